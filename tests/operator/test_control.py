"""Controller.reconcile and Controller.cycle against an in-memory API and fake agents."""

from __future__ import annotations

import asyncio
import copy
import json

import numpy as np
import pytest

from fake_agents import TOKEN, FakeCluster
from moe_operator import builders, control
from moe_operator import metrics as om
from moe_operator.crd import SpecError
from moe_operator.kube import KubeError
from moe_operator.metrics_source import MetricsReport, MetricsUnavailable
from moe_placement.baselines import linear_placement
from moe_placement.models import placement_hash

SHAPE = {"name": "t", "numLayers": 4, "numExperts": 16, "topK": 2, "hiddenSize": 256, "expertIntermediateSize": 512}


def merge(target, patch):
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKube:
    def __init__(self, body):
        self.body = body
        self.configmaps: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.endpoints: dict[str, dict] = {}
        self.status_patches: list[dict] = []

    async def get_deployment(self, namespace, name):
        return copy.deepcopy(self.body)

    async def patch_status(self, namespace, name, status):
        self.status_patches.append(copy.deepcopy(dict(status)))
        self.body.setdefault("status", {})
        merge(self.body["status"], dict(status))

    async def get_configmap(self, namespace, name):
        return copy.deepcopy(self.configmaps.get(name))

    async def put_configmap(self, body):
        self.configmaps[body["metadata"]["name"]] = copy.deepcopy(body)
        return body

    async def delete_configmap(self, namespace, name):
        self.configmaps.pop(name, None)

    async def ensure_service(self, body):
        self.services[body["metadata"]["name"]] = copy.deepcopy(body)

    async def get_endpoints(self, namespace, name):
        return copy.deepcopy(self.endpoints.get(name))

    async def get_secret_value(self, namespace, name, key):
        return TOKEN

    async def ensure_statefulset(self, body):
        raise AssertionError("no engine in these tests")

    async def get_workload(self, namespace, kind, name):
        return None

    async def ensure_custom(self, body, plural):
        return False


