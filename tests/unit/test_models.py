import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moe_placement.baselines import linear_placement, round_robin_placement
from moe_placement.models import (
    ModelShape,
    Placement,
    PlacementError,
    RoutingBatch,
    SparsePairs,
    WorkloadProfile,
    check_fits,
)
from moe_placement.presets import MODEL_PRESETS, model_preset, parse_topology, slots_per_gpu


@st.composite
def placements(draw):
    """A random valid placement: every expert once, then extra slots anywhere (some left empty)."""
    num_layers = draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, 24))
    num_gpus = draw(st.integers(1, 6))
    slots = draw(st.integers(-(-num_experts // num_gpus), -(-num_experts // num_gpus) + 3))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    mapping = np.full((num_layers, num_gpus * slots), -1)
    for layer in range(num_layers):
        order = rng.permutation(num_gpus * slots)
        mapping[layer, order[:num_experts]] = np.arange(num_experts)
        extra = order[num_experts:]
        mapping[layer, extra] = rng.integers(-1, num_experts, len(extra))
    return Placement(mapping, num_experts, slots)


@given(placements())
@settings(max_examples=60, deadline=None)
def test_every_expert_has_a_replica_and_maps_agree(placement):
    counts = placement.replica_count()
    assert (counts >= 1).all()
    assert counts.sum() == (placement.physical_to_logical_map >= 0).sum()
    table = placement.logical_to_physical_map()
    for layer in range(placement.num_layers):
        for expert in range(placement.num_experts):
            slots = table[layer, expert][table[layer, expert] >= 0]
            assert len(slots) == counts[layer, expert]
            assert (placement.physical_to_logical_map[layer, slots] == expert).all()
    per_gpu = placement.gpu_expert_matrix()
    assert per_gpu.sum(axis=2).max() <= placement.slots_per_gpu
    assert (per_gpu.sum(axis=1) == counts).all()


@given(st.integers(1, 5), st.integers(1, 40), st.integers(1, 8), st.integers(0, 16))
@settings(max_examples=60, deadline=None)
def test_baselines_are_valid(num_layers, num_experts, num_gpus, extra):
    slots = -(-(num_experts + extra) // num_gpus)
    for mapping in (
        linear_placement(num_layers, num_experts, num_gpus * slots),
        round_robin_placement(num_layers, num_experts, num_gpus, slots),
    ):
        placement = Placement(mapping, num_experts, slots)
        assert (placement.replica_count() >= 1).all()


def test_placement_errors_name_the_field():
    with pytest.raises(PlacementError, match="expert 2 of layer 0 has no replica"):
        Placement([[0, 1, 1, 0]], 3, 2)
    with pytest.raises(PlacementError, match="expert ids must be in -1..2"):
        Placement([[0, 1, 2, 3]], 3, 2)
    with pytest.raises(PlacementError, match="not divisible"):
        Placement([[0, 1, 2]], 3, 2)
    with pytest.raises(PlacementError, match="physical_to_logical_map: expected 2 dimensions"):
        Placement([0, 1, 2], 3, 1)


def test_profile_validation():
    with pytest.raises(PlacementError, match="load: expected 2 dimensions"):
        WorkloadProfile(load=np.ones(4), top_k=1)
    with pytest.raises(PlacementError, match="load: no tokens"):
        WorkloadProfile(load=np.zeros((2, 4)), top_k=1)
    with pytest.raises(PlacementError, match="top_k"):
        WorkloadProfile(load=np.ones((2, 4)), top_k=5)
    pairs = SparsePairs(np.array([1]), np.array([0]), np.array([9]), np.array([1.0]))
    with pytest.raises(PlacementError, match="transitions: layer index out of range"):
        WorkloadProfile(load=np.ones((1, 4)), top_k=1, transitions=pairs)
    pairs = SparsePairs(np.array([0]), np.array([0]), np.array([9]), np.array([1.0]))
    with pytest.raises(PlacementError, match="transitions: expert id out of range"):
        WorkloadProfile(load=np.ones((2, 4)), top_k=1, transitions=pairs)
    profile = WorkloadProfile(load=np.ones((2, 4)), top_k=2)
    with pytest.raises(PlacementError, match="load: shape"):
        profile.check_model(model_preset("mixtral-8x7b"))


def test_sparse_pairs_round_trip():
    dense = np.zeros((2, 3, 3))
    dense[0, 1, 2] = 5
    dense[1, 0, 0] = 2
    pairs = SparsePairs.from_dense(dense)
    assert np.array_equal(pairs.dense(0, 3), dense[0])
    assert np.array_equal(pairs.dense(1, 3), dense[1])


def test_model_shape_validation_and_camel_case():
    shape = ModelShape.model_validate(
        {"numLayers": 2, "numExperts": 8, "topK": 2, "hiddenSize": 16, "expertIntermediateSize": 32}
    )
    assert shape.expert_bytes == 3 * 16 * 32 * 2
    with pytest.raises(ValidationError, match="topK"):
        ModelShape(num_layers=2, num_experts=4, top_k=5, hidden_size=8, expert_intermediate_size=8)
    with pytest.raises(ValidationError):
        ModelShape(num_layers=0, num_experts=4, top_k=1, hidden_size=8, expert_intermediate_size=8)


def test_presets_and_topology_spec():
    assert set(MODEL_PRESETS) == {
        "mixtral-8x7b", "deepseek-v2-lite", "deepseek-v3", "qwen3-30b-a3b", "qwen3-235b-a22b"
    }
    # One expert is 3 x hidden x FFN width bf16 weights: DeepSeek-V2-Lite 3 x 2048 x 1408 x 2 B ~ 17 MB,
    # DeepSeek-V3 3 x 7168 x 2048 x 2 B ~ 88 MB, Mixtral 3 x 4096 x 14336 x 2 B ~ 352 MB.
    assert model_preset("deepseek-v2-lite").expert_bytes == pytest.approx(17.3e6, rel=0.01)
    assert model_preset("deepseek-v3").expert_bytes == pytest.approx(88.1e6, rel=0.01)
    assert model_preset("mixtral-8x7b").expert_bytes == pytest.approx(352.3e6, rel=0.01)
    topology = parse_topology("8x8:h200", 256, 64)
    assert (topology.num_gpus, topology.slots_per_gpu, topology.gpu.name) == (64, 5, "h200")
    with pytest.raises(PlacementError, match="topology: '2by4'"):
        parse_topology("2by4", 64)
    with pytest.raises(PlacementError, match="gpu: unknown 'a100'"):
        parse_topology("1x8:a100", 64)
    with pytest.raises(PlacementError, match="redundant_slots: 64 experts \\+ 3"):
        slots_per_gpu(64, 8, 3)
    with pytest.raises(PlacementError, match="model: unknown 'llama'"):
        model_preset("llama")


def test_check_fits():
    model = model_preset("deepseek-v2-lite")
    topology = parse_topology("1x8", 64).model_copy(update={"slots_per_gpu": 4})
    with pytest.raises(PlacementError, match="cannot hold 64 experts"):
        check_fits(model, topology)


def test_routing_batch_validation():
    with pytest.raises(PlacementError, match="source_gpu: 2 tokens, expert_ids has 3"):
        RoutingBatch(np.zeros((1, 3, 2)), np.zeros(2))
