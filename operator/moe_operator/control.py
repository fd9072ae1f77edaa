"""The control loop's logic: reconcile owned objects, and the rebalance cycle.

kopf handlers (``moe_operator.handlers``) are thin: they call ``Controller.reconcile`` on create,
resume and spec updates, and run ``Controller.cycle`` every ``rebalanceIntervalSeconds`` in a
per-resource daemon. Everything the controller needs to resume lives in the resource's status and
in owned ConfigMaps, so a restarted operator picks up where the last one stopped:

* ``<name>-placement``: the published generation (SGLang's map JSON, moeplace's placement file,
  generation, hash);
* ``<name>-migration``: while a migration runs, its source and target maps (the plan is
  deterministic in them), with ``status.migration`` holding the stage reached and the bytes moved.

A cycle: agents from the Service's Endpoints -> their live placements (resume a recorded migration
first; bring lagging agents onto the published map) -> per-expert load from Prometheus and
transitions from the agents' ``/v1/stats`` -> profile -> solve, predict and gate in a worker
process -> migrate stage by stage through the agents -> publish -> status, conditions, events,
metrics. One lock per resource: never two cycles (so never two migrations) at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor
from concurrent.futures import Executor as PoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_operator import builders
from moe_operator import metrics as om
from moe_operator.agents import AgentClient
from moe_operator.crd import ResolvedSpec, SpecError, resolve_spec
from moe_operator.credentials import AgentTokenError, deployment_token
from moe_operator.discovery import EndpointsError, discover_agents
from moe_operator.kube import Kube, KubeError
from moe_operator.metrics_source import (
    MetricsUnavailable,
    build_profile,
    fetch_load,
    parse_stats,
)
from moe_operator.migrate import (
    ExecOptions,
    Executor,
    Progress,
    Snapshot,
    converge,
    execute,
    plan_id_of,
    snapshot,
)
from moe_operator.solver import SolveRequest, SolveResult, plan_migration, solve_and_gate, token_imbalance
from moe_placement.baselines import linear_placement
from moe_placement.models import Placement, PlacementError, placement_hash

logger = logging.getLogger("moe_operator")

CONDITION_TYPES = ("Ready", "Balanced", "Migrating", "MetricsAvailable", "Degraded")

EventFn = Callable[[Mapping[str, Any], str, str, str], None]


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]], kind: str, status: str, reason: str, message: str = ""
) -> list[dict[str, Any]]:
    """The conditions with ``kind`` set; lastTransitionTime changes only when the status does."""
    result = []
    found = False
    for condition in conditions:
        if condition.get("type") == kind:
            found = True
            changed = condition.get("status") != status
            condition = {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message[:1000],
                "lastTransitionTime": now_iso() if changed else condition.get("lastTransitionTime", now_iso()),
            }
        result.append(condition)
    if not found:
        result.append(
            {"type": kind, "status": status, "reason": reason, "message": message[:1000], "lastTransitionTime": now_iso()}
        )
    order = {name: index for index, name in enumerate(CONDITION_TYPES)}
    return sorted(result, key=lambda c: order.get(c.get("type"), len(order)))


def condition_status(conditions: list[dict[str, Any]], kind: str) -> str | None:
    for condition in conditions:
        if condition.get("type") == kind:
            return condition.get("status")
    return None


def phase_of(conditions: list[dict[str, Any]], migration: Mapping[str, Any] | None) -> str:
    if migration and migration.get("state") == "Running":
        return "Migrating"
    if condition_status(conditions, "Degraded") == "True":
        return "Degraded"
    if condition_status(conditions, "Ready") == "True":
        return "Ready"
    return "Pending"


def _no_empty_strings(value: Any, in_list: bool = False) -> Any:
    """kube-apiserver 1.20 (as built here) reads an empty string back as null and then refuses it as
    "must be of type string": drop empty strings (a null in a merge patch deletes the key)."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if item == "":
                if not in_list:
                    result[key] = None
                continue
            result[key] = _no_empty_strings(item)
        return result
    if isinstance(value, list):
        return [_no_empty_strings(item, in_list=True) for item in value]
    return value


