"""``policy: auto``: per phase, the placement (and router) the cost model predicts fastest, and why.

The candidates are EPLB (token balance), ``ilp`` (MoETuner: balance and layer-to-layer locality),
``metro_aware`` (activated experts), ``locality`` (node co-placement) and, when requests go through
the request router (``PolicyOptions.request_router`` ``signature``) and the profile carries its
groups (``WorkloadProfile.domain_loads``), ``grouped`` (each group's experts on the node the router
sends it to). Each is scored with the cost model under every router on
batches drawn from the profile itself: tokens that follow the profile's layer-to-layer transitions
(a Markov chain over layers), so the locality the candidates aim at shows up in the score; with
groups, each token belongs to a group and lives on a GPU of the node the router sends the group to.

The objective is joint over the phases solved for (``PolicyOptions.phases``; default the profile's
own): the mean over phases of a candidate's predicted MoE time relative to EPLB with random replica
choice, each phase with the candidate's best router for it (the gate's gain, turned around).
Each phase is scored on 2 to 6 batches (``SCORED_BATCHES``; as many as ``SCORING_DRAWS`` allow, so
a DeepSeek-V3-sized model gets 2 and stays within its time limit). Candidates whose objectives
differ by less than ``TIE_TOLERANCE`` or two standard errors of their
per-batch difference are a tie: the first of ``CANDIDATES`` among them wins (never the seed's
noise) and the notes name the tie. Routers of one phase tie the same way (``ROUTER_PREFERENCE``).
The scored batches and replica draws come from ``SCORING_SEED``, not ``options.seed``: they are
the yardstick, so the seed changes only what the candidates solve, never how they are measured.

Shapes: L layers, E experts, B tokens per batch, k experts per token, G GPUs, D groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from moe_placement.cost import evaluate
from moe_placement.models import (
    ModelShape,
    Phase,
    Placement,
    RoutingBatch,
    Topology,
    WorkloadProfile,
)
from moe_placement.pairs import pair_matrices
from moe_placement.policies.base import PolicyOptions, SolverInfo
from moe_placement.policies.eplb import policy_eplb
from moe_placement.policies.grouped import policy_grouped
from moe_placement.policies.ilp import policy_ilp
from moe_placement.policies.locality import policy_locality
from moe_placement.policies.metro_aware import policy_metro_aware
from moe_placement.request_routing import assign_domain_nodes, domain_signatures_of_profile
from moe_placement.routing import ROUTERS
from moe_placement.traces import smallest_per_row

CANDIDATES = {
    "eplb": policy_eplb,
    "ilp": policy_ilp,
    "metro_aware": policy_metro_aware,
    "locality": policy_locality,
    "grouped": policy_grouped,
}
CANDIDATE_ROUTERS = ("random", "local_first", "metro")
ROUTER_PREFERENCE = ("metro", "local_first", "random")  # ties (e.g. no replicas) go to the first
SCORED_BATCHES = (2, 6)  # per phase, fewest and most: as many as SCORING_DRAWS allow
SCORING_DRAWS = 1 << 27  # token x layer x expert draws per phase: 6 batches at V2-Lite, 2 at V3
MAX_SCORED_TOKENS = 4096  # per batch: 512 per GPU on 8 GPUs keeps prefill compute-bound, as served
OTHER_PHASE_TOKENS_PER_GPU = {"prefill": 128, "decode": 16}  # a phase the profile is not of
TIE_TOLERANCE = 0.01  # relative objective difference below which two choices are a tie
SCORING_SEED = 0  # the scored batches and replica draws: the same whatever options.seed
SAMPLING_SHARE = 0.2  # of the time limit for drawing the scored batches of every phase
MIN_SCORED_TOKENS = 256  # fewest tokens per scored batch when drawing them is cut short
SCORING_SHARE = 0.5  # of the time limit left for scoring; the rest solves
SMOOTHING = 0.05  # share of a token's next-layer choice drawn from the layer's popularity alone


@dataclass(frozen=True)
class TokenGroups:
    """Who the sampled tokens are: each group's share of tokens [D], its per-layer popularity
    [D, L, E], and the share of its tokens the router sends to each node [D, N]."""

    share: np.ndarray
    popularity: np.ndarray
    node_share: np.ndarray


def routed_groups(profile: WorkloadProfile, options: PolicyOptions) -> bool:
    """Whether requests go through the request router and ``profile`` has two groups or more."""
    return options.request_router == "signature" and len(profile.domain_loads) >= 2


def token_groups(profile: WorkloadProfile, num_nodes: int) -> TokenGroups:
    """The router's groups of ``profile`` (its ``domain_loads``)."""
    _, signatures, tokens = domain_signatures_of_profile(profile)
    popularity = signatures / np.maximum(signatures.sum(2, keepdims=True), 1e-12)
    return TokenGroups(tokens / tokens.sum(), popularity, assign_domain_nodes(tokens, num_nodes))