def body(**spec_extra):
    spec = {
        "model": {"shape": SHAPE},
        "topology": {"nodes": 2, "gpusPerNode": 2},
        "placement": {"policy": "eplb_global", "redundantSlots": 4, "minPredictedGain": 0.01, "evaluationBatches": 1,
                      "objective": {"prefill": "tokenImbalance", "decode": "tokenImbalance",
                                    "prefillRouter": "random", "decodeRouter": "random"}},
        "migration": {"maxStepsInFlight": 3, "stepRetries": 1},
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


@pytest.fixture
def stack(planner, monkeypatch):
    def make(**spec_extra):
        kube = FakeKube(body(**spec_extra))
        cluster = FakeCluster(linear_placement(4, 16, 20), 16, 5)
        monkeypatch.setattr(control, "fetch_load", skewed_load)
        ctl = control.Controller(kube, pool=None, agent_token=TOKEN)
        return kube, cluster, ctl

    return make


def announce(kube, cluster):
    kube.endpoints["demo-agents"] = builders.build_external_endpoints(
        "demo", "ns", {rank: ("127.0.0.1", int(url.rsplit(":", 1)[1])) for rank, url in cluster.urls.items()}
    )


def conditions(kube):
    return {c["type"]: c for c in kube.body["status"]["conditions"]}


def test_reconcile_publishes_initial_placement_and_owned_objects(stack):
    kube, cluster, ctl = stack()
    assert asyncio.run(ctl.reconcile(kube.body)) == "reconciled"
    assert "demo-agents" in kube.services
    cm = kube.configmaps["demo-placement"]
    assert cm["data"]["generation"] == "0" and cm["metadata"]["ownerReferences"][0]["uid"] == "u1"
    status = kube.body["status"]
    assert status["phase"] == "Ready" and status["gpus"] == 4 and status["observedGeneration"] == 1
    assert status["placement"]["policy"] == "initial" and status["placement"]["confirmed"] is False
    assert conditions(kube)["Ready"]["status"] == "True"
    assert all("" not in c.values() for c in status["conditions"]), "no empty strings (1.20 reads them as null)"
    # Idempotent: a second reconcile changes nothing.
    asyncio.run(ctl.reconcile(kube.body))
    assert kube.configmaps["demo-placement"] == cm


def test_invalid_spec_is_marked_with_the_field(stack):
    kube, _, ctl = stack(placement={"redundantSlots": 3})
    with pytest.raises(SpecError):
        asyncio.run(ctl.reconcile(kube.body))
    status = kube.body["status"]
    assert status["phase"] == "Invalid" and status["message"].startswith("spec.placement.redundantSlots:")
    assert conditions(kube)["Ready"]["reason"] == "InvalidSpec"
    assert asyncio.run(ctl.cycle("ns", "demo")) == "invalid"


def test_cycle_rebalances_a_skewed_load(stack):
    kube, cluster, ctl = stack()

    async def main():
        await cluster.start()
        try:
            announce(kube, cluster)
            await ctl.reconcile(kube.body)
            assert await ctl.cycle("ns", "demo") == "applied"
            status = kube.body["status"]
            assert status["migration"]["state"] == "Completed" and status["migration"]["stage"] == status["migration"]["stages"]
            assert status["lastRebalanceTime"] and status["phase"] == "Ready"
            cm = kube.configmaps["demo-placement"]
            mapping = json.loads(cm["data"][builders.PLACEMENT_KEY])["physical_to_logical_map"]
            assert cluster.maps() == {placement_hash(np.asarray(mapping))}
            assert {agent.generation for agent in cluster.agents} == {int(cm["data"]["generation"])}
            assert status["placement"]["generation"] == int(cm["data"]["generation"])
            assert "demo-migration" not in kube.configmaps
            assert cluster.violations == []
            # The next cycle measures the new placement and (same load) keeps it.
            result = await ctl.cycle("ns", "demo")
            assert result == "skipped", result
            assert kube.body["status"]["imbalance"] < 1.3
            assert conditions(kube)["Balanced"]["status"] == "True"
            value = om.REGISTRY.get_sample_value(
                "moeplace_operator_rebalances_total", {"namespace": "ns", "deployment": "demo", "result": "applied"}
            )
            assert value >= 1
        finally:
            await ctl.close()
            await cluster.stop()

    asyncio.run(main())


def test_prometheus_down_changes_nothing(stack, monkeypatch):
    kube, cluster, ctl = stack()

    def down(*_args, **_kwargs):
        raise MetricsUnavailable("PrometheusUnavailable", "http://prom.invalid:9090: connection refused")

    async def main():
        await cluster.start()
        try:
            announce(kube, cluster)
            await ctl.reconcile(kube.body)
            monkeypatch.setattr(control, "fetch_load", down)
            before = copy.deepcopy(kube.configmaps["demo-placement"])
            assert await ctl.cycle("ns", "demo") == "metrics unavailable"
            assert conditions(kube)["MetricsAvailable"]["status"] == "False"
            assert conditions(kube)["MetricsAvailable"]["reason"] == "PrometheusUnavailable"
            assert kube.configmaps["demo-placement"] == before
            assert {agent.generation for agent in cluster.agents} == {0}
        finally:
            await ctl.close()
            await cluster.stop()

    asyncio.run(main())


def test_paused_and_missing_agents(stack):
    kube, cluster, ctl = stack(placement={"paused": True})

    async def main():
        await cluster.start()
        try:
            await ctl.reconcile(kube.body)
            assert await ctl.cycle("ns", "demo") == "no agents"
            assert conditions(kube)["Degraded"]["reason"] == "NoAgents"
            announce(kube, cluster)
            kube.endpoints["demo-agents"]["subsets"][0]["ports"].pop()
            assert await ctl.cycle("ns", "demo") == "agents unavailable"
            assert kube.body["status"]["phase"] == "Degraded"
            announce(kube, cluster)
            assert await ctl.cycle("ns", "demo") == "paused"
            assert kube.body["status"]["phase"] == "Ready"
            assert {agent.generation for agent in cluster.agents} == {0}
        finally:
            await ctl.close()
            await cluster.stop()

    asyncio.run(main())


def test_restarted_operator_resumes_a_recorded_migration(stack):
    kube, cluster, ctl = stack()

    async def main():
        await cluster.start()
        try:
            announce(kube, cluster)
            await ctl.reconcile(kube.body)
            # The first operator stops after one stage (as if killed at the stage boundary)...
            calls = {"n": 0}

            def stop_soon():
                calls["n"] += 1
                return True

            original = control.Controller._run_migration

            async def crash_after_first_stage(self, ctx, *args, **kwargs):
                should_stop = args[-1] if args else kwargs["should_stop"]
                del should_stop
                args = list(args)
                args[-1] = stop_soon
                return await original(self, ctx, *args, **kwargs)

            control.Controller._run_migration = crash_after_first_stage
            try:
                result = await ctl.cycle("ns", "demo")
            finally:
                control.Controller._run_migration = original
            assert result == "interrupted"
            status = kube.body["status"]
            assert status["migration"]["state"] == "Interrupted" and status["migration"]["stage"] == 1
            # ...an interrupted migration publishes the intermediate map the agents serve.
            cm = kube.configmaps["demo-placement"]
            mapping = np.asarray(json.loads(cm["data"][builders.PLACEMENT_KEY])["physical_to_logical_map"])
            assert cluster.maps() == {placement_hash(mapping)}
            # A migration recorded as Running (operator killed mid-stage) is resumed first.
            assert await ctl.cycle("ns", "demo") == "applied"
            kube.body["status"]["migration"]["state"] = "Running"
            kube.body["status"]["migration"]["stage"] = 0
            target = kube.configmaps["demo-placement"]
            source = copy.deepcopy(target)
            kube.configmaps["demo-migration"] = builders.build_migration_configmap(
                kube.body, kube.body["status"]["migration"]["planId"],
                builders.parse_placement_configmap(source, 16, 5)[0],
                builders.parse_placement_configmap(target, 16, 5)[0], 0, "eplb", 3,
            )
            assert await ctl.cycle("ns", "demo") == "applied"  # nothing left to do: every step skips
            assert kube.body["status"]["migration"]["state"] == "Completed"
            assert cluster.violations == []
        finally:
            await ctl.close()
            await cluster.stop()

    asyncio.run(main())


def test_kube_errors_become_retries(stack):
    kube, _, ctl = stack()

    async def broken(*_args, **_kwargs):
        raise KubeError("create service ns/demo-agents", 403, "forbidden")

    kube.ensure_service = broken
    with pytest.raises(control.Retry):
        asyncio.run(ctl.reconcile(kube.body))


def _crash(_request):
    import os

    os._exit(3)


def test_a_dead_solver_worker_is_replaced(stack, monkeypatch):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    kube, cluster, _ = stack()

    def factory():
        return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))

    ctl = control.Controller(kube, pool=factory(), agent_token=TOKEN, pool_factory=factory)
    monkeypatch.setattr(control, "solve_and_gate", _crash)
    first = ctl.pool

    async def main():
        await cluster.start()
        try:
            announce(kube, cluster)
            await ctl.reconcile(kube.body)
            assert await ctl.cycle("ns", "demo") == "solver failed"
            assert "worker replaced" in kube.body["status"]["message"]
            assert ctl.pool is not first
        finally:
            await ctl.close()
            await cluster.stop()
            ctl.pool.shutdown()

    asyncio.run(main())


def test_a_deleted_placement_configmap_is_recreated_from_the_agents(stack):
    kube, cluster, ctl = stack()

    async def main():
        await cluster.start()
        try:
            announce(kube, cluster)
            await ctl.reconcile(kube.body)
            assert await ctl.cycle("ns", "demo") == "applied"
            live = cluster.maps()
            generation = cluster.agents[0].generation
            del kube.configmaps["demo-placement"]
            assert await ctl.cycle("ns", "demo") == "pending"
            cm = kube.configmaps["demo-placement"]
            assert cm["data"]["hash"] in live and int(cm["data"]["generation"]) == generation
            assert cm["data"]["policy"] == "adopted"
        finally:
            await ctl.close()
            await cluster.stop()

    asyncio.run(main())
