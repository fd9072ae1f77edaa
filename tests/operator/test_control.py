"""Controller.reconcile and Controller.cycle against an in-memory API and fake agents."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest

from fake_agents import FakeCluster
from fake_kube import FakeKube
from moe_operator import builders, control, settings
from moe_operator import metrics as om
from moe_operator.agents import AgentError
from moe_operator.crd import SpecError
from moe_operator.discovery import KeyedAgents
from moe_operator.kube import KubeError
from moe_operator.metrics_source import MetricsReport, MetricsUnavailable
from moe_operator.outcomes import CycleResult
from moe_operator.plan_runner import AgentsView, GroupLayout
from moe_placement.baselines import linear_placement
from moe_placement.models import placement_hash

pytestmark = pytest.mark.anyio

SHAPE = {"name": "t", "numLayers": 4, "numExperts": 16, "topK": 2, "hiddenSize": 256, "expertIntermediateSize": 512}


def body(**spec_extra):
    spec = {
        "model": {"shape": SHAPE},
        "topology": {"nodes": 2, "gpusPerNode": 2},
        "placement": {"policy": "eplb_global", "redundantSlots": 4, "minPredictedGain": 0.01, "evaluationBatches": 1,
                      "objective": {"prefill": "tokenImbalance", "decode": "tokenImbalance",
                                    "prefillRouter": "random", "decodeRouter": "random"}},
        "migration": {"maxCopiesPerStage": 3, "stepRetries": 1},
        "metrics": {"prometheusUrl": "http://prom.invalid:9090", "windowSeconds": 30},
    }
    for key, value in spec_extra.items():
        spec.setdefault(key, {}).update(value)
    return {
        "apiVersion": "moeplace.io/v1alpha1", "kind": "MoEDeployment",
        "metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": spec,
    }


def skewed_load(*_args, **_kwargs):
    load = np.ones((4, 16)) * 10
    load[:, :4] = 400  # the hot experts all sit on GPU 0 in the linear placement
    return load, MetricsReport(series=64, used=64), 4.0


def shifted_load(hot: int):
    """A load with one very hot expert, ``hot`` (it needs replicas on every GPU, so each shift calls
    for another placement)."""

    def fetch(*_args, **_kwargs):
        load = np.ones((4, 16)) * 10
        load[:, hot] = 1000
        return load, MetricsReport(series=64, used=64), 4.0

    return fetch


@dataclass
class Stack:
    kube: FakeKube
    cluster: FakeCluster
    ctl: control.Controller
    events: list[tuple[str, str, str]]

    def announce(self) -> None:
        self.kube.endpoints["demo-agents"] = builders.build_external_endpoints(
            "demo", "ns", {rank: ("127.0.0.1", int(url.rsplit(":", 1)[1])) for rank, url in self.cluster.urls.items()}
        )

    def conditions(self) -> dict[str, dict]:
        return {c["type"]: c for c in self.kube.body["status"]["conditions"]}

    def published(self) -> tuple[np.ndarray, int]:
        cm = self.kube.configmaps["demo-placement"]
        return np.asarray(json.loads(cm["data"][builders.PLACEMENT_KEY])["physical_to_logical_map"]), int(cm["data"]["generation"])

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.events]


@pytest.fixture
async def make_stack(monkeypatch):
    """``await make_stack(**spec_sections)``: fake API, four started fake agents, a controller."""
    made: list[Stack] = []

    async def make(**spec_extra) -> Stack:
        kube = FakeKube(body(**spec_extra))
        cluster = FakeCluster(linear_placement(4, 16, 20), 16, 5)
        monkeypatch.setattr(control, "fetch_load", skewed_load)
        monkeypatch.setattr(settings, "_current", settings.OperatorSettings(agent_host_override=True))
        events: list[tuple[str, str, str]] = []
        ctl = control.Controller(
            kube, pool=None, event=lambda _body, kind, reason, message: events.append((kind, reason, message))
        )
        await cluster.start()
        made.append(Stack(kube, cluster, ctl, events))
        return made[-1]

    yield make
    for stack in made:
        await stack.ctl.close()
        await stack.cluster.stop()


async def test_reconcile_publishes_initial_placement_and_owned_objects(make_stack):
    stack = await make_stack()
    kube = stack.kube
    assert await stack.ctl.reconcile(kube.body) == "reconciled"
    assert "demo-agents" in kube.services
    cm = kube.configmaps["demo-placement"]
    assert cm["data"]["generation"] == "0" and cm["metadata"]["ownerReferences"][0]["uid"] == "u1"
    status = kube.body["status"]
    assert status["phase"] == "Ready" and status["gpus"] == 4 and status["observedGeneration"] == 1
    assert status["placement"]["policy"] == "initial" and status["placement"]["confirmed"] is False
    assert stack.conditions()["Ready"]["status"] == "True"
    assert all("" not in c.values() for c in status["conditions"]), "no empty strings (1.20 reads them as null)"
    # Idempotent: a second reconcile changes nothing.
    await stack.ctl.reconcile(kube.body)
    assert kube.configmaps["demo-placement"] == cm


async def test_invalid_spec_is_marked_with_the_field(make_stack):
    stack = await make_stack(placement={"redundantSlots": 3})
    with pytest.raises(SpecError):
        await stack.ctl.reconcile(stack.kube.body)
    status = stack.kube.body["status"]
    assert status["phase"] == "Invalid" and status["message"].startswith("spec.placement.redundantSlots:")
    assert stack.conditions()["Ready"]["reason"] == "InvalidSpec"
    assert (await stack.ctl.cycle("ns", "demo")).result == CycleResult.INVALID


async def test_cycle_rebalances_a_skewed_load(make_stack):
    stack = await make_stack()
    kube, cluster, ctl = stack.kube, stack.cluster, stack.ctl
    stack.announce()
    await ctl.reconcile(kube.body)
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.APPLIED
    status = kube.body["status"]
    assert status["migration"]["state"] == "Completed" and status["migration"]["stage"] == status["migration"]["stages"]
    assert status["migration"]["policy"] == "eplb_global" and status["migration"]["solverStatus"]
    assert status["lastRebalanceTime"] and status["phase"] == "Ready"
    mapping, generation = stack.published()
    assert cluster.maps() == {placement_hash(mapping)}
    assert {agent.generation for agent in cluster.agents} == {generation}
    assert status["placement"]["generation"] == generation
    assert "demo-migration" not in kube.configmaps
    assert cluster.violations == []
    # The next cycle measures the new placement and (same load) keeps it.
    outcome = await ctl.cycle("ns", "demo")
    assert outcome.result == CycleResult.SKIPPED, outcome
    assert outcome.retry_after is None
    assert kube.body["status"]["imbalance"] < 1.3
    assert stack.conditions()["Balanced"]["status"] == "True"
    value = om.REGISTRY.get_sample_value(
        "moeplace_operator_rebalances_total", {"namespace": "ns", "deployment": "demo", "result": "applied"}
    )
    assert value >= 1


async def test_many_migrations_in_one_process_through_alternating_shifts(make_stack, monkeypatch):
    """Each shift moves the hot experts and back; every migration completes (request ids never repeat
    across plans, so no agent answers a step with another plan's remembered answer)."""
    stack = await make_stack()
    stack.announce()
    await stack.ctl.reconcile(stack.kube.body)
    for number in range(8):
        monkeypatch.setattr(control, "fetch_load", shifted_load(0 if number % 2 == 0 else 9))
        outcome = await stack.ctl.cycle("ns", "demo")
        assert outcome.result == CycleResult.APPLIED, (number, outcome)
        mapping, generation = stack.published()
        assert stack.cluster.maps() == {placement_hash(mapping)}
        assert not any(state == "staged" for agent in stack.cluster.agents for _, state in agent.slots.values())
    assert "MigrationRolledBack" not in stack.reasons()
    assert stack.cluster.violations == []


async def test_a_failed_migration_returns_to_the_exact_source_map(make_stack, planner):
    """A stage fails after earlier stages changed the map: the agents go back to the map from before
    the migration, which is published as RolledBack, not as a rebalance."""
    stack = await make_stack(migration={"maxCopiesPerStage": 2, "stepRetries": 1})
    kube, cluster, ctl = stack.kube, stack.cluster, stack.ctl
    stack.announce()
    await ctl.reconcile(kube.body)
    source, _ = stack.published()
    failing = {"armed": True}
    original_record = control.Rollout._runner

    def arm_after_first_stage(self, ctx, persist, should_stop):
        async def persist_and_arm(state):
            await persist(state)
            if state.stage >= 2 and failing["armed"]:
                failing["armed"] = False
                for agent in cluster.agents:
                    agent.fail_stage = 100
        return original_record(self, ctx, persist_and_arm, should_stop)

    control.Rollout._runner = arm_after_first_stage
    try:
        outcome = await ctl.cycle("ns", "demo")
        assert outcome.result == CycleResult.ROLLING_BACK, outcome
        for agent in cluster.agents:
            agent.fail_stage = 0
        outcome = await ctl.cycle("ns", "demo")
    finally:
        control.Rollout._runner = original_record
    assert outcome.result == CycleResult.ROLLED_BACK, outcome
    status = kube.body["status"]
    assert status["migration"]["state"] == "RolledBack" and status["migration"]["rollbackOf"]
    assert "lastRebalanceTime" not in status
    mapping, generation = stack.published()
    assert np.array_equal(mapping, source), "exactly the map from before the migration"
    assert cluster.maps() == {placement_hash(source)}
    assert {agent.generation for agent in cluster.agents} == {generation}
    assert not any(state == "staged" for agent in cluster.agents for _, state in agent.slots.values())
    assert "MigrationRolledBack" in stack.reasons() and "MigrationCompleted" not in stack.reasons()
    assert stack.conditions()["Degraded"]["reason"] == "MigrationRolledBack"
    assert cluster.violations == []
    # The next cycle finds the agents healthy and rebalances for real.
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.APPLIED


async def test_a_rollback_waits_for_healthy_agents_and_leaks_nothing(make_stack):
    """While copies keep failing, the rollback stays Running (resumed every cycle), the published map
    is the one the agents serve, and no staged slot is left; once copies work it completes."""
    stack = await make_stack()
    stack.announce()
    await stack.ctl.reconcile(stack.kube.body)
    source, _ = stack.published()
    for agent in stack.cluster.agents:
        agent.fail_stage = 10_000
    for _ in range(3):
        outcome = await stack.ctl.cycle("ns", "demo")
        if outcome.result == CycleResult.ROLLED_BACK:
            break  # the plan's first stage with copies came first: nothing had changed yet
        assert outcome.result == CycleResult.ROLLING_BACK and outcome.retry_after is not None, outcome
        migration = stack.kube.body["status"]["migration"]
        assert migration["state"] == "Running" and migration["rollbackOf"]
        assert stack.conditions()["Degraded"]["reason"] == "MigrationRollingBack"
        assert stack.cluster.maps() == {placement_hash(stack.published()[0])}
        assert not any(state == "staged" for agent in stack.cluster.agents for _, state in agent.slots.values())
    for agent in stack.cluster.agents:
        agent.fail_stage = 0
    if outcome.result != CycleResult.ROLLED_BACK:
        outcome = await stack.ctl.cycle("ns", "demo")
    assert outcome.result == CycleResult.ROLLED_BACK, outcome
    assert np.array_equal(stack.published()[0], source)
    assert "lastRebalanceTime" not in stack.kube.body["status"]
    assert stack.cluster.violations == []


async def test_layers_without_metrics_keep_their_placement(make_stack, monkeypatch):
    stack = await make_stack()
    stack.announce()
    await stack.ctl.reconcile(stack.kube.body)
    before, _ = stack.published()

    def layer_two_silent(*_args, **_kwargs):
        load, report, activated = skewed_load()
        load[2] = 0
        report.missing_layers = [2]
        return load, report, activated

    monkeypatch.setattr(control, "fetch_load", layer_two_silent)
    assert (await stack.ctl.cycle("ns", "demo")).result == CycleResult.APPLIED
    after, _ = stack.published()
    assert np.array_equal(after[2], before[2]) and not np.array_equal(after, before)


async def test_prometheus_down_changes_nothing(make_stack, monkeypatch):
    stack = await make_stack()
    kube, cluster, ctl = stack.kube, stack.cluster, stack.ctl

    def down(*_args, **_kwargs):
        raise MetricsUnavailable("PrometheusUnavailable", "http://prom.invalid:9090: connection refused")

    stack.announce()
    await ctl.reconcile(kube.body)
    monkeypatch.setattr(control, "fetch_load", down)
    before = copy.deepcopy(kube.configmaps["demo-placement"])
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.METRICS_UNAVAILABLE
    assert stack.conditions()["MetricsAvailable"]["status"] == "False"
    assert stack.conditions()["MetricsAvailable"]["reason"] == "PrometheusUnavailable"
    assert kube.configmaps["demo-placement"] == before
    assert {agent.generation for agent in cluster.agents} == {0}


async def test_paused_and_missing_agents(make_stack):
    stack = await make_stack(placement={"paused": True})
    kube, cluster, ctl = stack.kube, stack.cluster, stack.ctl
    await ctl.reconcile(kube.body)
    outcome = await ctl.cycle("ns", "demo")
    assert outcome.result == CycleResult.NO_AGENTS and outcome.retry_after is not None
    assert stack.conditions()["Degraded"]["reason"] == "NoAgents"
    stack.announce()
    kube.endpoints["demo-agents"]["subsets"][0]["ports"].pop()
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.AGENTS_UNAVAILABLE
    assert kube.body["status"]["phase"] == "Degraded"
    stack.announce()
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.PAUSED
    assert kube.body["status"]["phase"] == "Ready"
    assert {agent.generation for agent in cluster.agents} == {0}


async def test_restarted_operator_resumes_a_recorded_migration(make_stack):
    stack = await make_stack()
    kube, cluster, ctl = stack.kube, stack.cluster, stack.ctl
    stack.announce()
    await ctl.reconcile(kube.body)
    # The first operator stops after one stage (as if stopped at the stage boundary)...
    outcome = await ctl.cycle("ns", "demo", should_stop=lambda: True)
    assert outcome.result == CycleResult.INTERRUPTED
    status = kube.body["status"]
    assert status["migration"]["state"] == "Interrupted" and status["migration"]["stage"] == 1
    assert "lastRebalanceTime" not in status, "a partial map is not a rebalance"
    # ...an interrupted migration publishes the intermediate map the agents serve.
    mapping, _ = stack.published()
    assert cluster.maps() == {placement_hash(mapping)}
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.APPLIED
    # A migration recorded as Running (operator killed mid-stage) is resumed first.
    kube.body["status"]["migration"]["state"] = "Running"
    kube.body["status"]["migration"]["stage"] = 0
    target = builders.parse_placement_configmap(kube.configmaps["demo-placement"], 16, 5)[0]
    kube.configmaps["demo-migration"] = builders.build_migration_configmap(
        kube.body,
        builders.MigrationRecord(
            plan_id=kube.body["status"]["migration"]["planId"], policy="eplb", max_copies_per_stage=3,
            source=target.physical_to_logical_map.tolist(), target=target.physical_to_logical_map.tolist(),
        ),
    )
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.APPLIED  # nothing left to do: every step skips
    assert kube.body["status"]["migration"]["state"] == "Completed"
    assert "MigrationResumed" in stack.reasons()
    assert cluster.violations == []


async def test_kube_errors_become_retries(make_stack):
    stack = await make_stack()

    async def broken(*_args, **_kwargs):
        raise KubeError("create service ns/demo-agents", 403, "forbidden")

    stack.kube.ensure_service = broken
    with pytest.raises(control.Retry):
        await stack.ctl.reconcile(stack.kube.body)


def _crash(_request):
    import os

    os._exit(3)


async def test_a_dead_solver_worker_is_replaced(make_stack, monkeypatch):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    stack = await make_stack()

    def factory():
        return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))

    ctl = control.Controller(stack.kube, pool=factory(), pool_factory=factory)
    monkeypatch.setattr(control, "solve_and_gate", _crash)
    first = ctl.pool
    try:
        stack.announce()
        await ctl.reconcile(stack.kube.body)
        assert (await ctl.cycle("ns", "demo")).result == CycleResult.SOLVER_FAILED
        assert "worker replaced" in stack.kube.body["status"]["message"]
        assert ctl.pool is not first
    finally:
        await ctl.close()
        ctl.pool.shutdown()


