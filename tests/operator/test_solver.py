"""Solve, predict, gate: pure functions run in the operator's worker process."""

from __future__ import annotations

import pickle

import numpy as np

from moe_operator.solver import SolveRequest, solve_and_gate, token_imbalance
from moe_placement.baselines import linear_placement
from moe_placement.models import ModelShape, Placement, WorkloadProfile
from moe_placement.policies import PolicyOptions
from moe_placement.presets import parse_topology

MODEL = ModelShape(name="t", num_layers=4, num_experts=16, top_k=2, hidden_size=256, expert_intermediate_size=512)
TOPOLOGY = parse_topology("2x2", 16, 4)


def skewed_load(seed=0):
    rng = np.random.default_rng(seed)
    load = np.ones((4, 16)) * 10
    load[:, :4] *= rng.uniform(20, 40, size=(4, 4))  # experts 0-3 are hot: linear puts them on GPU 0
    return load


def linear():
    return Placement(linear_placement(4, 16, 20), 16, 5)


def test_token_imbalance():
    uniform = np.ones((4, 16))
    # linear with 4 redundant slots: experts 0-3 have 2 replicas (GPUs 0 and 3 get 3 units, 1 and 2 get 5)
    assert abs(token_imbalance(uniform, linear()) - 1.25) < 1e-9
    assert abs(token_imbalance(uniform, Placement(linear_placement(4, 16, 16), 16, 4)) - 1.0) < 1e-9
    load = np.zeros((4, 16))
    load[:, 0] = 100  # one hot expert with replicas on GPU 0 (slot 0) and GPU 3 (slot 16)
    assert abs(token_imbalance(load, linear()) - 2.0) < 1e-9


def request(**extra):
    values = dict(
        policy="eplb_global", profile=WorkloadProfile(load=skewed_load(), top_k=2), model=MODEL, topology=TOPOLOGY,
        options=PolicyOptions(previous=linear(), time_limit_s=10.0), objectives={"prefill": "tokenImbalance", "decode": "moeTime"}, min_predicted_gain=0.05,
        interval_s=60, num_batches=1,
    )
    values.update(extra)
    return SolveRequest(**values)


def test_skewed_load_is_applied_with_a_plan(planner):
    result = solve_and_gate(request())
    assert result.apply, result.reason
    assert result.gain > 0.05 and result.net_gain <= result.gain
    expected = np.mean([(result.old_cost[p] - result.new_cost[p]) / result.old_cost[p] for p in ("prefill", "decode")])
    assert abs(result.gain - expected) < 1e-12
    assert result.plan is not None and result.stages == len(result.plan.stages) and result.bytes_to_move > 0
    assert result.solver_status == "heuristic"
    pickle.loads(pickle.dumps(result))  # crosses the process boundary


def test_gate_refuses_small_gains_and_costly_moves(planner):
    high_bar = solve_and_gate(request(min_predicted_gain=0.99))
    assert not high_bar.apply and "minPredictedGain" in high_bar.reason and high_bar.plan is None
    # Slow links and a short interval: the copies cost more than the gain.
    slow = parse_topology("2x2", 16, 4).model_copy(update={"inter_node_gb_s": 1e-6})
    costly = solve_and_gate(request(topology=slow, interval_s=1))
    assert not costly.apply and costly.migration_cost > costly.gain


def test_no_change_is_skipped(planner):
    first = solve_and_gate(request())
    applied = Placement(first.mapping, 16, 5)
    again = solve_and_gate(request(options=PolicyOptions(previous=applied, time_limit_s=10.0)))
    assert not again.apply and again.reason == "no change"
