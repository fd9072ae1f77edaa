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

CANDIDATES = {
    "eplb": policy_eplb,
    "ilp": policy_ilp,
    "metro_aware": policy_metro_aware,
    "locality": policy_locality,
}
CANDIDATE_ROUTERS = ("random", "local_first", "metro")
ROUTER_PREFERENCE = ("metro", "local_first", "random")  # ties (e.g. no replicas) go to the first
SCORED_BATCHES = 2
SMOOTHING = 0.05  # share of a token's next-layer choice drawn from the layer's popularity alone


def profile_batches(
    profile: WorkloadProfile, num_gpus: int, num_batches: int, rng: np.random.Generator
) -> list[RoutingBatch]:
    """Batches of ``profile.batch_size`` tokens, expert_ids [L, B, k], drawn from the profile: layer
    0 by popularity, each later layer by the transitions from the token's experts one layer up
    (mixed with a little popularity), k distinct experts by a Gumbel race. Token i starts on GPU
    i mod G."""
    load = profile.load
    num_layers, num_experts = load.shape
    transitions, _ = pair_matrices(profile)
    popularity = load / np.maximum(load.sum(1, keepdims=True), 1e-12)
    batch = profile.batch_size
    batches = []
    for _ in range(num_batches):
        ids = np.empty((num_layers, batch, profile.top_k), dtype=np.int64)
        weight = np.broadcast_to(popularity[0], (batch, num_experts))
        for layer in range(num_layers):
            race = np.log(np.maximum(weight, 1e-300)) + rng.gumbel(size=(batch, num_experts))
            ids[layer] = np.argsort(-race, axis=1)[:, : profile.top_k]
            if layer + 1 < num_layers:
                chosen = np.zeros((batch, num_experts))
                np.put_along_axis(chosen, ids[layer], 1.0, axis=1)
                follow = chosen @ transitions[layer]
                follow /= np.maximum(follow.sum(1, keepdims=True), 1e-12)
                weight = (1.0 - SMOOTHING) * follow + SMOOTHING * popularity[layer + 1]
        batches.append(RoutingBatch(ids, np.arange(batch) % num_gpus))
    return batches


def policy_auto(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """The candidate placement with the lowest predicted MoE time for the profile's phase, over
    every router -> ([L, N], SolverInfo whose notes give each candidate's time and the reason)."""
    started = time.perf_counter()
    share = options.time_limit_s / (2 * len(CANDIDATES))  # half the time solves, half scores
    rng = np.random.default_rng(options.seed)
    batches = profile_batches(profile, topology.num_gpus, SCORED_BATCHES, rng)
    routers = [name for name in CANDIDATE_ROUTERS if name in ROUTERS]
    results: dict[tuple[str, str], float] = {}
    mappings: dict[str, np.ndarray] = {}
    parts: dict[tuple[str, str], tuple[float, float]] = {}
    for name, policy in CANDIDATES.items():
        mapping, _ = policy(
            profile,
            model,
            topology,
            replace(options, time_limit_s=share),
        )
        mappings[name] = mapping
        placement = Placement(mapping.copy(), model.num_experts, topology.slots_per_gpu)
        for router in routers:
            report = evaluate(placement, model, topology, batches, router, options.seed)
            results[name, router] = report.moe_time_s
            parts[name, router] = (report.compute_time_s, report.comm_time_s)
    (best, best_router), best_time = min(
        results.items(), key=lambda item: (item[1], ROUTER_PREFERENCE.index(item[0][1]))
    )
    baseline = results["eplb", "random"]
    compute, comm = parts[best, best_router]
    base_compute, base_comm = parts["eplb", "random"]
    reason = (
        f"{profile.phase}: {best} with {best_router} routing predicts {best_time * 1e3:.3f} ms per step, "
        f"{1 - best_time / baseline:.1%} below eplb+random ({baseline * 1e3:.3f} ms); "
        f"compute {base_compute * 1e3:.3f} -> {compute * 1e3:.3f} ms, "
        f"all-to-all {base_comm * 1e3:.3f} -> {comm * 1e3:.3f} ms"
    )
    table = ", ".join(
        f"{name}: " + "/".join(f"{results[name, r] * 1e3:.3f}" for r in routers)
        for name in CANDIDATES
    )
    return mappings[best], SolverInfo(
        status="heuristic",
        objective=best_time,
        objective_name=f"predicted MoE seconds per {profile.phase} step (batches drawn from the profile)",
        notes=[
            reason,
            f"ms per step by router ({'/'.join(routers)}): {table}",
            f"recommended router: {best_router}; chose in {time.perf_counter() - started:.1f} s",
        ],
    )
