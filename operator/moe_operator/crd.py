"""The ``MoEDeployment`` custom resource: pydantic models of its spec and status, and the CRD generator.

The spec reuses the placement library's boundary models (``ModelShape``, ``GpuSpec``) so that a model
shape means the same thing in a placement file, an HTTP payload and the custom resource. Every model
reads and writes camelCase (``spec.placement.redundantSlots``).

``build_crd()`` turns the models into an ``apiextensions.k8s.io/v1`` structural schema that
kube-apiserver 1.20 accepts: ``$ref`` inlined, ``nullable`` instead of ``anyOf`` with null, boolean
``exclusiveMinimum``, no ``additionalProperties: false``, defaults, enums, ranges and descriptions
kept (so ``kubectl explain moed.spec.placement`` helps). ``crds/`` holds its YAML; a test keeps the two
equal (regenerate with ``moeplace crd --output crds/moeplace.io_moedeployments.yaml``).

Checks a schema cannot express (a preset or a shape, topK <= numExperts, slots that divide over the
GPUs, a topology that holds every expert) are made by ``resolve_spec``; the operator marks the
resource ``Invalid`` with the message naming the field.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from moe_placement.models import (
    GpuSpec,
    ModelShape,
    Placement,
    PlacementError,
    Topology,
    check_fits,
    format_validation_error,
)
from moe_placement.policies import POLICIES, PolicyOptions
from moe_placement.presets import GPU_PRESETS, MODEL_PRESETS, gpu_preset, model_preset, slots_per_gpu
from moe_placement.routing import ROUTERS

GROUP = "moeplace.io"
VERSION = "v1alpha1"
KIND = "MoEDeployment"
PLURAL = "moedeployments"
SINGULAR = "moedeployment"
SHORT_NAMES = ["moed"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{GROUP}_{PLURAL}.yaml"

# Enums are built from the library's registries: a new policy, preset or router changes the CRD, and
# the test that keeps crds/ in sync says so.
PolicyName = Literal[tuple(POLICIES)]  # type: ignore[valid-type]
ModelPresetName = Literal[tuple(MODEL_PRESETS)]  # type: ignore[valid-type]
GpuPresetName = Literal[tuple(GPU_PRESETS)]  # type: ignore[valid-type]
RouterName = Literal[tuple(ROUTERS)]  # type: ignore[valid-type]
Objective = Literal["moeTime", "tokenImbalance", "activatedExperts", "crossNodeBytes"]
ServedPhases = Literal["prefill", "decode", "both"]

_PRESERVE = {"x-kubernetes-preserve-unknown-fields": True}


class SpecModel(BaseModel):
    """camelCase in and out, unknown keys refused (the API server prunes them first)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ModelSpec(SpecModel):
    """The MoE model: a preset name or an explicit shape (exactly one)."""

    preset: ModelPresetName | None = Field(
        None, description="A preset model shape (routed experts only); set this or shape."
    )
    shape: ModelShape | None = Field(
        None, description="An explicit model shape; set this or preset."
    )

    @model_validator(mode="after")
    def _one_of(self) -> ModelSpec:
        if (self.preset is None) == (self.shape is None):
            raise ValueError("set exactly one of preset or shape")
        return self

    def resolve(self) -> ModelShape:
        return model_preset(self.preset) if self.preset is not None else self.shape  # type: ignore[return-value]


class TopologySpec(SpecModel):
    """The expert-parallel group: nodes x GPUs per node; expert slots per GPU follow from the model's
    experts plus ``spec.placement.redundantSlots``."""

    nodes: int = Field(ge=1, le=4096, description="Nodes in the expert-parallel group.")
    gpus_per_node: int = Field(ge=1, le=64, description="GPUs (agents, EP ranks) per node.")
    gpu: GpuPresetName = Field("h100", description="GPU preset; gpuSpec overrides it.")
    gpu_spec: GpuSpec | None = Field(None, description="Explicit GPU figures (overrides gpu).")
    intra_node_gb_s: float = Field(
        450.0, gt=0, le=100000, description="Per-GPU link bandwidth inside a node (NVLink), GB/s."
    )
    inter_node_gb_s: float = Field(
        50.0, gt=0, le=100000, description="Per-GPU link bandwidth between nodes, GB/s."
    )

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


