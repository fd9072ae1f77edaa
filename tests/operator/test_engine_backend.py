"""engine_backend against the stand-in engine: a real process, real sockets, the real sidecars.

The operator side publishes through ``build_placement_configmap`` (written to a directory as the
kubelet mounts a ConfigMap), the stand-in "moves" after a delay and reports through its sidecars.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from engine_standin import Standin
from moe_agent.engines import contract
from moe_operator import builders, engine_backend
from moe_operator.agents import AgentClient
from moe_operator.crd import resolve_spec
from moe_placement.baselines import linear_placement
from moe_placement.models import Placement

SHAPE = {"numLayers": 3, "numExperts": 8, "topK": 2, "hiddenSize": 64, "expertIntermediateSize": 32,
         "firstKDenseReplace": 1}
OWNER = {
    "apiVersion": "moeplace.io/v1alpha1",
    "kind": "MoEDeployment",
    "metadata": {"name": "demo", "namespace": "ns", "uid": "uid-1", "generation": 1},
}
TOKEN = "engine-test-token"
RESOLVED = resolve_spec({"model": {"shape": SHAPE}, "topology": {"nodes": 1, "gpusPerNode": 4},
                         "placement": {"redundantSlots": 4}})  # 4 GPUs x 3 slots


def publish(directory: Path, placement: Placement, generation: int) -> None:
    configmap = builders.build_placement_configmap(OWNER, placement, generation, "test", RESOLVED)
    contract.write_published(directory, configmap["data"])


def shifted(seed: int) -> Placement:
    """A placement of 8 experts in 12 slots (4 GPUs x 3), one slot per layer left empty; distinct
    seeds give distinct maps."""
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([rng.permutation(8), rng.integers(0, 8, 3), [-1]]) for _ in range(3)]
    return Placement(np.stack(rows), 8, 3)


def start_standin(tmp_path: Path, move_delay: float = 0.3, lagging: str = "") -> Standin:
    """A stand-in engine that starts on generation 1 (``shifted(0)``)."""
    standin = Standin(tmp_path, TOKEN, move_delay, lagging)
    publish(standin.placement_dir, shifted(0), 1)
    return standin.start()


@pytest.fixture(scope="module")
def shared_standin(tmp_path_factory):
    process = start_standin(tmp_path_factory.mktemp("standin"), move_delay=0.3)
    yield process
    process.stop()


@pytest.fixture
def standin(shared_standin):
    """The shared stand-in, back on generation 1 with every rank announced."""
    publish(shared_standin.placement_dir, shifted(0), 1)
    shared_standin.agents = dict(shared_standin.announced)
    assert isinstance(wait(shared_standin, shifted(0)), engine_backend.EngineLive)
    return shared_standin


@pytest.fixture
def lagging_standin(tmp_path):
    process = start_standin(tmp_path, move_delay=0.05, lagging="1,3")
    yield process
    process.stop()


def wait(standin: Standin, target: Placement, deadline_s: float = 10.0, token: str = TOKEN):
    async def go():
        client = AgentClient(token)
        try:
            return await engine_backend.wait_until_live(client, standin.agents, target, deadline_s, poll_s=0.05)
        finally:
            await client.close()

    return asyncio.run(go())


def test_engine_goes_live_with_the_filled_target_after_its_move(standin):
    first = wait(standin, shifted(0))
    assert isinstance(first, engine_backend.EngineLive) and set(first.ranks) == {0, 1, 2, 3}
    target = shifted(5)
    publish(standin.placement_dir, target, 2)
    outcome = wait(standin, target)
    assert isinstance(outcome, engine_backend.EngineLive), outcome
    assert outcome.ranks == {0: 2, 1: 2, 2: 2, 3: 2} and outcome.seconds >= 0.25  # the move delay
    filled = engine_backend.engine_map(target)
    assert (filled.physical_to_logical_map >= 0).all()
    status = contract.read_status(standin.engine_dir, 3)
    assert status.hash == outcome.expected_hash
    assert np.array_equal(status.physical_to_logical_map, filled.physical_to_logical_map)


def test_a_rank_that_never_moves_times_out_naming_it(lagging_standin):
    standin = lagging_standin
    assert isinstance(wait(standin, shifted(0)), engine_backend.EngineLive)
    publish(standin.placement_dir, shifted(2), 2)
    outcome = wait(standin, shifted(2), deadline_s=1.5)
    assert isinstance(outcome, engine_backend.EngineTimedOut), outcome
    old = engine_backend.engine_map(shifted(0))
    assert sorted(outcome.lagging) == [1, 3]
    assert all(str(engine_backend.EngineWait(None, {}, old, 1).expected_hash) in why for why in outcome.lagging.values())
    assert 1.0 <= outcome.seconds <= 3.0


def test_errors_that_waiting_cannot_fix_fail_at_once(standin):
    wrong_token = wait(standin, shifted(0), token="wrong")
    assert isinstance(wrong_token, engine_backend.EngineFailed) and "401" in wrong_token.message
    other_shape = Placement(linear_placement(3, 8, 16), 8, 4)  # 4 slots per GPU, the engine has 3
    outcome = wait(standin, other_shape)
    assert isinstance(outcome, engine_backend.EngineFailed) and "slots per GPU" in outcome.message


def test_a_rank_not_announced_lags_until_the_deadline(standin):
    standin.agents.pop(2)
    outcome = wait(standin, shifted(0), deadline_s=0.3)
    assert isinstance(outcome, engine_backend.EngineTimedOut) and outcome.lagging == {2: "not announced"}


def test_soak_many_generations_in_a_row(standin):
    for generation in range(2, 14):
        target = shifted(generation)
        publish(standin.placement_dir, target, generation)
        outcome = wait(standin, target)
        assert isinstance(outcome, engine_backend.EngineLive), (generation, outcome)
        assert set(outcome.ranks.values()) == {generation}


def test_the_operator_drives_an_engine_backend_without_copying_weights(tmp_path, monkeypatch):
    """The control loop with spec.serving.engineKind sglang and the stand-in engine (a real process):
    the gate accepts a new placement, the operator publishes it (the test mounts the ConfigMap's data
    where the engine reads it, as the kubelet would), never calls a stage or activation, and completes
    once every rank's sidecar reports the filled target; the next cycle sees it served."""
    from fake_kube import FakeKube

    from moe_operator import control, settings
    from moe_operator.metrics_source import MetricsReport
    from moe_operator.outcomes import CycleResult
    from moe_placement.models import placement_hash

    standin = Standin(tmp_path, TOKEN, move_delay=0.3)
    try:
        initial = Placement(linear_placement(3, 8, 12), 8, 3)
        publish(standin.placement_dir, initial, 0)
        standin.start()
        assert isinstance(wait(standin, initial, deadline_s=60), engine_backend.EngineLive)  # the engine is up
        spec = {
            "model": {"shape": SHAPE}, "topology": {"nodes": 1, "gpusPerNode": 4},
            "serving": {"engineKind": "sglang"},
            "placement": {"policy": "eplb_global", "redundantSlots": 4, "minPredictedGain": 0.01,
                          "evaluationBatches": 1,
                          "objective": {"prefill": "tokenImbalance", "decode": "tokenImbalance",
                                        "prefillRouter": "random", "decodeRouter": "random"}},
            "metrics": {"prometheusUrl": "http://prom.invalid:9090", "windowSeconds": 30},
        }
        kube = FakeKube({**OWNER, "spec": spec}, token=TOKEN)
        put = kube.put_configmap

        async def put_and_mount(configmap):
            await put(configmap)
            if configmap["metadata"]["name"] == "demo-placement":
                contract.write_published(standin.placement_dir, configmap["data"])

        kube.put_configmap = put_and_mount
        kube.endpoints["demo-agents"] = builders.build_external_endpoints(
            "demo", "ns", {rank: ("127.0.0.1", int(url.rsplit(":", 1)[1])) for rank, url in standin.announced.items()}
        )

        def skewed(*_args, **_kwargs):
            load = np.ones((3, 8)) * 10
            load[:, :2] = 400  # the hot experts share GPU 0 in the linear placement
            return load, MetricsReport(series=24, used=24), 3.0

        monkeypatch.setattr(control, "fetch_load", skewed)
        monkeypatch.setattr(settings, "_current", settings.OperatorSettings(agent_host_override=True))

        async def go():
            ctl = control.Controller(kube, pool=None)
            try:
                await ctl.reconcile(kube.body)
                first = await ctl.cycle("ns", "demo")
                second = await ctl.cycle("ns", "demo")
                return first, second
            finally:
                await ctl.close()

        first, second = asyncio.run(go())
        assert first.result == CycleResult.APPLIED, first
        status = kube.body["status"]
        assert status["migration"]["state"] == "Completed" and status["lastRebalanceTime"]
        published = builders.parse_placement_configmap(kube.configmaps["demo-placement"], 8, 3)[0]
        assert not np.array_equal(published.physical_to_logical_map, initial.physical_to_logical_map)
        expected = placement_hash(engine_backend.engine_map(published).physical_to_logical_map)
        assert status["migration"]["targetHash"] == expected
        assert contract.read_status(standin.engine_dir, 0).hash == expected
        assert second.result in (CycleResult.SKIPPED, CycleResult.APPLIED), second
    finally:
        standin.stop()