async def test_a_deleted_placement_configmap_is_recreated_from_the_agents(make_stack):
    stack = await make_stack()
    kube, cluster, ctl = stack.kube, stack.cluster, stack.ctl
    stack.announce()
    await ctl.reconcile(kube.body)
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.APPLIED
    live = cluster.maps()
    generation = cluster.agents[0].generation
    del kube.configmaps["demo-placement"]
    assert (await ctl.cycle("ns", "demo")).result == CycleResult.PENDING
    cm = kube.configmaps["demo-placement"]
    assert cm["data"]["hash"] in live and int(cm["data"]["generation"]) == generation
    assert cm["data"]["policy"] == "adopted"


async def test_an_agent_restarted_mid_rollback_is_brought_back_in(make_stack):
    """An agent restarts (generation 0, its weights reloaded from the published map) while a rollback
    waits: the rollback completes with it."""
    stack = await make_stack()
    stack.announce()
    await stack.ctl.reconcile(stack.kube.body)
    source, _ = stack.published()
    for agent in stack.cluster.agents:
        agent.fail_stage = 10_000
    outcome = await stack.ctl.cycle("ns", "demo")
    if outcome.result == CycleResult.ROLLED_BACK:
        pytest.skip("the plan's first stage with copies came first: nothing to diverge from")
    assert outcome.result == CycleResult.ROLLING_BACK, outcome
    for agent in stack.cluster.agents:
        agent.fail_stage = 0
    published, _ = stack.published()
    restarted = stack.cluster.agents[2]
    restarted.map, restarted.generation, restarted.retired = np.array(published), 0, {}
    restarted.slots = {
        (layer, slot): (int(published[layer, slot]), "live")
        for layer in range(published.shape[0]) for slot in range(10, 15) if published[layer, slot] >= 0
    }
    outcome = await stack.ctl.cycle("ns", "demo")
    assert outcome.result == CycleResult.ROLLED_BACK, outcome
    assert np.array_equal(stack.published()[0], source)
    assert stack.cluster.maps() == {placement_hash(source)}
    assert stack.cluster.violations == []


