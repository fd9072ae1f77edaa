"""Migrations as the control loop runs them: start, resume, finish, and return to the source map.

A migration is recorded before its first step: its source and target maps in the ``<name>-migration``
ConfigMap (the plan is deterministic in them), its progress in ``status.migration``. The outcomes:

* **Completed**: the target is published with the agents' generation; counted as a rebalance.
* **Failed stage**: the runner undid the stage; if earlier stages had changed the map, a second
  migration (``rollbackOf`` = the first plan) takes the agents back to the exact source map, make
  before break as always. Only when the agents serve the source map again is the migration
  ``RolledBack``; until then the rollback stays ``Running`` (resumed every cycle, the map that is
  live published meanwhile) and the deployment is Degraded. A rollback never counts as a rebalance.
* **Interrupted** (spec changed, paused, operator stopping): stopped at a stage boundary, the map
  that is live published, not counted as a rebalance.
* **Stalled** (a final activation failed): recorded progress kept, resumed next cycle.

With ``spec.serving.engineKind`` sglang or vllm the engine moves the weights itself: the target is
published at once (the engine's plugin reads the mounted ConfigMap and applies it at its next
rebalance), and each cycle waits up to ``ENGINE_POLL_S`` for every rank's sidecar to report the
engine serving it (the target with its empty slots filled, ``engine_backend.engine_map``). Live:
Completed. Not live within ``engineApplyTimeoutSeconds`` of the start, or a rank answering what
waiting cannot fix: the source map is published again and the migration is Failed (Degraded); the
engine goes back to it at its next rebalance.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_operator import builders
from moe_operator import metrics as om
from moe_operator.engine_backend import EngineLive, EngineTimedOut, engine_map, wait_until_live
from moe_operator.crd import MigrationStatus, PlacementStatus, ResolvedSpec
from moe_operator.kube import Kube
from moe_operator.outcomes import ConditionChange, CycleContext, CycleOutcome, CycleResult, Event, waiting
from moe_operator.plan_runner import (
    PlanRunner,
    Progress,
    RunOptions,
    RunOutcome,
    RunState,
    converge,
    plan_id_of,
    read_agents,
)
from moe_operator.solver import SolveResult
from moe_operator.status import now_iso
from moe_placement.migration_plan import MigrationPlan, plan_migration
from moe_placement.models import Placement, PlacementError, placement_hash

logger = logging.getLogger("moe_operator.rollout")

# An engine migration is waited for in slices of this long, so a cycle never holds its lock for long.
ENGINE_POLL_S = 20.0

EventFn = Callable[[Any, str, str, str], None]


def _seconds_since(timestamp: str | None) -> float:
    """Seconds since an RFC 3339 status timestamp (0 when there is none)."""
    if not timestamp:
        return 0.0
    started = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return max((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 0.0)


def _back_on_source(reason: str, message: str, error: str | None = None) -> CycleOutcome:
    """A migration given up, the map from before it published again: not Migrating, Degraded."""
    return waiting(
        CycleResult.ROLLED_BACK, message, error=error,
        conditions=(
            ConditionChange("Migrating", False, reason, message),
            ConditionChange("Degraded", True, reason, message),
        ),
        event=Event("Warning", reason, message),
    )


def _placement(mapping: Any, resolved: ResolvedSpec) -> Placement:
    placement = Placement(np.asarray(mapping, dtype=np.int64), resolved.model.num_experts, resolved.topology.slots_per_gpu)
    placement.check_topology(resolved.model, resolved.topology)
    return placement


@dataclass
class Rollout:
    kube: Kube
    event: EventFn

    async def start(
        self,
        ctx: CycleContext,
        source: Placement,
        target: Placement,
        generation: int,
        result: SolveResult,
        should_stop: Callable[[], bool],
    ) -> CycleOutcome:
        """Record and run a migration to ``target`` that the gate accepted."""
        if ctx.resolved.spec.serving.engine_kind != "agent":
            return await self._engine_start(ctx, source, target, generation, result)
        policy = ctx.resolved.spec.placement.policy
        record = self._record(ctx, source, target, generation, policy)
        migration = MigrationStatus(
            plan_id=record.plan_id,
            state="Running",
            target_hash=placement_hash(target.physical_to_logical_map),
            from_generation=generation,
            stages=result.stages,
            bytes_total=ctx.layout.total_bytes(result.bytes_to_move),
            started_at=now_iso(),
            message=result.reason,
            policy=policy,
            solver_status=result.solver_status,
        )
        await self.kube.put_configmap(builders.build_migration_configmap(ctx.body, record))
        ctx.writer.condition("Migrating", True, "MigrationRunning", f"plan {record.plan_id}: {result.stages} stages")
        await ctx.writer.patch(migration=migration)
        progress = Progress(plan_id=record.plan_id, stages=result.stages, bytes_total=migration.bytes_total)
        return await self._run(ctx, record, result.plan, progress, migration, should_stop)

    def _record(
        self, ctx: CycleContext, source: Placement, target: Placement, generation: int, policy: str, rollback_of: str = ""
    ) -> builders.MigrationRecord:
        max_copies = ctx.resolved.spec.migration.max_copies_per_stage
        plan_id = plan_id_of(
            placement_hash(source.physical_to_logical_map), placement_hash(target.physical_to_logical_map), max_copies
        )
        return builders.MigrationRecord(
            plan_id=plan_id,
            policy=policy,
            from_generation=generation,
            max_copies_per_stage=max_copies,
            rollback_of=rollback_of,
            source=source.physical_to_logical_map.tolist(),
            target=target.physical_to_logical_map.tolist(),
        )

    async def resume(
        self, ctx: CycleContext, migration: MigrationStatus, published: Placement, should_stop: Callable[[], bool]
    ) -> CycleOutcome:
        """Resume the recorded migration from its ConfigMap and status (the plan is re-derived).

        When the agents no longer serve one map (one restarted with the published map while the
        others had moved on), they are brought onto the published map first (the others still hold
        its weights, staged or retired) and the migration counts as failed from there: the agents go
        back to the map from before it."""
        name = builders.migration_configmap_name(ctx.name)
        try:
            record = builders.parse_migration_configmap(await self.kube.get_configmap(ctx.namespace, name))
            source, target = _placement(record.source, ctx.resolved), _placement(record.target, ctx.resolved)
            if record.plan_id != migration.plan_id:
                raise ValueError(f"plan {record.plan_id} != status plan {migration.plan_id}")
        except (ValueError, PlacementError) as error:
            message = f"migration {migration.plan_id} cannot be resumed: {error}"
            ctx.metrics.migrating(False)
            await self.kube.delete_configmap(ctx.namespace, name)
            return CycleOutcome(
                CycleResult.ABANDONED, message,
                conditions=(ConditionChange("Migrating", False, "MigrationAbandoned", message),),
                event=Event("Warning", "MigrationAbandoned", message),
                status={"migration": migration.model_copy(update={"state": "Failed", "message": message})},
            )
        if ctx.resolved.spec.serving.engine_kind != "agent":
            return await self._engine_wait(ctx, record, migration)
        view = ctx.view
        if view is not None and len({answer.hash for answer in view.answers.values()}) > 1:
            return await self._diverged(ctx, record, migration, published, should_stop)
        plan = await asyncio.to_thread(
            plan_migration, source, target, ctx.resolved.model, ctx.resolved.topology, record.max_copies_per_stage
        )
        progress = Progress(
            plan_id=migration.plan_id,
            stages=len(plan.stages),
            stage=migration.stage,
            step=migration.step,
            bytes_moved=migration.bytes_moved,
            bytes_total=migration.bytes_total or ctx.layout.total_bytes(plan.bytes_moved),
        )
        self.event(ctx.body, "Normal", "MigrationResumed", f"plan {progress.plan_id} at stage {progress.stage}/{progress.stages}")
        return await self._run(ctx, record, plan, progress, migration, should_stop)

    async def _run(
        self,
        ctx: CycleContext,
        record: builders.MigrationRecord,
        plan: MigrationPlan,
        progress: Progress,
        migration: MigrationStatus,
        should_stop: Callable[[], bool],
    ) -> CycleOutcome:
        ctx.metrics.migrating(True)
        current = migration

        async def persist(state: Progress) -> None:
            nonlocal current
            current = current.model_copy(
                update={"stage": state.stage, "stages": state.stages, "step": state.step,
                        "bytes_moved": state.bytes_moved, "state": "Running"}
            )
            await ctx.writer.patch(migration=current)

        runner = self._runner(ctx, persist, should_stop)
        try:
            outcome = await runner.run(plan, progress)
        finally:
            ctx.metrics.migrating(False)
        current = current.model_copy(
            update={"stage": outcome.progress.stage, "step": outcome.progress.step,
                    "bytes_moved": outcome.progress.bytes_moved, "message": outcome.message}
        )
        if outcome.state == RunState.STALLED:
            ctx.metrics.migrating(True)
            ctx.metrics.migration_step("failed")
            return waiting(
                CycleResult.STALLED, outcome.message, status={"migration": current}, error="agent",
                conditions=(ConditionChange("Degraded", True, "MigrationStalled", outcome.message),),
                event=Event("Warning", "MigrationStalled", outcome.message),
            )
        if outcome.state == RunState.FAILED:
            return await self._failed(ctx, record, current, outcome, should_stop)
        if record.rollback_of:
            return await self._rolled_back(ctx, record, current, outcome)
        if outcome.state == RunState.COMPLETED:
            return await self._completed(ctx, record, current, outcome)
        return await self._interrupted(ctx, record, current, outcome)

    async def _engine_start(
        self, ctx: CycleContext, source: Placement, target: Placement, generation: int, result: SolveResult
    ) -> CycleOutcome:
        """Publish ``target`` for the engine to apply, record the migration, and wait for it."""
        policy = ctx.resolved.spec.placement.policy
        record = self._record(ctx, source, target, generation, policy)
        migration = MigrationStatus(
            plan_id=record.plan_id, state="Running",
            target_hash=placement_hash(engine_map(target).physical_to_logical_map), from_generation=generation,
            stages=1, bytes_total=result.bytes_to_move, started_at=now_iso(),
            message=f"{ctx.resolved.spec.serving.engine_kind} applies it: {result.reason}",
            policy=policy, solver_status=result.solver_status,
        )
        await self.kube.put_configmap(builders.build_migration_configmap(ctx.body, record))
        ctx.writer.condition("Migrating", True, "EngineApplying", f"plan {record.plan_id}: published for the engine")
        solver = {"status": result.solver_status}
        await self.publish(ctx, target, generation + 1, policy, solver, migration=migration)
        return await self._engine_wait(ctx, record, migration)

    async def _engine_wait(
        self, ctx: CycleContext, record: builders.MigrationRecord, migration: MigrationStatus
    ) -> CycleOutcome:
        """Wait a slice for the engine to serve the target; finish, keep waiting, or give up."""
        target = _placement(record.target, ctx.resolved)
        elapsed = _seconds_since(migration.started_at)
        remaining = ctx.resolved.spec.migration.engine_apply_timeout_seconds - elapsed
        ctx.metrics.migrating(True)
        try:
            outcome = await wait_until_live(
                ctx.client, ctx.agents, target, max(min(remaining, ENGINE_POLL_S), 0.0), groups=ctx.layout.groups
            )
        finally:
            ctx.metrics.migrating(False)
        name = builders.migration_configmap_name(ctx.name)
        if isinstance(outcome, EngineLive):
            await self.kube.delete_configmap(ctx.namespace, name)
            ctx.metrics.rebalance("applied")
            done = migration.model_copy(update={"state": "Completed", "stage": 1, "message": f"live on {len(outcome.ranks)} ranks"})
            message = f"plan {record.plan_id}: the engine serves it on every rank after {elapsed + outcome.seconds:.0f}s"
            return CycleOutcome(
                CycleResult.APPLIED, message,
                conditions=(
                    ConditionChange("Migrating", False, "MigrationCompleted", message),
                    ConditionChange("Degraded", False, "AgentsServing", message),
                ),
                event=Event("Normal", "MigrationCompleted", message),
                status={"migration": done, "lastRebalanceTime": now_iso()},
            )
        if isinstance(outcome, EngineTimedOut) and remaining > ENGINE_POLL_S:
            lagging = ", ".join(f"{ctx.layout.name(rank)}: {why}" for rank, why in sorted(outcome.lagging.items())[:4])
            return waiting(CycleResult.ENGINE_APPLYING, f"plan {record.plan_id}: waiting for the engine ({lagging})")
        why = (
            f"not served within {ctx.resolved.spec.migration.engine_apply_timeout_seconds:.0f}s"
            if isinstance(outcome, EngineTimedOut) else f"{ctx.layout.name(outcome.rank)}: {outcome.message}"
        )
        message = f"plan {record.plan_id}: {why}; the previous map is published again for the engine"
        source = _placement(record.source, ctx.resolved)
        published = ctx.writer.observed.placement
        generation = (published.generation if published is not None else record.from_generation) + 1
        failed = migration.model_copy(update={"state": "Failed", "message": message})
        await self.publish(ctx, source, generation, record.policy, migration=failed)
        await self.kube.delete_configmap(ctx.namespace, name)
        ctx.metrics.rebalance("failed")
        return _back_on_source("EngineApplyFailed", message, error="agent")

    async def _diverged(
        self,
        ctx: CycleContext,
        record: builders.MigrationRecord,
        migration: MigrationStatus,
        published: Placement,
        should_stop: Callable[[], bool],
    ) -> CycleOutcome:
        assert ctx.view is not None
        generation = ctx.view.max_generation + 1
        problems = await converge(
            ctx.client, ctx.agents, published.physical_to_logical_map, generation, ctx.view, ctx.layout
        )
        if problems:
            message = f"plan {migration.plan_id}: agents serve different maps and cannot all serve the published one: " + (
                "; ".join(problems[:3])
            )
            return waiting(
                CycleResult.AGENTS_DIVERGED, message, error="agent",
                conditions=(ConditionChange("Degraded", True, "AgentsDiverged", message),),
            )
        progress = Progress(plan_id=migration.plan_id, stages=migration.stages, stage=migration.stage)
        message = "agents served different maps mid-migration; all are back on the published map"
        outcome = RunOutcome(RunState.FAILED, published.physical_to_logical_map, generation, progress, message)
        return await self._failed(ctx, record, migration, outcome, should_stop)

    def _runner(self, ctx: CycleContext, persist: Callable, should_stop: Callable[[], bool]) -> PlanRunner:
        spec = ctx.resolved.spec.migration
        return PlanRunner(
            client=ctx.client,
            agents=ctx.agents,
            slots_per_gpu=ctx.resolved.topology.slots_per_gpu,
            options=RunOptions(
                max_concurrent_transfers=spec.max_concurrent_transfers,
                step_timeout_s=spec.step_timeout_seconds,
                retries=spec.step_retries,
                stage_pause_s=spec.stage_pause_seconds,
            ),
            record=persist,
            should_stop=should_stop,
            on_step=lambda result, bytes_moved: ctx.metrics.migration_step(result, bytes_moved),
            layout=ctx.layout,
        )

    async def _completed(
        self, ctx: CycleContext, record: builders.MigrationRecord, migration: MigrationStatus, outcome: RunOutcome
    ) -> CycleOutcome:
        live = _placement(outcome.live_map, ctx.resolved)
        migration = migration.model_copy(update={"state": "Completed"})
        solver = {"status": migration.solver_status or "heuristic"}
        await self.publish(ctx, live, outcome.generation, record.policy, solver, migration=migration, rebalanced=True)
        # Agents skipped by the last activation (already on the map) catch up on its generation.
        ctx.view = await read_agents(ctx.client, ctx.agents)
        await converge(ctx.client, ctx.agents, live.physical_to_logical_map, outcome.generation, ctx.view, ctx.layout)
        ctx.record_groups(placement_hash(live.physical_to_logical_map), outcome.generation)
        await self.kube.delete_configmap(ctx.namespace, builders.migration_configmap_name(ctx.name))
        ctx.metrics.rebalance("applied")
        message = (
            f"plan {record.plan_id}: {outcome.progress.stages} stages, {outcome.progress.bytes_moved / 1e6:.2f} MB; "
            f"generation {outcome.generation}"
        )
        return CycleOutcome(
            CycleResult.APPLIED, f"placement generation {outcome.generation} published",
            conditions=(
                ConditionChange("Migrating", False, "MigrationCompleted", outcome.message),
                ConditionChange("Degraded", False, "AgentsServing", f"generation {outcome.generation} live"),
            ),
            event=Event("Normal", "MigrationCompleted", message),
        )

    async def _interrupted(
        self, ctx: CycleContext, record: builders.MigrationRecord, migration: MigrationStatus, outcome: RunOutcome
    ) -> CycleOutcome:
        live = _placement(outcome.live_map, ctx.resolved)
        migration = migration.model_copy(update={"state": "Interrupted"})
        await self.publish(ctx, live, outcome.generation, record.policy, migration=migration)
        await self.kube.delete_configmap(ctx.namespace, builders.migration_configmap_name(ctx.name))
        message = f"{outcome.message}; the map live at that stage is published (not counted as a rebalance)"
        return CycleOutcome(
            CycleResult.INTERRUPTED, message,
            conditions=(ConditionChange("Migrating", False, "MigrationInterrupted", message),),
            event=Event("Normal", "MigrationInterrupted", message),
        )

    async def _failed(
        self,
        ctx: CycleContext,
        record: builders.MigrationRecord,
        migration: MigrationStatus,
        outcome: RunOutcome,
        should_stop: Callable[[], bool],
    ) -> CycleOutcome:
        """A stage failed and was undone; go back to the map from before the migration."""
        ctx.metrics.error("agent")
        original = _placement(record.target if record.rollback_of else record.source, ctx.resolved)
        if np.array_equal(outcome.live_map, original.physical_to_logical_map):
            return await self._rolled_back(ctx, record, migration, outcome)
        live = _placement(outcome.live_map, ctx.resolved)
        forward_plan = record.rollback_of or record.plan_id
        await self.publish(ctx, live, outcome.generation, record.policy)
        back = self._record(ctx, live, original, outcome.generation, record.policy, rollback_of=forward_plan)
        plan = await asyncio.to_thread(
            plan_migration, live, original, ctx.resolved.model, ctx.resolved.topology, back.max_copies_per_stage
        )
        await self.kube.put_configmap(builders.build_migration_configmap(ctx.body, back))
        rollback = MigrationStatus(
            plan_id=back.plan_id, state="Running", rollback_of=forward_plan,
            target_hash=placement_hash(original.physical_to_logical_map), from_generation=outcome.generation,
            stages=len(plan.stages), bytes_total=ctx.layout.total_bytes(plan.bytes_moved), started_at=now_iso(),
            message=f"returning to the map before plan {forward_plan}: {outcome.message}",
            policy=record.policy, solver_status=migration.solver_status,
        )
        ctx.writer.condition("Degraded", True, "MigrationRollingBack", rollback.message)
        await ctx.writer.patch(migration=rollback)
        if record.rollback_of:
            # One rollback attempt per cycle: the next cycle resumes it once the agents answer.
            return waiting(CycleResult.ROLLING_BACK, rollback.message, event=Event("Warning", "MigrationRollingBack", rollback.message))
        self.event(ctx.body, "Warning", "MigrationRollingBack", rollback.message)
        progress = Progress(plan_id=back.plan_id, stages=len(plan.stages), bytes_total=ctx.layout.total_bytes(plan.bytes_moved))
        return await self._run(ctx, back, plan, progress, rollback, should_stop)

    async def _rolled_back(
        self, ctx: CycleContext, record: builders.MigrationRecord, migration: MigrationStatus, outcome: RunOutcome
    ) -> CycleOutcome:
        """The agents serve the map from before the migration again: publish it, not as a rebalance."""
        live = _placement(outcome.live_map, ctx.resolved)
        forward_plan = record.rollback_of or record.plan_id
        message = f"plan {forward_plan} rolled back: the agents serve the map from before it ({migration.message})"
        migration = migration.model_copy(update={"state": "RolledBack", "message": message})
        await self.publish(ctx, live, outcome.generation, record.policy, migration=migration)
        await self.kube.delete_configmap(ctx.namespace, builders.migration_configmap_name(ctx.name))
        ctx.metrics.rebalance("failed")
        return _back_on_source("MigrationRolledBack", message)

    async def publish(
        self,
        ctx: CycleContext,
        placement: Placement,
        generation: int,
        policy: str,
        solver: dict[str, Any] | None = None,
        migration: MigrationStatus | None = None,
        rebalanced: bool = False,
    ) -> None:
        """Write the placement ConfigMap and status.placement (and ``migration`` when given)."""
        configmap = await asyncio.to_thread(
            builders.build_placement_configmap, ctx.body, placement, generation, policy, ctx.resolved, solver
        )
        await self.kube.put_configmap(configmap)
        fields: dict[str, Any] = {
            "placement": PlacementStatus(
                generation=generation,
                hash=placement_hash(placement.physical_to_logical_map),
                config_map=builders.placement_configmap_name(ctx.name),
                policy=policy,
                confirmed=True,
            )
        }
        if migration is not None:
            fields["migration"] = migration
        if rebalanced:
            fields["lastRebalanceTime"] = now_iso()
        ctx.metrics.set(om.PLACEMENT_GENERATION, generation)
        await ctx.writer.patch(**fields)
        self.event(ctx.body, "Normal", "PlacementPublished", f"generation {generation} ({policy})")
