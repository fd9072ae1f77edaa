from dataclasses import replace

import numpy as np
import pytest
from moe_placement.grouping import (
    domain_signatures,
    expected_activated,
    expert_signature,
    group_requests,
    home_nodes,
    predict_decode,
    predictor_accuracy,
    prefill_decode_split,
)
from moe_placement.packing import coplace_nodes, greedy_nodes, spread_counts
from moe_placement.pairs import locality_score, pair_matrices
from moe_placement.models import ModelShape, PlacementError, Topology
from moe_placement.policies import PolicyOptions, plan
from moe_placement.presets import gpu_preset
from moe_placement.synthetic import SyntheticConfig, generate

MODEL = ModelShape(
    num_layers=4, num_experts=16, top_k=2, hidden_size=256, expert_intermediate_size=128
)
TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=5, gpu=gpu_preset("h100"))


@pytest.fixture(scope="module")
def trace():
    """Two domains with different favourite experts, 64 sequences of 32 tokens."""
    config = SyntheticConfig(
        num_layers=4,
        num_experts=16,
        top_k=2,
        num_sequences=64,
        tokens_per_sequence=32,
        popularity_skew=1.2,
        domain_drift=0.9,
    )
    return generate(config, seed=1)


def test_signatures_sum_to_k(trace):
    signature = expert_signature(trace.expert_ids, trace.num_experts)
    assert signature.shape == (4, 16)
    assert np.allclose(signature.sum(1), trace.top_k)
    assert set(domain_signatures(trace)) == {"intent", "law"}


def test_prefill_decode_split_and_predictor_beats_popularity(trace):
    prefill, decode = prefill_decode_split(trace, 0.5)
    assert prefill.shape == decode.shape == (64, 4, 16)
    fit, test = trace.split(0.5)
    accuracy = predictor_accuracy(fit, test)
    for key in ("precision_at_k", "recall", "spearman", "domain_accuracy"):
        assert -1.0 <= accuracy[key] <= 1.0
    assert accuracy["domain_accuracy"] >= 0.9
    assert accuracy["precision_at_k"] >= accuracy["global_precision_at_k"]
    with pytest.raises(PlacementError):
        prefill_decode_split(trace, 1.0)


def test_predict_decode_picks_the_nearest_domain():
    domains = np.zeros((2, 1, 4))
    domains[0, 0, :2] = 1.0
    domains[1, 0, 2:] = 1.0
    prefill = np.array([[[0.9, 0.8, 0.1, 0.0]], [[0.0, 0.1, 1.0, 0.7]]])
    predicted, nearest = predict_decode(prefill, domains)
    assert nearest.tolist() == [0, 1]
    assert np.array_equal(predicted, domains[[0, 1]])


def test_grouping_partitions_requests_and_keeps_clusters_together():
    rng = np.random.default_rng(0)
    # Two kinds of requests with disjoint experts, interleaved.
    signatures = np.zeros((16, 2, 8))
    signatures[0::2, :, :4] = rng.dirichlet(np.ones(4), size=(8, 2)) * 2
    signatures[1::2, :, 4:] = rng.dirichlet(np.ones(4), size=(8, 2)) * 2
    groups = group_requests(np.clip(signatures, 0, 1), group_size=4)
    assert sorted(np.concatenate(groups).tolist()) == list(range(16))
    assert all(len(g) <= 4 for g in groups)
    for group in groups:
        assert len({int(r) % 2 for r in group}) == 1
    interleaved = [np.arange(i, i + 4) for i in range(0, 16, 4)]
    assert sum(expected_activated(signatures[g]) for g in groups) < sum(
        expected_activated(signatures[g]) for g in interleaved
    )


def test_grouping_by_home_node(trace):
    placement = plan(
        "locality", trace.profile(), MODEL, TOPOLOGY, PolicyOptions(time_limit_s=5)
    ).placement
    signatures = prefill_decode_split(trace)[0]
    homes = home_nodes(signatures, placement, TOPOLOGY)
    assert homes.shape == (64,) and set(homes) <= {0, 1}
    groups = group_requests(signatures, 8, homes, TOPOLOGY.num_nodes)
    assert sorted(np.concatenate(groups).tolist()) == list(range(64))
    mixed = [g for g in groups if len(set(homes[g])) > 1]
    assert len(mixed) <= 1  # only the leftovers of both nodes share a batch


def test_coplacement_keeps_slots_and_balance_and_improves_locality(trace):
    profile = trace.profile()
    counts = spread_counts(profile.load, TOPOLOGY)
    node_slots = np.full(2, 10)
    start = np.stack(
        [greedy_nodes(profile.load[layer], counts[layer], node_slots) for layer in range(4)]
    )
    presence = coplace_nodes(profile, counts, node_slots, initial=start)
    assert np.array_equal(presence.sum(1), start.sum(1))  # slots per node unchanged
    assert np.array_equal(presence.sum(2), counts) and presence.max() <= 1
    transitions, _ = pair_matrices(profile)
    assert locality_score(presence, counts, transitions) >= locality_score(
        start, counts, transitions
    )
    for layer in range(4):
        node_load = (profile.load[layer] / counts[layer]) @ presence[layer]
        start_load = (profile.load[layer] / counts[layer]) @ start[layer]
        assert node_load.max() <= max(1.05 * profile.load[layer].sum() / 2, start_load.max()) + 1e-9


def test_locality_policy_is_valid_and_reports(trace):
    result = plan(
        "locality",
        replace(trace.profile(), phase="prefill"),
        MODEL,
        TOPOLOGY,
        PolicyOptions(time_limit_s=5),
    )
    result.placement.check_topology(MODEL, TOPOLOGY)
    assert result.solver.status == "heuristic"
    assert 0.0 <= result.solver.objective <= 1.0
    assert "kept on their node" in result.solver.notes[0]


def test_auto_explains_its_choice(trace):
    result = plan(
        "auto",
        trace.profile(batch_size=64, phase="decode"),
        MODEL,
        TOPOLOGY,
        PolicyOptions(time_limit_s=4),
    )
    result.placement.check_topology(MODEL, TOPOLOGY)
    reason = result.solver.notes[0]
    assert (
        reason.startswith("decode: ") and "eplb+random" in reason and "routing predicts" in reason
    )
    assert "recommended router" in result.solver.notes[2]