def _token_homes(
    groups: TokenGroups | None, batch: int, num_gpus: int, rng: np.random.Generator
) -> tuple[np.ndarray | None, np.ndarray]:
    """Group of each token [B] (None without groups) and its home GPU [B]: token i on GPU i mod G,
    or on a node drawn from its group's node share, GPUs of a node taken in turn."""
    if groups is None:
        return None, np.arange(batch) % num_gpus
    num_nodes = groups.node_share.shape[1]
    group = rng.choice(len(groups.share), size=batch, p=groups.share)
    cumulative = np.cumsum(groups.node_share[group], axis=1)
    node = np.minimum((rng.random(batch)[:, None] > cumulative).sum(1), num_nodes - 1)
    return group, node * (num_gpus // num_nodes) + np.arange(batch) % (num_gpus // num_nodes)


def profile_batches(
    profile: WorkloadProfile,
    num_gpus: int,
    num_batches: int,
    rng: np.random.Generator,
    max_tokens: int = MAX_SCORED_TOKENS,
    batch_size: int | None = None,
    num_nodes: int | None = None,
    seconds: float = float("inf"),
) -> list[RoutingBatch]:
    """Batches of ``batch_size`` (default ``profile.batch_size``) tokens, at most ``max_tokens``,
    expert_ids [L, B, k], drawn from the profile: layer 0 by popularity, each later layer by the
    transitions from the token's experts one layer up (mixed with a little popularity), k distinct
    experts by a Gumbel race. Without ``num_nodes`` popularity is the profile's and token i starts
    on GPU i mod G (round-robin requests); with it (routed requests, ``token_groups`` over that many
    nodes) it is the token's group's and the token lives on its group's node. Where the first
    batch's first layers show that drawing every batch would take longer than ``seconds``, the
    batches are cut to the tokens that fit (at least MIN_SCORED_TOKENS)."""
    load = profile.load
    transitions = pair_matrices(profile)[0].astype(np.float32)
    has_transitions = transitions.reshape(len(transitions), -1).any(1)
    popularity = (load / np.maximum(load.sum(1, keepdims=True), 1e-12)).astype(np.float32)
    groups = None if num_nodes is None else token_groups(profile, num_nodes)
    batch = min(batch_size or profile.batch_size, max_tokens)
    batches = []
    for _ in range(num_batches):
        group, home = _token_homes(groups, batch, num_gpus, rng)
        # Per token and layer: what it would choose with no history, [B, L, E] (or [1, L, E]).
        prior = popularity[None] if group is None else groups.popularity[group].astype(np.float32)
        ids = _markov_tokens(
            prior, transitions, has_transitions, profile.top_k, batch, rng, seconds / num_batches
        )
        batch = ids.shape[1]
        batches.append(RoutingBatch(ids, home[:batch]))
    return batches


def _markov_tokens(
    prior: np.ndarray,
    transitions: np.ndarray,
    has_transitions: np.ndarray,
    top_k: int,
    batch: int,
    rng: np.random.Generator,
    seconds: float = float("inf"),
) -> np.ndarray:
    """expert_ids [L, B', k] of ``batch`` tokens whose layer-0 choices follow ``prior`` [B or 1, L,
    E] and later ones the transitions [L-1, E, E] from their choices one layer up. B' = B unless
    the first layers show that drawing all would take longer than ``seconds``: then the first B'
    tokens that fit (at least MIN_SCORED_TOKENS), drawn as they would have been (a token's layers
    depend on its own earlier layers only)."""
    num_layers, num_experts = prior.shape[1:]
    ids = np.empty((num_layers, batch, top_k), dtype=np.int64)
    weight = np.broadcast_to(prior[:, 0], (batch, num_experts))
    started = time.perf_counter()
    measured_layer = min(1, num_layers - 1)  # layer 1 is the first to follow transitions
    for layer in range(num_layers):
        uniform = rng.random((batch, num_experts), dtype=np.float32)
        race = np.log(np.maximum(weight, np.float32(1e-30))) - np.log(
            -np.log(uniform + np.float32(1e-30))
        )
        ids[layer] = smallest_per_row(-race, top_k)
        if layer == measured_layer and np.isfinite(seconds):
            projected = (time.perf_counter() - started) / (layer + 1) * num_layers
            fits = max(MIN_SCORED_TOKENS, int(batch * seconds / max(projected, 1e-9)))
            if fits < batch:
                batch, ids = fits, ids[:, :fits].copy()
                prior = prior[:fits] if len(prior) > 1 else prior
        if layer + 1 == num_layers:
            break
        weight = np.broadcast_to(prior[:, layer + 1], (batch, num_experts))
        if has_transitions[layer]:  # else every token follows the prior alone
            follow = transitions[layer][ids[layer]].sum(1)  # [B, E]
            follow /= np.maximum(follow.sum(1, keepdims=True), np.float32(1e-12))
            weight = (1.0 - SMOOTHING) * follow + SMOOTHING * weight
    return ids


@dataclass
class Scores:
    """Per-batch predicted MoE seconds by (candidate, router, phase) -> [B'], and the
    compute / all-to-all split of their mean."""

    times: dict[tuple[str, str, str], np.ndarray]
    parts: dict[tuple[str, str, str], tuple[float, float]]


def _score(
    placement: Placement,
    model: ModelShape,
    topology: Topology,
    batches: list[RoutingBatch],
    router: str,
    seed: int,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Per-batch MoE seconds [B'] and the mean compute / all-to-all seconds."""
    reports = [evaluate(placement, model, topology, [batch], router, seed) for batch in batches]
    return np.array([report.moe_time_s for report in reports]), (
        float(np.mean([report.compute_time_s for report in reports])),
        float(np.mean([report.comm_time_s for report in reports])),
    )


def _phases(profile: WorkloadProfile, options: PolicyOptions) -> tuple[Phase, ...]:
    return tuple(options.phases) or (profile.phase,)


def _candidates(profile: WorkloadProfile, options: PolicyOptions) -> dict:
    if routed_groups(profile, options):
        return CANDIDATES
    return {name: fn for name, fn in CANDIDATES.items() if name != "grouped"}


def _batches_per_phase(
    profile: WorkloadProfile, topology: Topology, options: PolicyOptions
) -> dict[str, list[RoutingBatch]]:
    rng = np.random.default_rng(SCORING_SEED)
    num_nodes = topology.num_nodes if routed_groups(profile, options) else None
    batches = {}
    for phase in _phases(profile, options):
        size = min(
            profile.batch_size
            if phase == profile.phase
            else OTHER_PHASE_TOKENS_PER_GPU[phase] * topology.num_gpus,
            MAX_SCORED_TOKENS,
        )
        # Drawing a batch costs B x L x E: a model as big as DeepSeek-V3 gets the fewest.
        count = int(np.clip(SCORING_DRAWS // (size * profile.load.size), *SCORED_BATCHES))
        batches[phase] = profile_batches(
            profile, topology.num_gpus, count, rng, batch_size=size, num_nodes=num_nodes,
            seconds=SAMPLING_SHARE * options.time_limit_s / len(_phases(profile, options)),
        )
    return batches


def _solve_and_score(
    profile: WorkloadProfile,
    model: ModelShape,
    topology: Topology,
    options: PolicyOptions,
    batches: dict[str, list[RoutingBatch]],
    deadline: float,
) -> tuple[Scores, dict[str, np.ndarray], list[str]]:
    """Each candidate solved and scored in order (eplb first, always done) within the time limit,
    each solve given its share of what is left after the scoring still to come; a candidate or a
    router that no longer fits ``deadline`` (``time.perf_counter``) is skipped (named in the
    returned list)."""
    candidates = _candidates(profile, options)
    routers = [name for name in CANDIDATE_ROUTERS if name in ROUTERS]
    scores = Scores({}, {})
    mappings: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    scoring_s = 0.0  # one candidate-router's scoring time over every phase, the longest seen
    for index, (name, policy) in enumerate(candidates.items()):
        remaining = len(candidates) - index
        left = deadline - time.perf_counter()
        share = (left - remaining * len(routers) * scoring_s) / remaining
        if index and share < SCORING_SHARE * scoring_s:
            skipped.append(name)
            continue
        mapping, _ = policy(profile, model, topology, replace(options, time_limit_s=share))
        placement = Placement(mapping.copy(), model.num_experts, topology.slots_per_gpu)
        mappings[name] = mapping
        for router in routers:
            if scores.times and time.perf_counter() + scoring_s > deadline:
                skipped.append(f"{name}+{router}")
                continue
            started = time.perf_counter()
            for phase, phase_batches in batches.items():
                key = (name, router, phase)
                scores.times[key], scores.parts[key] = _score(
                    placement, model, topology, phase_batches, router, SCORING_SEED
                )
            scoring_s = max(scoring_s, time.perf_counter() - started)
    return scores, mappings, skipped


def _tied(best: np.ndarray, other: np.ndarray) -> bool:
    """Whether two per-batch objectives [B'] are too close to tell apart: mean difference under
    ``TIE_TOLERANCE`` of the best's mean or two standard errors of the paired difference."""
    difference = other - best
    error = difference.std(ddof=1) / np.sqrt(len(difference)) if len(difference) > 1 else 0.0
    return float(difference.mean()) <= max(TIE_TOLERANCE * float(best.mean()), 2.0 * error)


def choose_with_ties(objectives: dict[str, np.ndarray], order: list[str]) -> tuple[str, list[str]]:
    """The choice of least mean objective, or the first in ``order`` of those tied with it, and
    the tied ones (the choice included; one name when there is no tie)."""
    lowest = min(objectives, key=lambda name: (objectives[name].mean(), order.index(name)))
    tied = [name for name in order if name in objectives and _tied(objectives[lowest], objectives[name])]
    return tied[0], tied


@dataclass(frozen=True)
class Choice:
    """auto's answer: the candidate, its router per phase, the tie it was taken from, and the
    joint objective per candidate (mean over phases of time / eplb+random time)."""

    candidate: str
    routers: dict[str, str]
    tied: list[str]
    objective: dict[str, float]


def _choose(scores: Scores, phases: tuple[Phase, ...], names: list[str]) -> Choice:
    """Each candidate's best router per phase (ties by ``ROUTER_PREFERENCE``), then the candidate
    of least joint objective (ties by ``CANDIDATES`` order)."""
    baseline = {phase: float(scores.times["eplb", "random", phase].mean()) for phase in phases}
    routers: dict[str, dict[str, str]] = {}
    joint: dict[str, np.ndarray] = {}
    for name in names:
        routers[name] = {}
        per_phase = []
        for phase in phases:
            options = {r: t for (n, r, p), t in scores.times.items() if n == name and p == phase}
            if not options:
                break
            router, _ = choose_with_ties(options, [r for r in ROUTER_PREFERENCE if r in options])
            routers[name][phase] = router
            per_phase.append(options[router] / baseline[phase])
        else:
            joint[name] = np.mean(per_phase, axis=0)
    best, tied = choose_with_ties(joint, [name for name in names if name in joint])
    objective = {name: float(values.mean()) for name, values in joint.items()}
    return Choice(best, routers[best], tied, objective)


def _notes(
    choice: Choice, scores: Scores, phases: tuple[Phase, ...], names: list[str], elapsed: float
) -> list[str]:
    """Why: the choice against eplb+random per phase, the table, the routers, ties, timing."""
    parts = []
    for phase in phases:
        router = choice.routers[phase]
        best = scores.times[choice.candidate, router, phase].mean()
        base_key = ("eplb", "random", phase)
        baseline = scores.times[base_key].mean()
        compute, comm = scores.parts[choice.candidate, router, phase]
        base_compute, base_comm = scores.parts[base_key]
        parts.append(
            f"{phase}: {choice.candidate} with {router} routing predicts {best * 1e3:.3f} ms per "
            f"step, {1 - best / baseline:.1%} below eplb+{base_key[1]} ({baseline * 1e3:.3f} ms); "
            f"compute {base_compute * 1e3:.3f} -> {compute * 1e3:.3f} ms, "
            f"all-to-all {base_comm * 1e3:.3f} -> {comm * 1e3:.3f} ms"
        )
    routers = list(dict.fromkeys(r for (_, r, _) in scores.times))
    table = "; ".join(
        f"{phase} " + ", ".join(
            f"{name}: " + "/".join(
                f"{scores.times[name, r, phase].mean() * 1e3:.3f}"
                if (name, r, phase) in scores.times else "-"
                for r in routers
            )
            for name in names
        )
        for phase in phases
    )
    recommended = ", ".join(f"{phase} {router}" for phase, router in choice.routers.items())
    notes = [
        " | ".join(parts),
        f"ms per step by router ({'/'.join(routers)}): {table}",
        f"recommended router: {recommended}; chose in {elapsed:.1f} s",
    ]
    if len(choice.tied) > 1:
        notes.append(
            f"tie: {', '.join(choice.tied)} within {TIE_TOLERANCE:.0%} (or two standard errors) "
            f"of the best; {choice.candidate} is the first of them in the candidates' order"
        )
    return notes


def policy_auto(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """The candidate placement with the lowest predicted joint MoE time over the phases solved for,
    each phase with its best router -> ([L, N], SolverInfo whose notes give each candidate's time,
    the reason and any tie; ``router`` is the profile's phase's, ``phase_routers`` every phase's).

    Within ``options.time_limit_s``; a candidate or router that no longer fits is skipped, and the
    notes say which."""
    started = time.perf_counter()
    phases = _phases(profile, options)
    batches = _batches_per_phase(profile, topology, options)
    deadline = started + options.time_limit_s  # drawing the batches counts too
    scores, mappings, skipped = _solve_and_score(
        profile, model, topology, options, batches, deadline
    )
    names = list(mappings)
    choice = _choose(scores, phases, names)
    notes = _notes(choice, scores, phases, names, time.perf_counter() - started)
    if skipped:
        notes.append(f"not scored within the time limit: {', '.join(skipped)}")
    return mappings[choice.candidate], SolverInfo(
        status="time_limit" if skipped else "heuristic",
        objective=choice.objective[choice.candidate],
        objective_name=(
            f"predicted MoE time relative to eplb+random, mean over {'+'.join(phases)} "
            "(batches drawn from the profile)"
        ),
        notes=notes,
        router=choice.routers.get(profile.phase, choice.routers[phases[0]]),
        phase_routers=dict(choice.routers),
        tied=list(choice.tied),
    )
