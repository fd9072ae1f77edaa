"""What a step of the control loop returns: a typed outcome, applied to status, events and metrics in
one place (``Controller._apply``); the kopf daemon reads ``retry_after``, never message text."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_operator import metrics as om
from moe_operator.agents import AgentClient
from moe_operator.plan_runner import ONE_GROUP, AgentsView, GroupLayout, build_group_status
from moe_operator.crd import ConditionType, ResolvedSpec
from moe_operator.status import StatusWriter

# While waiting for something (the initial placement, agents, a rollback), cycles come this often.
WAIT_INTERVAL_S = float(os.environ.get("MOEPLACE_WAIT_INTERVAL_S", "3"))
# With no agents announced at all (the workload is not up yet), look again less often.
NO_AGENTS_INTERVAL_S = float(os.environ.get("MOEPLACE_NO_AGENTS_INTERVAL_S", "15"))


class CycleResult(enum.StrEnum):
    GONE = "gone"
    INVALID = "invalid"
    PENDING = "pending"
    PLACEMENT_INCOMPATIBLE = "placement incompatible"
    ENDPOINTS_INVALID = "endpoints invalid"
    NO_AGENTS = "no agents"
    NO_TOKEN = "no token"
    AGENTS_UNAVAILABLE = "agents unavailable"
    ADOPTED = "adopted"
    AGENTS_DIVERGED = "agents diverged"
    METRICS_UNAVAILABLE = "metrics unavailable"
    PAUSED = "paused"
    SOLVER_FAILED = "solver failed"
    SKIPPED = "skipped"
    GROUPS_UNCHANGED = "groups unchanged"
    APPLIED = "applied"
    ENGINE_APPLYING = "engine applying"
    INTERRUPTED = "interrupted"
    ROLLED_BACK = "rolled back"
    ROLLING_BACK = "rolling back"
    STALLED = "migration stalled"
    ABANDONED = "migration abandoned"
    KUBERNETES_ERROR = "kubernetes error"
    ERROR = "error"


class GroupsTrigger(enum.StrEnum):
    """Why a cycle with a request router solves (``status.routerGroups.trigger``)."""

    FIRST_SEEN = "first seen"
    DRIFTED = "drifted"
    IMBALANCED = "load imbalanced"


@dataclass(frozen=True)
class ConditionChange:
    type: ConditionType
    status: bool | None
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class CycleOutcome:
    """How a cycle (or the step that ended it) went.

    ``status``: extra status fields (camelCase) to write; ``write`` False leaves the status alone
    (nothing changed, or there is no resource to write to); ``error``: the operator error counter's
    ``kind`` label; ``retry_after``: run the next cycle this soon instead of after the interval.
    """

    result: CycleResult
    message: str = ""
    conditions: tuple[ConditionChange, ...] = ()
    event: Event | None = None
    status: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    retry_after: float | None = None
    write: bool = True


def waiting(result: CycleResult, message: str = "", **fields: Any) -> CycleOutcome:
    """An outcome that asks for the next cycle soon (the deployment waits for something)."""
    return CycleOutcome(result, message, retry_after=WAIT_INTERVAL_S, **fields)


@dataclass
class CycleContext:
    """What every step of one cycle works on."""

    body: dict[str, Any]
    resolved: ResolvedSpec
    writer: StatusWriter
    metrics: om.DeploymentMetrics
    client: AgentClient
    agents: dict[int, str]
    base: dict[str, Any] = field(default_factory=dict)
    view: AgentsView | None = None
    layout: GroupLayout = ONE_GROUP

    def record_groups(self, digest: str, generation: int) -> None:
        """``status.groups`` and ``groupStatus`` from the current view, for a LeaderWorkerSet
        workload (its groups against the map ``digest`` at ``generation``)."""
        ref = self.resolved.spec.serving.workload_ref
        if self.view is None or ref is None or ref.kind != "LeaderWorkerSet":
            return
        self.base.update(
            groups=self.layout.groups,
            groupStatus=build_group_status(self.layout, self.agents, self.view, digest, generation),
        )

    @property
    def namespace(self) -> str:
        return self.body["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]