def test_agent_problems_name_the_group_and_rank():
    layout = GroupLayout(ranks=2, groups=2)
    announced = KeyedAgents({0: "a", 1: "b", 3: "d"}, layout, ("group 2 rank 0",))
    view = AgentsView({}, errors={1: AgentError("b", "placement", 0, "refused")})
    assert control._agent_problems(announced, view) == [
        "group 1 rank 0 not announced",
        "group 2 rank 0 outside the 2 groups of 2 GPUs",
        "unreachable: group 0 rank 1 (refused)",
    ]
    # One group: the messages as they always were.
    single = KeyedAgents({0: "a", 2: "c"}, GroupLayout(ranks=2))
    assert control._agent_problems(single, AgentsView({})) == ["ranks [1] not announced", "ranks [2] beyond the 2 GPUs"]
@pytest.fixture
async def request_router():
    """A real ``moeplace router`` service (in this process, on a real socket) for the stack's 2x2
    topology of 4 layers x 16 experts, top-2; its backends are never called here."""
    from aiohttp import web
    from moe_placement.models import Topology
    from moe_placement.presets import gpu_preset
    from moe_placement.request_routing import RequestRouter
    from moe_router.service import BackendSet, RouterService

    topology = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=5, gpu=gpu_preset("h100"))
    router = RequestRouter(topology, 4, 16)
    service = RouterService(router, BackendSet.by_header("http://127.0.0.1:9", 4))
    runner = web.AppRunner(service.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield router, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def _group_signature(experts: list[int]) -> np.ndarray:
    """A signature [4, 16] whose every token chooses ``experts`` (two) at every layer."""
    signature = np.zeros((4, 16))
    signature[:, experts] = 1.0
    return signature


async def test_router_groups_drive_the_solve(make_stack, request_router):
    """With spec.placement.routerUrl the cycle places by the router's groups, records them, solves
    nothing while they stay put (and the load is balanced), and re-solves once they drift."""
    router, url = request_router
    for _ in range(3):
        router.learn(_group_signature([0, 1]))
        router.learn(_group_signature([8, 9]))
    stack = await make_stack(
        placement={"policy": "grouped", "routerUrl": url, "groupDriftThreshold": 0.1},
        alerts={"imbalanceThreshold": 100},
    )
    stack.announce()
    await stack.ctl.reconcile(stack.kube.body)
    first = await stack.ctl.cycle("ns", "demo")
    assert first.result in (CycleResult.APPLIED, CycleResult.SKIPPED), first
    recorded = stack.kube.body["status"]["routerGroups"]
    assert recorded["groups"] == 2 and recorded["trigger"] == "first seen" and recorded["drift"] == 1.0
    assert np.isclose(np.sum(recorded["demand"]), 1.0)

    unchanged = await stack.ctl.cycle("ns", "demo")
    assert unchanged.result == CycleResult.GROUPS_UNCHANGED, unchanged
    assert stack.kube.body["status"]["lastCycleResult"] == "groups unchanged"
    assert stack.kube.body["status"]["routerGroups"]["demand"] == recorded["demand"]

    for _ in range(6):  # a third group, as busy as the other two together
        router.learn(_group_signature([12, 13]))
    drifted = await stack.ctl.cycle("ns", "demo")
    assert drifted.result in (CycleResult.APPLIED, CycleResult.SKIPPED), drifted
    after = stack.kube.body["status"]["routerGroups"]
    assert after["groups"] == 3 and after["trigger"] == "drifted" and after["drift"] >= 0.1
    assert "RouterGroupsDrifted" in stack.reasons()
    assert stack.cluster.violations == []


async def test_an_unreachable_router_leaves_the_cycle_as_before(make_stack):
    stack = await make_stack(placement={"routerUrl": "http://127.0.0.1:9"})
    stack.announce()
    await stack.ctl.reconcile(stack.kube.body)
    assert (await stack.ctl.cycle("ns", "demo")).result == CycleResult.APPLIED
    assert "RouterUnavailable" in stack.reasons() and "routerGroups" not in stack.kube.body["status"]
