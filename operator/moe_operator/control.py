"""The control loop's logic: reconcile owned objects, and the rebalance cycle.

kopf handlers (``moe_operator.handlers``) are thin: they call ``Controller.reconcile`` on create,
resume and spec updates, and run ``Controller.cycle`` every ``rebalanceIntervalSeconds`` in a
per-resource daemon. Everything the controller needs to resume lives in the resource's status and
in owned ConfigMaps, so a restarted operator picks up where the last one stopped:

* ``<name>-placement``: the published generation (SGLang's map JSON, moeplace's placement file,
  generation, hash);
* ``<name>-migration``: while a migration runs, its source and target maps (the plan is
  deterministic in them), with ``status.migration`` holding the stage reached and the bytes moved.

A cycle is a chain of steps, each returning either what the next step needs or a ``CycleOutcome``
that ends the cycle: load (resource, spec, published map) -> agents (Endpoints, token, their live
placements; a recorded migration is resumed first) -> converge (lagging agents onto the published
map) -> profile (Prometheus load, agents' transitions, the request router's groups; with a router, a
cycle whose groups have not drifted and whose load is balanced ends here) -> gate (solve, predict, compare, in a worker
process) -> migrate (``moe_operator.rollout``). ``Controller._apply`` writes an outcome's status,
conditions, events and metrics in one place. One lock per resource: never two cycles (so never two
migrations) at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor
from concurrent.futures import Executor as PoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moe_operator import builders
from moe_operator import metrics as om
from moe_operator.agents import AgentClient
from moe_operator.credentials import AgentTokenError, deployment_token
from moe_operator.crd import PlacementStatus, ResolvedSpec, SpecError, resolve_spec
from moe_operator.discovery import EndpointsError, KeyedAgents, discover_agents
from moe_operator.engine_backend import engine_map
from moe_operator.kube import Kube, KubeError
from moe_operator.metrics_source import MetricsReport, MetricsUnavailable, build_profile, fetch_load, parse_stats
from moe_operator.outcomes import (
    NO_AGENTS_INTERVAL_S,
    ConditionChange,
    CycleContext,
    CycleOutcome,
    CycleResult,
    Event,
    GroupsTrigger,
    waiting,
)
from moe_operator.plan_runner import AgentsView, GroupLayout, converge, read_agents
from moe_operator.router_source import RouterGroups, RouterUnavailable, fetch_router_groups
from moe_operator.rollout import Rollout
from moe_operator.solver import SolveRequest, SolveResult, solve_and_gate, token_imbalance
from moe_operator.status import StatusWriter, condition_reason, now_iso
from moe_placement.baselines import linear_placement
from moe_placement.models import Placement, PlacementError, WorkloadProfile, placement_hash
from moe_placement.request_routing import demand_drift

logger = logging.getLogger("moe_operator")

EventFn = Callable[[Mapping[str, Any], str, str, str], None]


class Retry(Exception):
    """Try again later (the handler turns this into ``kopf.TemporaryError``)."""

    def __init__(self, message: str, delay: float = 10.0) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass
class Published:
    """The placement the deployment's ConfigMap publishes."""

    placement: Placement
    generation: int
    policy: str


@dataclass
class Loaded:
    """What the first step of a cycle read."""

    body: dict[str, Any]
    resolved: ResolvedSpec
    writer: StatusWriter
    published: Published


