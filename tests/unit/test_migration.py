import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_placement.migration_plan import (
    ExpertCopy,
    MigrationPlan,
    MigrationStage,
    check_migration,
    plan_migration,
)
from moe_placement.models import ModelShape, Placement, PlacementError, Topology
from moe_placement.policies import PolicyOptions, plan
from moe_placement.policies.ilp import layer_busiest
from moe_placement.presets import gpu_preset
from moe_placement.traces import Trace
from reference_migration import reference_stages

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
    for stage, after in zip(plan_.stages, plan_.stage_maps()):
        for copy in stage.copies:
            assert live[copy.layer, copy.target_slot] == -1
            assert live[copy.layer, copy.source_slot] == copy.expert
        assert np.array_equal(stage.apply(live), after)
        live = after


@settings(max_examples=150, deadline=None)
@given(old=maps(), new=maps(), per_stage=st.integers(1, 6))
def test_plans_equal_the_reference_planner_stage_by_stage(old, new, per_stage):
    try:
        expected = reference_stages(old, new, MODEL, TOPOLOGY, per_stage)
    except PlacementError as error:
        with pytest.raises(PlacementError, match="no slack"):
            plan_migration(old, new, MODEL, TOPOLOGY, max_copies_per_stage=per_stage)
        assert "no slack" in str(error)
        return
    plan_ = plan_migration(old, new, MODEL, TOPOLOGY, max_copies_per_stage=per_stage)
    assert len(plan_.stages) == len(expected)
    for stage, after, (copies, expected_after) in zip(plan_.stages, plan_.stage_maps(), expected):
        assert stage.copies == copies
        assert np.array_equal(after, expected_after)


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
    start = old.physical_to_logical_map
    none = np.zeros((0, 2), dtype=np.int64)
    into_full = MigrationPlan(
        start, (MigrationStage((ExpertCopy(0, 0, 0, 1, size),), none),), size, {}
    )
    with pytest.raises(PlacementError, match="not empty"):
        check_migration(old, into_full)
    dropped = np.array([[0, 0]])  # expert 0 of layer 0 loses its only replica
    with pytest.raises(PlacementError, match="no replica"):
        check_migration(old, MigrationPlan(start, (MigrationStage((), dropped),), 0.0, {}))
    empty = np.array([[0, 6]])  # retires a slot that holds nothing
    with pytest.raises(PlacementError, match="out of range or empty"):
        check_migration(old, MigrationPlan(start, (MigrationStage((), empty),), 0.0, {}))
    elsewhere = np.roll(start, 1, axis=1)
    with pytest.raises(PlacementError, match="initial_map"):
        check_migration(old, MigrationPlan(elsewhere, (MigrationStage((), none),), 0.0, {}))


def test_a_plan_pickles_as_deltas_and_replays_to_any_stage():
    old = Placement(np.tile(np.array([0, 1, 2, 3, 4, 5, -1, -1]), (2, 1)), 6, 2)
    new = Placement(np.tile(np.array([5, 4, 3, 2, 1, 0, 0, -1]), (2, 1)), 6, 2)
    plan_ = plan_migration(old, new, MODEL, TOPOLOGY, max_copies_per_stage=2)
    copied = pickle.loads(pickle.dumps(plan_))
    maps = list(copied.stage_maps())
    assert all(np.array_equal(plan_.map_after(i), m) for i, m in enumerate(maps))
    assert np.array_equal(maps[-1], new.physical_to_logical_map)
    with pytest.raises(PlacementError, match="index"):
        plan_.map_after(len(plan_.stages))


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


@pytest.mark.parametrize("seed", range(3))
def test_many_layers_equal_the_reference_planner(seed):
    model = ModelShape(
        num_layers=6, num_experts=16, top_k=2, hidden_size=64, expert_intermediate_size=32
    )
    topology = Topology(num_nodes=2, gpus_per_node=4, slots_per_gpu=3, gpu=gpu_preset("h100"))
    rng = np.random.default_rng(seed)

    def placement() -> Placement:
        rows = [
            rng.permutation(np.concatenate([np.arange(16), rng.integers(-1, 16, size=8)]))
            for _ in range(model.num_layers)
        ]
        return Placement(np.array(rows), 16, 3)

    old, new = placement(), placement()
    plan_ = plan_migration(old, new, model, topology, max_copies_per_stage=5)
    expected = reference_stages(old, new, model, topology, 5)
    assert [stage.copies for stage in plan_.stages] == [copies for copies, _ in expected]
    assert all(np.array_equal(a, b) for a, (_, b) in zip(plan_.stage_maps(), expected))
