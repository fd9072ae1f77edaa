"""``policy: auto``: per phase, the placement (and router) the cost model predicts fastest, and why.

The candidates are EPLB (token balance), ``ilp`` (MoETuner: balance and layer-to-layer locality),
``metro_aware`` (activated experts) and ``locality`` (node co-placement). Each is scored with the
cost model under every router on batches drawn from the profile itself: tokens that follow the
profile's layer-to-layer transitions (a Markov chain over layers), so the locality the candidates
aim at shows up in the score. The profile's phase and batch size set the batches.

Shapes: L layers, E experts, B tokens per batch, k experts per token, G GPUs.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from moe_placement.cost import evaluate
from moe_placement.models import ModelShape, Placement, RoutingBatch, Topology, WorkloadProfile
from moe_placement.pairs import pair_matrices
from moe_placement.policies.base import PolicyOptions, SolverInfo
from moe_placement.policies.eplb import policy_eplb
from moe_placement.policies.ilp import policy_ilp
from moe_placement.policies.locality import policy_locality
from moe_placement.policies.metro_aware import policy_metro_aware
from moe_placement.routing import ROUTERS
from moe_placement.traces import smallest_per_row

CANDIDATES = {
    "eplb": policy_eplb,
    "ilp": policy_ilp,
    "metro_aware": policy_metro_aware,
    "locality": policy_locality,
}
CANDIDATE_ROUTERS = ("random", "local_first", "metro")
ROUTER_PREFERENCE = ("metro", "local_first", "random")  # ties (e.g. no replicas) go to the first
SCORED_BATCHES = 2
MAX_SCORED_TOKENS = 4096  # tokens per scored batch: enough to rank candidates, seconds at V3 scale
MIN_SCORED_TOKENS = 256  # fewest tokens per scored batch when drawing them is cut short
SAMPLING_SHARE = 0.2  # of the time limit for drawing the scored batches
SCORING_SHARE = 0.5  # of the time limit left for scoring; the rest solves
SMOOTHING = 0.05  # share of a token's next-layer choice drawn from the layer's popularity alone


def profile_batches(
    profile: WorkloadProfile,
    num_gpus: int,
    num_batches: int,
    rng: np.random.Generator,
    max_tokens: int = MAX_SCORED_TOKENS,
    seconds: float = float("inf"),
) -> list[RoutingBatch]:
    """Batches of ``profile.batch_size`` tokens (at most ``max_tokens``), expert_ids [L, B, k],
    drawn from the profile: layer
    0 by popularity, each later layer by the transitions from the token's experts one layer up
    (mixed with a little popularity), k distinct experts by a Gumbel race. Token i starts on GPU
    i mod G. Where the first batch's first layers show that drawing them all would take longer
    than ``seconds``, every batch is cut to the tokens that fit (at least MIN_SCORED_TOKENS): a
    token's layers depend on its own earlier layers only, so the tokens kept are drawn as before."""
    load = profile.load
    num_layers, num_experts = load.shape
    transitions = pair_matrices(profile)[0].astype(np.float32)
    has_transitions = transitions.reshape(len(transitions), -1).any(1)
    popularity = (load / np.maximum(load.sum(1, keepdims=True), 1e-12)).astype(np.float32)
    log_popularity = np.log(np.maximum(popularity, 1e-30))
    batch = min(profile.batch_size, max_tokens)
    batches = []
    started = time.perf_counter()
    measured_layer = min(1, num_layers - 1)  # layer 1 is the first to follow transitions
    for index in range(num_batches):
        ids = np.empty((num_layers, batch, profile.top_k), dtype=np.int64)
        log_weight = np.broadcast_to(log_popularity[0], (batch, num_experts))
        for layer in range(num_layers):
            uniform = rng.random((batch, num_experts), dtype=np.float32)
            race = log_weight - np.log(-np.log(uniform + np.float32(1e-30)))
            ids[layer] = smallest_per_row(-race, profile.top_k)
            if index == 0 and layer == measured_layer:
                projected = (time.perf_counter() - started) / (layer + 1) * num_layers * num_batches
                fits = max(MIN_SCORED_TOKENS, int(batch * seconds / projected))
                if fits < batch:
                    batch, ids = fits, ids[:, :fits].copy()
            if layer + 1 == num_layers:
                break
            log_weight = np.broadcast_to(log_popularity[layer + 1], (batch, num_experts))
            if has_transitions[layer]:  # else every token follows the popularity alone
                follow = transitions[layer][ids[layer]].sum(1)  # [B, E]
                follow /= np.maximum(follow.sum(1, keepdims=True), np.float32(1e-12))
                mixed = (1.0 - SMOOTHING) * follow + SMOOTHING * popularity[layer + 1]
                log_weight = np.log(np.maximum(mixed, np.float32(1e-30)))
        batches.append(RoutingBatch(ids, np.arange(batch) % num_gpus))
    return batches


