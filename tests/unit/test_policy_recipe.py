"""CONTRIBUTING.md's recipe, followed once: a policy module registered and run through ``plan``;
the registry's promises (every policy's signature, what load-only policies read)."""

from dataclasses import replace

import numpy as np
import pytest
import spread_policy
from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.policies import LOAD_ONLY_POLICIES, POLICIES, PolicyOptions, plan
from moe_placement.presets import gpu_preset, model_preset, parse_topology
from moe_placement.synthetic import SYNTHETIC_PRESETS, generate

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


@pytest.mark.parametrize("name", sorted(LOAD_ONLY_POLICIES))
def test_a_load_only_policy_plans_the_same_without_pairs(name):
    """``LOAD_ONLY_POLICIES`` are given profiles without pairs: they must not read them."""
    trace = generate(replace(SYNTHETIC_PRESETS["deepseek-v2-lite"], num_sequences=16))
    model = model_preset("deepseek-v2-lite")
    topology = parse_topology("2x4", model.num_experts, 8)
    with_pairs, without = trace.profile(), trace.profile(pairs=False)
    assert with_pairs.transitions is not None and without.transitions is None
    options = PolicyOptions(time_limit_s=5.0)
    expected = plan(name, with_pairs, model, topology, options).placement.physical_to_logical_map
    found = plan(name, without, model, topology, options).placement.physical_to_logical_map
    assert np.array_equal(found, expected)
