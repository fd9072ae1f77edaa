"""Routing traces: per-token expert choices, the files they come in, windows and batches of them.

A trace is what the routers of a MoE model chose for every token at every layer. From it come
the workload profile the placement policies fit on (``Trace.profile``) and the batches the cost
model scores on (``sample_batches``). Files that hold counts only become a ``WorkloadProfile``
(``load_profile``), and ``sample_tokens`` turns one back into tokens that keep its per-layer loads.

File kinds (detected by their content, never by their names; see docs/traces.md):
    native trace npz     expert_ids [L, T, k], num_experts; optional seq_offsets, domains, phase
    native profile npz   load [L, E], top_k; optional phase, batch_size, pairs, domain loads
    ESFT npz             <task>_expert_ids [L, T, k], <task>_gate_weights, <task>_seq_offsets
    FLAME-MoE npz        expert_ids [L, S, P, k], router_scores, token_ids
    OLMoE/Mixtral npz    <model>_expert_counts [D, 3, E], <model>_expert_counts_crosslayer
                         [D, 2, E, E]
    Qwen3 heat JSON      k, layers[i].heat [E], layers[i].pairs [[i, j, count, lift], ...]

Shapes: L layers, T tokens, k experts per token, E experts, S sequences, D domains, G GPUs,
B tokens per batch.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_placement.models import PHASES, Phase, PlacementError, RoutingBatch, SparsePairs, WorkloadProfile
from moe_placement.parallel import in_order_on_threads

# Model names of the OLMoE/Mixtral counts file -> the prefix of its keys.
OLMOE_MODELS = {"olmoe": "olmoe", "mistral": "mistral", "mixtral": "mistral"}


def _checked_expert_ids(value: object, num_experts: object) -> np.ndarray:
    """``value`` as an int64 [L, T, k] array of expert ids in 0..num_experts - 1; PlacementError
    if it is empty, ``num_experts`` is not an integer > 0, or k or an id exceeds it. A read-only
    int64 array that owns its memory is taken as it is (nothing writes to it unless its owner
    makes it writable again); any other value is copied."""
    expert_ids = value if _read_only_int64(value, 3) else _integer_array("expert_ids", value, 3)
    num_layers, num_tokens, top_k = expert_ids.shape
    if num_layers == 0 or num_tokens == 0 or top_k == 0:
        raise PlacementError(f"expert_ids: empty trace, shape {expert_ids.shape}")
    if not isinstance(num_experts, (int, np.integer)) or num_experts <= 0:
        raise PlacementError(f"num_experts: {num_experts!r} must be an integer > 0")
    if top_k > num_experts:
        raise PlacementError(f"expert_ids: top_k {top_k} exceeds num_experts {num_experts}")
    if expert_ids.min() < 0 or expert_ids.max() >= num_experts:
        raise PlacementError(
            f"expert_ids: ids must be in 0..{num_experts - 1}, "
            f"found {expert_ids.min()}..{expert_ids.max()}"
        )
    return expert_ids


def _read_only_int64(value: object, ndim: int) -> bool:
    """Whether ``value`` is an int64 array of ``ndim`` dimensions that owns its memory and is not
    writable. A trace of DeepSeek-V3's shape holds 60 MB of ids; a copy of it costs a tenth of a
    second in fresh pages."""
    return (
        isinstance(value, np.ndarray)
        and value.dtype == np.int64
        and value.ndim == ndim
        and value.flags.owndata
        and not value.flags.writeable
    )


def _checked_offsets(value: object, num_tokens: int) -> np.ndarray:
    """``value`` as integer sequence offsets [S + 1], running from 0 to ``num_tokens`` strictly
    increasing (every sequence has a token); PlacementError otherwise."""
    offsets = _integer_array("seq_offsets", value, 1)
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_tokens:
        raise PlacementError(
            f"seq_offsets: must run from 0 to T={num_tokens} with at least one sequence, "
            f"got {len(offsets)} offsets"
        )
    if np.any(np.diff(offsets) <= 0):
        raise PlacementError("seq_offsets: not strictly increasing (every sequence needs a token)")
    return offsets


@dataclass(frozen=True, eq=False)
class Trace:
    """Per-token expert choices of a window of traffic.

    expert_ids: [L, T, k] int64, column 0 the token's first choice (highest gate score).
    seq_offsets: [S+1] int64, sequence s holds tokens seq_offsets[s] .. seq_offsets[s+1]-1; one
        sequence [0, T] when the sequences are unknown.
    domains: [S] task domain of each sequence ("" when unknown).

    The arrays are copied and made read-only on construction; expert_ids is taken without a copy
    when it is already a read-only int64 array that owns its memory.
    """

    expert_ids: np.ndarray
    num_experts: int
    seq_offsets: np.ndarray
    domains: tuple[str, ...]
    phase: Phase = "prefill"
    name: str = ""

    def __post_init__(self) -> None:
        expert_ids = _checked_expert_ids(self.expert_ids, self.num_experts)
        offsets = _checked_offsets(self.seq_offsets, expert_ids.shape[1])
        domains = tuple(str(domain) for domain in self.domains)
        if len(domains) != len(offsets) - 1:
            raise PlacementError(f"domains: {len(domains)} names for {len(offsets) - 1} sequences")
        if self.phase not in PHASES:
            raise PlacementError(f"phase: {self.phase!r} is not prefill or decode")
        expert_ids.setflags(write=False)
        offsets.setflags(write=False)
        object.__setattr__(self, "expert_ids", expert_ids)
        object.__setattr__(self, "num_experts", int(self.num_experts))
        object.__setattr__(self, "seq_offsets", offsets)
        object.__setattr__(self, "domains", domains)

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_sequences(self) -> int:
        return len(self.domains)

    @property
    def domain_names(self) -> tuple[str, ...]:
        """The distinct domains, in order of first appearance."""
        return tuple(dict.fromkeys(self.domains))

    def sequence_of_token(self) -> np.ndarray:
        """Sequence index of every token, shape [T]."""
        return np.repeat(np.arange(self.num_sequences), np.diff(self.seq_offsets))

    def select_sequences(self, sequence_indices: np.ndarray, name: str | None = None) -> Trace:
        """The trace of the given sequences, in the given order, shape [S'] of indices; it keeps
        this trace's name unless given another."""
        indices = _integer_array("sequence_indices", sequence_indices, 1)
        if len(indices) == 0:
            raise PlacementError("sequence_indices: empty selection")
        if indices.min() < 0 or indices.max() >= self.num_sequences:
            raise PlacementError(
                f"sequence_indices: must be in 0..{self.num_sequences - 1}, "
                f"found {indices.min()}..{indices.max()}"
            )
        starts, lengths = self.seq_offsets[indices], np.diff(self.seq_offsets)[indices]
        new_offsets = np.concatenate([[0], np.cumsum(lengths)])
        # Token t of the selection is token (t - new start of its sequence) + old start.
        tokens = np.arange(new_offsets[-1]) + np.repeat(starts - new_offsets[:-1], lengths)
        return Trace(
            expert_ids=self.expert_ids[:, tokens],
            num_experts=self.num_experts,
            seq_offsets=new_offsets,
            domains=tuple(self.domains[i] for i in indices),
            phase=self.phase,
            name=self.name if name is None else name,
        )

    def select_domain(self, domain: str) -> Trace:
        """The trace of the sequences of one domain."""
        indices = [i for i, name in enumerate(self.domains) if name == domain]
        if not indices:
            raise PlacementError(
                f"task: unknown domain {domain!r} in trace {self.name!r}; "
                f"known: {', '.join(repr(name) for name in self.domain_names)}"
            )
        return self.select_sequences(
            np.array(indices), f"{self.name}:{domain}" if self.name else domain
        )

    def split(self, fraction: float = 0.5) -> tuple[Trace, Trace]:
        """Two traces by whole sequences: the first ``fraction`` of each domain's sequences, in
        order, and the rest ("fit on one window, score on the next"). Splitting per domain keeps
        every domain's share of sequences in both halves. Each domain needs two sequences."""
        if not 0.0 < fraction < 1.0:
            raise PlacementError(f"fraction: {fraction} not strictly between 0 and 1")
        domains = np.array(self.domains)
        in_first = np.zeros(self.num_sequences, dtype=bool)
        for domain in self.domain_names:
            members = np.nonzero(domains == domain)[0]
            if len(members) < 2:
                raise PlacementError(
                    f"domains: domain {domain!r} has {len(members)} sequence; split needs 2"
                )
            count = min(max(round(fraction * len(members)), 1), len(members) - 1)
            in_first[members[:count]] = True
        return (
            self.select_sequences(np.nonzero(in_first)[0]),
            self.select_sequences(np.nonzero(~in_first)[0]),
        )

    def windows(self, num_windows: int) -> list[Trace]:
        """``num_windows`` consecutive traces by whole sequences, of about equal token counts."""
        if not 1 <= num_windows <= self.num_sequences:
            raise PlacementError(
                f"num_windows: {num_windows} not in 1..{self.num_sequences} (the sequences)"
            )
        targets = np.arange(1, num_windows) * self.num_tokens / num_windows
        cuts = np.abs(self.seq_offsets[None, :] - targets[:, None]).argmin(axis=1)
        # Nudge the cuts apart so that every window keeps at least one sequence.
        bounds = [0]
        for window, cut in enumerate(cuts, start=1):
            bounds.append(
                min(max(int(cut), bounds[-1] + 1), self.num_sequences - num_windows + window)
            )
        bounds.append(self.num_sequences)
        return [
            self.select_sequences(np.arange(start, stop))
            for start, stop in zip(bounds[:-1], bounds[1:])
        ]

    def domain_loads(self) -> dict[str, np.ndarray]:
        """Load [L, E] of each domain, in order of first appearance; empty for one domain."""
        names = self.domain_names
        if len(names) < 2:
            return {}
        index = {name: position for position, name in enumerate(names)}
        sequence_domain = np.array([index[domain] for domain in self.domains])
        # One layer at a time, each token's ids shifted into its domain's block of E: no copy of
        # the whole trace per domain.
        shift = (sequence_domain[self.sequence_of_token()] * self.num_experts)[:, None]
        by_layer = np.stack([
            np.bincount((layer_ids + shift).ravel(), minlength=len(names) * self.num_experts)
            for layer_ids in self.expert_ids
        ]).reshape(self.num_layers, len(names), self.num_experts)
        return {name: by_layer[:, position].astype(np.float64) for position, name in enumerate(names)}

    def profile(
        self,
        batch_size: int = 4096,
        phase: Phase | None = None,
        max_pairs_per_layer: int = 4096,
        pairs: bool = True,
    ) -> WorkloadProfile:
        """What the experts see over this trace.

        load [L, E]: tokens per expert (each token counts once in each of its k experts).
        transitions: for l -> l+1, tokens that chose ``first`` among their k at l and ``second``
            among their k at l+1 (all k x k pairs of a token, each counting 1, so layer l's counts
            sum to T*k*k and expert i's row sums to k*load[l, i]).
        coactivation: tokens that chose both ``first`` < ``second`` at one layer.
        Only the ``max_pairs_per_layer`` largest pairs of each layer are kept (ties by pair id).
        With ``pairs`` False, neither kind is counted (for ``LOAD_ONLY_POLICIES``).
        domain_loads [L, E] per domain, when the trace has more than one domain.
        """
        if max_pairs_per_layer <= 0:
            raise PlacementError(f"max_pairs_per_layer: {max_pairs_per_layer} must be > 0")
        transitions = coactivation = None
        if pairs:  # the two kinds at once on threads
            arguments = (self.expert_ids, self.num_experts, max_pairs_per_layer)
            transitions, coactivation = in_order_on_threads(
                [(transition_pairs, arguments), (coactivation_pairs, arguments)]
            )
        return WorkloadProfile(
            load=expert_load(self.expert_ids, self.num_experts),
            top_k=self.top_k,
            transitions=transitions,
            coactivation=coactivation,
            domain_loads=self.domain_loads(),
            phase=self.phase if phase is None else phase,
            batch_size=batch_size,
        )


def expert_load(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens per expert per layer, [L, E] float64, of ids [L, T, k]."""
    # One layer at a time: a layer's ids need no copy, all layers shifted into one range would.
    return np.stack(
        [np.bincount(layer_ids.ravel(), minlength=num_experts) for layer_ids in expert_ids]
    ).astype(np.float64)


def transition_pairs(
    expert_ids: np.ndarray, num_experts: int, max_pairs_per_layer: int
) -> SparsePairs:
    """Tokens choosing expert i at layer l and j at l+1, all k x k pairs, of ids [L, T, k]."""
    per_layer = (
        (expert_ids[layer][:, :, None] * num_experts + expert_ids[layer + 1][:, None, :]).ravel()
        for layer in range(expert_ids.shape[0] - 1)
    )  # one layer's codes at a time: all of them at once take gigabytes at DeepSeek-V3's size
    return _top_pairs(per_layer, num_experts, max_pairs_per_layer)


def coactivation_pairs(
    expert_ids: np.ndarray, num_experts: int, max_pairs_per_layer: int
) -> SparsePairs:
    """Tokens choosing both experts i < j at one layer, of ids [L, T, k]."""
    first, second = np.triu_indices(expert_ids.shape[2], k=1)
    per_layer = (
        (np.minimum(a, b) * num_experts + np.maximum(a, b)).ravel()
        for a, b in ((layer_ids[:, first], layer_ids[:, second]) for layer_ids in expert_ids)
    )
    return _top_pairs(per_layer, num_experts, max_pairs_per_layer)


def _top_pairs(per_layer_codes: Iterable[np.ndarray], num_experts: int, keep: int) -> SparsePairs:
    """Sparse counts of pair codes (first * E + second), one [N] array per layer; the ``keep``
    largest per layer."""
    layers, codes, counts = [], [], []
    for layer, layer_codes in enumerate(per_layer_codes):
        histogram = np.bincount(layer_codes, minlength=num_experts * num_experts)
        kept = _largest_codes(histogram, keep)
        layers.append(np.full(len(kept), layer, dtype=np.int64))
        codes.append(kept)
        counts.append(histogram[kept].astype(np.float64))
    if not codes:
        return SparsePairs.empty()
    code = np.concatenate(codes)
    return SparsePairs(
        np.concatenate(layers), code // num_experts, code % num_experts, np.concatenate(counts)
    )


def _largest_codes(histogram: np.ndarray, keep: int) -> np.ndarray:
    """The codes of the ``keep`` largest nonzero counts of histogram [E*E], ties by code, ascending:
    every count above the keep-th largest and the lowest codes of those equal to it (a partition, not
    a sort of every present pair)."""
    present = np.nonzero(histogram)[0]
    if len(present) <= keep:
        return present
    counts = histogram[present]
    threshold = np.partition(counts, len(counts) - keep)[len(counts) - keep]
    above = counts > threshold
    at_threshold = np.nonzero(counts == threshold)[0][: keep - int(above.sum())]
    kept = np.concatenate([np.nonzero(above)[0], at_threshold])
    kept.sort()
    return present[kept]


def concatenate(traces: Sequence[Trace]) -> Trace:
    """One trace of the sequences of ``traces``, in order. Shapes, experts and phase must agree."""
    if not traces:
        raise PlacementError("traces: nothing to concatenate")
    head = traces[0]
    for index, trace in enumerate(traces[1:], start=1):
        if trace.num_layers != head.num_layers:
            raise PlacementError(
                f"traces[{index}]: {trace.num_layers} layers, traces[0] has {head.num_layers}"
            )
        if (trace.top_k, trace.num_experts) != (head.top_k, head.num_experts):
            raise PlacementError(
                f"traces[{index}]: top_k {trace.top_k} of {trace.num_experts} experts, "
                f"traces[0] has top_k {head.top_k} of {head.num_experts}"
            )
        if trace.phase != head.phase:
            raise PlacementError(f"traces[{index}]: phase {trace.phase}, traces[0] is {head.phase}")
    offsets = [head.seq_offsets]
    for trace in traces[1:]:
        offsets.append(trace.seq_offsets[1:] + offsets[-1][-1])
    expert_ids = np.concatenate([trace.expert_ids for trace in traces], axis=1)
    expert_ids.setflags(write=False)  # a fresh array: the trace takes it without a copy
    return Trace(
        expert_ids=expert_ids,
        num_experts=head.num_experts,
        seq_offsets=np.concatenate(offsets),
        domains=tuple(domain for trace in traces for domain in trace.domains),
        phase=head.phase,
        name="+".join(dict.fromkeys(trace.name for trace in traces if trace.name)),
    )


def sample_batches(
    trace: Trace,
    num_gpus: int,
    tokens_per_gpu: int,
    num_batches: int,
    phase: Phase,
    rng: np.random.Generator,
    home_gpu: np.ndarray | None = None,
) -> list[RoutingBatch]:
    """Forward steps of B = num_gpus * tokens_per_gpu tokens each, expert_ids [L, B, k].

    prefill: the trace read as one stream of whole sequences from a random sequence on, wrapping
        around; batch b holds stream tokens b*B .. (b+1)*B-1 (a sequence cut at a batch's end goes
        on in the next, as chunked prefill does). Each sequence of a batch runs on one GPU, its
        attention DP rank, round robin in order of appearance.
    decode: a decode step sees one token of each of many sequences: B tokens from distinct random
        positions, each on GPU (its sequence index) % num_gpus.
    A trace of fewer than B tokens is sampled with replacement: the prefill stream wraps within a
    batch and decode positions repeat.

    With ``home_gpu`` [S] (each sequence's rank, a request router's choice), every rank batches its
    own queue, as each DP rank's scheduler does: rank g's part of a batch is ``tokens_per_gpu``
    tokens of its own sequences (prefill: the next ones of its stream, from a common random
    fraction of the way in; decode: random positions of its sequences); a rank with no sequence
    idles.
    """
    for name, value in (
        ("num_gpus", num_gpus),
        ("tokens_per_gpu", tokens_per_gpu),
        ("num_batches", num_batches),
    ):
        if value <= 0:
            raise PlacementError(f"{name}: {value} must be > 0")
    if phase not in PHASES:
        raise PlacementError(f"phase: {phase!r} is not prefill or decode")
    if home_gpu is not None:
        home_gpu = _integer_array("home_gpu", home_gpu, 1)
        if len(home_gpu) != trace.num_sequences:
            raise PlacementError(
                f"home_gpu: {len(home_gpu)} GPUs for {trace.num_sequences} sequences"
            )
        if home_gpu.min() < 0 or home_gpu.max() >= num_gpus:
            raise PlacementError(f"home_gpu: GPUs must be in 0..{num_gpus - 1}")
        return _rank_batches(trace, home_gpu, num_gpus, tokens_per_gpu, num_batches, phase, rng)
    batch_tokens = num_gpus * tokens_per_gpu
    sequence = trace.sequence_of_token()
    batches = []
    if phase == "prefill":
        start = trace.seq_offsets[rng.integers(trace.num_sequences)]
        for batch in range(num_batches):
            positions = (start + batch * batch_tokens + np.arange(batch_tokens)) % trace.num_tokens
            # A new run starts where the sequence changes or the stream wraps onto the same one.
            new_run = np.ones(batch_tokens, dtype=bool)
            new_run[1:] = (sequence[positions[1:]] != sequence[positions[:-1]]) | (
                positions[1:] == 0
            )
            source_gpu = (np.cumsum(new_run) - 1) % num_gpus
            batches.append(RoutingBatch(trace.expert_ids[:, positions], source_gpu))
    else:
        replace = trace.num_tokens < batch_tokens
        for _ in range(num_batches):
            positions = rng.choice(trace.num_tokens, batch_tokens, replace=replace)
            batches.append(
                RoutingBatch(trace.expert_ids[:, positions], sequence[positions] % num_gpus)
            )
    return batches


def _rank_batches(
    trace: Trace,
    home_gpu: np.ndarray,
    num_gpus: int,
    tokens_per_gpu: int,
    num_batches: int,
    phase: Phase,
    rng: np.random.Generator,
) -> list[RoutingBatch]:
    """``sample_batches`` with each rank batching its own sequences (home_gpu [S])."""
    token_home = home_gpu[trace.sequence_of_token()]
    streams = [np.nonzero(token_home == gpu)[0] for gpu in range(num_gpus)]
    fraction = rng.random()
    batches = []
    for batch in range(num_batches):
        parts, sources = [], []
        for gpu, stream in enumerate(streams):
            if not len(stream):
                continue
            if phase == "prefill":
                start = int(fraction * len(stream)) + batch * tokens_per_gpu
                picked = stream[(start + np.arange(tokens_per_gpu)) % len(stream)]
            else:
                picked = rng.choice(stream, tokens_per_gpu, replace=len(stream) < tokens_per_gpu)
            parts.append(picked)
            sources.append(np.full(tokens_per_gpu, gpu))
        positions = np.concatenate(parts)
        batches.append(RoutingBatch(trace.expert_ids[:, positions], np.concatenate(sources)))
    return batches


def sample_tokens(
    profile: WorkloadProfile, num_tokens: int, rng: np.random.Generator, phase: Phase | None = None
) -> Trace:
    """A trace of ``num_tokens`` independent tokens whose expected load is ``profile.load``.

    Keeps the per-layer marginals only: transitions and co-activation are not reproduced. Each
    token's k distinct experts come from systematic sampling with inclusion probabilities
    load[l] / (tokens of the profile), in one of 64 random expert orders per layer, so the expected
    load is exact (an expert holding more than every token is capped at every token and the rest
    scaled up). Column 0 is a popularity-weighted random pick among the k (the profile does not say
    which choice came first). When the profile's domain loads add up to its load, each domain's
    share of tokens is drawn from its own load and labelled with it. Tokens are independent, so each
    is its own sequence (seq_offsets = 0..T), in random order.
    """
    expert_ids, names, token_domains = sample_expert_ids(profile, num_tokens, rng)
    return Trace(
        expert_ids=expert_ids,
        num_experts=profile.num_experts,
        seq_offsets=np.arange(num_tokens + 1),
        domains=tuple(names[i] for i in token_domains),
        phase=profile.phase if phase is None else phase,
        name="sampled",
    )


def sample_expert_ids(
    profile: WorkloadProfile, num_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``sample_tokens``'s draw without building a Trace (which labels every token with its
    domain's name): (expert_ids [L, T, k], domain names, each token's domain index [T])."""
    if num_tokens <= 0:
        raise PlacementError(f"num_tokens: {num_tokens} must be > 0")
    domain_loads = dict(profile.domain_loads)
    if not domain_loads or not np.allclose(sum(domain_loads.values()), profile.load):
        domain_loads = {"": profile.load}
    names = list(domain_loads)
    weights = np.array([domain_loads[name][0].sum() for name in names])
    counts = _proportional_counts(weights, num_tokens)
    parts = [
        _systematic_sample(
            np.asarray(domain_loads[name], np.float64), profile.top_k, int(count), rng
        )
        for name, count in zip(names, counts)
        if count
    ]
    order = rng.permutation(num_tokens)
    token_domains = np.repeat(np.arange(len(names)), counts)[order]
    return np.concatenate(parts, axis=1)[:, order], names, token_domains


def _proportional_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` [D] summing to ``total`` (largest remainder)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts


def _inclusion_probabilities(load: np.ndarray, top_k: int) -> np.ndarray:
    """Probability that a token picks each expert, [E], from one layer's load [E]: proportional to
    the load, summing to k, at most 1 (a capped expert's excess goes to the others)."""
    if np.count_nonzero(load) < top_k:
        raise PlacementError(f"load: {np.count_nonzero(load)} experts with load, top_k is {top_k}")
    probability = np.zeros_like(load, dtype=np.float64)
    capped = np.zeros(len(load), dtype=bool)
    while True:
        free = ~capped
        probability[free] = load[free] * (top_k - capped.sum()) / load[free].sum()
        probability[capped] = 1.0
        over = free & (probability > 1.0)
        if not over.any():
            return probability
        capped |= over


def smallest_per_row(keys: np.ndarray, k: int) -> np.ndarray:
    """Columns of the k smallest keys of each row, smallest first: keys [T, n] -> [T, k].

    The k-th smallest value (np.partition) picks them out by a comparison, three times faster than
    np.argpartition's introselect on indices at DeepSeek-V3's 256 experts; rows where keys tie with
    it (more than k at or below it) take np.argpartition."""
    threshold = np.partition(keys, k - 1, axis=1)[:, k - 1 : k]
    below = keys <= threshold
    exact = np.count_nonzero(below, axis=1) == k
    chosen = np.empty((len(keys), k), dtype=np.int64)
    chosen[exact] = np.nonzero(below[exact])[1].reshape(-1, k)
    if not exact.all():
        chosen[~exact] = np.argpartition(keys[~exact], k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(keys, chosen, axis=1), axis=1)
    return np.take_along_axis(chosen, order, axis=1)


def _systematic_sample(
    load: np.ndarray, top_k: int, num_tokens: int, rng: np.random.Generator
) -> np.ndarray:
    """k distinct experts per token, [L, T, k], with inclusion probabilities from load [L, E]. Each
    layer's random numbers are drawn in layer order, as one layer after another would draw them,
    and several layers are sampled at once on threads (``in_order_on_threads``)."""
    num_orders = 64
    num_layers, num_experts = load.shape

    def sample_layer(
        layer_load: np.ndarray,
        order_keys: np.ndarray,
        token_draws: np.ndarray,
        shuffle: np.ndarray,
        gumbel: np.ndarray,
    ) -> np.ndarray:
        """order_keys [orders, E], token_draws [T], shuffle [T] (a permutation), gumbel [T, k]."""
        probability = _inclusion_probabilities(layer_load, top_k)
        orders = np.argsort(order_keys, axis=1)
        # Order r's cumulative probabilities run from r*k to (r+1)*k: one sorted array serves all.
        edges = (
            np.cumsum(probability[orders], axis=1) + top_k * np.arange(num_orders)[:, None]
        ).ravel()
        # Integer part: the token's order; fraction: its systematic start. Sorted, because
        # searchsorted is several times faster on sorted needles; a permutation undoes the sort.
        position = np.sort(token_draws * num_orders)
        order_of_token = position.astype(np.int64)
        starts = position + (top_k - 1) * order_of_token
        points = starts[None, :] + np.arange(top_k)[:, None]  # [k, T], each row sorted
        slot = np.minimum(np.searchsorted(edges, points, side="right"), edges.size - 1)
        chosen = orders.ravel()[slot.T][shuffle]
        # First choice: popular experts more likely (Gumbel-perturbed log probability).
        priority = np.log(probability[chosen]) + gumbel
        return np.take_along_axis(chosen, np.argsort(-priority, axis=1), axis=1)

    layers = in_order_on_threads(
        (
            sample_layer,
            (
                layer_load,
                rng.random((num_orders, num_experts)),
                rng.random(num_tokens),
                rng.permutation(num_tokens),
                rng.gumbel(size=(num_tokens, top_k)),
            ),
        )
        for layer_load in load
    )
    ids = np.empty((num_layers, num_tokens, top_k), dtype=np.int64)
    for layer, layer_ids in enumerate(layers):
        ids[layer] = layer_ids
    return ids


# ---------------------------------------------------------------------------------------------
# Files


def load_trace(path: str | Path, task: str | None = None) -> Trace:
    """The per-token trace in a file: native trace npz, ESFT npz or FLAME-MoE npz (by their keys).

    ``task`` keeps one domain (ESFT: ``intent`` or ``law``; without it both, as domains, intent
    first). Counts-only files (native profile, OLMoE/Mixtral, Qwen3 heat) raise PlacementError:
    use ``load_profile``.
    """
    path = Path(path)
    kind, content = _read(path)
    if kind in ("profile", "olmoe", "qwen-heat"):
        raise PlacementError(f"{path}: holds counts only, use load_profile")
    trace = {"trace": _native_trace, "esft": _esft_trace, "flame": _flame_trace}[kind](
        path, content
    )
    return trace.select_domain(task) if task is not None else trace


def load_profile(
    path: str | Path, task: str | None = None, model: str | None = None
) -> WorkloadProfile:
    """The workload profile of any trace file.

    ``model`` picks the model of files that hold several (OLMoE/Mixtral counts: a name starting
    with ``olmoe``, ``mistral`` or ``mixtral``, so a preset name like ``mixtral-8x7b`` does); other
    files ignore it. Per-token files: ``load_trace(path, task).profile()``. Native profile npz: as
    ``save_profile`` wrote it (``task`` keeps one domain's load). OLMoE/Mixtral counts: ``task``
    keeps one domain, else the five are summed and kept as domain loads. Its profile layers 0, 1, 2
    are the file's layers 0, 7, 15, and its transitions are the file's joint counts between them
    (0 -> 7, 7 -> 15): those pair each of a token's k choices with one choice at the other layer (a
    layer pair sums to T*k, where ``Trace.profile``'s k x k pairs sum to T*k*k). Qwen3 heat JSON:
    load from ``layers[i].heat``, co-activation from ``layers[i].pairs`` (the file keeps pairs with
    count >= 5 and lift >= 1.5, at most 2000 a layer), phase decode, k from ``k``.
    """
    path = Path(path)
    kind, content = _read(path)
    if kind == "olmoe":
        return _olmoe_profile(path, content, task, model)
    if kind == "profile":
        return _native_profile(path, content, task)
    if kind == "qwen-heat":
        if task is not None:
            raise PlacementError(f"task: {path} has no domains, got {task!r}")
        return _qwen_heat_profile(path, content)
    return load_trace(path, task).profile()


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` as a native trace npz (round-trips exactly through ``load_trace``)."""
    np.savez_compressed(
        Path(path),
        expert_ids=trace.expert_ids.astype(np.uint8 if trace.num_experts <= 256 else np.int32),
        num_experts=np.int64(trace.num_experts),
        seq_offsets=trace.seq_offsets,
        domains=np.array(trace.domains, dtype=str),
        phase=np.array(trace.phase),
        name=np.array(trace.name),
    )


def save_profile(profile: WorkloadProfile, path: str | Path) -> None:
    """Write ``profile`` as a native profile npz (round-trips exactly through ``load_profile``)."""
    arrays = {
        "load": profile.load,
        "top_k": np.int64(profile.top_k),
        "phase": np.array(profile.phase),
        "batch_size": np.int64(profile.batch_size),
    }
    for kind, pairs in (
        ("transitions", profile.transitions),
        ("coactivation", profile.coactivation),
    ):
        if pairs is not None:
            for part in ("layer", "first", "second", "count"):
                arrays[f"{kind}_{part}"] = np.asarray(getattr(pairs, part))
    if profile.domain_loads:
        arrays["domain_names"] = np.array(list(profile.domain_loads), dtype=str)
        arrays["domain_loads"] = np.stack(list(profile.domain_loads.values())).astype(np.float64)
    np.savez_compressed(Path(path), **arrays)


def _read(path: Path) -> tuple[str, dict]:
    """(file kind, its arrays or JSON document); the kind comes from the content, not the name."""
    try:
        with path.open("rb") as stream:
            is_zip = stream.read(4) == b"PK\x03\x04"
        if not is_zip:
            document = json.loads(path.read_text())
            if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
                raise PlacementError(f"{path}: unknown file kind (neither npz nor heat JSON)")
            return "qwen-heat", document
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise PlacementError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise PlacementError(f"{path}: unknown file kind, not npz or JSON ({error})") from None
    return _npz_kind(path, arrays), arrays


def _npz_kind(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Which file kind the keys of an npz say it is."""
    keys = set(arrays)
    if {"expert_ids", "router_scores"} <= keys:
        return "flame"
    if "expert_ids" in keys:
        return "trace"
    if "load" in keys:
        return "profile"
    if _esft_tasks(arrays):
        return "esft"
    if any(key.endswith("_expert_counts_crosslayer") for key in keys):
        return "olmoe"
    raise PlacementError(f"{path}: unknown file kind (keys: {', '.join(sorted(keys))})")


def _required(path: Path, arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in arrays:
        raise PlacementError(f"{path}: missing key {key!r}")
    return arrays[key]


def _scalar(path: Path, arrays: dict[str, np.ndarray], key: str) -> int:
    value = _required(path, arrays, key)
    if value.ndim != 0 or value.dtype.kind not in "iu":
        raise PlacementError(
            f"{path}: {key} must be an integer scalar, got {value.dtype} {value.shape}"
        )
    return int(value)


def _text(arrays: dict[str, np.ndarray], key: str, default: str) -> str:
    return str(arrays[key]) if key in arrays else default


def _native_trace(path: Path, arrays: dict[str, np.ndarray]) -> Trace:
    expert_ids = _required(path, arrays, "expert_ids")
    num_tokens = expert_ids.shape[1] if expert_ids.ndim >= 2 else 0
    offsets = arrays.get("seq_offsets", np.array([0, num_tokens]))
    domains = arrays.get("domains", np.full(max(len(offsets) - 1, 0), ""))
    return _trace_of_file(
        path,
        expert_ids=expert_ids,
        num_experts=_scalar(path, arrays, "num_experts"),
        seq_offsets=offsets,
        domains=tuple(str(domain) for domain in np.atleast_1d(domains)),
        phase=_text(arrays, "phase", "prefill"),
        name=_text(arrays, "name", path.stem),
    )


def _esft_tasks(arrays: dict[str, np.ndarray]) -> list[str]:
    """Tasks of an ESFT file: prefixes with both ``<task>_expert_ids`` and ``_seq_offsets``."""
    return [
        key.removesuffix("_expert_ids")
        for key in arrays
        if key.endswith("_expert_ids")
        and key.removesuffix("_expert_ids") + "_seq_offsets" in arrays
    ]


def _esft_trace(path: Path, arrays: dict[str, np.ndarray]) -> Trace:
    """Both tasks, each sequence labelled with its task; ids reordered by gate weight (the file
    stores each token's six in another order, so its column 0 is the top choice for ~20% only)."""
    num_experts = _scalar(path, arrays, "num_experts")
    traces = []
    for task in _esft_tasks(arrays):
        expert_ids = arrays[f"{task}_expert_ids"]
        weights = _required(path, arrays, f"{task}_gate_weights")
        if weights.shape != expert_ids.shape:
            raise PlacementError(
                f"{path}: {task}_gate_weights shape {weights.shape} != "
                f"{task}_expert_ids {expert_ids.shape}"
            )
        offsets = arrays[f"{task}_seq_offsets"]
        traces.append(
            _trace_of_file(
                path,
                expert_ids=_by_score(expert_ids, weights),
                num_experts=num_experts,
                seq_offsets=offsets,
                domains=(task,) * max(len(offsets) - 1, 0),
                name=path.stem,
            )
        )
    return concatenate(traces)


def _flame_trace(path: Path, arrays: dict[str, np.ndarray]) -> Trace:
    """[L, S, P, k] ids become [L, S*P, k] with a sequence every P tokens."""
    expert_ids = arrays["expert_ids"]
    scores = arrays["router_scores"]
    if expert_ids.ndim != 4 or scores.shape != expert_ids.shape:
        raise PlacementError(
            f"{path}: expert_ids must be [L, S, P, k] like router_scores, got {expert_ids.shape} "
            f"and {scores.shape}"
        )
    num_layers, num_sequences, positions, top_k = expert_ids.shape
    return _trace_of_file(
        path,
        expert_ids=_by_score(expert_ids, scores).reshape(
            num_layers, num_sequences * positions, top_k
        ),
        num_experts=_scalar(path, arrays, "num_experts"),
        seq_offsets=np.arange(num_sequences + 1) * positions,
        domains=("",) * num_sequences,
        name=path.stem,
    )


def _by_score(expert_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ids [..., k] reordered by descending score [..., k]."""
    return np.take_along_axis(expert_ids, np.argsort(-scores, axis=-1, kind="stable"), axis=-1)


def _trace_of_file(path: Path, **fields: object) -> Trace:
    """A Trace whose validation errors name the file."""
    try:
        return Trace(**fields)
    except PlacementError as error:
        raise PlacementError(f"{path}: {error}") from None


def _native_profile(path: Path, arrays: dict[str, np.ndarray], task: str | None) -> WorkloadProfile:
    """As save_profile wrote it; ``task`` keeps one domain's load, without the pairs (they are
    the whole profile's)."""
    load = _required(path, arrays, "load")
    names = [str(name) for name in arrays.get("domain_names", [])]
    stacked = _required(path, arrays, "domain_loads") if names else np.zeros((0, *load.shape))
    if stacked.ndim != 3 or len(stacked) != len(names):
        raise PlacementError(
            f"{path}: domain_loads shape {stacked.shape} does not hold {len(names)} [L, E] loads"
        )
    fields = {
        "load": load,
        "transitions": _pairs_of_file(path, arrays, "transitions"),
        "coactivation": _pairs_of_file(path, arrays, "coactivation"),
        "domain_loads": dict(zip(names, stacked)),
    }
    if task is not None:
        fields = {"load": stacked[_domain_index(path, names, task)]}
    return _profile_of_file(
        path,
        top_k=_scalar(path, arrays, "top_k"),
        phase=_text(arrays, "phase", "prefill"),
        batch_size=_scalar(path, arrays, "batch_size") if "batch_size" in arrays else 4096,
        **fields,
    )


def _pairs_of_file(path: Path, arrays: dict[str, np.ndarray], kind: str) -> SparsePairs | None:
    parts = [f"{kind}_{part}" for part in ("layer", "first", "second", "count")]
    if not any(part in arrays for part in parts):
        return None
    layer, first, second, count = (_required(path, arrays, part) for part in parts)
    try:
        return SparsePairs(
            layer.astype(np.int64), first.astype(np.int64), second.astype(np.int64), count
        )
    except PlacementError as error:
        raise PlacementError(f"{path}: {kind}: {error}") from None


def _domain_index(path: Path, names: list[str], task: str) -> int:
    if task not in names:
        raise PlacementError(
            f"task: unknown domain {task!r} in {path}; known: {', '.join(names) or 'none'}"
        )
    return names.index(task)


def _olmoe_profile(
    path: Path, arrays: dict[str, np.ndarray], task: str | None, model: str | None
) -> WorkloadProfile:
    prefixes = [
        prefix for alias, prefix in OLMOE_MODELS.items() if (model or "").lower().startswith(alias)
    ]
    if not prefixes:
        raise PlacementError(
            f"model: {path} holds OLMoE and Mixtral counts; pass model='olmoe' or 'mistral' "
            f"(alias 'mixtral'), got {model!r}"
        )
    prefix = prefixes[0]
    counts = _required(path, arrays, f"{prefix}_expert_counts").astype(np.float64)
    first_counts = _required(path, arrays, f"{prefix}_expert_counts_top1")
    joint = _required(path, arrays, f"{prefix}_expert_counts_crosslayer").astype(np.float64)
    names = [str(name) for name in _required(path, arrays, "domains")]
    if counts.ndim != 3 or len(counts) != len(names) or counts.shape[1] != 3:
        raise PlacementError(
            f"{path}: {prefix}_expert_counts shape {counts.shape} is not "
            f"[{len(names)} domains, 3, E]"
        )
    if joint.shape != (len(names), 2, counts.shape[2], counts.shape[2]):
        raise PlacementError(
            f"{path}: {prefix}_expert_counts_crosslayer shape {joint.shape} is not "
            f"[{len(names)}, 2, {counts.shape[2]}, {counts.shape[2]}]"
        )
    if first_counts[:, 0].sum() <= 0:
        raise PlacementError(f"{path}: {prefix}_expert_counts_top1 holds no tokens")
    # Counts of all k choices over counts of the first choice: k (the file does not store it).
    top_k = round(counts[:, 0].sum() / first_counts[:, 0].sum())
    domain_loads = dict(zip(names, counts))
    if task is None:
        load, joint_counts = counts.sum(axis=0), joint.sum(axis=0)
    else:
        index = _domain_index(path, names, task)
        load, joint_counts, domain_loads = counts[index], joint[index], {}
    return _profile_of_file(
        path,
        load=load,
        top_k=top_k,
        transitions=SparsePairs.from_dense(joint_counts),
        domain_loads=domain_loads,
    )


def _qwen_heat_profile(path: Path, document: dict) -> WorkloadProfile:
    layers = document["layers"]
    try:
        load = np.array([layer["heat"] for layer in layers], dtype=np.float64)
        rows = [
            (index, *pair[:3])
            for index, layer in enumerate(layers)
            for pair in layer.get("pairs", [])
        ]
        top_k = int(document["k"])
    except KeyError as error:
        raise PlacementError(f"{path}: missing key {error}") from None
    except (TypeError, ValueError) as error:
        raise PlacementError(f"{path}: layers[].heat is not an [L, E] table ({error})") from None
    table = np.array(rows, dtype=np.float64).reshape(-1, 4)
    layer, first, second = (table[:, column].astype(np.int64) for column in range(3))
    coactivation = SparsePairs(
        layer, np.minimum(first, second), np.maximum(first, second), table[:, 3]
    )
    return _profile_of_file(path, load=load, top_k=top_k, coactivation=coactivation, phase="decode")


def _profile_of_file(path: Path, **fields: object) -> WorkloadProfile:
    """A WorkloadProfile whose validation errors name the file."""
    try:
        return WorkloadProfile(**fields)
    except PlacementError as error:
        raise PlacementError(f"{path}: {error}") from None


def _integer_array(name: str, value: object, ndim: int) -> np.ndarray:
    """``value`` as a fresh int64 array of ``ndim`` dimensions; PlacementError naming ``name``."""
    array = np.asarray(value)
    if array.size and array.dtype.kind not in "iu":
        raise PlacementError(f"{name}: dtype {array.dtype} is not an integer type")
    if array.ndim != ndim:
        raise PlacementError(f"{name}: expected {ndim} dimensions, got shape {array.shape}")
    return array.astype(np.int64, copy=True)