class EnvVar(SpecModel):
    """A plain environment variable."""

    name: str = Field(min_length=1, description="Variable name.")
    value: str = Field("", description="Value.")


class EngineSpec(SpecModel):
    """A serving engine the operator deploys as a StatefulSet (one pod per node), with one sidecar per
    GPU of the pod (moeplace's agent, or for engineKind sglang / vllm the engine sidecar); the
    placement ConfigMap is mounted into every container."""

    image: str = Field(min_length=1, description="Engine container image.")
    command: list[str] = Field(default_factory=list, description="Engine command (image default if empty).")
    args: list[str] = Field(default_factory=list, description="Engine arguments.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment of the engine.")
    resources: dict[str, Any] = Field(
        default_factory=dict,
        description="Engine container resources (ResourceRequirements); nvidia.com/gpu defaults to gpusPerNode.",
        json_schema_extra=_PRESERVE,
    )
    agent_image: str = Field(
        "moeplace/agent:0.1.0", min_length=1, description="Image of the moeplace agent sidecar."
    )
    agent_args: list[str] = Field(
        default_factory=list,
        description="Extra arguments of every per-GPU sidecar: the agent's (python -m moe_agent agent), or for "
        "engineKind sglang/vllm the engine sidecar's (python -m moe_agent.engines sidecar).",
    )


class WorkloadRef(SpecModel):
    """An existing serving workload whose pods run the agents (the operator does not change it)."""

    kind: Literal["StatefulSet", "LeaderWorkerSet"] = Field(description="Kind of the workload.")
    name: str = Field(min_length=1, description="Name of the workload, in this namespace.")


class ServingSpec(SpecModel):
    """Where the agents run: an engine the operator deploys, an existing workload, or neither (the agents
    are announced by whoever writes the agents Service's Endpoints, as the local demo does)."""

    engine: EngineSpec | None = Field(None, description="Deploy this engine with agent sidecars.")
    workload_ref: WorkloadRef | None = Field(None, description="Use this existing workload's pods.")
    engine_kind: Literal["agent", "sglang", "vllm"] = Field(
        "agent",
        description=(
            "Who moves expert weights. agent: moeplace's agents copy them over HTTP (the replay engine, "
            "plain HF/torch models). sglang, vllm: the engine moves them itself, applying the published "
            "map through moeplace's plugin (docs/engines.md); the operator publishes and waits until "
            "the engine's sidecars report it live."
        ),
    )

    @model_validator(mode="after")
    def _at_most_one(self) -> ServingSpec:
        if self.engine is not None and self.workload_ref is not None:
            raise ValueError("set at most one of engine or workloadRef")
        return self


class ObjectiveSpec(SpecModel):
    """What the rebalance gate compares, per serving phase, and the token router it assumes."""

    prefill: Objective = Field("moeTime", description="Cost-model figure minimised for prefill.")
    decode: Objective = Field("moeTime", description="Cost-model figure minimised for decode.")
    prefill_router: RouterName = Field("local_first", description="Router assumed for prefill.")
    decode_router: RouterName = Field("metro", description="Router assumed for decode.")
    phases: ServedPhases = Field("both", description="Phases this deployment serves.")


