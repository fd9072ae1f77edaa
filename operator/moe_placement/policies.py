"""Placement policies by name: each turns a workload profile into a placement with its solver status.

A policy is ``fn(profile, model, topology, options) -> (physical_to_logical_map [L, N], SolverInfo)``;
``plan`` validates the inputs, times the call and wraps the result. Policies never raise on solver
trouble: they return the best valid placement they have and say so in ``SolverInfo.status``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moe_placement.baselines import (
    eplb_rebalance,
    linear_placement,
    round_robin_placement,
)
from moe_placement.models import (
    ModelShape,
    Placement,
    Topology,
    WorkloadProfile,
    check_fits,
    lookup,
)


@dataclass(frozen=True)
class PolicyOptions:
    """Knobs shared by policies.

    previous: the placement serving now (migration-aware policies stay close to it).
    move_budget: most expert replicas a re-solve may move (None: no budget).
    """

    time_limit_s: float = 30.0
    previous: Placement | None = None
    move_budget: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class SolverInfo:
    """How a policy's answer came about.

    status: ``heuristic`` (no solver), ``optimal``, ``feasible`` (stopped with a gap),
    ``time_limit``, or ``fallback`` (the solver failed; the warm start is returned).
    objective and lower_bound are in the policy's own units (stated in ``objective_name``).
    """

    status: str = "heuristic"
    objective: float | None = None
    lower_bound: float | None = None
    objective_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def gap(self) -> float | None:
        """Relative gap between the objective and the lower bound, None when either is missing."""
        if self.objective is None or self.lower_bound is None:
            return None
        return (self.objective - self.lower_bound) / max(abs(self.objective), 1e-12)


@dataclass(frozen=True)
class PlanResult:
    """A policy's placement, how it was found, and how long it took."""

    policy: str
    placement: Placement
    solver: SolverInfo
    solve_seconds: float


PolicyFn = Callable[[WorkloadProfile, ModelShape, Topology, PolicyOptions], tuple[np.ndarray, SolverInfo]]


def policy_linear(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Contiguous blocks of experts per GPU (what an engine does with no balancer)."""
    mapping = linear_placement(model.num_layers, model.num_experts, topology.num_slots)
    return mapping, SolverInfo()


def policy_round_robin(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Expert e on GPU e mod G."""
    mapping = round_robin_placement(
        model.num_layers, model.num_experts, topology.num_gpus, topology.slots_per_gpu
    )
    return mapping, SolverInfo()


def policy_eplb(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """DeepSeek EPLB, hierarchical (one expert group per node) when the shapes allow, else global."""
    num_nodes = topology.num_nodes
    hierarchical = model.num_experts % num_nodes == 0
    num_groups, num_nodes = (num_nodes, num_nodes) if hierarchical else (1, 1)
    mapping, _, _ = eplb_rebalance(
        profile.load, topology.num_slots, num_groups, num_nodes, topology.num_gpus
    )
    kind = "hierarchical" if hierarchical and num_nodes > 1 else "global"
    return mapping, SolverInfo(notes=[f"eplb {kind} policy"])


def policy_eplb_global(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """DeepSeek EPLB's global policy (one group, one node)."""
    mapping, _, _ = eplb_rebalance(profile.load, topology.num_slots, 1, 1, topology.num_gpus)
    return mapping, SolverInfo(notes=["eplb global policy"])


POLICIES: dict[str, PolicyFn] = {
    "linear": policy_linear,
    "round_robin": policy_round_robin,
    "eplb": policy_eplb,
    "eplb_global": policy_eplb_global,
}


def get_policy(name: str) -> PolicyFn:
    """The policy called ``name``."""
    return lookup(POLICIES, name, "policy")


def plan(
    policy: str,
    profile: WorkloadProfile,
    model: ModelShape,
    topology: Topology,
    options: PolicyOptions | None = None,
) -> PlanResult:
    """Run ``policy`` on ``profile`` and return a validated placement."""
    policy_fn = get_policy(policy)
    profile.check_model(model)
    check_fits(model, topology)
    options = options or PolicyOptions()
    if options.previous is not None:
        options.previous.check_topology(model, topology)
    started = time.perf_counter()
    mapping, solver = policy_fn(profile, model, topology, options)
    elapsed = time.perf_counter() - started
    placement = Placement(mapping, model.num_experts, topology.slots_per_gpu)
    placement.check_topology(model, topology)
    return PlanResult(policy=policy, placement=placement, solver=solver, solve_seconds=elapsed)


def _deferred(module: str, name: str) -> PolicyFn:
    """The policy ``name`` of ``module``, imported on first call (those modules import this one)."""

    def policy(
        profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
    ) -> tuple[np.ndarray, SolverInfo]:
        return getattr(importlib.import_module(module), name)(profile, model, topology, options)

    policy.__name__ = name
    return policy


# Solver-backed and workload-aware policies (issue 3).
POLICIES.update(
    ilp=_deferred("moe_placement.ilp", "policy_ilp"),
    metro_aware=_deferred("moe_placement.metro", "policy_metro_aware"),
    locality=_deferred("moe_placement.locality", "policy_locality"),
    auto=_deferred("moe_placement.auto", "policy_auto"),
    migration_aware=_deferred("moe_placement.migration", "policy_migration_aware"),
    grouped=_deferred("moe_placement.grouped", "policy_grouped"),
)
