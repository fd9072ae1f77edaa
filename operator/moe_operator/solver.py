"""Solve, predict, gate and plan: the CPU-heavy part of a rebalance cycle, run in a worker process.

Everything here is pure (numpy and moe_placement only: no kopf, no kubernetes) and its inputs and
outputs pickle, so the operator runs ``solve_and_gate`` in a ``ProcessPoolExecutor`` and its event
loop never waits on the solver.

The gate: the live and the new placement are scored by the cost model on the same batches sampled
from the profile (per served phase, with that phase's router and objective). The predicted gain is
the mean relative improvement over the served phases; the migration's cost is the time its bytes
take over the inter-node links (``maxConcurrentTransfers`` at once) as a fraction of the rebalance
interval. The new placement is applied when ``gain - cost >= minPredictedGain`` (and > 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from moe_placement.migration_plan import MigrationPlan, plan_migration, transfer_seconds
from moe_placement.models import ModelShape, Placement, Topology, WorkloadProfile, placement_hash
from moe_placement.policies import PolicyOptions, plan
from moe_placement.scoring import phase_batches, score_placements

OBJECTIVE_FIELDS = {
    "moeTime": "moe_time_s",
    "tokenImbalance": "token_imbalance",
    "activatedExperts": "max_activated_experts",
    "crossNodeBytes": "cross_node_bytes",
}


@dataclass(frozen=True)
class SolveRequest:
    policy: str
    profile: WorkloadProfile
    model: ModelShape
    topology: Topology
    previous: Placement
    time_limit_s: float = 10.0
    move_budget: int | None = None
    phases: tuple[str, ...] = ("prefill", "decode")
    objectives: dict[str, str] = field(default_factory=lambda: {"prefill": "moeTime", "decode": "moeTime"})
    routers: dict[str, str] = field(default_factory=lambda: {"prefill": "local_first", "decode": "metro"})
    tokens_per_gpu: dict[str, int] = field(default_factory=lambda: {"prefill": 128, "decode": 16})
    num_batches: int = 2
    min_predicted_gain: float = 0.05
    interval_s: float = 300.0
    max_concurrent_transfers: int = 4
    max_copies_per_stage: int = 8
    seed: int = 0
    keep_layers: tuple[int, ...] = ()


@dataclass
class SolveResult:
    apply: bool
    reason: str
    mapping: np.ndarray | None
    solver_status: str
    gap: float | None
    solve_seconds: float
    old_cost: dict[str, float]
    new_cost: dict[str, float]
    gain: float
    migration_cost: float
    net_gain: float
    bytes_to_move: float
    stages: int
    plan: MigrationPlan | None = None
    old_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    new_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def token_imbalance(load: np.ndarray, placement: Placement) -> float:
    """Live token imbalance: per layer max/mean GPU load with an expert's tokens split evenly over its
    replicas, averaged over layers with load."""
    load = np.asarray(load, dtype=np.float64)
    mapping = placement.physical_to_logical_map
    replicas = placement.replica_count().astype(np.float64)
    share = np.where(replicas > 0, load / np.maximum(replicas, 1), 0.0)  # [L, E]
    slot_load = np.where(mapping >= 0, np.take_along_axis(share, np.maximum(mapping, 0), axis=1), 0.0)
    gpu_load = slot_load.reshape(placement.num_layers, placement.num_gpus, placement.slots_per_gpu).sum(axis=2)
    mean = gpu_load.mean(axis=1)
    valid = mean > 0
    if not valid.any():
        return 1.0
    return float(np.mean(gpu_load[valid].max(axis=1) / mean[valid]))


def _smoothed(profile: WorkloadProfile) -> WorkloadProfile:
    """The profile with every expert given a little load, so token sampling always works."""
    load = profile.load
    floor = max(float(load.sum()) * 1e-6 / load.size, 1e-9)
    return WorkloadProfile(load=load + floor, top_k=profile.top_k, phase=profile.phase)


def _costs(
    request: SolveRequest, placements: list[Placement]
) -> tuple[list[dict[str, float]], list[dict[str, dict[str, float]]]]:
    """Per placement: {phase: objective value}, {phase: cost summary}; same batches for all."""
    rng = np.random.default_rng(request.seed)
    profile = _smoothed(request.profile)
    batches = {
        phase: phase_batches(
            profile, request.topology.num_gpus, request.tokens_per_gpu[phase], request.num_batches, phase, rng  # type: ignore[arg-type]
        )
        for phase in request.phases
    }
    reports = score_placements(placements, request.model, request.topology, batches, request.routers, request.seed)  # type: ignore[arg-type]
    objective_values = [
        {phase: float(getattr(report, OBJECTIVE_FIELDS[request.objectives[phase]])) for phase, report in costs.items()}
        for costs in reports
    ]
    summaries = [{phase: report.summary() for phase, report in costs.items()} for costs in reports]
    return objective_values, summaries


def _keep_rows(new: Placement, previous: Placement, layers: tuple[int, ...]) -> Placement:
    """``new`` with the rows of ``layers`` taken from ``previous`` (layers without metrics stay put)."""
    if not layers:
        return new
    mapping = new.physical_to_logical_map.copy()
    mapping[list(layers)] = previous.physical_to_logical_map[list(layers)]
    return Placement(mapping, new.num_experts, new.slots_per_gpu)


def solve_and_gate(request: SolveRequest) -> SolveResult:
    """Solve with the policy, predict the gain on sampled batches, plan the migration, and gate."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    result = plan(
        request.policy,
        request.profile,
        request.model,
        request.topology,
        PolicyOptions(
            time_limit_s=request.time_limit_s,
            previous=request.previous,
            move_budget=request.move_budget,
            seed=request.seed,
        ),
    )
    timings["solve"] = time.perf_counter() - started
    new = _keep_rows(result.placement, request.previous, request.keep_layers)
    common = dict(
        solver_status=result.solver.status,
        gap=result.solver.gap,
        solve_seconds=result.solve_seconds,
        timings=timings,
    )
    if placement_hash(new.physical_to_logical_map) == placement_hash(request.previous.physical_to_logical_map):
        return SolveResult(
            apply=False, reason="no change", mapping=None, old_cost={}, new_cost={}, gain=0.0,
            migration_cost=0.0, net_gain=0.0, bytes_to_move=0.0, stages=0, **common,
        )
    started = time.perf_counter()
    (old_cost, new_cost), (old_summary, new_summary) = _costs(request, [request.previous, new])
    timings["evaluate"] = time.perf_counter() - started
    gains = [
        (old_cost[phase] - new_cost[phase]) / old_cost[phase] if old_cost[phase] > 0 else 0.0
        for phase in request.phases
    ]
    gain = float(np.mean(gains)) if gains else 0.0
    started = time.perf_counter()
    migration = plan_migration(
        request.previous, new, request.model, request.topology, max_copies_per_stage=request.max_copies_per_stage
    )
    timings["plan_migration"] = time.perf_counter() - started
    bytes_to_move = float(migration.bytes_moved)
    seconds = transfer_seconds(bytes_to_move, request.topology, request.max_concurrent_transfers)
    migration_cost = seconds / max(request.interval_s, 1e-9)
    net = gain - migration_cost
    apply = net > 0 and net >= request.min_predicted_gain
    reason = (
        f"predicted gain {gain:.3f} - migration cost {migration_cost:.3f} = {net:.3f} "
        f"{'>=' if apply else '<'} minPredictedGain {request.min_predicted_gain:.3f}"
    )
    return SolveResult(
        apply=apply,
        reason=reason,
        mapping=new.physical_to_logical_map.copy(),
        old_cost=old_cost,
        new_cost=new_cost,
        gain=gain,
        migration_cost=migration_cost,
        net_gain=net,
        bytes_to_move=bytes_to_move,
        stages=len(migration.stages),
        plan=migration if apply else None,
        old_summary=old_summary,
        new_summary=new_summary,
        **common,
    )


def warm_up() -> bool:
    """Imported in each worker at start so the first real solve does not pay for imports."""
    return True