class PlacementSpec(SpecModel):
    """How placements are solved and when a new one is applied."""

    policy: PolicyName = Field("eplb", description="Placement policy of moe_placement.policies.")
    redundant_slots: int = Field(
        0,
        ge=0,
        le=65536,
        description="Extra expert slots over the whole group (experts + redundantSlots must divide over the GPUs).",
    )
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="Objective per phase.")
    solver_time_limit_seconds: float = Field(
        10.0, gt=0, le=3600, description="Time limit of one solve."
    )
    rebalance_interval_seconds: float = Field(
        300.0, ge=1, le=604800, description="Seconds between rebalance cycles."
    )
    min_predicted_gain: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Apply a new placement only when its predicted MoE-time gain, net of migration cost, is at least this fraction.",
    )
    move_budget: int | None = Field(
        None, ge=0, le=10000000, description="Most expert replicas one rebalance may move (none: no budget)."
    )
    paused: bool = Field(False, description="Stop rebalancing (a running migration stops at the next stage).")
    evaluation_batches: int = Field(
        2, ge=1, le=64, description="Batches sampled from the profile to predict the gain."
    )
    prefill_tokens_per_gpu: int = Field(
        128, ge=1, le=65536, description="Tokens per GPU of a sampled prefill batch."
    )
    decode_tokens_per_gpu: int = Field(
        16, ge=1, le=65536, description="Tokens per GPU of a sampled decode batch."
    )
    router_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description=(
            "Request router (moeplace router) in front of the engine: its groups join the profile "
            "(policies grouped and auto place by them) and a cycle re-solves when they drift."
        ),
    )
    group_drift_threshold: float = Field(
        0.1,
        gt=0,
        le=1,
        description=(
            "With routerUrl: re-solve when the router's groups moved this far (total variation of "
            "the expert demand per node) since the last solve; below it, and with the load "
            "balanced, a cycle solves nothing."
        ),
    )

    def policy_options(self, previous: Placement, seed: int) -> PolicyOptions:
        """The policy's knobs from this spec: the one place a placement knob of the CRD reaches
        ``moe_placement.policies.PolicyOptions``."""
        return PolicyOptions(
            time_limit_s=self.solver_time_limit_seconds,
            previous=previous,
            move_budget=self.move_budget,
            seed=seed,
            phases=("prefill", "decode") if self.objective.phases == "both" else (),
            request_router="signature" if self.router_url else "round_robin",
        )


class MigrationSpec(SpecModel):
    """How a new placement is rolled out."""

    max_concurrent_transfers: int = Field(
        4, ge=1, le=1024, description="Expert copies in flight at once."
    )
    max_copies_per_stage: int = Field(
        8, ge=1, le=65536, description="Expert copies per migration stage (one activation per stage)."
    )
    step_timeout_seconds: float = Field(60.0, gt=0, le=3600, description="Timeout of one agent call.")
    step_retries: int = Field(2, ge=0, le=20, description="Retries of a failed step before rolling back.")
    stage_pause_seconds: float = Field(
        0.0, ge=0, le=3600, description="Pause after each stage (lets engines settle)."
    )
    engine_apply_timeout_seconds: float = Field(
        900.0, gt=0, le=86400,
        description="engineKind sglang/vllm: how long the engine may take to serve a published map "
        "before the operator publishes the previous one again.",
    )


class SecretKeyRef(SpecModel):
    """A key of a Secret in this namespace."""

    name: str = Field(min_length=1, description="Secret name.")
    key: str = Field("token", min_length=1, description="Key in the Secret.")


class MetricsSpec(SpecModel):
    """Where the live statistics come from."""

    prometheus_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Prometheus base URL (default: the operator's --prometheus-url).",
    )
    window_seconds: int = Field(300, ge=1, le=86400, description="Window of the per-expert load query.")
    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Extra label matchers of the agents' series in PromQL."
    )
    agent_port: int = Field(
        9400, ge=1, le=65535, description="Agent port of local rank 0 (rank r listens on agentPort + r)."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "Secret holding the agents' bearer token; it must be labelled moeplace.io/agent-token-for=<this "
            "MoEDeployment's name>. Unset: the operator keeps <name>-agent-token for these agents alone."
        ),
    )
    stats_top_pairs: int = Field(
        256, ge=0, le=65536,
        description="Transition pairs per layer asked of each agent (engineKind agent; engines record no "
        "transitions, their profile is the load alone).",
    )
    min_tokens: float = Field(1.0, ge=0, description="Fewer tokens in the window: metrics unusable.")


