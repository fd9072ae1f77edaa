"""Workload-aware grouping and locality (the multi-node paper): expert signatures, a prefill -> decode
predictor, micro-batch grouping, and node-level co-placement of co-activated experts.

A token leaves a node when one of its experts has no replica there. Two statistics say where that
happens: the transitions (a token's experts at layer l and l+1: the GPU of its first choice at l is
where it starts layer l+1) and the co-activation (experts one token uses together). Co-placement puts
each layer's experts on nodes so that the tokens these statistics count stay on one node, within a
token-balance tolerance, with replicas of hot experts spread over nodes so that a local replica
exists for most tokens (``local_first`` routing then keeps them home).

Shapes: L layers, E experts, N nodes, G GPUs, S slots per GPU, T tokens, k experts per token,
R requests (sequences), D domains.
"""

from __future__ import annotations

import time

import numpy as np

from moe_placement.ilp import greedy_packing, replica_counts
from moe_placement.models import ModelShape, Placement, PlacementError, Topology, WorkloadProfile
from moe_placement.policies import PolicyOptions, SolverInfo
from moe_placement.traces import Trace

COACTIVATION_WEIGHT = 0.25  # a co-activated pair counts a quarter of a layer-to-layer transition
BALANCE_TOLERANCE = 0.05  # a node may carry 5% more than the mean tokens
MAX_SWEEPS = 3

# ---------------------------------------------------------------------------------------------
# Signatures and the prefill -> decode predictor


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


# ---------------------------------------------------------------------------------------------
# Micro-batch grouping


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


# ---------------------------------------------------------------------------------------------
# Node-level co-placement


def pair_matrices(profile: WorkloadProfile) -> tuple[np.ndarray, np.ndarray]:
    """Dense per-token pair weights: transitions [L-1, E, E] (divided by k: a token's first choice at
    l is where its k experts at l+1 start from) and symmetric co-activation [L, E, E]."""
    num_layers, num_experts = profile.load.shape
    transitions = np.zeros((max(num_layers - 1, 0), num_experts, num_experts))
    coactivation = np.zeros((num_layers, num_experts, num_experts))
    if profile.transitions is not None:
        for layer in range(num_layers - 1):
            transitions[layer] = profile.transitions.dense(layer, num_experts) / profile.top_k
    if profile.coactivation is not None:
        for layer in range(num_layers):
            pairs = profile.coactivation.dense(layer, num_experts)
            coactivation[layer] = pairs + pairs.T
    return transitions, coactivation


def node_affinity(
    layer: int,
    presence: np.ndarray,
    counts: np.ndarray,
    transitions: np.ndarray,
    coactivation: np.ndarray,
    coactivation_weight: float,
) -> np.ndarray:
    """Tokens that stay on node m if expert e of ``layer`` has a replica there, [E, N].

    presence: [L, E, N] replicas per node (0/1); counts: [L, E]. Tokens that arrive from layer-1
    replicas on m, tokens that leave e's replica on m for layer+1 experts on m, and tokens that also
    use a co-activated expert on m."""
    num_layers = presence.shape[0]
    share = presence / counts[..., None]
    affinity = (
        coactivation_weight * (coactivation[layer] @ presence[layer]) / counts[layer][:, None]
    )
    if layer > 0:
        affinity += transitions[layer - 1].T @ share[layer - 1]
    if layer < num_layers - 1:
        affinity += (transitions[layer] @ presence[layer + 1]) / counts[layer][:, None]
    return affinity


def node_presence(mapping: np.ndarray, topology: Topology, num_experts: int) -> np.ndarray:
    """Replicas of each expert on each node, [L, E, N], of a map [L, G*S]."""
    num_layers = mapping.shape[0]
    presence = np.zeros((num_layers, num_experts, topology.num_nodes), dtype=np.int64)
    layer, slot = np.nonzero(mapping >= 0)
    node = slot // (topology.slots_per_gpu * topology.gpus_per_node)
    np.add.at(presence, (layer, mapping[layer, slot], node), 1)
    return presence


def locality_score(presence: np.ndarray, counts: np.ndarray, transitions: np.ndarray) -> float:
    """Share of the layer-to-layer token flow that finds its next expert on its node. presence
    [L, E, N], counts [L, E], transitions [L-1, E, E]."""
    if len(transitions) == 0 or transitions.sum() <= 0:
        return 1.0
    share = presence / counts[..., None]
    kept = sum(
        float((share[layer].T @ transitions[layer] @ presence[layer + 1]).trace())
        for layer in range(len(transitions))
    )
    return kept / float(transitions.sum())


