"""Time limits and layer chunks: a policy out of time still returns a valid placement and says it
stopped early (``SolverInfo.stopped_early``); splitting layers over worker processes gives the
placement one process gives."""

import threading

import numpy as np
import pytest
from moe_placement.baselines import linear_placement
from moe_placement.models import ModelShape, Placement, Topology
from moe_placement.parallel import can_fork, even_chunks, run_chunks, worker_count
from moe_placement.policies import PolicyOptions, plan
from moe_placement.presets import gpu_preset
from moe_placement.traces import Trace

MODEL = ModelShape(num_layers=6, num_experts=16, top_k=2, hidden_size=256, expert_intermediate_size=128)
TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=5, gpu=gpu_preset("h100"))
LIMITED = ("ilp", "metro_aware", "locality", "auto", "migration_aware")


def profile(phase: str = "prefill", tokens: int = 300):
    """A skewed random trace's profile (transitions and co-activation included)."""
    rng = np.random.default_rng(0)
    popularity = rng.dirichlet(np.full(MODEL.num_experts, 0.6), size=MODEL.num_layers)
    ids = np.stack(
        [
            np.stack(
                [rng.choice(MODEL.num_experts, MODEL.top_k, replace=False, p=popularity[layer])
                 for _ in range(tokens)]
            )
            for layer in range(MODEL.num_layers)
        ]
    )
    trace = Trace(ids, MODEL.num_experts, np.array([0, tokens]), ("",), phase=phase)
    return trace.profile(batch_size=64, phase=phase)


def previous() -> Placement:
    mapping = linear_placement(MODEL.num_layers, MODEL.num_experts, TOPOLOGY.num_slots)
    return Placement(mapping, MODEL.num_experts, TOPOLOGY.slots_per_gpu)


@pytest.mark.parametrize("policy", LIMITED)
def test_a_policy_out_of_time_returns_a_valid_placement_and_says_it_stopped_early(policy):
    options = PolicyOptions(time_limit_s=1e-6, previous=previous())
    result = plan(policy, profile(), MODEL, TOPOLOGY, options)  # plan validates the placement
    assert result.solver.stopped_early
    assert result.solver.status == "time_limit"


@pytest.mark.parametrize("policy", ["metro_aware", "locality", "auto"])
def test_a_heuristic_with_time_to_spare_does_not_say_it_stopped_early(policy):
    result = plan(policy, profile("decode"), MODEL, TOPOLOGY, PolicyOptions(time_limit_s=60))
    assert not result.solver.stopped_early


@pytest.mark.parametrize("policy", ["ilp", "metro_aware", "locality"])
def test_layer_chunks_in_worker_processes_give_the_one_process_placement(policy):
    assert can_fork()  # else both runs below would take the one-process path
    fit = profile("decode")
    one = plan(policy, fit, MODEL, TOPOLOGY, PolicyOptions(time_limit_s=60, workers=1))
    split = plan(policy, fit, MODEL, TOPOLOGY, PolicyOptions(time_limit_s=60, workers=3))
    assert np.array_equal(one.placement.physical_to_logical_map, split.placement.physical_to_logical_map)
    assert one.solver.status == split.solver.status


def test_layer_chunks_cover_every_layer_once_in_order():
    for num_layers in range(1, 12):
        for num_chunks in range(1, num_layers + 1):
            chunks = even_chunks(num_layers, num_chunks)
            assert len(chunks) == num_chunks
            covered = np.concatenate([np.arange(num_layers)[chunk] for chunk in chunks])
            assert np.array_equal(covered, np.arange(num_layers))
            assert max(c.stop - c.start for c in chunks) - min(c.stop - c.start for c in chunks) <= 1


def test_run_chunks_returns_every_result_in_order():
    assert run_chunks(pow, [(2, 3), (3, 2), (5, 1)]) == [8, 9, 5]


def test_no_workers_from_a_second_thread():
    counts = []
    thread = threading.Thread(target=lambda: counts.append(worker_count(8, 4)))
    thread.start()
    thread.join()
    assert counts == [1]
    assert worker_count(8, 1) == 1 and worker_count(1, 4) == 1
