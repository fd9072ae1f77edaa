"""Workload-aware grouping (the multi-node paper): expert signatures, a prefill -> decode
predictor, and micro-batch grouping of requests that activate few experts, near their experts' node.

Shapes: L layers, E experts, N nodes, T tokens, k experts per token, R requests (sequences),
D domains.
"""

from __future__ import annotations

import numpy as np

from moe_placement.models import Placement, PlacementError, Topology
from moe_placement.presence import node_presence
from moe_placement.traces import Trace


def expert_signature(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of tokens choosing each expert per layer, [L, E] (each layer sums to k), of ids [L, T, k]."""
    num_layers, num_tokens, _ = expert_ids.shape
    flat = (expert_ids + num_experts * np.arange(num_layers)[:, None, None]).ravel()
    counts = np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    return counts / max(num_tokens, 1)


def domain_signatures(trace: Trace) -> dict[str, np.ndarray]:
    """Signature [L, E] of each domain's tokens."""
    token_domain = np.array(trace.domains)[trace.sequence_of_token()]
    return {
        domain: expert_signature(trace.expert_ids[:, token_domain == domain], trace.num_experts)
        for domain in trace.domain_names
    }


def prefill_decode_split(
    trace: Trace, prefill_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence, its first ``prefill_fraction`` of tokens (the prompt) and the rest (what decode
    generates): signatures [S, L, E] each. ESFT rows are aligned by sequence, so a sequence's later
    tokens stand for its decode steps. Sequences need two tokens."""
    if not 0.0 < prefill_fraction < 1.0:
        raise PlacementError(f"prefill_fraction: {prefill_fraction} not strictly between 0 and 1")
    lengths = np.diff(trace.seq_offsets)
    if lengths.min() < 2:
        raise PlacementError(
            "seq_offsets: every sequence needs two tokens to split prefill from decode"
        )
    prefill, decode = [], []
    for start, length in zip(trace.seq_offsets[:-1], lengths):
        cut = start + min(max(int(round(length * prefill_fraction)), 1), length - 1)
        prefill.append(expert_signature(trace.expert_ids[:, start:cut], trace.num_experts))
        decode.append(
            expert_signature(trace.expert_ids[:, cut : start + length], trace.num_experts)
        )
    return np.stack(prefill), np.stack(decode)


def predict_decode(
    prefill: np.ndarray, domains: np.ndarray, own_weight: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted decode signature of each request: the signature of the domain its prefill looks
    most like (cosine over all layers), mixed with ``own_weight`` of its own prefill signature. On
    ESFT a prompt's own signature (~30 tokens) is too noisy to add: precision@k falls from 0.60 to
    0.56 at weight 0.1, so by default the prefill only picks the domain.

    prefill [R, L, E], domains [D, L, E] -> (predicted [R, L, E], domain index [R])."""
    flat_requests = prefill.reshape(len(prefill), -1)
    flat_domains = domains.reshape(len(domains), -1)
    similarity = (flat_requests @ flat_domains.T) / (
        np.linalg.norm(flat_requests, axis=1, keepdims=True) * np.linalg.norm(flat_domains, axis=1)
        + 1e-12
    )
    nearest = similarity.argmax(axis=1)
    return own_weight * prefill + (1.0 - own_weight) * domains[nearest], nearest


def predictor_accuracy(
    fit: Trace, test: Trace, prefill_fraction: float = 0.5, own_weight: float = 0.0
) -> dict[str, float]:
    """How well prefill predicts decode on ``test``'s sequences, with domain signatures from ``fit``.

    For each request and layer, with m = k: ``precision_at_k``: share of the predicted m most used
    experts among the m most used in decode; ``recall``: share of the decode (token, expert) choices
    that fall in the predicted top m; ``spearman``: rank correlation of predicted and decode
    signatures; ``domain_accuracy``: share of requests whose nearest domain is their own. Each figure
    also for two references: ``global`` (the fit trace's overall popularity) and ``prefill_only``."""
    signatures = domain_signatures(fit)
    names = list(signatures)
    prefill, decode = prefill_decode_split(test, prefill_fraction)
    predicted, nearest = predict_decode(
        prefill, np.stack([signatures[n] for n in names]), own_weight
    )
    overall = np.broadcast_to(expert_signature(fit.expert_ids, fit.num_experts), predicted.shape)
    result = {"requests": float(len(prefill))}
    for name, guess in (("", predicted), ("global_", overall), ("prefill_only_", prefill)):
        result.update(
            {f"{name}{key}": value for key, value in _agreement(guess, decode, test.top_k).items()}
        )
    own_domain = np.array([names.index(d) if d in names else -1 for d in test.domains])
    result["domain_accuracy"] = float(np.mean(nearest == own_domain))
    return result


def _agreement(predicted: np.ndarray, actual: np.ndarray, top: int) -> dict[str, float]:
    """precision_at_k, recall and spearman of predicted vs actual signatures [R, L, E]."""
    predicted_top = np.argsort(-predicted, axis=-1, kind="stable")[..., :top]
    actual_top = np.argsort(-actual, axis=-1, kind="stable")[..., :top]
    hits = (predicted_top[..., :, None] == actual_top[..., None, :]).any(-1).mean(-1)
    covered = np.take_along_axis(actual, predicted_top, -1).sum(-1) / np.maximum(
        actual.sum(-1), 1e-12
    )
    return {
        "precision_at_k": float(hits.mean()),
        "recall": float(covered.mean()),
        "spearman": float(np.mean(_spearman(predicted, actual))),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis (ties broken by position), [...]."""
    rank_a = np.argsort(np.argsort(a, axis=-1, kind="stable"), axis=-1).astype(np.float64)
    rank_b = np.argsort(np.argsort(b, axis=-1, kind="stable"), axis=-1).astype(np.float64)
    rank_a -= rank_a.mean(-1, keepdims=True)
    rank_b -= rank_b.mean(-1, keepdims=True)
    return (rank_a * rank_b).sum(-1) / np.sqrt((rank_a**2).sum(-1) * (rank_b**2).sum(-1) + 1e-12)


def expected_activated(signatures: np.ndarray) -> float:
    """Expected distinct experts one decode step of these requests activates, summed over layers:
    sum_l,e 1 - prod_r (1 - p[r, l, e]), with p a request's chance of choosing e (signature).
    signatures: [R, L, E]."""
    chance = np.clip(signatures, 0.0, 1.0)
    return float((1.0 - np.prod(1.0 - chance, axis=0)).sum())


def home_nodes(signatures: np.ndarray, placement: Placement, topology: Topology) -> np.ndarray:
    """The node holding most of each request's expected expert choices, [R], of signatures [R, L, E]
    (an expert with replicas on several nodes counts on each)."""
    on_node = node_presence(placement.physical_to_logical_map, topology, placement.num_experts) > 0
    return np.einsum("rle,len->rn", signatures, on_node.astype(np.float64)).argmax(axis=1)


def group_requests(
    signatures: np.ndarray, group_size: int, home_node: np.ndarray | None = None, num_nodes: int = 1
) -> list[np.ndarray]:
    """Micro-batches of ``group_size`` requests (the last may be smaller) that activate few experts:
    each batch starts from the request with the most expected experts still unplaced and adds the
    request that raises its expected activated experts least. With ``home_node`` [R], batches are
    formed per node from that node's requests first, so each runs where its experts live (fewer
    cross-node tokens); the leftovers of all nodes are grouped together at the end.

    signatures: [R, L, E] predicted -> list of request-index arrays."""
    if group_size <= 0:
        raise PlacementError(f"group_size: {group_size} must be > 0")
    chance = np.clip(signatures.reshape(len(signatures), -1), 0.0, 1.0)
    pools = (
        [np.nonzero(home_node == node)[0] for node in range(num_nodes)]
        if home_node is not None
        else [np.arange(len(signatures))]
    )
    groups: list[np.ndarray] = []
    leftovers: list[int] = []
    for pool in pools:
        full = len(pool) - len(pool) % group_size if home_node is not None else len(pool)
        formed, rest = _greedy_groups(chance, pool, group_size, full)
        groups += formed
        leftovers += rest
    if leftovers:
        formed, _ = _greedy_groups(chance, np.array(leftovers), group_size, len(leftovers))
        groups += formed
    return groups


def _greedy_groups(
    chance: np.ndarray, pool: np.ndarray, group_size: int, count: int
) -> tuple[list[np.ndarray], list[int]]:
    """Group ``count`` requests of ``pool`` greedily; the rest are returned ungrouped.
    chance: [R, L*E]."""
    remaining = list(pool)
    groups = []
    while count > 0 and remaining:
        size = min(group_size, count)
        seed = remaining[int(np.argmax(chance[remaining].sum(1)))]
        group = [seed]
        remaining.remove(seed)
        idle = 1.0 - chance[seed]  # chance that each (layer, expert) is still idle
        while len(group) < size and remaining:
            increase = chance[remaining] @ idle
            pick = remaining[int(np.argmin(increase))]
            group.append(pick)
            remaining.remove(pick)
            idle = idle * (1.0 - chance[pick])
        groups.append(np.array(group))
        count -= len(group)
    return groups, remaining


def decode_step_activated(
    trace: Trace, groups: list[np.ndarray], prefill_fraction: float = 0.5, steps: int = 16
) -> float:
    """Mean distinct experts per layer that a micro-batch's decode steps activate, measured on the
    trace: at step t each request of the batch emits its t-th token after its prompt."""
    total, count = 0.0, 0
    starts = trace.seq_offsets[:-1]
    lengths = np.diff(trace.seq_offsets)
    cuts = starts + np.clip(np.round(lengths * prefill_fraction).astype(np.int64), 1, lengths - 1)
    for group in groups:
        for step in range(steps):
            tokens = np.minimum(cuts[group] + step, starts[group] + lengths[group] - 1)
            ids = trace.expert_ids[:, tokens].reshape(trace.num_layers, -1)
            total += np.mean([len(np.unique(row)) for row in ids])
            count += 1
    return total / max(count, 1)


def cross_node_share(
    trace: Trace,
    groups: list[np.ndarray],
    node_of_group: np.ndarray,
    placement: Placement,
    topology: Topology,
    prefill_fraction: float = 0.5,
) -> float:
    """Share of the decode (token, expert) choices of each micro-batch that have no replica on the
    node the micro-batch runs on (node_of_group [len(groups)])."""
    on_node = node_presence(placement.physical_to_logical_map, topology, placement.num_experts) > 0
    starts, lengths = trace.seq_offsets[:-1], np.diff(trace.seq_offsets)
    cuts = starts + np.clip(np.round(lengths * prefill_fraction).astype(np.int64), 1, lengths - 1)
    remote, total = 0, 0
    layers = np.arange(trace.num_layers)[:, None, None]
    for group, node in zip(groups, node_of_group):
        tokens = np.concatenate([np.arange(cuts[r], starts[r] + lengths[r]) for r in group])
        ids = trace.expert_ids[:, tokens]
        remote += int((~on_node[layers, ids, node]).sum())
        total += ids.size
    return remote / max(total, 1)
