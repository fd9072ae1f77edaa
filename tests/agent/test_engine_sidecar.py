"""The engine sidecar on real sockets: the agent contract from an engine's status file, and the
engines' loads (SGLang recorder dumps, vLLM's loads file) as moeplace_expert_tokens_total."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from moe_agent.engines import contract
from moe_agent.engines.sidecar import EngineSidecar, start
from moe_agent.tokens import TokenSource
from moe_operator import builders
from moe_operator.crd import resolve_spec
from moe_placement.baselines import linear_placement
from moe_placement.models import Placement

SHAPE = {"numLayers": 3, "numExperts": 8, "topK": 2, "hiddenSize": 64, "expertIntermediateSize": 32,
         "firstKDenseReplace": 1}
OWNER = {"apiVersion": "moeplace.io/v1alpha1", "kind": "MoEDeployment",
         "metadata": {"name": "demo", "namespace": "ns", "uid": "uid-1", "generation": 1}}
RESOLVED = resolve_spec({"model": {"shape": SHAPE}, "topology": {"nodes": 1, "gpusPerNode": 2},
                         "placement": {"redundantSlots": 2}})  # 2 GPUs x 5 slots
PLACEMENT = Placement(linear_placement(3, 8, 10), 8, 5)  # experts 0, 1 have two replicas


def setup_dirs(tmp_path):
    configmap = builders.build_placement_configmap(OWNER, PLACEMENT, 4, "test", RESOLVED)
    contract.write_published(tmp_path / "placement", configmap["data"])
    for rank in (0, 1):
        contract.write_status(tmp_path / "engine", contract.EngineStatus.of(
            "sglang", rank, 4, "published", PLACEMENT.physical_to_logical_map))
    return tmp_path / "placement", tmp_path / "engine"


async def scrape(sidecar: EngineSidecar) -> tuple[dict, dict]:
    runner = await start(sidecar, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as session:
            async with session.get(url + "/v1/placement") as response:
                assert response.status == 200
                answer = await response.json()
            async with session.get(url + "/metrics") as response:
                text = await response.text()
    finally:
        await runner.cleanup()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == "moeplace_expert_tokens":
            for sample in family.samples:
                labels = sample.labels
                counts[(int(labels["rank"]), int(labels["layer"]), int(labels["expert"]))] = sample.value
    return answer, counts


def test_sglang_dumps_become_every_ranks_share_of_the_global_load(tmp_path):
    placement_dir, engine_dir = setup_dirs(tmp_path)
    rng = np.random.default_rng(0)
    total = np.zeros((4, 8))
    for step in range(2):
        # _StatAccumulator.dump (sglang/srt/eplb/expert_distribution.py): logical_count
        # [buffered steps, num_hidden_layers, E] int32, all-reduced, saved by rank 0
        logical_count = torch.from_numpy(rng.integers(0, 50, (5, 4, 8))).to(torch.int32)
        total += logical_count.sum(0).numpy()
        torch.save({"rank": 0, "logical_count": logical_count, "average_utilization_rate_over_window": None},
                   engine_dir / f"expert_distribution_recorder_{1700000000 + step}.pt")
    sidecar = EngineSidecar(0, TokenSource(value="t"), placement_dir, engine_dir, loads="sglang-dumps")
    sidecar.poll_loads()
    assert not list(engine_dir.glob("*.pt"))  # consumed
    answer, counts = asyncio.run(scrape(sidecar))
    assert answer["generation"] == 4 and answer["num_layers"] == 3 and len(answer["slots"]) == 15
    global_load = np.zeros((3, 8))
    for (rank, layer, expert), value in counts.items():
        global_load[layer, expert] += value
    np.testing.assert_allclose(global_load, total[1:])  # the dense layer 0 dropped
    # expert 0 has a replica on each rank: its count is split between them
    assert counts[(0, 0, 0)] == counts[(1, 0, 0)] == total[1, 0] / 2


def test_vllm_loads_file_exports_this_ranks_share_of_each_new_window(tmp_path):
    placement_dir, engine_dir = setup_dirs(tmp_path)
    sidecar = EngineSidecar(1, TokenSource(value="t"), placement_dir, engine_dir, loads="vllm")
    window = np.arange(24, dtype=np.float64).reshape(3, 8)
    for windows in (1, 2):
        contract.write_loads(engine_dir, contract.EngineLoads(
            engine="vllm", rank=1, windows=windows, expert_tokens_total=(windows * window).tolist(), updated_unix=0.0))
        sidecar.poll_loads()
    _, counts = asyncio.run(scrape(sidecar))
    share = contract.split_by_rank(2 * window, PLACEMENT)[1]
    assert {rank for rank, _, _ in counts} == {1}
    for (_, layer, expert), value in counts.items():
        assert value == share[layer, expert]
    assert sum(counts.values()) == share.sum() > 0


def test_the_standins_sglang_recorder_dumps_what_the_sidecar_reads(tmp_path):
    """The stand-in's SGLang recorder (tests/e2e's load source) writes stat-mode dumps the sidecar
    reads: topK choices per token on every MoE layer, nothing on the dense layer, the popularity
    switching with the phase."""
    from moe_agent.engines.standin import SglangRecorder

    model = RESOLVED.model
    recorder = SglangRecorder(tmp_path, tokens_per_second=100.0, shift_seconds=10.0, started=0.0)
    recorder.advance(model, now=5.0)  # phase 0
    recorder.dump()
    dump = torch.load(next(tmp_path.glob(contract.SGLANG_DUMP_GLOB)), weights_only=True)
    assert dump["rank"] == 0 and dump["logical_count"].shape == (1, 4, 8)  # [steps, num_hidden_layers, E]
    assert dump["logical_count"][0, 0].sum() == 0  # the dense layer
    first = contract.read_sglang_dumps(tmp_path, model)  # MoE rows, the file consumed
    assert first.shape == (3, 8) and not list(tmp_path.glob(contract.SGLANG_DUMP_GLOB))
    np.testing.assert_allclose(first.sum(axis=1), 100 * 5 * 2, atol=8)  # whole counts; fractions carry over
    recorder.advance(model, now=15.0)  # 10 s of phase 1
    recorder.dump()
    second = contract.read_sglang_dumps(tmp_path, model)
    np.testing.assert_allclose(second.sum(axis=1), 100 * 10 * 2, atol=8)
    assert (np.argmax(first, axis=1) != np.argmax(second, axis=1)).any()  # another popularity
