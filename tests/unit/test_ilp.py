import itertools

import numpy as np
import pulp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_placement.milp import solve_milp
from moe_placement.packing import greedy_packing, replica_counts
from moe_placement.policies import ilp
from moe_placement.policies.ilp import (
    align_layers,
    layer_busiest,
    linear_assignment,
    link_cost,
    pack_ilp,
    policy_ilp,
)
from moe_placement.models import ModelShape, Placement, Topology
from moe_placement.policies import PolicyOptions, plan
from moe_placement.presets import gpu_preset
from moe_placement.traces import Trace

MODEL = ModelShape(
    num_layers=3, num_experts=12, top_k=2, hidden_size=256, expert_intermediate_size=128
)


def topology(num_nodes: int = 2, gpus_per_node: int = 2, slots: int = 4) -> Topology:
    return Topology(
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        slots_per_gpu=slots,
        gpu=gpu_preset("h100"),
    )


def profile(seed: int = 0, tokens: int = 400):
    """A skewed random trace's profile (transitions and co-activation included)."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(MODEL.num_experts, 0.6), size=MODEL.num_layers)
    ids = np.stack(
        [
            np.stack(
                [
                    rng.choice(MODEL.num_experts, MODEL.top_k, replace=False, p=popularity[layer])
                    for _ in range(tokens)
                ]
            )
            for layer in range(MODEL.num_layers)
        ]
    )
    trace = Trace(ids, MODEL.num_experts, np.array([0, tokens]), ("",))
    return trace.profile()


def greedy_objective(load: np.ndarray, topo: Topology) -> float:
    counts = replica_counts(load, topo.num_slots, topo.num_gpus)
    total = 0.0
    for layer in range(load.shape[0]):
        weight = load[layer] / counts[layer]
        ones = np.ones(len(weight), dtype=np.int64)
        packing = greedy_packing(weight, counts[layer], ones, topo.num_gpus, topo.slots_per_gpu)
        total += float((weight @ packing).max())
    return total


def test_ilp_is_valid_no_worse_than_its_warm_start_and_bounded():
    topo, prof = topology(), profile()
    result = plan("ilp", prof, MODEL, topo, PolicyOptions(time_limit_s=10))
    info = result.solver
    assert info.status in ("optimal", "feasible", "time_limit")
    objective = layer_busiest(
        result.placement.physical_to_logical_map, prof.load, topo.slots_per_gpu
    ).sum()
    assert info.objective == pytest.approx(objective)
    assert info.objective <= greedy_objective(prof.load, topo) + 1e-9
    assert info.lower_bound <= info.objective + 1e-9
    assert 0.0 <= info.gap < 1.0
    # replicas of one expert sit on different GPUs
    assert result.placement.gpu_expert_matrix().max() == 1


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), num_gpus=st.integers(2, 4), extra=st.integers(0, 4))
def test_packing_bound_is_below_every_packing(seed, num_gpus, extra):
    rng = np.random.default_rng(seed)
    slots = 3
    num_items = num_gpus * slots - extra
    load = rng.gamma(0.7, 10.0, size=num_items) + 0.1
    copies = replica_counts(load[None, :], num_gpus * slots, num_gpus)[0]
    weight = load / copies
    ones = np.ones(num_items, dtype=np.int64)
    packing, result, greedy_max = pack_ilp(weight, copies, ones, num_gpus, slots, time_limit_s=5)
    busiest = float((weight @ packing).max())
    assert busiest <= greedy_max + 1e-9
    assert (
        np.array_equal(packing.sum(1), copies)
        and np.all(packing.sum(0) <= slots)
        and packing.max() <= 1
    )
    if result.lower_bound is not None:
        assert result.lower_bound <= busiest + 1e-6
        # any other feasible packing (LPT of shuffled weights) is no better than the bound
        other = greedy_packing(rng.random(num_items), copies, ones, num_gpus, slots)
        assert result.lower_bound <= float((weight @ other).max()) + 1e-6


def test_timeout_returns_a_valid_placement_with_its_status():
    topo = topology(num_nodes=2, gpus_per_node=4, slots=2)
    prof = profile(seed=3)
    mapping, info = policy_ilp(prof, MODEL, topo, PolicyOptions(time_limit_s=0.0))
    Placement(mapping, MODEL.num_experts, topo.slots_per_gpu).check_topology(MODEL, topo)
    assert info.status == "time_limit"
    assert info.lower_bound <= info.objective


def test_solver_failure_falls_back_to_the_warm_start(monkeypatch):
    def broken(self, solver=None, **kwargs):
        raise pulp.PulpSolverError("solver crashed")

    monkeypatch.setattr(pulp.LpProblem, "solve", broken)
    problem = pulp.LpProblem("p", pulp.LpMinimize)
    x = problem.add_variable("x", 0, 1, cat=pulp.LpInteger)
    problem += x
    assert solve_milp(problem, 1.0).status == "fallback"
    topo, prof = topology(), profile()
    mapping, info = policy_ilp(prof, MODEL, topo, PolicyOptions(time_limit_s=5))
    Placement(mapping, MODEL.num_experts, topo.slots_per_gpu).check_topology(MODEL, topo)
    assert info.status == "fallback"
    assert info.objective == pytest.approx(greedy_objective(prof.load, topo))


def test_decomposed_packing_is_valid_and_bounded(monkeypatch):
    monkeypatch.setattr(ilp, "MONOLITHIC_VARIABLES", 8)  # force nodes first, then GPUs
    topo, prof = topology(num_nodes=2, gpus_per_node=2, slots=4), profile(seed=5)
    mapping, info = policy_ilp(prof, MODEL, topo, PolicyOptions(time_limit_s=10))
    placement = Placement(mapping, MODEL.num_experts, topo.slots_per_gpu)
    assert placement.gpu_expert_matrix().max() == 1
    assert info.status in ("feasible", "time_limit")
    assert info.lower_bound <= info.objective <= greedy_objective(prof.load, topo) + 1e-9


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6])
def test_linear_assignment_matches_brute_force(size):
    rng = np.random.default_rng(size)
    cost = rng.integers(0, 20, size=(size, size)).astype(float)
    column = linear_assignment(cost)
    assert sorted(column) == list(range(size))
    best = min(sum(cost[i, p[i]] for i in range(size)) for p in itertools.permutations(range(size)))
    assert cost[np.arange(size), column].sum() == pytest.approx(best)


def test_stage_two_never_worse_than_unaligned_and_bound_below():
    topo = topology(num_nodes=2, gpus_per_node=2)
    rng = np.random.default_rng(1)
    flows = rng.random((4, topo.num_gpus, topo.num_gpus)) ** 3
    cost = link_cost(topo, MODEL.token_bytes)
    gpu, value, bound = align_layers(flows, cost, deadline=float("inf"))
    unaligned = sum((flows[layer] * cost).sum() for layer in range(len(flows)))
    assert value <= unaligned + 1e-15
    assert bound <= value + 1e-15
    for row in gpu:
        assert sorted(row) == list(range(topo.num_gpus))