class StatusWriter:
    """Accumulates conditions and writes merge patches of the status subresource."""

    def __init__(self, kube: Kube, body: Mapping[str, Any]) -> None:
        self.kube = kube
        self.namespace = body["metadata"]["namespace"]
        self.name = body["metadata"]["name"]
        status = dict(body.get("status") or {})
        self.conditions: list[dict[str, Any]] = [dict(c) for c in status.get("conditions") or []]
        self.migration: dict[str, Any] | None = status.get("migration")

    def condition(self, kind: str, status: bool | None, reason: str, message: str = "") -> None:
        text = "Unknown" if status is None else ("True" if status else "False")
        self.conditions = set_condition(self.conditions, kind, text, reason, message)

    async def patch(self, message: str | None = None, **fields: Any) -> None:
        if "migration" in fields:
            self.migration = fields["migration"]
        patch: dict[str, Any] = dict(fields)
        patch["conditions"] = self.conditions
        if "phase" not in patch:
            patch["phase"] = phase_of(self.conditions, self.migration)
        if message is not None:
            patch["message"] = message[:1000]
        await self.kube.patch_status(self.namespace, self.name, _no_empty_strings(patch))


@dataclass
class CycleContext:
    body: dict[str, Any]
    resolved: ResolvedSpec
    writer: StatusWriter
    metrics: om.DeploymentMetrics
    client: AgentClient
    agents: dict[int, str]

    @property
    def namespace(self) -> str:
        return self.body["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]


class Retry(Exception):
    """Try again later (the handler turns this into ``kopf.TemporaryError``)."""

    def __init__(self, message: str, delay: float = 10.0) -> None:
        super().__init__(message)
        self.delay = delay


class Controller:
    """Reconcile and rebalance MoEDeployments. ``pool`` runs the solver (None: a thread)."""

    def __init__(
        self,
        kube: Kube,
        pool: PoolExecutor | None = None,
        event: EventFn | None = None,
        agent_timeout_s: float = 10.0,
        prometheus_url: str | None = None,
        pool_factory: Callable[[], PoolExecutor] | None = None,
    ) -> None:
        self.kube = kube
        self.pool_factory = pool_factory
        self.prometheus_url = prometheus_url or os.environ.get(
            "MOEPLACE_PROMETHEUS_URL", "http://prometheus-operated.monitoring.svc:9090"
        )
        self.pool = pool
        self.event = event or (lambda body, kind, reason, message: None)
        self.agent_timeout_s = agent_timeout_s
        self._clients: dict[tuple[str | None, float], AgentClient] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        om.DeploymentMetrics(namespace, name).forget()

    async def _client(self, body: Mapping[str, Any], resolved: ResolvedSpec) -> AgentClient:
        try:
            token = await deployment_token(self.kube, body, resolved)
        except AgentTokenError as error:
            raise Retry(str(error)) from None
        timeout = max(resolved.spec.migration.step_timeout_seconds, self.agent_timeout_s)
        key = (token, timeout)
        if key not in self._clients:
            self._clients[key] = AgentClient(token=token, timeout_s=timeout)
        return self._clients[key]

    async def _agents(self, namespace: str, name: str, resolved: ResolvedSpec) -> dict[int, str]:
        return (await discover_agents(self.kube, namespace, name, resolved)).group(0)

    # ------------------------------------------------------------------------------------------
    # Reconcile (create / resume / spec update)

    async def reconcile(self, body: Mapping[str, Any]) -> str:
        """Validate, ensure owned objects, publish an initial placement when there is none."""
        body = dict(body)
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        metrics = om.DeploymentMetrics(namespace, name)
        writer = StatusWriter(self.kube, body)
        try:
            resolved = resolve_spec(body.get("spec"))
        except SpecError as error:
            metrics.error("invalid_spec")
            writer.condition("Ready", False, "InvalidSpec", str(error))
            await writer.patch(phase="Invalid", message=str(error), observedGeneration=meta.get("generation", 0))
            self.event(body, "Warning", "InvalidSpec", str(error))
            raise
        async with self.lock(namespace, name):
            try:
                return await self._reconcile(body, resolved, writer, metrics)
            except KubeError as error:
                metrics.error("kubernetes")
                raise Retry(str(error)) from None

    async def _reconcile(
        self, body: dict[str, Any], resolved: ResolvedSpec, writer: StatusWriter, metrics: om.DeploymentMetrics
    ) -> str:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        serving = resolved.spec.serving
        selector = None
        owned = ["Service"]
        if serving.engine is not None:
            # The engine's agents mount the token Secret: it must exist before they can start.
            await self._client(body, resolved)
            await self.kube.ensure_statefulset(builders.build_engine_statefulset(body, resolved))
            selector = builders.engine_selector(name)
            owned.append("StatefulSet")
        elif serving.workload_ref is not None:
            ref = serving.workload_ref
            workload = await self.kube.get_workload(namespace, ref.kind, ref.name)
            if workload is None:
                message = f"spec.serving.workloadRef: {ref.kind} {ref.name} not found"
                writer.condition("Ready", False, "WorkloadMissing", message)
                await writer.patch(message=message, observedGeneration=meta.get("generation", 0))
                raise Retry(message, delay=15)
            selector = builders.workload_selector(workload)
        await self.kube.ensure_service(builders.build_agents_service(body, resolved, selector))
        if await self.kube.ensure_custom(builders.build_podmonitor(body, resolved), "podmonitors"):
            owned.append("PodMonitor")
        if await self.kube.ensure_custom(builders.build_prometheusrule(body, resolved), "prometheusrules"):
            owned.append("PrometheusRule")

        status = dict(body.get("status") or {})
        placement_status = dict(status.get("placement") or {})
        configmap = await self.kube.get_configmap(namespace, builders.placement_configmap_name(name))
        published: Placement | None = None
        old_generation = -1
        if configmap is not None:
            old_generation = int((configmap.get("data") or {}).get("generation", "0") or 0)
            try:
                published, generation, policy = builders.parse_placement_configmap(
                    configmap, resolved.model.num_experts, resolved.topology.slots_per_gpu
                )
                published.check_topology(resolved.model, resolved.topology)
            except (ValueError, KeyError, PlacementError) as error:
                logger.warning("%s/%s: placement ConfigMap unusable (%s): publishing a new one", namespace, name, error)
                published = None
            else:
                if placement_status.get("hash") != placement_hash(published.physical_to_logical_map):
                    placement_status = {
                        "generation": generation,
                        "hash": placement_hash(published.physical_to_logical_map),
                        "configMap": builders.placement_configmap_name(name),
                        "policy": policy,
                        "confirmed": bool(placement_status.get("confirmed", False)),
                    }
        if published is None:
            placement, generation, policy, confirmed = await self._initial_placement(body, resolved, old_generation + 1)
            await self.kube.put_configmap(
                builders.build_placement_configmap(body, placement, generation, policy, resolved)
            )
            placement_status = {
                "generation": generation,
                "hash": placement_hash(placement.physical_to_logical_map),
                "configMap": builders.placement_configmap_name(name),
                "policy": policy,
                "confirmed": confirmed,
            }
            metrics.set(om.PLACEMENT_GENERATION, generation)
            self.event(body, "Normal", "PlacementPublished", f"initial placement ({policy}) generation {generation}")
        writer.condition("Ready", True, "Reconciled", "owned objects: " + ", ".join(owned + ["placement ConfigMap"]))
        for kind in ("Degraded", "Migrating", "MetricsAvailable", "Balanced"):
            if condition_status(writer.conditions, kind) is None:
                default = {"Degraded": False, "Migrating": False}.get(kind)
                writer.condition(kind, default, "Initializing", "")
        await writer.patch(
            message="",
            observedGeneration=meta.get("generation", 0),
            gpus=resolved.num_gpus,
            placement=placement_status,
            agentTokenSecret=builders.agent_token_source(body, resolved)[0],
        )
        return "reconciled"

    async def _initial_placement(
        self, body: Mapping[str, Any], resolved: ResolvedSpec, generation: int
    ) -> tuple[Placement, int, str, bool]:
        """The agents' map when they all serve one valid map; else a linear placement."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            agents = await self._agents(namespace, name, resolved)
            if len(agents) == resolved.num_gpus:
                client = await self._client(body, resolved)
                view = await snapshot(client, agents)
                adopted = self._common_map(view, resolved)
                if adopted is not None:
                    placement, live_generation = adopted
                    return placement, max(live_generation, generation, 0), "adopted", False
        except (EndpointsError, Retry, KubeError) as error:
            logger.info("%s/%s: agents not usable for the initial placement: %s", namespace, name, error)
        mapping = linear_placement(resolved.model.num_layers, resolved.model.num_experts, resolved.topology.num_slots)
        return Placement(mapping, resolved.model.num_experts, resolved.topology.slots_per_gpu), max(generation, 0), "initial", False

    def _common_map(self, view: Snapshot, resolved: ResolvedSpec) -> tuple[Placement, int] | None:
        if view.errors or len(view.answers) != resolved.num_gpus:
            return None
        hashes = {answer.get("hash") for answer in view.answers.values()}
        if len(hashes) != 1:
            return None
        answer = next(iter(view.answers.values()))
        try:
            placement = Placement(
                np.asarray(answer["physical_to_logical_map"], dtype=np.int64),
                resolved.model.num_experts,
                resolved.topology.slots_per_gpu,
            )
            placement.check_topology(resolved.model, resolved.topology)
        except (KeyError, PlacementError, ValueError):
            return None
        return placement, max(int(a.get("generation", 0)) for a in view.answers.values())

    # ------------------------------------------------------------------------------------------
    # The rebalance cycle

    async def cycle(
        self, namespace: str, name: str, should_stop: Callable[[], bool] = lambda: False
    ) -> str:
        """One rebalance cycle; returns a short result for logs and tests."""
        async with self.lock(namespace, name):
            metrics = om.DeploymentMetrics(namespace, name)
            try:
                return await self._cycle(namespace, name, metrics, should_stop)
            except KubeError as error:
                metrics.error("kubernetes")
                logger.warning("%s/%s: cycle: %s", namespace, name, error)
                return f"kubernetes error: {error}"

    async def _cycle(
        self, namespace: str, name: str, metrics: om.DeploymentMetrics, should_stop: Callable[[], bool]
    ) -> str:
        body = await self.kube.get_deployment(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return "gone"
        try:
            resolved = resolve_spec(body.get("spec"))
        except SpecError:
            return "invalid"
        status = body.get("status") or {}
        if not status.get("placement") or status.get("phase") == "Invalid":
            return "pending"
        writer = StatusWriter(self.kube, body)
        configmap = await self.kube.get_configmap(namespace, builders.placement_configmap_name(name))
        if configmap is None:
            # Deleted behind our back: reconcile again (adopts what the agents serve, if they agree).
            try:
                await self._reconcile(body, resolved, writer, metrics)
            except Retry as error:
                logger.info("%s/%s: placement ConfigMap missing, reconcile: %s", namespace, name, error)
            return "pending"
        try:
            published, generation, policy = builders.parse_placement_configmap(
                configmap, resolved.model.num_experts, resolved.topology.slots_per_gpu
            )
            published.check_topology(resolved.model, resolved.topology)
        except (ValueError, KeyError, PlacementError) as error:
            writer.condition("Degraded", True, "PlacementIncompatible", str(error))
            await writer.patch(message=f"published placement does not fit the spec: {error}")
            return "placement incompatible"

        # Agents
        try:
            agents = await self._agents(namespace, name, resolved)
        except EndpointsError as error:
            metrics.error("agent")
            writer.condition("Degraded", True, "EndpointsInvalid", str(error))
            await writer.patch(message=str(error))
            return "endpoints invalid"
        expected = resolved.num_gpus
        metrics.set(om.AGENTS_EXPECTED, len(agents))
        if not agents:
            metrics.set(om.AGENTS_REACHABLE, 0)
            degraded = next((c for c in writer.conditions if c.get("type") == "Degraded"), {})
            if degraded.get("reason") != "NoAgents" or status.get("lastCycleResult") != "no agents":
                writer.condition("Degraded", False, "NoAgents", "no agents announced in the Endpoints yet")
                await writer.patch(
                    agentsExpected=0, agentsReachable=0, lastCycleTime=now_iso(), lastCycleResult="no agents"
                )
            return "no agents"
        try:
            client = await self._client(body, resolved)
        except Retry as error:
            writer.condition("Degraded", True, "AgentTokenMissing", str(error))
            await writer.patch(message=str(error))
            return "no token"
        view = await snapshot(client, agents)
        metrics.set(om.AGENTS_REACHABLE, len(view.answers))
        ctx = CycleContext(body, resolved, writer, metrics, client, agents)
        base = {"agentsExpected": len(agents), "agentsReachable": len(view.answers), "lastCycleTime": now_iso()}
        missing = sorted(set(range(expected)) - set(agents))
        if missing or view.errors or len(agents) != expected:
            if view.errors:
                metrics.error("agent")
            detail = []
            if missing:
                detail.append(f"ranks {missing} not announced")
            extra = sorted(set(agents) - set(range(expected)))
            if extra:
                detail.append(f"ranks {extra} beyond the {expected} GPUs")
            if view.errors:
                detail.append(
                    "unreachable: " + ", ".join(f"rank {r} ({e.message[:80]})" for r, e in sorted(view.errors.items()))
                )
            message = "; ".join(detail)
            writer.condition("Degraded", True, "AgentsUnavailable", message)
            await writer.patch(message=message, lastCycleResult="agents unavailable", **base)
            return "agents unavailable"

        # A recorded migration comes first: finish it (or roll it back) before anything else.
        migration = status.get("migration") or {}
        if migration.get("state") == "Running":
            return await self._resume(ctx, published, generation, policy, migration, should_stop)

        placement_status = dict(status.get("placement") or {})
        if not placement_status.get("confirmed"):
            adopted = self._common_map(view, resolved)
            if adopted is not None and placement_hash(adopted[0].physical_to_logical_map) != placement_hash(
                published.physical_to_logical_map
            ):
                placement, live_generation = adopted
                await self._publish(ctx, placement, max(live_generation, generation), "adopted")
                self.event(body, "Normal", "PlacementAdopted", f"agents' placement adopted at generation {live_generation}")
                return "adopted"
        # Agents ahead of the published generation (a rolled-back stage, a lost publish): serve the
        # published map at a generation above every agent's, then publish that generation.
        target_generation = generation
        top = view.max_generation
        if top > generation:
            same = all(
                answer.get("hash") == placement_hash(published.physical_to_logical_map)
                for answer in view.answers.values()
                if int(answer.get("generation", 0)) == top
            )
            target_generation = top if same else top + 1
        problems = await converge(client, agents, published.physical_to_logical_map, target_generation, view)
        if not problems and target_generation != generation:
            await self._publish(ctx, published, target_generation, policy)
            generation = target_generation
            placement_status = dict((await self.kube.get_deployment(namespace, name) or {}).get("status", {}).get("placement") or placement_status)
        if problems:
            metrics.error("agent")
            message = "agents diverge from the published placement: " + "; ".join(problems[:3])
            writer.condition("Degraded", True, "AgentsDiverged", message)
            await writer.patch(message=message, lastCycleResult="agents diverged", **base)
            return "agents diverged"
        if not placement_status.get("confirmed"):
            placement_status["confirmed"] = True
            base["placement"] = placement_status
        writer.condition("Degraded", False, "AgentsServing", f"{len(agents)} agents serve generation {generation}")
        writer.condition("Ready", True, "AgentsServing", f"placement generation {generation} live on all agents")
        metrics.set(om.PLACEMENT_GENERATION, generation)

        # Metrics -> profile
        try:
            profile, report, activated = await self._profile(ctx)
        except MetricsUnavailable as error:
            metrics.error("prometheus")
            metrics.set(om.METRICS_AVAILABLE, 0)
            writer.condition("MetricsAvailable", False, error.reason, str(error))
            await writer.patch(message=str(error), lastCycleResult="metrics unavailable", **base)
            return "metrics unavailable"
        metrics.set(om.METRICS_AVAILABLE, 1)
        writer.condition("MetricsAvailable", True, "LoadAvailable", report.summary())
        imbalance = token_imbalance(profile.load, published)
        metrics.set(om.IMBALANCE, imbalance)
        metrics.set(om.MAX_ACTIVATED, activated)
        threshold = resolved.spec.alerts.imbalance_threshold
        writer.condition(
            "Balanced", imbalance <= threshold, "BelowThreshold" if imbalance <= threshold else "AboveThreshold",
            f"token imbalance {imbalance:.3f} (threshold {threshold})",
        )
        base.update(imbalance=round(imbalance, 4), maxActivatedExperts=activated)
        if report.skipped:
            self.event(body, "Warning", "BadMetrics", report.summary())

        if resolved.spec.placement.paused:
            metrics.rebalance("skipped")
            await writer.patch(message="rebalancing paused", lastCycleResult="paused", **base)
            return "paused"

        # Solve, predict, gate (in a worker)
        request = self._solve_request(resolved, profile, published, body)
        try:
            result = await self._solve(request)
        except (PlacementError, RuntimeError, ValueError) as error:
            metrics.error("solver")
            metrics.rebalance("failed")
            writer.condition("Degraded", True, "SolverFailed", str(error))
            await writer.patch(message=f"solver: {error}", lastCycleResult="solver failed", **base)
            self.event(body, "Warning", "SolverFailed", str(error)[:500])
            return "solver failed"
        metrics.solve(result.solve_seconds, result.solver_status)
        metrics.set(om.PREDICTED_GAIN, result.gain)
        base.update(predictedGain=round(result.net_gain, 4))
        if not result.apply:
            metrics.rebalance("skipped")
            await writer.patch(message=f"kept generation {generation}: {result.reason}", lastCycleResult=f"skipped: {result.reason}", **base)
            return "skipped"
        target = Placement(result.mapping, resolved.model.num_experts, resolved.topology.slots_per_gpu)
        self.event(
            body, "Normal", "Rebalancing",
            f"{result.reason}; moving {result.bytes_to_move / 1e6:.1f} MB in {result.stages} stages",
        )
        await writer.patch(lastCycleResult="migrating", **base)
        return await self._start_migration(
            ctx, published, target, generation, resolved.spec.placement.policy, result, should_stop
        )

    async def _profile(self, ctx: CycleContext) -> tuple[Any, Any, float | None]:
        spec = ctx.resolved.spec.metrics
        model = ctx.resolved.model
        load, report, activated = await asyncio.to_thread(
            fetch_load,
            spec.prometheus_url or self.prometheus_url,
            spec.window_seconds,
            spec.match_labels,
            model.num_layers,
            model.num_experts,
        )
        tokens = float(load.sum() / model.top_k)
        report.tokens = tokens
        if tokens < max(spec.min_tokens, 1e-9):
            raise MetricsUnavailable("NoData", f"only {tokens:.0f} tokens in the last {spec.window_seconds}s")
        documents = []
        if spec.stats_top_pairs > 0:
            answers = await asyncio.gather(
                *(ctx.client.stats(url, spec.stats_top_pairs) for url in ctx.agents.values()), return_exceptions=True
            )
            for answer in answers:
                if isinstance(answer, BaseException):
                    report.skip("stats_unreachable")
                else:
                    documents.append(answer)
        transitions, coactivation, report = parse_stats(documents, model.num_layers, model.num_experts, report)
        phases = ctx.resolved.spec.placement.objective.phases
        try:
            profile = build_profile(
                load, model.top_k, transitions, coactivation, phase="decode" if phases == "decode" else "prefill"
            )
        except PlacementError as error:
            raise MetricsUnavailable("BadData", str(error)) from None
        return profile, report, activated

    def _solve_request(self, resolved: ResolvedSpec, profile: Any, published: Placement, body: Mapping[str, Any]) -> SolveRequest:
        placement = resolved.spec.placement
        objective = placement.objective
        phases = ("prefill", "decode") if objective.phases == "both" else (objective.phases,)
        return SolveRequest(
            policy=placement.policy,
            profile=profile,
            model=resolved.model,
            topology=resolved.topology,
            previous=published,
            time_limit_s=placement.solver_time_limit_seconds,
            move_budget=placement.move_budget,
            phases=phases,
            objectives={"prefill": objective.prefill, "decode": objective.decode},
            routers={"prefill": objective.prefill_router, "decode": objective.decode_router},
            tokens_per_gpu={"prefill": placement.prefill_tokens_per_gpu, "decode": placement.decode_tokens_per_gpu},
            num_batches=placement.evaluation_batches,
            min_predicted_gain=placement.min_predicted_gain,
            interval_s=placement.rebalance_interval_seconds,
            max_concurrent_transfers=resolved.spec.migration.max_concurrent_transfers,
            max_copies_per_stage=resolved.spec.migration.max_steps_in_flight,
            seed=int(body["metadata"].get("generation", 0)),
        )

    async def _solve(self, request: SolveRequest) -> SolveResult:
        """Solve in the worker pool; a worker that dies or overruns its time limit by far is replaced."""
        loop = asyncio.get_running_loop()
        if self.pool is None:
            return await asyncio.to_thread(solve_and_gate, request)
        deadline = request.time_limit_s * 4 + 120
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.pool, solve_and_gate, request), deadline)
        except (BrokenExecutor, TimeoutError) as error:
            self._replace_pool()
            what = f"no answer in {deadline:.0f}s" if isinstance(error, TimeoutError) else "the worker died"
            raise RuntimeError(f"solver: {what}; worker replaced") from None

    def _replace_pool(self) -> None:
        old = self.pool
        if self.pool_factory is None or old is None:
            return
        self.pool = self.pool_factory()
        for process in list(getattr(old, "_processes", {}).values()):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------
    # Migrations

    async def _start_migration(
        self,
        ctx: CycleContext,
        source: Placement,
        target: Placement,
        generation: int,
        policy: str,
        result: SolveResult,
        should_stop: Callable[[], bool],
    ) -> str:
        max_copies = ctx.resolved.spec.migration.max_steps_in_flight
        source_hash = placement_hash(source.physical_to_logical_map)
        target_hash = placement_hash(target.physical_to_logical_map)
        plan_id = plan_id_of(source_hash, target_hash, max_copies)
        await self.kube.put_configmap(
            builders.build_migration_configmap(ctx.body, plan_id, source, target, generation, policy, max_copies)
        )
        migration = {
            "planId": plan_id,
            "state": "Running",
            "targetHash": target_hash,
            "fromGeneration": generation,
            "stage": 0,
            "stages": result.stages,
            "step": "",
            "bytesMoved": 0.0,
            "bytesTotal": result.bytes_to_move,
            "startedAt": now_iso(),
            "message": result.reason,
            "policy": policy,
            "solverStatus": result.solver_status,
        }
        ctx.writer.condition("Migrating", True, "MigrationRunning", f"plan {plan_id}: {result.stages} stages")
        await ctx.writer.patch(migration=migration)
        progress = Progress(plan_id=plan_id, stages=result.stages, bytes_total=result.bytes_to_move)
        return await self._run_migration(
            ctx, source, target, result.plan, progress, migration, policy, should_stop,
            solver={"status": result.solver_status, "gap": result.gap, "solveSeconds": result.solve_seconds},
        )

    async def _resume(
        self,
        ctx: CycleContext,
        published: Placement,
        generation: int,
        policy: str,
        migration: Mapping[str, Any],
        should_stop: Callable[[], bool],
    ) -> str:
        """Resume the recorded migration from its ConfigMap and status (the plan is re-derived)."""
        name = builders.migration_configmap_name(ctx.name)
        configmap = await self.kube.get_configmap(ctx.namespace, name)
        resolved = ctx.resolved
        try:
            document = json.loads((configmap or {}).get("data", {})[builders.TARGET_KEY])
            source = Placement(np.asarray(document["source"]), resolved.model.num_experts, resolved.topology.slots_per_gpu)
            target = Placement(np.asarray(document["target"]), resolved.model.num_experts, resolved.topology.slots_per_gpu)
            source.check_topology(resolved.model, resolved.topology)
            target.check_topology(resolved.model, resolved.topology)
            if document.get("planId") != migration.get("planId"):
                raise ValueError(f"plan {document.get('planId')} != status plan {migration.get('planId')}")
        except (KeyError, TypeError, ValueError, PlacementError) as error:
            # Nothing to resume from: the agents serve valid maps; forget the migration.
            message = f"migration {migration.get('planId')} cannot be resumed: {error}"
            self.event(ctx.body, "Warning", "MigrationAbandoned", message)
            ctx.metrics.migrating(False)
            ctx.writer.condition("Migrating", False, "MigrationAbandoned", message)
            await ctx.writer.patch(migration={**dict(migration), "state": "Failed", "message": message}, message=message)
            await self.kube.delete_configmap(ctx.namespace, name)
            return "migration abandoned"
        max_copies = int(document.get("maxCopiesPerStage", resolved.spec.migration.max_steps_in_flight))
        plan = await asyncio.to_thread(plan_migration, source, target, resolved.model, resolved.topology, max_copies)
        progress = Progress(
            plan_id=str(migration.get("planId")),
            stages=len(plan.stages),
            stage=int(migration.get("stage", 0)),
            step=str(migration.get("step", "")),
            bytes_moved=float(migration.get("bytesMoved", 0.0)),
            bytes_total=float(migration.get("bytesTotal", plan.bytes_moved)),
        )
        self.event(ctx.body, "Normal", "MigrationResumed", f"plan {progress.plan_id} at stage {progress.stage}/{progress.stages}")
        return await self._run_migration(
            ctx, source, target, plan, progress, dict(migration), str(document.get("policy", policy)), should_stop
        )

    async def _run_migration(
        self,
        ctx: CycleContext,
        source: Placement,
        target: Placement,
        plan: Any,
        progress: Progress,
        migration: dict[str, Any],
        policy: str,
        should_stop: Callable[[], bool],
        solver: Mapping[str, Any] | None = None,
    ) -> str:
        spec = ctx.resolved.spec.migration
        metrics = ctx.metrics
        metrics.migrating(True)

        async def record(state: Progress) -> None:
            migration.update(
                stage=state.stage, stages=state.stages, step=state.step, bytesMoved=state.bytes_moved, state="Running"
            )
            await ctx.writer.patch(migration=dict(migration))

        def on_step(result: str, bytes_moved: float) -> None:
            metrics.migration_step(result, bytes_moved)

        executor = Executor(
            client=ctx.client,
            agents=ctx.agents,
            slots_per_gpu=ctx.resolved.topology.slots_per_gpu,
            num_experts=ctx.resolved.model.num_experts,
            options=ExecOptions(
                max_concurrent_transfers=spec.max_concurrent_transfers,
                step_timeout_s=spec.step_timeout_seconds,
                retries=spec.step_retries,
                stage_pause_s=spec.stage_pause_seconds,
            ),
            record=record,
            should_stop=should_stop,
            on_step=on_step,
        )
        try:
            outcome = await execute(executor, source.physical_to_logical_map, plan, progress)
        finally:
            metrics.migrating(False)
        migration.update(
            stage=outcome.progress.stage, step=outcome.progress.step, bytesMoved=outcome.progress.bytes_moved,
            message=outcome.message,
        )
        name = builders.migration_configmap_name(ctx.name)
        if outcome.state == "Stalled":
            metrics.error("agent")
            metrics.migration_step("failed")
            metrics.migrating(True)
            ctx.writer.condition("Degraded", True, "MigrationStalled", outcome.message)
            await ctx.writer.patch(migration=dict(migration), message=outcome.message, lastCycleResult="migration stalled")
            self.event(ctx.body, "Warning", "MigrationStalled", outcome.message)
            return "migration stalled"
        live = Placement(outcome.live_map, ctx.resolved.model.num_experts, ctx.resolved.topology.slots_per_gpu)
        live_hash = placement_hash(live.physical_to_logical_map)
        if outcome.state == "Completed":
            migration["state"] = "Completed"
            await self._publish(ctx, live, outcome.generation, policy, solver, migration=migration, rebalanced=True)
            # Agents skipped by the last activation (already on the map) catch up on its generation.
            await converge(ctx.client, ctx.agents, live.physical_to_logical_map, outcome.generation,
                           await snapshot(ctx.client, ctx.agents))
            ctx.writer.condition("Migrating", False, "MigrationCompleted", outcome.message)
            ctx.writer.condition("Degraded", False, "AgentsServing", f"generation {outcome.generation} live")
            metrics.rebalance("applied")
            await ctx.writer.patch(message=f"placement generation {outcome.generation} published", lastCycleResult="applied")
            self.event(
                ctx.body, "Normal", "MigrationCompleted",
                f"plan {progress.plan_id}: {outcome.progress.stages} stages, {outcome.progress.bytes_moved / 1e6:.2f} MB; "
                f"generation {outcome.generation}",
            )
            await self.kube.delete_configmap(ctx.namespace, name)
            return "applied"
        # Interrupted (spec changed, paused, stopping) or rolled back: publish what the agents serve.
        migration["state"] = outcome.state
        changed = live_hash != placement_hash(source.physical_to_logical_map)
        await self._publish(ctx, live, outcome.generation, policy, solver, migration=migration, rebalanced=changed)
        ctx.writer.condition("Migrating", False, f"Migration{outcome.state}", outcome.message)
        if outcome.state == "RolledBack":
            metrics.rebalance("failed")
            metrics.error("agent")
            ctx.writer.condition("Degraded", True, "MigrationRolledBack", outcome.message)
            self.event(ctx.body, "Warning", "MigrationRolledBack", outcome.message)
        else:
            metrics.rebalance("applied")
            self.event(ctx.body, "Normal", "MigrationInterrupted", outcome.message)
        await ctx.writer.patch(message=outcome.message, lastCycleResult=outcome.state.lower())
        await self.kube.delete_configmap(ctx.namespace, name)
        return outcome.state.lower()

    async def _publish(
        self,
        ctx: CycleContext,
        placement: Placement,
        generation: int,
        policy: str,
        solver: Mapping[str, Any] | None = None,
        migration: Mapping[str, Any] | None = None,
        rebalanced: bool = False,
    ) -> None:
        solver_doc = {"status": str((solver or {}).get("status", "heuristic"))}
        if solver and solver.get("gap") is not None:
            solver_doc["gap"] = float(solver["gap"])
        if solver and solver.get("solveSeconds") is not None:
            solver_doc["solve_seconds"] = float(solver["solveSeconds"])
        await self.kube.put_configmap(
            builders.build_placement_configmap(ctx.body, placement, generation, policy, ctx.resolved, solver_doc)
        )
        fields: dict[str, Any] = {
            "placement": {
                "generation": generation,
                "hash": placement_hash(placement.physical_to_logical_map),
                "configMap": builders.placement_configmap_name(ctx.name),
                "policy": policy,
                "confirmed": True,
            }
        }
        if migration is not None:
            fields["migration"] = dict(migration)
        if rebalanced:
            fields["lastRebalanceTime"] = now_iso()
        ctx.metrics.set(om.PLACEMENT_GENERATION, generation)
        await ctx.writer.patch(**fields)
        self.event(ctx.body, "Normal", "PlacementPublished", f"generation {generation} ({policy})")

