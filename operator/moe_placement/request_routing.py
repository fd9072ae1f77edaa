"""Workload-aware request routing: which data-parallel rank (home GPU) a request runs on.

Under the engines' data flow (a token lives on its attention rank; every layer dispatches it to its
experts and combines it back), the rank a request runs on decides its cross-node bytes. Requests
whose expert use is alike (a domain) are sent to the node that hosts their experts, under a cap on
how far a rank's outstanding tokens may run ahead of the mean.

What the router sees before a request runs: its prompt. Offline (a trace of prompts) that is the
prompt's own expert choices, whose signature picks the nearest domain; online (an HTTP request) it
is the prompt's token ids or words, whose hashed counts vote for a domain (naive Bayes) learned from
the signatures engines report for finished requests. Both end in ``rank_scores``: one score in
[0, 1] per rank, and the request goes to the best.

Shapes: L layers, E experts, N nodes, G GPUs (ranks), D domains, H hashed prompt features,
T tokens, k experts per token, R requests.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe_placement.grouping import expert_signature
from moe_placement.presence import node_presence
from moe_placement.models import Placement, PlacementError, Topology, WorkloadProfile
from moe_placement.traces import Trace

FEATURE_BUCKETS = 1 << 16
NEW_DOMAIN_SIMILARITY = 0.8  # a reported signature less alike than this to every domain starts one
MAX_DOMAINS = 16
REQUEST_ROUTERS = ("round_robin", "signature")
OWN_SIGNATURE_WEIGHT = 0.0  # share of a prompt's own signature in its predicted one (offline)
LOAD_CAP = 1.2  # a rank may hold at most this times the mean outstanding tokens


# ---------------------------------------------------------------------------------------------
# The decision


def node_locality(signature: np.ndarray, on_node: np.ndarray) -> np.ndarray:
    """Share of a request's expected expert choices that have a replica on each node, [N], of its
    signature [L, E] and on_node [L, E, N] (0/1)."""
    total = max(float(signature.sum()), 1e-12)
    return np.einsum("le,len->n", signature, on_node) / total


def rank_scores(
    locality: np.ndarray,
    outstanding: np.ndarray,
    tokens: float,
    load_cap: float = LOAD_CAP,
) -> np.ndarray:
    """Score in [0, 1] of each rank for one request of ``tokens`` tokens; it goes to the highest.

    locality [G]: share of the request's expected expert choices on the rank's node;
    outstanding [G]: tokens each rank has queued or running. A rank under the cap (with the request,
    at most ``load_cap`` x the mean outstanding; the least loaded rank always is) scores
    0.5 + 0.49 x locality + 0.01 x (its spare load), so locality decides and load breaks ties within
    a node; a rank over the cap scores below 0.5, the less loaded the higher."""
    outstanding = np.asarray(outstanding, dtype=np.float64)
    busiest = max(float(outstanding.max()), 1.0)
    spare = 1.0 - outstanding / busiest
    mean_after = (outstanding.sum() + tokens) / len(outstanding)
    under_cap = (outstanding + tokens <= load_cap * mean_after) | (
        outstanding == outstanding.min()
    )
    return np.where(under_cap, 0.5 + 0.49 * np.clip(locality, 0, 1) + 0.01 * spare, 0.49 * spare)


def assign_domain_nodes(domain_tokens: np.ndarray, num_nodes: int) -> np.ndarray:
    """Share of each domain's tokens sent to each node, [D, N], of tokens per domain [D]: largest
    domain first, each fills the emptiest nodes up to an equal share, splitting where it must
    (a domain bigger than a node's share spans several)."""
    domain_tokens = np.asarray(domain_tokens, dtype=np.float64)
    share = np.zeros((len(domain_tokens), num_nodes))
    capacity = domain_tokens.sum() / num_nodes
    filled = np.zeros(num_nodes)
    for domain in np.argsort(-domain_tokens, kind="stable"):
        rest = domain_tokens[domain]
        for node in np.argsort(filled, kind="stable"):
            if rest <= 1e-9 * capacity:
                break
            take = min(rest, capacity - filled[node])
            if take <= 1e-9 * capacity:
                continue
            share[domain, node] += take / domain_tokens[domain]
            filled[node] += take
            rest -= take
    return share


def node_demand(signatures: np.ndarray, weights: np.ndarray, node_share: np.ndarray) -> np.ndarray:
    """Share of all expert choices that each node's requests bring to each expert, summed over
    layers, [N, E] (sums to 1), of groups' signatures [D, L, E], their weights [D] (requests or
    tokens) and where their requests go, node_share [D, N] (a row of zeros: where
    ``assign_domain_nodes`` would send the group). What a group-aware placement is solved for:
    two of these far apart (``demand_drift``) call for another placement."""
    weights = np.asarray(weights, dtype=np.float64)
    share = np.array(node_share, dtype=np.float64)
    unrouted = share.sum(1) <= 0
    if unrouted.any():
        share[unrouted] = assign_domain_nodes(weights, share.shape[1])[unrouted]
    demand = np.einsum("d,dn,de->ne", weights, share, np.asarray(signatures).sum(1))
    return demand / max(float(demand.sum()), 1e-12)


def demand_drift(before: np.ndarray, after: np.ndarray) -> float:
    """Total variation distance between two ``node_demand`` [N, E] in [0, 1] (1: different shapes)."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape:
        return 1.0
    return float(0.5 * np.abs(before - after).sum())


# ---------------------------------------------------------------------------------------------
# Prompt features


def prompt_features(tokens: Sequence[int] | Sequence[str]) -> np.ndarray:
    """Hashed bucket of each prompt token id or word (CRC32, stable across processes), [T]."""
    return np.array(
        [zlib.crc32(str(token).encode()) % FEATURE_BUCKETS for token in tokens], dtype=np.int64
    )


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes: its rank, the domain it was taken for (-1: none known yet), and
    the score of every rank [G]."""

    rank: int
    domain: int
    scores: np.ndarray


class RequestRouter:
    """The learned state and the decision: domains (signature centroids [D, L, E]), hashed prompt
    features per domain [H, D], which nodes host which experts, and each rank's outstanding tokens.

    Not thread-safe; the HTTP service calls it from one event loop."""

    def __init__(
        self,
        topology: Topology,
        num_layers: int,
        num_experts: int,
        *,
        placement: Placement | None = None,
        load_cap: float = LOAD_CAP,
        max_domains: int = MAX_DOMAINS,
    ) -> None:
        if load_cap < 1:
            raise PlacementError(f"load_cap: {load_cap} must be >= 1 (a multiple of the mean load)")
        self.topology = topology
        self.num_layers, self.num_experts = num_layers, num_experts
        self.load_cap = float(load_cap)
        self.max_domains = max_domains
        self.signatures = np.zeros((0, num_layers, num_experts))
        self.signature_weight = np.zeros(0)  # requests (or tokens) behind each centroid, [D]
        self.feature_counts = np.zeros((FEATURE_BUCKETS, 0))
        self.feature_totals = np.zeros(0)  # feature_counts summed over features, [D]
        self.outstanding = np.zeros(topology.num_gpus)
        self.routed_tokens = np.zeros((0, topology.num_nodes))  # prompt tokens per domain and node
        self.on_node: np.ndarray | None = None
        if placement is not None:
            self.set_placement(placement)

    # -- what the router knows ---------------------------------------------------------------------

    def set_placement(self, placement: Placement) -> None:
        """Use ``placement``'s expert-to-node map for locality."""
        if placement.num_layers != self.num_layers or placement.num_experts != self.num_experts:
            raise PlacementError(
                f"placement: {placement.num_layers} layers x {placement.num_experts} experts, "
                f"router has {self.num_layers} x {self.num_experts}"
            )
        if placement.num_gpus != self.topology.num_gpus:
            raise PlacementError(
                f"placement: {placement.num_gpus} GPUs, topology has {self.topology.num_gpus}"
            )
        presence = node_presence(placement.physical_to_logical_map, self.topology, self.num_experts)
        self.on_node = (presence > 0).astype(np.float64)

    def add_domains(self, signatures: np.ndarray, weights: np.ndarray) -> None:
        """Known domains: signatures [D', L, E] (each layer summing to k), weights [D'] (tokens)."""
        signatures = np.asarray(signatures, dtype=np.float64)
        if signatures.ndim != 3 or signatures.shape[1:] != (self.num_layers, self.num_experts):
            raise PlacementError(
                f"signatures: shape {signatures.shape}, expected [D, {self.num_layers}, "
                f"{self.num_experts}]"
            )
        self.signatures = np.concatenate([self.signatures, signatures])
        self.signature_weight = np.concatenate([self.signature_weight, np.asarray(weights, float)])
        extra = len(signatures)
        self.feature_counts = np.pad(self.feature_counts, ((0, 0), (0, extra)))
        self.feature_totals = np.pad(self.feature_totals, (0, extra))
        self.routed_tokens = np.pad(self.routed_tokens, ((0, extra), (0, 0)))

    def learn(self, signature: np.ndarray, prompt: Sequence[int] | Sequence[str] = ()) -> int:
        """A finished request's reported signature [L, E] (and its prompt's token ids or words):
        folded into the nearest domain, or a new one when none is alike. Returns the domain."""
        signature = np.asarray(signature, dtype=np.float64)
        if signature.shape != (self.num_layers, self.num_experts):
            raise PlacementError(
                f"signature: shape {signature.shape}, expected [{self.num_layers}, {self.num_experts}]"
            )
        if not np.all(np.isfinite(signature)) or np.any(signature < 0) or signature.sum() <= 0:
            raise PlacementError("signature: shares must be finite, >= 0 and not all zero")
        similarity = self._similarity(signature)
        if len(similarity) and (
            similarity.max() >= NEW_DOMAIN_SIMILARITY or len(similarity) >= self.max_domains
        ):
            domain = int(similarity.argmax())
            weight = self.signature_weight[domain] + 1.0
            self.signatures[domain] += (signature - self.signatures[domain]) / weight
            self.signature_weight[domain] = weight
        else:
            domain = len(self.signatures)
            self.add_domains(signature[None], np.ones(1))
        if len(prompt):
            np.add.at(self.feature_counts[:, domain], prompt_features(prompt), 1.0)
            self.feature_totals[domain] += len(prompt)
        return domain

    def _similarity(self, signature: np.ndarray) -> np.ndarray:
        """Cosine of a signature [L, E] with every domain, [D]."""
        if not len(self.signatures):
            return np.zeros(0)
        flat = self.signatures.reshape(len(self.signatures), -1)
        norms = np.linalg.norm(flat, axis=1) * np.linalg.norm(signature) + 1e-12
        return flat @ signature.ravel() / norms

    # -- prediction ----------------------------------------------------------------------------

    def domain_of_signature(self, prompt_signature: np.ndarray) -> int:
        """The domain most alike to a prompt's own signature [L, E] (-1 when none is known)."""
        similarity = self._similarity(np.asarray(prompt_signature, dtype=np.float64))
        return int(similarity.argmax()) if len(similarity) else -1

    def domain_of_prompt(self, prompt: Sequence[int] | Sequence[str]) -> int:
        """The domain whose learned prompts share most of this prompt's features (multinomial
        naive Bayes, add-one smoothing; -1 when nothing is learned yet or no feature was seen)."""
        if not len(self.signatures) or not len(prompt):
            return -1
        counts = self.feature_counts[prompt_features(prompt)]  # [T, D]
        if counts.sum() == 0:
            return -1
        log_likelihood = np.log((counts + 1.0) / (self.feature_totals + FEATURE_BUCKETS)).sum(0)
        log_prior = np.log((self.signature_weight + 1.0) / (self.signature_weight.sum() + 1.0))
        return int(np.argmax(log_likelihood + log_prior))

    def locality(self, domain: int = -1, signature: np.ndarray | None = None) -> np.ndarray:
        """Share of a request's expected choices on each rank's node, [G]: of its predicted
        ``signature`` [L, E] when given, else of its domain's centroid (all zero for an unknown
        domain). Without a placement, a domain's locality is its share of ``assign_domain_nodes``
        (the ``grouped`` placement co-places the same way) and a bare signature counts nowhere."""
        per_node = np.zeros(self.topology.num_nodes)
        if self.on_node is not None and signature is not None:
            per_node = node_locality(np.asarray(signature, dtype=np.float64), self.on_node)
        elif domain >= 0 and self.on_node is not None:
            per_node = node_locality(self.signatures[domain], self.on_node)
        elif domain >= 0:
            per_node = assign_domain_nodes(self.signature_weight, self.topology.num_nodes)[domain]
        return np.repeat(per_node, self.topology.gpus_per_node)

    # -- the decision ----------------------------------------------------------------------------

    def scores(self, tokens: int, domain: int = -1, signature: np.ndarray | None = None) -> np.ndarray:
        """``rank_scores`` of a request of ``tokens`` prompt tokens, [G]; changes nothing."""
        return rank_scores(self.locality(domain, signature), self.outstanding, tokens, self.load_cap)

    def route(
        self,
        tokens: int,
        domain: int = -1,
        signature: np.ndarray | None = None,
        available: np.ndarray | None = None,
    ) -> RouteDecision:
        """Pick the rank for a request of ``tokens`` prompt tokens, taken for ``domain`` (-1:
        unknown) with predicted ``signature`` [L, E] (optional), among the ``available`` ranks
        ([G] bool, default all; at least one), and count its tokens as outstanding there."""
        scores = self.scores(tokens, domain, signature)
        if available is not None:
            if not np.any(available):
                raise PlacementError("available: no rank to route to")
            scores = np.where(available, scores, -1.0)
        rank = int(np.argmax(scores))
        self.outstanding[rank] += tokens
        if domain >= 0:
            self.routed_tokens[domain, rank // self.topology.gpus_per_node] += tokens
        return RouteDecision(rank=rank, domain=domain, scores=scores)

    def finish(self, rank: int, tokens: int) -> None:
        """A request of ``tokens`` tokens left rank ``rank``."""
        self.outstanding[rank] = max(self.outstanding[rank] - tokens, 0.0)

    def node_share(self) -> np.ndarray:
        """Share of each domain's routed prompt tokens per node, [D, N] (zero rows: none routed)."""
        totals = self.routed_tokens.sum(1, keepdims=True)
        return np.divide(self.routed_tokens, totals, out=np.zeros_like(self.routed_tokens), where=totals > 0)


# ---------------------------------------------------------------------------------------------
# Offline: a trace of prompts


def domain_signatures_of_profile(profile: WorkloadProfile) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, signatures [D, L, E] and tokens [D] of a profile's domains (its whole load as one
    domain when it has none)."""
    loads = profile.domain_loads or {"": profile.load}
    names = list(loads)
    stacked = np.stack([np.asarray(loads[name], dtype=np.float64) for name in names])
    tokens = stacked[:, 0].sum(1) / profile.top_k
    return names, stacked / np.maximum(tokens, 1e-12)[:, None, None], tokens


def route_prompts(
    router: RequestRouter,
    prompt_ids: np.ndarray,
    seq_offsets: np.ndarray,
    own_weight: float = OWN_SIGNATURE_WEIGHT,
) -> np.ndarray:
    """Home GPU of every request [R], in order, of their prompts' expert choices [L, T, k] with
    request r holding tokens seq_offsets[r] .. seq_offsets[r+1]-1. A request's predicted signature
    is its nearest domain's, mixed with ``own_weight`` of its prompt's own (its prompt's alone when
    no domain is known). Each request's prompt tokens count as outstanding on its rank for the rest
    of the run (no request finishes)."""
    homes = np.empty(len(seq_offsets) - 1, dtype=np.int64)
    for request, (start, stop) in enumerate(zip(seq_offsets[:-1], seq_offsets[1:])):
        own = expert_signature(prompt_ids[:, start:stop], router.num_experts)
        domain = router.domain_of_signature(own)
        predicted = own if domain < 0 else own_weight * own + (1 - own_weight) * router.signatures[domain]
        homes[request] = router.route(int(stop - start), domain, predicted).rank
    return homes


def round_robin_homes(num_requests: int, num_gpus: int) -> np.ndarray:
    """Request r on GPU r mod G, [R] (what an engine's DP controller does by default)."""
    return np.arange(num_requests) % num_gpus


def tokens_per_gpu_imbalance(homes: np.ndarray, lengths: np.ndarray, num_gpus: int) -> float:
    """Max / mean tokens per GPU of an assignment: homes [R], lengths [R]."""
    per_gpu = np.bincount(homes, weights=lengths, minlength=num_gpus)
    return float(per_gpu.max() / max(per_gpu.mean(), 1e-12))


def prompts_of(trace: Trace, prefill_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's first ``prefill_fraction`` of tokens (at least one): expert ids [L, T', k]
    and offsets [R+1], what a router may see of the requests."""
    starts, lengths = trace.seq_offsets[:-1], np.diff(trace.seq_offsets)
    prompt_lengths = np.clip(np.round(lengths * prefill_fraction).astype(np.int64), 1, lengths)
    tokens = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, prompt_lengths)])
    return trace.expert_ids[:, tokens], np.concatenate([[0], np.cumsum(prompt_lengths)])


def request_homes(
    request_router: str,
    requests: Trace,
    topology: Topology,
    fit: WorkloadProfile | None = None,
    placement: Placement | None = None,
    load_cap: float = LOAD_CAP,
) -> np.ndarray:
    """Home GPU of each request of ``requests`` [R] by ``request_router``: ``round_robin``, or
    ``signature`` (domains from ``fit``, locality from ``placement``, seeing each sequence's first
    half as its prompt)."""
    if request_router == "round_robin":
        return round_robin_homes(requests.num_sequences, topology.num_gpus)
    if request_router != "signature":
        raise PlacementError(
            f"request_router: {request_router!r} is not one of {', '.join(REQUEST_ROUTERS)}"
        )
    router = RequestRouter(
        topology, requests.num_layers, requests.num_experts, placement=placement, load_cap=load_cap
    )
    if fit is not None:
        _, signatures, tokens = domain_signatures_of_profile(fit)
        router.add_domains(signatures, tokens)
    return route_prompts(router, *prompts_of(requests))
