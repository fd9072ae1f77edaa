import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_placement.baselines import eplb_rebalance, replicate_experts, token_balance_lower_bound
from moe_placement.models import Placement, PlacementError


def test_eplb_reproduces_the_published_example():
    """The worked example of deepseek-ai/EPLB's README: 2 layers, 12 experts, 16 slots, 2 nodes, 8 GPUs."""
    weight = np.array(
        [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ]
    )
    physical_to_logical, logical_to_physical, count = eplb_rebalance(weight, 16, 4, 2, 8)
    assert physical_to_logical.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert count.sum(axis=1).tolist() == [16, 16]
    for layer in range(2):
        for expert in range(12):
            slots = logical_to_physical[layer, expert]
            slots = slots[slots >= 0]
            assert len(slots) == count[layer, expert]
            assert (physical_to_logical[layer, slots] == expert).all()


@given(
    st.integers(1, 3), st.sampled_from([(8, 2), (16, 4), (12, 2), (10, 5)]), st.integers(0, 3),
    st.integers(0, 2**31),
)
@settings(max_examples=40, deadline=None)
def test_eplb_placements_are_valid_and_beat_identity(num_layers, experts_nodes, extra_per_gpu, seed):
    num_experts, num_nodes = experts_nodes
    num_gpus = num_nodes * 2
    while num_experts % num_gpus:
        num_experts += num_nodes
    num_slots = num_experts + extra_per_gpu * num_gpus
    rng = np.random.default_rng(seed)
    weight = rng.zipf(1.6, (num_layers, num_experts)).astype(float)
    for groups in (num_nodes, 1):
        mapping, _, _ = eplb_rebalance(weight, num_slots, groups, num_nodes if groups > 1 else 1, num_gpus)
        placement = Placement(mapping, num_experts, num_slots // num_gpus)
        assert (placement.replica_count() >= 1).all()
        assert (mapping >= 0).all()


def test_eplb_rejects_bad_shapes():
    with pytest.raises(PlacementError, match="num_physical: 10 slots < 12 experts"):
        eplb_rebalance(np.ones((1, 12)), 10, 1, 1, 2)
    with pytest.raises(PlacementError, match="not divisible by 4 GPUs"):
        eplb_rebalance(np.ones((1, 12)), 14, 1, 1, 4)


@given(st.integers(2, 30), st.integers(0, 30), st.integers(1, 8), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_lower_bound_holds_for_the_greedy_replication(num_experts, extra, num_gpus, seed):
    rng = np.random.default_rng(seed)
    load = rng.zipf(1.5, (2, num_experts)).astype(float)
    num_slots = num_experts + extra
    bound = token_balance_lower_bound(load, num_gpus, num_slots)
    assert (bound >= load.sum(1) / num_gpus - 1e-9).all()
    _, _, count = replicate_experts(load, num_slots)
    # Any placement of those replicas has a GPU with at least the heaviest replica.
    assert np.allclose(bound, np.maximum(load.sum(1) / num_gpus, (load / count).max(1)))
