"""What every placement policy shares: its options, what it says about its solve, its result, and
its signature.

A policy is ``fn(profile, model, topology, options) -> (physical_to_logical_map [L, N], SolverInfo)``.
Policies never raise on solver trouble: they return the best valid placement they have and say so
in ``SolverInfo.status``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moe_placement.models import (
    PHASES,
    ModelShape,
    Phase,
    Placement,
    PlacementError,
    Topology,
    WorkloadProfile,
)
from moe_placement.request_routing import REQUEST_ROUTERS


@dataclass(frozen=True)
class PolicyOptions:
    """Knobs shared by policies.

    previous: the placement serving now (migration-aware policies stay close to it).
    move_budget: most expert replicas a re-solve may move (None: no budget).
    workers: processes a policy whose layers are independent may split them over (None: every
    usable CPU; see ``moe_placement.parallel``).
    phases: the phases the placement serves, for policies with a joint objective over them
    (``auto``); empty: the profile's own phase.
    request_router: how requests reach the data-parallel ranks: ``round_robin`` (an engine's
    default) or ``signature`` (moeplace's request router, whose groups are the profile's
    ``domain_loads``; ``auto`` then weighs ``grouped`` too).
    """

    time_limit_s: float = 30.0
    previous: Placement | None = None
    move_budget: int | None = None
    seed: int = 0
    workers: int | None = None
    phases: tuple[Phase, ...] = ()
    request_router: str = "round_robin"

    def __post_init__(self) -> None:
        if self.request_router not in REQUEST_ROUTERS:
            raise PlacementError(
                f"request_router: {self.request_router!r} is not one of {', '.join(REQUEST_ROUTERS)}"
            )
        unknown = [phase for phase in self.phases if phase not in PHASES]
        if unknown:
            raise PlacementError(f"phases: {unknown} are not of {', '.join(PHASES)}")


@dataclass(frozen=True)
class SolverInfo:
    """How a policy's answer came about.

    status: ``heuristic`` (no solver), ``optimal``, ``feasible`` (stopped with a gap),
    ``time_limit``, or ``fallback`` (the solver failed; the warm start is returned).
    objective and lower_bound are in the policy's own units (stated in ``objective_name``).
    router: the router the placement is meant for in the profile's phase (None: the phase's
    default); phase_routers: the router per phase solved for, when the policy weighed several.
    tied: choices the policy could not tell apart from its answer (its answer first; empty: no tie).
    """

    status: str = "heuristic"
    objective: float | None = None
    lower_bound: float | None = None
    objective_name: str = ""
    notes: list[str] = field(default_factory=list)
    router: str | None = None
    phase_routers: dict[str, str] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)

    @property
    def stopped_early(self) -> bool:
        """Whether the time limit cut the search short (the placement is the best found by then)."""
        return self.status == "time_limit"

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