class AlertsSpec(SpecModel):
    """Thresholds of the PrometheusRule and of the Balanced condition."""

    imbalance_threshold: float = Field(
        1.5, ge=1, le=1000, description="Token imbalance (max/mean) above which the deployment is not Balanced."
    )
    migration_stalled_seconds: int = Field(
        600, ge=1, le=604800, description="A migration without progress this long raises an alert."
    )
    metrics_missing_seconds: int = Field(
        300, ge=1, le=604800, description="Metrics unavailable this long raise an alert."
    )


class MoEDeploymentSpec(SpecModel):
    """Desired state of a MoE expert-parallel deployment."""

    model: ModelSpec = Field(description="The MoE model's shape (preset or explicit).")
    topology: TopologySpec = Field(description="GPUs of the expert-parallel group.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The serving workload.")
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="Placement policy.")
    migration: MigrationSpec = Field(default_factory=MigrationSpec, description="Migration policy.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Live statistics sources.")
    alerts: AlertsSpec = Field(default_factory=AlertsSpec, description="Alert thresholds.")


# --------------------------------------------------------------------------------------------------
# Status


ConditionType = Literal["Ready", "Balanced", "Migrating", "MetricsAvailable", "Degraded"]


class Condition(SpecModel):
    """A standard condition."""

    type: ConditionType = Field(description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed from."
    )


class PlacementStatus(SpecModel):
    """The published placement."""

    generation: int = Field(0, description="Placement generation (the agents' live generation).")
    hash: str = Field("", description="placement_hash of the map.")
    config_map: str = Field("", description="ConfigMap holding the map.")
    policy: str = Field("", description="Policy that produced it (or initial / adopted).")
    confirmed: bool = Field(False, description="Whether the agents were seen serving it.")


class MigrationStatus(SpecModel):
    """Progress of the running (or last) migration."""

    plan_id: str = Field("", description="Identity of the plan (old and target hash).")
    state: Literal["Running", "Completed", "RolledBack", "Interrupted", "Failed"] = Field(
        "Running",
        description="Migration state: RolledBack = the agents serve the exact map from before the migration.",
    )
    rollback_of: str = Field(
        "", description="Set while returning to the map before plan <rollbackOf> (this plan runs back to it)."
    )
    target_hash: str = Field("", description="Hash of the target placement.")
    from_generation: int = Field(0, description="Published generation the migration started from.")
    stage: int = Field(0, description="Stages completed.")
    stages: int = Field(0, description="Stages in the plan.")
    step: str = Field("", description="Last completed step of the current stage (staged, union, activated).")
    bytes_moved: float = Field(0.0, description="Expert bytes copied so far.")
    bytes_total: float = Field(0.0, description="Expert bytes the plan copies.")
    started_at: str | None = Field(None, description="Start time.")
    message: str = Field("", description="Detail of the last outcome.")
    policy: str = Field("", description="Policy whose placement the migration applies.")
    solver_status: str = Field("", description="Status of the solve that produced the target.")


class GroupStatus(SpecModel):
    """One expert-parallel group (a LeaderWorkerSet replica) and the published placement."""

    index: int = Field(..., ge=0, description="The group's leaderworkerset.sigs.k8s.io/group-index.")
    agents: int = Field(0, ge=0, description="Its agents announced in the agents Service's endpoints.")
    reachable: int = Field(0, ge=0, description="Its agents answering /v1/placement.")
    generation: int = Field(0, description="Lowest placement generation its answering agents serve.")
    serving: bool = Field(False, description="Whether every rank of the group serves the published placement.")


class RouterGroupsStatus(SpecModel):
    """The request router's groups the last solve was for."""

    groups: int = Field(0, ge=0, description="Groups (domains) the router had learned.")
    drift: float = Field(0.0, ge=0, le=1, description="How far the groups moved since the solve before (1: first seen).")
    trigger: str = Field("", description="Why the last solve ran: first seen, drifted or load imbalanced.")
    demand: list[list[float]] = Field(
        default_factory=list,
        description="Share of expert choices each node's requests bring to each expert, summed over layers, [nodes][experts].",
    )