@dataclass
class Profiled:
    profile: WorkloadProfile
    imbalance: float
    missing_layers: tuple[int, ...]
    groups: RouterGroups | None = None


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
        self.rollout = Rollout(kube, self.event)
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

    async def _agents(self, namespace: str, name: str, resolved: ResolvedSpec) -> KeyedAgents:
        found = await discover_agents(self.kube, namespace, name, resolved)
        return found.keyed(await self._layout(namespace, resolved))

    async def _layout(self, namespace: str, resolved: ResolvedSpec) -> GroupLayout:
        """One group of ``num_gpus`` ranks; a LeaderWorkerSet has one per replica (each its own
        expert-parallel group, all serving the one published placement)."""
        ref = resolved.spec.serving.workload_ref
        if ref is None or ref.kind != "LeaderWorkerSet":
            return GroupLayout(resolved.num_gpus)
        workload = await self.kube.get_workload(namespace, ref.kind, ref.name)
        replicas = ((workload or {}).get("spec") or {}).get("replicas", 1)  # the LWS API's default
        return GroupLayout(resolved.num_gpus, max(int(replicas), 1))

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
            resolved = await asyncio.to_thread(resolve_spec, body.get("spec"))
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

    async def _ensure_owned(self, body: dict[str, Any], resolved: ResolvedSpec, writer: StatusWriter) -> list[str]:
        """The Service, the engine StatefulSet when asked for, PodMonitor and PrometheusRule."""
        meta = body["metadata"]
        serving = resolved.spec.serving
        selector = None
        owned = ["Service"]
        if serving.engine is not None:
            # The engine's agents mount the token Secret: it must exist before they can start.
            await self._client(body, resolved)
            await self.kube.ensure_statefulset(builders.build_engine_statefulset(body, resolved))
            selector = builders.engine_selector(meta["name"])
            owned.append("StatefulSet")
        elif serving.workload_ref is not None:
            ref = serving.workload_ref
            workload = await self.kube.get_workload(meta["namespace"], ref.kind, ref.name)
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
        return owned

    async def _read_published(self, body: Mapping[str, Any], resolved: ResolvedSpec) -> tuple[Published | None, int]:
        """The placement ConfigMap's placement (None when missing or unusable) and its generation."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        configmap = await self.kube.get_configmap(namespace, builders.placement_configmap_name(name))
        if configmap is None:
            return None, -1
        old_generation = int((configmap.get("data") or {}).get("generation", "0") or 0)
        try:
            placement, generation, policy = await asyncio.to_thread(
                builders.parse_placement_configmap, configmap, resolved.model.num_experts, resolved.topology.slots_per_gpu
            )
            placement.check_topology(resolved.model, resolved.topology)
        except (ValueError, KeyError, PlacementError) as error:
            logger.warning("%s/%s: placement ConfigMap unusable (%s): publishing a new one", namespace, name, error)
            return None, old_generation
        return Published(placement, generation, policy), old_generation

    async def _reconcile(
        self, body: dict[str, Any], resolved: ResolvedSpec, writer: StatusWriter, metrics: om.DeploymentMetrics
    ) -> str:
        meta = body["metadata"]
        name = meta["name"]
        owned = await self._ensure_owned(body, resolved, writer)
        placement_status = writer.observed.placement or PlacementStatus()
        published, old_generation = await self._read_published(body, resolved)
        if published is not None:
            digest = placement_hash(published.placement.physical_to_logical_map)
            if placement_status.hash != digest:
                placement_status = PlacementStatus(
                    generation=published.generation, hash=digest, config_map=builders.placement_configmap_name(name),
                    policy=published.policy, confirmed=placement_status.confirmed,
                )
        else:
            placement, generation, policy = await self._initial_placement(body, resolved, old_generation + 1)
            configmap = await asyncio.to_thread(
                builders.build_placement_configmap, body, placement, generation, policy, resolved
            )
            await self.kube.put_configmap(configmap)
            placement_status = PlacementStatus(
                generation=generation, hash=placement_hash(placement.physical_to_logical_map),
                config_map=builders.placement_configmap_name(name), policy=policy, confirmed=False,
            )
            metrics.set(om.PLACEMENT_GENERATION, generation)
            self.event(body, "Normal", "PlacementPublished", f"initial placement ({policy}) generation {generation}")
        writer.condition("Ready", True, "Reconciled", "owned objects: " + ", ".join(owned + ["placement ConfigMap"]))
        for kind in ("Degraded", "Migrating", "MetricsAvailable", "Balanced"):
            if writer.status_of(kind) is None:
                writer.condition(kind, False if kind in ("Degraded", "Migrating") else None, "Initializing", "")
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
    ) -> tuple[Placement, int, str]:
        """The agents' map when they all serve one valid map; else a linear placement."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            announced = await self._agents(namespace, name, resolved)
            expected = len(announced.layout.keys)
            if len(announced.agents) == expected and not announced.stray:
                client = await self._client(body, resolved)
                # Only an attempt to adopt: agents that do not answer soon get a linear placement.
                view = await asyncio.wait_for(read_agents(client, announced.agents), self.agent_timeout_s)
                adopted = self._common_map(view, resolved, expected)
                if adopted is not None:
                    placement, live_generation = adopted
                    return placement, max(live_generation, generation, 0), "adopted"
        except (EndpointsError, Retry, KubeError, TimeoutError) as error:
            logger.info("%s/%s: agents not usable for the initial placement: %s", namespace, name, error)
        mapping = await asyncio.to_thread(
            linear_placement, resolved.model.num_layers, resolved.model.num_experts, resolved.topology.num_slots
        )
        return Placement(mapping, resolved.model.num_experts, resolved.topology.slots_per_gpu), max(generation, 0), "initial"

    def _common_map(self, view: AgentsView, resolved: ResolvedSpec, expected: int) -> tuple[Placement, int] | None:
        """The map every one of the ``expected`` agents serves (and their highest generation), if valid."""
        if view.errors or len(view.answers) != expected:
            return None
        if len({answer.hash for answer in view.answers.values()}) != 1:
            return None
        answer = next(iter(view.answers.values()))
        try:
            placement = Placement(
                np.asarray(answer.physical_to_logical_map, dtype=np.int64),
                resolved.model.num_experts,
                resolved.topology.slots_per_gpu,
            )
            placement.check_topology(resolved.model, resolved.topology)
        except (PlacementError, ValueError):
            return None
        return placement, view.max_generation

    # ------------------------------------------------------------------------------------------
    # The rebalance cycle

    async def cycle(
        self, namespace: str, name: str, should_stop: Callable[[], bool] = lambda: False
    ) -> CycleOutcome:
        """One rebalance cycle; its outcome is already applied to status, events and metrics."""
        async with self.lock(namespace, name):
            metrics = om.DeploymentMetrics(namespace, name)
            try:
                return await self._cycle(namespace, name, metrics, should_stop)
            except KubeError as error:
                metrics.error("kubernetes")
                logger.warning("%s/%s: cycle: %s", namespace, name, error)
                return waiting(CycleResult.KUBERNETES_ERROR, str(error), write=False)

    async def _cycle(
        self, namespace: str, name: str, metrics: om.DeploymentMetrics, should_stop: Callable[[], bool]
    ) -> CycleOutcome:
        loaded = await self._load(namespace, name, metrics)
        if isinstance(loaded, CycleOutcome):
            return await self._apply(loaded, None, metrics)
        ctx = await self._connect(loaded, metrics)
        if isinstance(ctx, CycleOutcome):
            return await self._apply(ctx, loaded, metrics)
        outcome = await self._steps(ctx, loaded, should_stop)
        return await self._apply(outcome, loaded, metrics, ctx.base)

    async def _steps(self, ctx: CycleContext, loaded: Loaded, should_stop: Callable[[], bool]) -> CycleOutcome:
        """The steps after the agents answered: resume, converge, profile, gate, migrate."""
        migration = loaded.writer.migration
        if migration is not None and migration.state == "Running":
            return await self.rollout.resume(ctx, migration, loaded.published.placement, should_stop)
        converged = await self._converge(ctx, loaded)
        if isinstance(converged, CycleOutcome):
            return converged
        profiled = await self._profile(ctx, loaded.published)
        if isinstance(profiled, CycleOutcome):
            return profiled
        if ctx.resolved.spec.placement.paused:
            ctx.metrics.rebalance("skipped")
            return CycleOutcome(CycleResult.PAUSED, "rebalancing paused")
        unchanged = self._groups_unchanged(ctx, profiled)
        if unchanged is not None:
            return unchanged
        result = await self._gate(ctx, loaded.published, profiled)
        if isinstance(result, CycleOutcome):
            return result
        target = Placement(result.mapping, ctx.resolved.model.num_experts, ctx.resolved.topology.slots_per_gpu)
        self.event(
            ctx.body, "Normal", "Rebalancing",
            f"{result.reason}; moving {result.bytes_to_move / 1e6:.1f} MB in {result.stages} stages",
        )
        await ctx.writer.patch(lastCycleResult="migrating", **ctx.base)
        return await self.rollout.start(
            ctx, loaded.published.placement, target, loaded.published.generation, result, should_stop
        )

    async def _apply(
        self,
        outcome: CycleOutcome,
        loaded: Loaded | None,
        metrics: om.DeploymentMetrics,
        base: Mapping[str, Any] | None = None,
    ) -> CycleOutcome:
        """Write an outcome's conditions, status fields, event and error count."""
        if outcome.error is not None:
            metrics.error(outcome.error)
        if loaded is not None and outcome.event is not None:
            self.event(loaded.body, outcome.event.type, outcome.event.reason, outcome.event.message)
        if loaded is None or not outcome.write:
            return outcome
        for change in outcome.conditions:
            loaded.writer.condition(change.type, change.status, change.reason, change.message)
        fields = {**dict(base or {}), **dict(outcome.status)}
        await loaded.writer.patch(message=outcome.message, lastCycleResult=str(outcome.result), **fields)
        return outcome

    async def _load(self, namespace: str, name: str, metrics: om.DeploymentMetrics) -> Loaded | CycleOutcome:
        """The resource, its spec and the published placement."""
        body = await self.kube.get_deployment(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return CycleOutcome(CycleResult.GONE, write=False)
        try:
            resolved = await asyncio.to_thread(resolve_spec, body.get("spec"))
        except SpecError:
            return CycleOutcome(CycleResult.INVALID, write=False)
        status = body.get("status") or {}
        if not status.get("placement") or status.get("phase") == "Invalid":
            return waiting(CycleResult.PENDING, write=False)
        writer = StatusWriter(self.kube, body)
        configmap = await self.kube.get_configmap(namespace, builders.placement_configmap_name(name))
        if configmap is None:
            # Deleted behind our back: reconcile again (adopts what the agents serve, if they agree).
            try:
                await self._reconcile(body, resolved, writer, metrics)
            except Retry as error:
                logger.info("%s/%s: placement ConfigMap missing, reconcile: %s", namespace, name, error)
            return waiting(CycleResult.PENDING, write=False)
        try:
            placement, generation, policy = await asyncio.to_thread(
                builders.parse_placement_configmap, configmap, resolved.model.num_experts, resolved.topology.slots_per_gpu
            )
            placement.check_topology(resolved.model, resolved.topology)
        except (ValueError, KeyError, PlacementError) as error:
            message = f"published placement does not fit the spec: {error}"
            writer.condition("Degraded", True, "PlacementIncompatible", str(error))
            await writer.patch(message=message, lastCycleResult=str(CycleResult.PLACEMENT_INCOMPATIBLE))
            return CycleOutcome(CycleResult.PLACEMENT_INCOMPATIBLE, message, write=False)
        return Loaded(body, resolved, writer, Published(placement, generation, policy))

    async def _connect(self, loaded: Loaded, metrics: om.DeploymentMetrics) -> CycleContext | CycleOutcome:
        """The agents from the Endpoints, a client with the deployment's token, all agents answering."""
        body, resolved = loaded.body, loaded.resolved
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            announced = await self._agents(namespace, name, resolved)
        except EndpointsError as error:
            return CycleOutcome(
                CycleResult.ENDPOINTS_INVALID, str(error), error="agent",
                conditions=(ConditionChange("Degraded", True, "EndpointsInvalid", str(error)),),
            )
        agents, layout = announced.agents, announced.layout
        metrics.set(om.AGENTS_EXPECTED, len(agents))
        if not agents and not announced.stray:
            return self._no_agents(loaded, metrics)
        try:
            client = await self._client(body, resolved)
        except Retry as error:
            return CycleOutcome(
                CycleResult.NO_TOKEN, str(error), conditions=(ConditionChange("Degraded", True, "AgentTokenMissing", str(error)),)
            )
        view = await read_agents(client, agents)
        metrics.set(om.AGENTS_REACHABLE, len(view.answers))
        base = {"agentsExpected": len(agents), "agentsReachable": len(view.answers), "lastCycleTime": now_iso()}
        ctx = CycleContext(body, resolved, loaded.writer, metrics, client, agents, base, view, layout)
        published = loaded.published
        ctx.record_groups(placement_hash(published.placement.physical_to_logical_map), published.generation)
        problems = _agent_problems(announced, view)
        if problems:
            message = "; ".join(problems)
            return waiting(
                CycleResult.AGENTS_UNAVAILABLE, message, status=base, error="agent" if view.errors else None,
                conditions=(ConditionChange("Degraded", True, "AgentsUnavailable", message),),
            )
        return ctx

    def _no_agents(self, loaded: Loaded, metrics: om.DeploymentMetrics) -> CycleOutcome:
        metrics.set(om.AGENTS_REACHABLE, 0)
        already = (
            condition_reason(loaded.writer.conditions, "Degraded") == "NoAgents"
            and loaded.writer.observed.last_cycle_result == str(CycleResult.NO_AGENTS)
        )
        return CycleOutcome(
            CycleResult.NO_AGENTS, "no agents announced in the Endpoints yet", write=not already,
            retry_after=NO_AGENTS_INTERVAL_S,
            conditions=(ConditionChange("Degraded", False, "NoAgents", "no agents announced in the Endpoints yet"),),
            status={"agentsExpected": 0, "agentsReachable": 0, "lastCycleTime": now_iso()},
        )

    async def _converge(self, ctx: CycleContext, loaded: Loaded) -> int | CycleOutcome:
        """Adopt the agents' common map while the published one was never confirmed; bring lagging
        agents onto the published map. Returns the generation the agents serve."""
        published = loaded.published
        view = ctx.view
        assert view is not None
        if ctx.resolved.spec.serving.engine_kind != "agent":
            return self._engine_serves(ctx, view, published)
        placement_status = loaded.writer.observed.placement or PlacementStatus()
        if not placement_status.confirmed:
            adopted = self._common_map(view, ctx.resolved, len(ctx.layout.keys))
            if adopted is not None and placement_hash(adopted[0].physical_to_logical_map) != placement_hash(
                published.placement.physical_to_logical_map
            ):
                placement, live_generation = adopted
                await self.rollout.publish(ctx, placement, max(live_generation, published.generation), "adopted")
                return waiting(
                    CycleResult.ADOPTED, f"agents' placement adopted at generation {live_generation}",
                    event=Event("Normal", "PlacementAdopted", f"agents' placement adopted at generation {live_generation}"),
                )
        target_generation = _converge_generation(view, published)
        digest = placement_hash(published.placement.physical_to_logical_map)
        problems = await converge(
            ctx.client, ctx.agents, published.placement.physical_to_logical_map, target_generation, view, ctx.layout
        )
        ctx.record_groups(digest, target_generation)
        if problems:
            message = "agents diverge from the published placement: " + "; ".join(problems[:3])
            return waiting(
                CycleResult.AGENTS_DIVERGED, message, error="agent",
                conditions=(ConditionChange("Degraded", True, "AgentsDiverged", message),),
            )
        if target_generation != published.generation or not placement_status.confirmed:
            await self.rollout.publish(ctx, published.placement, target_generation, published.policy)
            published.generation = target_generation
        ctx.writer.condition("Degraded", False, "AgentsServing", f"{len(ctx.agents)} agents serve generation {target_generation}")
        ctx.writer.condition("Ready", True, "AgentsServing", f"placement generation {target_generation} live on all agents")
        ctx.metrics.set(om.PLACEMENT_GENERATION, target_generation)
        return target_generation

    def _engine_serves(self, ctx: CycleContext, view: AgentsView, published: Published) -> int | CycleOutcome:
        """An engine applies the published map itself: check that every rank's sidecar reports it."""
        expected = placement_hash(engine_map(published.placement).physical_to_logical_map)
        lagging = sorted(rank for rank, answer in view.answers.items() if answer.hash != expected)
        if lagging:
            message = f"the engine does not serve published generation {published.generation} on {ctx.layout.names(lagging)} yet"
            return waiting(
                CycleResult.ENGINE_APPLYING, message,
                conditions=(ConditionChange("Degraded", True, "EngineApplying", message),),
            )
        ctx.writer.condition("Degraded", False, "AgentsServing", f"the engine serves generation {published.generation}")
        ctx.writer.condition("Ready", True, "AgentsServing", f"placement generation {published.generation} live")
        ctx.metrics.set(om.PLACEMENT_GENERATION, published.generation)
        return published.generation

    async def _profile(self, ctx: CycleContext, published: Published) -> Profiled | CycleOutcome:
        """Load from Prometheus and transitions from the agents -> profile, imbalance, conditions."""
        try:
            profile, report, activated = await self._read_profile(ctx)
        except MetricsUnavailable as error:
            ctx.metrics.set(om.METRICS_AVAILABLE, 0)
            return CycleOutcome(
                CycleResult.METRICS_UNAVAILABLE, str(error), status=ctx.base, error="prometheus",
                conditions=(ConditionChange("MetricsAvailable", False, error.reason, str(error)),),
            )
        ctx.metrics.set(om.METRICS_AVAILABLE, 1)
        ctx.writer.condition("MetricsAvailable", True, "LoadAvailable", report.summary())
        imbalance = token_imbalance(profile.load, published.placement)
        ctx.metrics.set(om.IMBALANCE, imbalance)
        ctx.metrics.set(om.MAX_ACTIVATED, activated)
        threshold = ctx.resolved.spec.alerts.imbalance_threshold
        balanced = imbalance <= threshold
        ctx.writer.condition(
            "Balanced", balanced, "BelowThreshold" if balanced else "AboveThreshold",
            f"token imbalance {imbalance:.3f} (threshold {threshold})",
        )
        ctx.base.update(imbalance=round(imbalance, 4), maxActivatedExperts=activated)
        if report.skipped:
            self.event(ctx.body, "Warning", "BadMetrics", report.summary())
        groups = await self._router_groups(ctx)
        if groups is not None:
            profile = replace(profile, domain_loads=groups.domain_loads)
        return Profiled(profile, imbalance, tuple(report.missing_layers), groups)

    async def _router_groups(self, ctx: CycleContext) -> RouterGroups | None:
        """The request router's groups (None without a router, before it learned any, or when it
        cannot be read: the cycle goes on without them and a Warning event says why)."""
        url = ctx.resolved.spec.placement.router_url
        if url is None:
            return None
        model, topology = ctx.resolved.model, ctx.resolved.topology
        try:
            return await asyncio.to_thread(
                fetch_router_groups, url, model.num_layers, model.num_experts, topology.num_nodes, self.agent_timeout_s
            )
        except RouterUnavailable as error:
            self.event(ctx.body, "Warning", "RouterUnavailable", str(error))
            return None

    def _groups_unchanged(self, ctx: CycleContext, profiled: Profiled) -> CycleOutcome | None:
        """With router groups: the outcome that ends the cycle when they have not drifted since the
        last solve and the load is balanced (nothing to re-solve for); else None, with the groups
        this solve is for (and why it runs) in ``ctx.base``."""
        groups = profiled.groups
        if groups is None:
            return None
        recorded = ctx.writer.observed.router_groups
        drift = 1.0 if recorded is None else demand_drift(recorded.demand, groups.demand)
        threshold = ctx.resolved.spec.placement.group_drift_threshold
        balanced = profiled.imbalance <= ctx.resolved.spec.alerts.imbalance_threshold
        if recorded is not None and drift < threshold and balanced:
            ctx.metrics.rebalance("skipped")
            return CycleOutcome(
                CycleResult.GROUPS_UNCHANGED,
                f"router groups moved {drift:.3f} < groupDriftThreshold {threshold} and the load is balanced",
                status=ctx.base,
            )
        if recorded is None:
            trigger = GroupsTrigger.FIRST_SEEN
        else:
            trigger = GroupsTrigger.DRIFTED if drift >= threshold else GroupsTrigger.IMBALANCED
        if trigger == GroupsTrigger.DRIFTED:
            self.event(
                ctx.body, "Normal", "RouterGroupsDrifted",
                f"router groups moved {drift:.3f} >= groupDriftThreshold {threshold} since the last solve; re-solving",
            )
        ctx.base["routerGroups"] = {
            "groups": groups.count, "drift": round(min(drift, 1.0), 4), "trigger": str(trigger),
            "demand": np.round(groups.demand, 6).tolist(),
        }
        return None

    async def _read_profile(self, ctx: CycleContext) -> tuple[WorkloadProfile, MetricsReport, float | None]:
        spec = ctx.resolved.spec.metrics
        model = ctx.resolved.model
        load, report, activated = await asyncio.to_thread(
            fetch_load,
            spec.prometheus_url or self.prometheus_url,
            spec.window_seconds,
            spec.match_labels,
            model.num_layers,
            model.num_experts,
            ctx.resolved.num_gpus,
            num_groups=ctx.layout.groups,
        )
        tokens = float(load.sum() / model.top_k)
        report.tokens = tokens
        if tokens < max(spec.min_tokens, 1e-9):
            raise MetricsUnavailable("NoData", f"only {tokens:.0f} tokens in the last {spec.window_seconds}s")
        documents = []
        # An engine's sidecars serve no /v1/stats: SGLang's recorder and vLLM's load window count
        # experts, not transitions between them, so an engine's profile is its load alone.
        if spec.stats_top_pairs > 0 and ctx.resolved.spec.serving.engine_kind == "agent":
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

    async def _gate(self, ctx: CycleContext, published: Published, profiled: Profiled) -> SolveResult | CycleOutcome:
        """Solve, predict and gate in the worker; an outcome unless the new placement is to be applied."""
        request = self._solve_request(ctx.resolved, profiled, published.placement, ctx.body)
        try:
            result = await self._solve(request)
        except (PlacementError, RuntimeError, ValueError) as error:
            ctx.metrics.rebalance("failed")
            ctx.base.pop("routerGroups", None)  # not solved for: the next cycle tries them again
            return CycleOutcome(
                CycleResult.SOLVER_FAILED, f"solver: {error}", status=ctx.base, error="solver",
                conditions=(ConditionChange("Degraded", True, "SolverFailed", str(error)),),
                event=Event("Warning", "SolverFailed", str(error)[:500]),
            )
        ctx.metrics.solve(result.solve_seconds, result.solver_status)
        ctx.metrics.set(om.PREDICTED_GAIN, result.gain)
        ctx.base.update(predictedGain=round(result.net_gain, 4))
        if not result.apply:
            ctx.metrics.rebalance("skipped")
            return CycleOutcome(
                CycleResult.SKIPPED, f"kept generation {published.generation}: {result.reason}", status=ctx.base
            )
        return result

    def _solve_request(
        self, resolved: ResolvedSpec, profiled: Profiled, published: Placement, body: Mapping[str, Any]
    ) -> SolveRequest:
        placement = resolved.spec.placement
        objective = placement.objective
        phases = ("prefill", "decode") if objective.phases == "both" else (objective.phases,)
        return SolveRequest(
            policy=placement.policy,
            profile=profiled.profile,
            model=resolved.model,
            topology=resolved.topology,
            options=placement.policy_options(published, seed=int(body["metadata"].get("generation", 0))),
            phases=phases,
            objectives={"prefill": objective.prefill, "decode": objective.decode},
            routers={"prefill": objective.prefill_router, "decode": objective.decode_router},
            tokens_per_gpu={"prefill": placement.prefill_tokens_per_gpu, "decode": placement.decode_tokens_per_gpu},
            num_batches=placement.evaluation_batches,
            min_predicted_gain=placement.min_predicted_gain,
            interval_s=placement.rebalance_interval_seconds,
            max_concurrent_transfers=resolved.spec.migration.max_concurrent_transfers,
            max_copies_per_stage=resolved.spec.migration.max_copies_per_stage,
            keep_layers=profiled.missing_layers,
        )

    async def _solve(self, request: SolveRequest) -> SolveResult:
        """Solve in the worker pool; a worker that dies or overruns its time limit by far is replaced."""
        loop = asyncio.get_running_loop()
        if self.pool is None:
            return await asyncio.to_thread(solve_and_gate, request)
        deadline = request.options.time_limit_s * 4 + 120
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


def _agent_problems(announced: KeyedAgents, view: AgentsView) -> list[str]:
    """What keeps the cycle from acting on the agents: ranks (of any group) missing, extra, or not
    answering."""
    layout, agents = announced.layout, announced.agents
    problems = []
    missing = sorted(set(layout.keys) - set(agents))
    if missing:
        problems.append(f"{layout.names(missing)} not announced")
    extra = sorted(set(agents) - set(layout.keys))
    if extra:
        problems.append(f"ranks {extra} beyond the {layout.ranks} GPUs")
    if announced.stray:
        problems.append(f"{', '.join(announced.stray)} outside the {layout.groups} groups of {layout.ranks} GPUs")
    if view.errors:
        problems.append(
            "unreachable: " + ", ".join(f"{layout.name(r)} ({e.message[:80]})" for r, e in sorted(view.errors.items()))
        )
    return problems


def _converge_generation(view: AgentsView, published: Published) -> int:
    """The generation to serve the published map at: the published one, or one above every agent's
    when an agent is ahead of it (a lost publish), so that activation is never refused as stale."""
    top = view.max_generation
    if top <= published.generation:
        return published.generation
    digest = placement_hash(published.placement.physical_to_logical_map)
    same = all(answer.hash == digest for answer in view.answers.values() if answer.generation == top)
    return top if same else top + 1
