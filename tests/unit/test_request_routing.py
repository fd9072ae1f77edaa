"""Request routing: the decision, online learning, the grouped policy, the data flows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_placement.cost import evaluate
from moe_placement.policies.grouped import node_sets
from moe_placement.presence import node_presence
from moe_placement.models import Placement, PlacementError, RoutingBatch
from moe_placement.policies import plan
from moe_placement.presets import model_preset, parse_topology
from moe_placement.request_routing import (
    RequestRouter,
    assign_domain_nodes,
    rank_scores,
    request_homes,
    round_robin_homes,
    tokens_per_gpu_imbalance,
)
from moe_placement.traces import load_trace, sample_batches

ESFT = Path(__file__).resolve().parents[3] / "shared" / "traces" / "esft_lite_intent_law_top6.npz"
MODEL = model_preset("deepseek-v2-lite")
TOPOLOGY = parse_topology("2x4", MODEL.num_experts, 16)


def one_hot_signature(experts: list[int]) -> np.ndarray:
    signature = np.zeros((MODEL.num_layers, MODEL.num_experts))
    signature[:, experts] = 1.0
    return signature


def test_rank_scores_prefer_locality_under_the_cap_and_stay_in_unit_range() -> None:
    locality = np.array([0.9, 0.9, 0.2, 0.2])
    scores = rank_scores(locality, np.array([0.0, 10.0, 0.0, 0.0]), tokens=10, load_cap=1.2)
    assert scores.argmax() == 0 and np.all((scores >= 0) & (scores <= 1))
    # Rank 0 and 1 far above the mean: the request goes to the other node.
    scores = rank_scores(locality, np.array([500.0, 500.0, 0.0, 10.0]), tokens=10, load_cap=1.2)
    assert scores.argmax() == 2 and scores[:2].max() < 0.5


def test_assign_domain_nodes_fills_nodes_evenly() -> None:
    share = assign_domain_nodes(np.array([3.0, 1.0]), 2)
    np.testing.assert_allclose(share.sum(1), 1.0)
    np.testing.assert_allclose(share.T @ np.array([3.0, 1.0]), [2.0, 2.0])


def test_router_learns_domains_and_sends_them_to_separate_nodes() -> None:
    router = RequestRouter(TOPOLOGY, MODEL.num_layers, MODEL.num_experts)
    for _ in range(5):
        assert router.learn(one_hot_signature([0, 1, 2, 3, 4, 5]), ["court", "contract"]) == 0
        assert router.learn(one_hot_signature([40, 41, 42, 43, 44, 45]), [17, 18, 19]) == 1
    assert router.domain_of_prompt(["the", "contract"]) == 0
    assert router.domain_of_prompt([18]) == 1
    assert router.domain_of_prompt(["never", "seen"]) == -1
    first = router.route(4, router.domain_of_prompt(["court"]))
    second = router.route(4, router.domain_of_prompt([17]))
    assert first.rank // 4 != second.rank // 4
    router.finish(first.rank, 4)
    assert router.outstanding[first.rank] == 0
    with pytest.raises(PlacementError, match="signature"):
        router.learn(np.zeros((2, 2)))
    with pytest.raises(PlacementError, match="available"):
        router.route(1, 0, available=np.zeros(TOPOLOGY.num_gpus, dtype=bool))


def test_node_sets_cover_every_expert_within_node_slots() -> None:
    rng = np.random.default_rng(0)
    wanted = rng.random((2, 64)) ** 4
    held = node_sets(wanted, 40)
    assert held.sum(0).tolist() == [40, 40] and held.any(1).all()


def test_home_flow_keeps_tokens_on_their_node_when_the_experts_are_there() -> None:
    """Every expert on both nodes: under ``home`` a token never leaves its node with local_first;
    under ``follow`` it starts layer l+1 where its first choice was served, on the same node too."""
    topology = parse_topology("2x2", 8, 8)
    model = MODEL.model_copy(update={"num_layers": 2, "num_experts": 8, "top_k": 2})
    placement = Placement(np.tile(np.arange(16) % 8, (2, 1)), 8, 4)
    rng = np.random.default_rng(0)
    batch = RoutingBatch(rng.integers(0, 8, (2, 64, 2)), np.arange(64) % 4)
    for flow in ("home", "follow"):
        cost = evaluate(placement, model, topology, [batch], "local_first", data_flow=flow)
        assert cost.cross_node_bytes == 0
    with pytest.raises(PlacementError, match="data_flow"):
        evaluate(placement, model, topology, [batch], data_flow="elsewhere")


@pytest.mark.skipif(not ESFT.exists(), reason="../shared/traces absent")
def test_signature_routing_with_grouped_placement_cuts_cross_node_bytes() -> None:
    """ESFT intent + law interleaved: fitted on one half, scored on the other."""
    from moe_placement.bench import interleaved_split

    fit, score = interleaved_split(load_trace(ESFT), seed=0)
    profile = fit.profile(batch_size=TOPOLOGY.num_gpus * 512, phase="prefill")
    placement = plan("grouped", profile, MODEL, TOPOLOGY).placement
    homes = request_homes("signature", score, TOPOLOGY, profile, placement)
    rr = round_robin_homes(score.num_sequences, TOPOLOGY.num_gpus)
    lengths = np.diff(score.seq_offsets)
    assert tokens_per_gpu_imbalance(homes, lengths, 8) <= tokens_per_gpu_imbalance(rr, lengths, 8)
    costs = {}
    for name, home in (("signature", homes), ("round_robin", rr)):
        batches = sample_batches(score, 8, 512, 2, "prefill", np.random.default_rng(0), home)
        costs[name] = evaluate(placement, MODEL, TOPOLOGY, batches, "local_first")
    assert costs["signature"].cross_node_bytes < 0.9 * costs["round_robin"].cross_node_bytes
    presence = node_presence(placement.physical_to_logical_map, TOPOLOGY, 64)
    assert (presence.sum(-1) >= 1).all()