class MoEDeploymentStatus(SpecModel):
    """Observed state (the operator also keeps its own bookkeeping here)."""

    phase: Literal["Pending", "Ready", "Migrating", "Degraded", "Invalid"] = Field(
        "Pending", description="Summary phase."
    )
    message: str = Field("", description="Why the phase is what it is.")
    observed_generation: int = Field(0, description="metadata.generation last reconciled.")
    gpus: int = Field(0, description="GPUs (agents) of the group.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Conditions, at most one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    placement: PlacementStatus | None = Field(None, description="Published placement.")
    imbalance: float | None = Field(None, description="Live token imbalance (max/mean GPU load).")
    max_activated_experts: float | None = Field(None, description="Live max activated experts per GPU.")
    predicted_gain: float | None = Field(None, description="Predicted gain of the last solved placement.")
    router_groups: RouterGroupsStatus | None = Field(None, description="Request router's groups of the last solve.")
    last_rebalance_time: str | None = Field(None, description="When a new placement was last applied.")
    last_cycle_time: str | None = Field(None, description="When the last rebalance cycle ran.")
    last_cycle_result: str | None = Field(None, description="Outcome of the last cycle.")
    migration: MigrationStatus | None = Field(None, description="Running or last migration.")
    agents_expected: int = Field(0, description="Agents announced in the Service's Endpoints.")
    agents_reachable: int = Field(0, description="Agents answering /v1/placement.")
    groups: int = Field(
        0,
        ge=0,
        description=(
            "Expert-parallel groups of a LeaderWorkerSet workloadRef (its replicas; unset otherwise): "
            "the one published placement applies to every group, and a migration moves all of them."
        ),
    )
    group_status: list[GroupStatus] = Field(
        default_factory=list,
        description="Per LeaderWorkerSet group: its agents and whether they serve the published placement.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["index"]},
    )
    agent_token_secret: str = Field("", description="Secret holding the agents' bearer token.")


# --------------------------------------------------------------------------------------------------
# Spec resolution


class SpecError(ValueError):
    """An invalid spec; ``str()`` names the field (``spec.placement.redundantSlots: ...``)."""


@dataclass(frozen=True)
class ResolvedSpec:
    """The spec validated and turned into the library's objects."""

    spec: MoEDeploymentSpec
    model: ModelShape
    topology: Topology

    @property
    def num_gpus(self) -> int:
        return self.topology.num_gpus


def resolve_spec(spec: Any) -> ResolvedSpec:
    """Validate a ``spec`` mapping (as the API server stored it) and resolve presets and slots."""
    try:
        parsed = MoEDeploymentSpec.model_validate(dict(spec or {}))
    except ValidationError as error:
        raise SpecError(format_validation_error(error, prefix="spec")) from None
    model = parsed.model.resolve()
    topo = parsed.topology
    gpu = topo.gpu_spec if topo.gpu_spec is not None else gpu_preset(topo.gpu)
    total_slots = model.num_experts + parsed.placement.redundant_slots
    if total_slots < topo.num_gpus:
        raise SpecError(
            f"spec.topology: {topo.nodes} nodes x {topo.gpus_per_node} GPUs = {topo.num_gpus} GPUs, more than "
            f"the {model.num_experts} experts + {parsed.placement.redundant_slots} redundant slots of the model: "
            "every GPU needs at least one expert slot"
        )
    try:
        slots = slots_per_gpu(model.num_experts, topo.num_gpus, parsed.placement.redundant_slots)
    except PlacementError as error:
        message = str(error).removeprefix("redundant_slots: ")
        raise SpecError(f"spec.placement.redundantSlots: {message}") from None
    try:
        topology = Topology(
            num_nodes=topo.nodes,
            gpus_per_node=topo.gpus_per_node,
            slots_per_gpu=slots,
            gpu=gpu,
            intra_node_gb_s=topo.intra_node_gb_s,
            inter_node_gb_s=topo.inter_node_gb_s,
        )
    except ValidationError as error:
        # slotsPerGpu out of range: the placement's redundantSlots or the topology is to blame.
        raise SpecError(
            "spec.placement.redundantSlots: " + format_validation_error(error)
        ) from None
    try:
        check_fits(model, topology)
    except PlacementError as error:
        raise SpecError(f"spec.topology: {str(error).removeprefix('topology: ')}") from None
    _check_map_size(model, topology)
    return ResolvedSpec(spec=parsed, model=model, topology=topology)


# A ConfigMap holds 1 MiB; the placement ConfigMap carries the map twice (SGLang's file and
# moeplace's), each entry an expert id and a comma. Keep a margin for the rest of the object.
PLACEMENT_CONFIGMAP_BUDGET_BYTES = 900_000


def placement_configmap_bytes(model: ModelShape, topology: Topology) -> int:
    """An upper estimate of the placement ConfigMap's data for a map of L x N slots."""
    entry = len(str(model.num_experts - 1)) + 2
    return 2 * model.num_layers * topology.num_slots * entry + 4096


def _check_map_size(model: ModelShape, topology: Topology) -> None:
    """Refuse a spec whose placement could not be published (and whose maps would swamp the operator)."""
    estimate = placement_configmap_bytes(model, topology)
    if estimate > PLACEMENT_CONFIGMAP_BUDGET_BYTES:
        raise SpecError(
            f"spec.model and spec.topology: {model.num_layers} layers x {topology.num_slots} slots "
            f"({topology.num_gpus} GPUs x {topology.slots_per_gpu} slots, spec.placement.redundantSlots included) "
            f"make a placement of about {estimate / 1e6:.1f} MB, over the {PLACEMENT_CONFIGMAP_BUDGET_BYTES / 1e6:.1f} MB "
            "a placement ConfigMap may hold (ConfigMaps hold 1 MiB): use fewer layers, experts or GPUs"
        )


# --------------------------------------------------------------------------------------------------
# CRD generation


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            merged = copy.deepcopy(defs[name])
            extra = {k: v for k, v in schema.items() if k != "$ref"}
            merged.update(extra)
            return _inline(merged, defs)
        return {key: _inline(value, defs) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


_DROP_KEYS = {"title", "$defs", "examples"}


def _without_null_union(schema: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, null]`` -> X with ``nullable: true`` (and the outer keys kept)."""
    options = schema.pop("anyOf")
    non_null = [option for option in options if option.get("type") != "null"]
    if len(non_null) != 1:
        raise ValueError(f"unsupported union in CRD schema: {options}")
    inner = _structural(non_null[0])
    outer_description = schema.get("description")
    inner.update({k: v for k, v in schema.items() if k != "description"})
    if outer_description:
        inner["description"] = outer_description
    if len(non_null) != len(options):
        inner["nullable"] = True
    return inner


def _keywords_for_1_20(schema: dict[str, Any]) -> None:
    """const -> enum, typed enums, boolean exclusive bounds, no ``additionalProperties: false``, no
    empty defaults (1.20 reads an empty-string default back as null and refuses it)."""
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    if "enum" in schema and "type" not in schema:
        schema["type"] = "string"
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = schema.get(bound)
        if value is not None and not isinstance(value, bool):
            schema[flag] = value
            schema[bound] = True
    if schema.get("additionalProperties") is False:
        del schema["additionalProperties"]
    if "default" in schema and schema["default"] in (None, ""):
        del schema["default"]


def _structural(schema: dict[str, Any]) -> dict[str, Any]:
    """One node of a JSON schema rewritten to what apiextensions v1 on 1.20 accepts."""
    schema = {key: value for key, value in schema.items() if key not in _DROP_KEYS}
    if "anyOf" in schema:
        schema = _without_null_union(schema)
    _keywords_for_1_20(schema)
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _structural(schema["additionalProperties"])
    if "properties" in schema:
        schema["properties"] = {name: _structural(value) for name, value in schema["properties"].items()}
        schema.setdefault("type", "object")
    if "items" in schema:
        schema["items"] = _structural(schema["items"])
    if schema.get("type") == "object" and schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.pop("additionalProperties", None)
    return schema


def _default_empty_objects(schema: dict[str, Any], required: bool) -> None:
    """Give every optional object of defaulted properties ``default: {}`` so nested defaults apply."""
    properties = schema.get("properties")
    if not properties:
        return
    required_names = set(schema.get("required", []))
    for name, sub in properties.items():
        _default_empty_objects(sub, name in required_names)
        if (
            sub.get("type") == "object"
            and "properties" in sub
            and not sub.get("nullable")
            and name not in required_names
            and "default" not in sub
            and not sub.get("required")
        ):
            sub["default"] = {}


_KEY_ORDER = (
    "description", "type", "nullable", "enum", "default", "format", "pattern", "minLength",
    "maxLength", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minItems", "maxItems",
    "x-kubernetes-preserve-unknown-fields", "additionalProperties", "items", "required", "properties",
)


def _ordered(schema: Any) -> Any:
    """Keys in a fixed, readable order (description and type first, properties last)."""
    if isinstance(schema, list):
        return [_ordered(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rank = {key: index for index, key in enumerate(_KEY_ORDER)}
    keys = sorted(schema, key=lambda key: (rank.get(key, len(rank)), key))
    result = {}
    for key in keys:
        value = schema[key]
        if key == "properties":
            value = {name: _ordered(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            value = _ordered(value)
        result[key] = value
    return result


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model (camelCase), for a CRD."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(_inline(raw, defs))
    _default_empty_objects(schema, True)
    return _ordered(schema)


PRINTER_COLUMNS = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "The Ready condition's status.",
    },
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Summary phase."},
    {
        "name": "Imbalance",
        "type": "number",
        "jsonPath": ".status.imbalance",
        "description": "Live token imbalance (max/mean GPU load).",
    },
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus", "description": "GPUs of the group."},
    {
        "name": "Generation",
        "type": "integer",
        "jsonPath": ".status.placement.generation",
        "description": "Published placement generation.",
        "priority": 1,
    },
    {
        "name": "Last-Rebalance",
        "type": "date",
        "jsonPath": ".status.lastRebalanceTime",
        "description": "When a new placement was last applied.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The ``MoEDeployment`` CustomResourceDefinition as a dict."""
    spec_schema = structural_schema(MoEDeploymentSpec)
    status_schema = structural_schema(MoEDeploymentStatus)
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    status_schema["description"] = (
        "Observed state. Unknown fields are kept: the operator stores its bookkeeping here."
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "moeplace"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["moeplace"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A Mixture-of-Experts expert-parallel deployment whose expert placement moeplace manages.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = (
    "# Generated by `moeplace crd` from moe_operator/crd.py: do not edit by hand.\n"
    "# tests/operator/test_crd_in_sync.py fails when this file and the models differ.\n"
)


def crd_yaml() -> str:
    """The CRD as the YAML checked in under ``crds/``."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def manifest_reference() -> str:
    """The spec's fields as a Markdown table (path, type, default, allowed values, description),
    generated from the same schema as the CRD; the README carries it."""
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rows = ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]

    def walk(schema: dict[str, Any], path: str) -> None:
        for name, child in schema.get("properties", {}).items():
            field_path = f"{path}.{name}"
            kind = child.get("type", "object")
            if kind == "array":
                kind = f"array of {child.get('items', {}).get('type', 'object')}"
            rows.append(
                f"| `{field_path}` | {kind} | {_reference_default(child)} | {_reference_allowed(child)} | "
                f"{child.get('description', '').replace('|', '/')} |"
            )
            walk(child, field_path)

    walk(spec, "spec")
    return "\n".join(rows) + "\n"


def _reference_default(schema: dict[str, Any]) -> str:
    if "default" not in schema or schema["default"] in ({}, []):
        return ""
    return f"`{json.dumps(schema['default'])}`"


def _reference_allowed(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return ", ".join(f"`{value}`" for value in schema["enum"] if value is not None)
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is None and high is None:
        return ""
    low_text = "" if low is None else f"{'>' if schema.get('exclusiveMinimum') else '>='} {low}"
    high_text = "" if high is None else f"<= {high}"
    return ", ".join(part for part in (low_text, high_text) if part)
