"""CONTRIBUTING.md's recipe, followed once: a policy module registered and run through ``plan``."""

import numpy as np
import pytest
import spread_policy
from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.policies import POLICIES, PolicyOptions, plan
from moe_placement.presets import gpu_preset

MODEL = ModelShape(num_layers=3, num_experts=12, top_k=2, hidden_size=64, expert_intermediate_size=32)
TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=4, gpu=gpu_preset("h100"))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(POLICIES, "spread", spread_policy.policy_spread)


def test_a_registered_policy_module_runs_through_plan(registered):
    load = np.random.default_rng(0).pareto(1.5, (MODEL.num_layers, MODEL.num_experts)) + 1.0
    profile = WorkloadProfile(load=load, top_k=MODEL.top_k)
    result = plan("spread", profile, MODEL, TOPOLOGY, PolicyOptions(time_limit_s=1.0))
    mapping = result.placement.physical_to_logical_map
    assert result.policy == "spread" and result.solver.status == "heuristic"
    assert mapping.shape == (MODEL.num_layers, TOPOLOGY.num_slots)
    hottest = load.argmax(1)
    per_gpu = mapping.reshape(MODEL.num_layers, TOPOLOGY.num_gpus, -1)
    for layer in range(MODEL.num_layers):  # the hottest expert's replicas are on different GPUs
        gpus = np.nonzero((per_gpu[layer] == hottest[layer]).any(1))[0]
        assert len(gpus) == (mapping[layer] == hottest[layer]).sum()


def test_every_registered_policy_follows_the_signature():
    profile = WorkloadProfile(load=np.ones((MODEL.num_layers, MODEL.num_experts)), top_k=MODEL.top_k)
    for name in POLICIES:
        result = plan(name, profile, MODEL, TOPOLOGY, PolicyOptions(time_limit_s=2.0))
        assert result.placement.physical_to_logical_map.shape == (MODEL.num_layers, TOPOLOGY.num_slots)