def greedy_nodes(load: np.ndarray, counts: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    """Replicas onto nodes, hottest first to the lightest node with room, one per node per expert.
    load, counts [E], node_slots [N] -> presence [E, N]."""
    weight = load / counts
    cap = np.ones(len(load), dtype=np.int64)
    if counts.max() > len(node_slots):
        cap = np.maximum(cap, -(-counts // len(node_slots)))
    uniform = int(node_slots.min()) if np.all(node_slots == node_slots[0]) else None
    if uniform is not None:
        return greedy_packing(weight, counts, cap, len(node_slots), uniform)
    presence = np.zeros((len(load), len(node_slots)), dtype=np.int64)
    free = node_slots.astype(np.int64).copy()
    node_load = np.zeros(len(node_slots))
    items = np.repeat(np.arange(len(load)), counts)
    for item in items[np.argsort(-weight[items], kind="stable")]:
        allowed = (free > 0) & (presence[item] < cap[item])
        node = int(np.argmin(np.where(allowed, node_load, np.inf)))
        presence[item, node] += 1
        node_load[node] += weight[item]
        free[node] -= 1
    return presence


def coplace_nodes(
    profile: WorkloadProfile,
    counts: np.ndarray,
    node_slots: np.ndarray,
    *,
    initial: np.ndarray | None = None,
    keep_bonus: np.ndarray | None = None,
    coactivation_weight: float = COACTIVATION_WEIGHT,
    balance_tolerance: float = BALANCE_TOLERANCE,
    deadline: float = float("inf"),
    sweeps: int = MAX_SWEEPS,
) -> np.ndarray:
    """Experts onto nodes per layer so that tokens stay on one node: swap local search.

    counts [L, E] replicas (at most one per node); node_slots [N] replicas each node holds.
    initial [L, E, N]: the start (default ``greedy_nodes``). keep_bonus [L, E, N]: tokens' worth
    credited for keeping a replica where it is (the migration-aware re-solve). Each layer in turn,
    the best swap of two replicas between nodes is applied while it keeps more tokens local and no
    node exceeds (1 + balance_tolerance) x the mean tokens (or its tokens before the swap).
    -> presence [L, E, N]."""
    load = profile.load
    num_layers, num_experts = load.shape
    num_nodes = len(node_slots)
    transitions, coactivation = pair_matrices(profile)
    presence = (
        np.stack(
            [greedy_nodes(load[layer], counts[layer], node_slots) for layer in range(num_layers)]
        )
        if initial is None
        else initial.astype(np.int64).copy()
    )
    if num_nodes == 1:
        return presence
    bonus = np.zeros(presence.shape) if keep_bonus is None else keep_bonus
    for _ in range(sweeps):
        improved = False
        for layer in range(num_layers):
            if time.perf_counter() > deadline:
                return presence
            improved |= _improve_layer(
                layer,
                presence,
                counts,
                transitions,
                coactivation,
                bonus[layer],
                load[layer],
                coactivation_weight,
                balance_tolerance,
            )
        if not improved:
            break
    return presence


def _improve_layer(
    layer: int,
    presence: np.ndarray,
    counts: np.ndarray,
    transitions: np.ndarray,
    coactivation: np.ndarray,
    bonus: np.ndarray,
    load: np.ndarray,
    coactivation_weight: float,
    balance_tolerance: float,
) -> bool:
    """Best-improvement swaps at one layer (presence updated in place); True if any was made."""
    weight = load / counts[layer]
    cap = (1.0 + balance_tolerance) * load.sum() / presence.shape[2]
    coupling = coactivation_weight * coactivation[layer]
    improved = False
    for _ in range(4 * presence.shape[1]):
        here = presence[layer]
        affinity = (
            node_affinity(layer, presence, counts, transitions, coactivation, coactivation_weight)
            + bonus
        )
        expert, node = np.nonzero(here)
        # gain of moving replica i to node b (-inf where its expert is already there)
        move = affinity[expert] - affinity[expert, node][:, None]
        move = np.where(here[expert] > 0, -np.inf, move)
        swap = move[:, node] + move[:, node].T
        swap -= coupling[np.ix_(expert, expert)] * (2.0 / counts[layer][expert])[:, None]
        node_load = weight @ here
        load_a = node_load[node][:, None] - weight[expert][:, None] + weight[expert][None, :]
        load_b = node_load[node][None, :] - weight[expert][None, :] + weight[expert][:, None]
        limit_a = np.maximum(cap, node_load[node])[:, None]
        limit_b = np.maximum(cap, node_load[node])[None, :]
        allowed = (
            (node[:, None] != node[None, :])
            & (load_a <= limit_a + 1e-9)
            & (load_b <= limit_b + 1e-9)
        )
        swap = np.where(allowed, swap, -np.inf)
        i, j = np.unravel_index(int(np.argmax(swap)), swap.shape)
        if not swap[i, j] > 1e-9 * max(float(load.sum()), 1.0):
            break
        presence[layer, expert[i], node[i]] -= 1
        presence[layer, expert[i], node[j]] += 1
        presence[layer, expert[j], node[j]] -= 1
        presence[layer, expert[j], node[i]] += 1
        improved = True
    return improved


def gpus_within_nodes(presence: np.ndarray, load: np.ndarray, topology: Topology) -> np.ndarray:
    """Each node's replicas onto its GPUs, tokens balanced (LPT, one replica of an expert per GPU).
    presence [L, E, N], load [L, E] -> physical_to_logical_map [L, G*S]."""
    num_layers, num_experts, num_nodes = presence.shape
    gpus_per_node, slots_per_gpu = topology.gpus_per_node, topology.slots_per_gpu
    counts = presence.sum(-1)
    mapping = np.full((num_layers, topology.num_slots), -1, dtype=np.int64)
    ones = np.ones(num_experts, dtype=np.int64)
    for layer in range(num_layers):
        weight = load[layer] / np.maximum(counts[layer], 1)
        for node in range(num_nodes):
            members = np.nonzero(presence[layer, :, node])[0]
            packing = greedy_packing(
                weight[members],
                presence[layer, members, node],
                ones[members],
                gpus_per_node,
                slots_per_gpu,
            )
            for local_gpu in range(gpus_per_node):
                experts = members[np.nonzero(packing[:, local_gpu])[0]]
                start = (node * gpus_per_node + local_gpu) * slots_per_gpu
                mapping[layer, start : start + len(experts)] = experts
    return mapping


def spread_counts(load: np.ndarray, topology: Topology) -> np.ndarray:
    """Replicas per expert for co-placement, [L, E]: extra slots to the largest load per replica,
    at most one replica per node (so hot experts get a local replica on several nodes)."""
    max_replicas = topology.num_nodes
    if load.shape[1] * max_replicas < topology.num_slots:
        max_replicas = topology.num_gpus
    return replica_counts(load, topology.num_slots, max_replicas)


def policy_locality(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Node-level co-placement of co-activated and chained experts, hot experts replicated on
    several nodes, tokens balanced over each node's GPUs -> ([L, G*S], SolverInfo). Pairs with
    ``local_first`` routing, which keeps a token on its node when a replica is there."""
    started = time.perf_counter()
    counts = spread_counts(profile.load, topology)
    node_slots = np.full(topology.num_nodes, topology.gpus_per_node * topology.slots_per_gpu)
    transitions, _ = pair_matrices(profile)
    start = np.stack(
        [
            greedy_nodes(profile.load[layer], counts[layer], node_slots)
            for layer in range(profile.num_layers)
        ]
    )
    presence = coplace_nodes(
        profile,
        counts,
        node_slots,
        initial=start,
        # the rest of the time limit packs the GPUs (a second or two at DeepSeek-V3's size)
        deadline=started + 0.9 * options.time_limit_s,
    )
    before, after = (
        locality_score(start, counts, transitions),
        locality_score(presence, counts, transitions),
    )
    mapping = gpus_within_nodes(presence, profile.load, topology)
    return mapping, SolverInfo(
        status="heuristic",
        objective=1.0 - after,
        objective_name="share of layer-to-layer token flow leaving its node",
        notes=[
            f"tokens kept on their node between layers: {after:.1%} (balanced greedy start {before:.1%})",
            f"{int((counts > 1).sum())} (layer, expert) pairs replicated on several nodes",
        ],
    )