def policy_auto(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """The candidate placement with the lowest predicted MoE time for the profile's phase, over
    every router -> ([L, N], SolverInfo whose notes give each candidate's time and the reason).

    Within ``options.time_limit_s``: candidates are solved and scored in order (eplb first, always
    done), each solve given its share of what is left after the scoring still to come; a candidate
    or router that no longer fits is skipped, and the notes say which."""
    started = time.perf_counter()
    deadline = started + options.time_limit_s
    rng = np.random.default_rng(options.seed)
    batches = profile_batches(
        profile, topology.num_gpus, SCORED_BATCHES, rng,
        seconds=SAMPLING_SHARE * options.time_limit_s,
    )
    routers = [name for name in CANDIDATE_ROUTERS if name in ROUTERS]
    results: dict[tuple[str, str], float] = {}
    mappings: dict[str, np.ndarray] = {}
    parts: dict[tuple[str, str], tuple[float, float]] = {}
    skipped: list[str] = []
    # one evaluation's time per router, the longest seen (routers differ: local_first builds
    # each placement's nearest replicas first); a router not yet measured is guessed at the slowest
    scoring_s: dict[str, float] = {}

    def scoring_guess(router: str) -> float:
        return scoring_s.get(router, max(scoring_s.values(), default=0.0))

    for index, (name, policy) in enumerate(CANDIDATES.items()):
        left = deadline - time.perf_counter()
        remaining = len(CANDIDATES) - index
        one_candidate_s = sum(scoring_guess(router) for router in routers)
        share = (left - remaining * one_candidate_s) / remaining
        if index and share < SCORING_SHARE * one_candidate_s:
            skipped.append(name)
            continue
        mapping, _ = policy(profile, model, topology, replace(options, time_limit_s=share))
        placement = Placement(mapping.copy(), model.num_experts, topology.slots_per_gpu)
        for router in routers:
            if results and time.perf_counter() + scoring_guess(router) > deadline:
                skipped.append(f"{name}+{router}")
                continue
            scored = time.perf_counter()
            report = evaluate(placement, model, topology, batches, router, options.seed)
            scoring_s[router] = max(scoring_s.get(router, 0.0), time.perf_counter() - scored)
            results[name, router] = report.moe_time_s
            parts[name, router] = (report.compute_time_s, report.comm_time_s)
            mappings[name] = mapping
    (best, best_router), best_time = min(
        results.items(), key=lambda item: (item[1], ROUTER_PREFERENCE.index(item[0][1]))
    )
    notes = [
        *_choice_notes(profile.phase, best, best_router, results, parts, routers),
        f"recommended router: {best_router}; chose in {time.perf_counter() - started:.1f} s",
    ]
    if skipped:
        notes.append(f"not scored within the time limit: {', '.join(skipped)}")
    return mappings[best], SolverInfo(
        status="time_limit" if skipped else "heuristic",
        objective=best_time,
        objective_name=f"predicted MoE seconds per {profile.phase} step (batches drawn from the profile)",
        notes=notes,
        router=best_router,
    )


def _choice_notes(
    phase: str,
    best: str,
    best_router: str,
    results: dict[tuple[str, str], float],
    parts: dict[tuple[str, str], tuple[float, float]],
    routers: list[str],
) -> list[str]:
    """Why ``best`` with ``best_router`` won against eplb, and every scored candidate's time per
    router. results: predicted MoE seconds, parts: (compute, all-to-all) seconds, by (candidate,
    router)."""
    best_time = results[best, best_router]
    base_router = "random" if ("eplb", "random") in results else best_router
    baseline = results["eplb", base_router]
    compute, comm = parts[best, best_router]
    base_compute, base_comm = parts["eplb", base_router]
    reason = (
        f"{phase}: {best} with {best_router} routing predicts {best_time * 1e3:.3f} ms per step, "
        f"{1 - best_time / baseline:.1%} below eplb+{base_router} ({baseline * 1e3:.3f} ms); "
        f"compute {base_compute * 1e3:.3f} -> {compute * 1e3:.3f} ms, "
        f"all-to-all {base_comm * 1e3:.3f} -> {comm * 1e3:.3f} ms"
    )
    candidates = dict.fromkeys(name for name, _ in results)
    table = ", ".join(
        f"{name}: " + "/".join(
            f"{results[name, r] * 1e3:.3f}" if (name, r) in results else "-" for r in routers
        )
        for name in candidates
    )
    return [reason, f"ms per step by router ({'/'.join(routers)}): {table}"]
