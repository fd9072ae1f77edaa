import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_placement.policies.ilp import layer_busiest
from moe_placement.migration_plan import (
    ExpertCopy,
    MigrationPlan,
    MigrationStage,
    check_migration,
    plan_migration,
)
from moe_placement.models import ModelShape, Placement, PlacementError, Topology
from moe_placement.policies import PolicyOptions, plan
from moe_placement.presets import gpu_preset
from moe_placement.traces import Trace

MODEL = ModelShape(
    num_layers=2, num_experts=6, top_k=2, hidden_size=64, expert_intermediate_size=32
)
TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=2, gpu=gpu_preset("h100"))


@st.composite
def maps(draw):
    """A map [2, 8] of 6 experts: each expert once, two slack slots (empty or redundant)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    rows = []
    for _ in range(MODEL.num_layers):
        slack = rng.integers(-1, MODEL.num_experts, size=TOPOLOGY.num_slots - MODEL.num_experts)
        rows.append(rng.permutation(np.concatenate([np.arange(MODEL.num_experts), slack])))
    return Placement(np.array(rows), MODEL.num_experts, TOPOLOGY.slots_per_gpu)


@settings(max_examples=150, deadline=None)
@given(old=maps(), new=maps(), per_stage=st.integers(1, 6))
def test_plans_keep_every_invariant(old, new, per_stage):
    plan_ = plan_migration(old, new, MODEL, TOPOLOGY, max_copies_per_stage=per_stage)
    check_migration(old, plan_)
    assert np.array_equal(plan_.final_map(), new.physical_to_logical_map)
    assert all(len(stage.copies) <= per_stage for stage in plan_.stages)
    assert plan_.bytes_moved == pytest.approx(sum(plan_.bytes_per_link.values()))
    live = old.physical_to_logical_map
    for stage in plan_.stages:
        for copy in stage.copies:
            assert live[copy.layer, copy.target_slot] == -1
            assert live[copy.layer, copy.source_slot] == copy.expert
        live = stage.physical_to_logical_map


def test_equal_placements_need_one_empty_stage():
    old = Placement(np.tile(np.array([0, 1, 2, 3, 4, 5, 0, -1]), (2, 1)), 6, 2)
    plan_ = plan_migration(old, old, MODEL, TOPOLOGY)
    assert len(plan_.stages) == 1 and not plan_.stages[0].copies and plan_.bytes_moved == 0


def test_a_swap_without_slack_is_refused_and_with_slack_uses_a_temporary_slot():
    model = ModelShape(
        num_layers=1, num_experts=4, top_k=1, hidden_size=64, expert_intermediate_size=32
    )
    topology = Topology(num_nodes=1, gpus_per_node=2, slots_per_gpu=2, gpu=gpu_preset("h100"))
    full = Placement(np.array([[0, 1, 2, 3]]), 4, 2)
    swapped = Placement(np.array([[1, 0, 2, 3]]), 4, 2)
    with pytest.raises(PlacementError, match="no slack"):
        plan_migration(full, swapped, model, topology)
    topology = Topology(num_nodes=1, gpus_per_node=2, slots_per_gpu=3, gpu=gpu_preset("h100"))
    old = Placement(np.array([[0, 1, 2, 3, 2, -1]]), 4, 3)
    new = Placement(np.array([[1, 0, 2, 3, 2, -1]]), 4, 3)
    plan_ = plan_migration(old, new, model, topology)
    check_migration(old, plan_)
    assert np.array_equal(plan_.final_map(), new.physical_to_logical_map)
    assert sum(len(s.copies) for s in plan_.stages) == 3  # a temporary copy and the two moves


def test_sources_are_the_closest_replicas():
    model = ModelShape(
        num_layers=1, num_experts=3, top_k=1, hidden_size=64, expert_intermediate_size=32
    )
    old = Placement(np.array([[0, -1, 1, 2, 0, 1, 2, 0]]), 3, 2)
    new = Placement(np.array([[0, 0, 1, 2, 0, 1, 2, 0]]), 3, 2)
    plan_ = plan_migration(old, new, model, TOPOLOGY)
    (copy,) = plan_.stages[0].copies
    assert copy.source_slot == 0 and plan_.bytes_per_link == {"intra-gpu": model.expert_bytes}


def test_check_migration_catches_broken_plans():
    old = Placement(np.tile(np.array([0, 1, 2, 3, 4, 5, -1, -1]), (2, 1)), 6, 2)
    size = MODEL.expert_bytes
    into_full = MigrationPlan(
        (MigrationStage((ExpertCopy(0, 0, 0, 1, size),), old.physical_to_logical_map),), size, {}
    )
    with pytest.raises(PlacementError, match="not empty"):
        check_migration(old, into_full)
    dropped = old.physical_to_logical_map.copy()
    dropped[0, 0] = -1  # expert 0 of layer 0 loses its only replica
    with pytest.raises(PlacementError, match="no replica"):
        check_migration(old, MigrationPlan((MigrationStage((), dropped),), 0.0, {}))
    sneaky = old.physical_to_logical_map.copy()
    sneaky[0, 6] = 3  # appears without a copy
    with pytest.raises(PlacementError, match="other than by copies"):
        check_migration(old, MigrationPlan((MigrationStage((), sneaky),), 0.0, {}))


def shifted_profiles(seed: int = 0):
    """Profiles of the same model before and after the hottest experts change."""
    model = ModelShape(
        num_layers=3, num_experts=12, top_k=2, hidden_size=256, expert_intermediate_size=128
    )
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(12, 0.6), size=3)

    def profile(weights):
        ids = np.stack(
            [
                np.stack([rng.choice(12, 2, replace=False, p=weights[layer]) for _ in range(300)])
                for layer in range(3)
            ]
        )
        return Trace(ids, 12, np.array([0, 300]), ("",)).profile()

    shifted = popularity.copy()
    shifted[:, [0, 1, 2, 3]] = shifted[:, [3, 2, 1, 0]]  # four experts trade popularity
    return model, profile(popularity), profile(shifted)


def test_migration_aware_respects_the_budget():
    model, before, after = shifted_profiles()
    topology = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=4, gpu=gpu_preset("h100"))
    previous = plan("eplb", before, model, topology).placement
    unchanged = plan(
        "migration_aware", after, model, topology, PolicyOptions(previous=previous, move_budget=0)
    )
    assert np.array_equal(
        unchanged.placement.physical_to_logical_map, previous.physical_to_logical_map
    )
    limited = plan(
        "migration_aware", after, model, topology, PolicyOptions(previous=previous, move_budget=3)
    )
    assert previous.moved_experts(limited.placement) <= 3


def test_a_small_shift_gives_a_small_migration():
    model, before, after = shifted_profiles()
    topology = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=4, gpu=gpu_preset("h100"))
    previous = plan("locality", before, model, topology).placement
    resolved = plan(
        "migration_aware", after, model, topology, PolicyOptions(previous=previous)
    ).placement
    moves = previous.moved_experts(resolved)
    for policy in ("eplb", "locality"):
        assert moves < previous.moved_experts(plan(policy, after, model, topology).placement)
    busiest = layer_busiest(
        resolved.physical_to_logical_map, after.load, topology.slots_per_gpu
    ).sum()
    assert (
        busiest
        < layer_busiest(previous.physical_to_logical_map, after.load, topology.slots_per_gpu).sum()
    )
    check_migration(previous, plan_migration(previous, resolved, model, topology))


def test_migration_aware_without_previous_solves_from_scratch():
    model, before, _ = shifted_profiles(1)
    topology = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=4, gpu=gpu_preset("h100"))
    result = plan("migration_aware", before, model, topology)
    result.placement.check_topology(model, topology)
    assert "from scratch" in result.solver.notes[0]
