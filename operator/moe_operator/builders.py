"""Pure ``build_*`` functions: the Kubernetes objects the operator owns, as plain dicts.

Nothing here talks to the API server; the handlers create, patch and read what these return. Every
owned object carries an owner reference to its ``MoEDeployment`` and the labels in ``labels_for``.

Agents are announced in the Endpoints of the ``<name>-agents`` Service; the rank mapping is explicit:

* each Endpoints port named ``rank-<r>`` is local rank ``r`` at that port;
* an address whose ``targetRef`` (or ``hostname``) names a pod ending in ``-<ordinal>`` (StatefulSet
  and LeaderWorkerSet pods) is node ``ordinal``: global rank = ``ordinal * gpusPerNode + r``;
* an address without either is node 0: global rank = ``r`` (the local demo announces its agent
  processes as one address with ports ``rank-0`` .. ``rank-<G-1>``).

Kubernetes refuses loopback addresses in Endpoints, so agents on the operator's own machine (the
local demo and tests) are announced under a placeholder address (``192.0.2.1``, TEST-NET-1) with the
annotation ``moeplace.io/agent-host: 127.0.0.1``: the operator then contacts every address of that
Endpoints object at the annotated host instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from moe_operator import settings
from moe_operator.crd import API_VERSION, KIND, AlertsSpec, ResolvedSpec
from moe_placement.files import sglang_json
from moe_placement.models import ModelShape, Placement, Topology, format_validation_error, placement_hash

MANAGED_BY = "moeplace-operator"
LABEL_DEPLOYMENT = "moeplace.io/deployment"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_GENERATION = "moeplace.io/placement-generation"
ANNOTATION_HASH = "moeplace.io/placement-hash"

SGLANG_KEY = "physical_to_logical_map.json"
PLACEMENT_KEY = "placement.json"
TARGET_KEY = "target.json"
PLACEMENT_MOUNT = "/etc/moeplace/placement"
TOKEN_MOUNT = "/etc/moeplace/agent-token"
# engineKind sglang / vllm: the emptyDir the engine and its sidecars share (moe_agent.engines.contract's
# default engine directory), the variables the plugins read, and where SGLang's HTTP server listens
# (its --port default) for the rank-0 sidecar's recorder dumps.
ENGINE_DIR_MOUNT = "/var/run/moeplace/engine"
PLACEMENT_DIR_ENV = "MOEPLACE_PLACEMENT_DIR"
ENGINE_DIR_ENV = "MOEPLACE_ENGINE_DIR"
SGLANG_RECORDER_DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
SGLANG_URL = "http://127.0.0.1:30000"

RANK_PORT_PREFIX = "rank-"
ANNOTATION_AGENT_HOST = "moeplace.io/agent-host"
PLACEHOLDER_IP = "192.0.2.1"

AGENT_TOKEN_KEY = "token"
LABEL_AGENT_TOKEN_FOR = "moeplace.io/agent-token-for"
ANNOTATION_ROTATE_TOKEN = "moeplace.io/rotate-agent-token"
ANNOTATION_TOKEN_ROTATION = "moeplace.io/agent-token-rotation"


def placement_configmap_name(name: str) -> str:
    return f"{name}-placement"


def migration_configmap_name(name: str) -> str:
    return f"{name}-migration"


def agents_service_name(name: str) -> str:
    return f"{name}-agents"


def engine_statefulset_name(name: str) -> str:
    return f"{name}-engine"


def agent_token_secret_name(name: str) -> str:
    return f"{name}-agent-token"


def podmonitor_name(name: str) -> str:
    return f"{name}-agents"


def prometheusrule_name(name: str) -> str:
    return f"{name}-alerts"


def labels_for(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "moeplace",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_COMPONENT: component,
        LABEL_DEPLOYMENT: name,
    }


def build_owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """The controller owner reference to a MoEDeployment body."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner.get("kind", KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_labels(name: str, component: str) -> dict[str, str]:
    """Labels of an object the operator creates: the operator-wide inherited labels
    (``--inherited-label``, e.g. the ``release`` label kube-prometheus-stack selects by) and
    ``labels_for``. Selectors use ``labels_for`` alone, so changing the inherited labels never
    orphans pods."""
    return {**settings.current().inherited_labels, **labels_for(name, component)}


def _metadata(owner: Mapping[str, Any], name: str, component: str, **extra: Any) -> dict[str, Any]:
    meta = owner["metadata"]
    metadata = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": object_labels(meta["name"], component),
        "ownerReferences": [build_owner_reference(owner)],
    }
    metadata.update(extra)
    return metadata


# --------------------------------------------------------------------------------------------------
# Placement ConfigMaps


def build_placement_document(
    placement: Placement,
    generation: int,
    policy: str,
    model: ModelShape,
    topology: Topology,
    solver: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """moeplace's placement file (``moeplace.placement/v1``) of a published generation."""
    return {
        "format": "moeplace.placement/v1",
        "policy": policy,
        "model": model.model_dump(by_alias=True),
        "topology": topology.model_dump(by_alias=True),
        "physical_to_logical_map": placement.physical_to_logical_map.tolist(),
        "solver": dict(solver or {"status": "heuristic"}),
        "predicted": {},
    }


def build_placement_configmap(
    owner: Mapping[str, Any],
    placement: Placement,
    generation: int,
    policy: str,
    resolved: ResolvedSpec,
    solver: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The published placement: SGLang's map JSON, moeplace's placement file, generation and hash."""
    digest = placement_hash(placement.physical_to_logical_map)
    document = build_placement_document(
        placement, generation, policy, resolved.model, resolved.topology, solver
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            owner,
            placement_configmap_name(owner["metadata"]["name"]),
            "placement",
            annotations={ANNOTATION_GENERATION: str(generation), ANNOTATION_HASH: digest},
        ),
        "data": {
            SGLANG_KEY: sglang_json(placement, resolved.model),
            PLACEMENT_KEY: json.dumps(document, separators=(",", ":")),
            "generation": str(generation),
            "hash": digest,
            "policy": policy,
        },
    }


def parse_placement_configmap(
    configmap: Mapping[str, Any], num_experts: int, slots_per_gpu: int
) -> tuple[Placement, int, str]:
    """(placement, generation, policy) of a placement ConfigMap; raises ValueError/PlacementError."""
    data = configmap.get("data") or {}
    mapping = json.loads(data[PLACEMENT_KEY])["physical_to_logical_map"]
    placement = Placement(np.asarray(mapping, dtype=np.int64), num_experts, slots_per_gpu)
    generation = int(data.get("generation", "0"))
    digest = data.get("hash")
    if digest and digest != placement_hash(placement.physical_to_logical_map):
        raise ValueError(f"{PLACEMENT_KEY}: hash {digest} does not match the map")
    return placement, generation, data.get("policy", "")


class MigrationRecord(BaseModel):
    """The in-flight migration's source and target maps [L, N] (``target.json`` of the migration
    ConfigMap), so a restarted operator re-derives the plan; ``rollbackOf`` names the plan whose
    source map this migration returns to."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    plan_id: str
    policy: str = ""
    from_generation: int = 0
    max_copies_per_stage: int = Field(ge=1)
    rollback_of: str = ""
    source: list[list[int]]
    target: list[list[int]]


def build_migration_configmap(owner: Mapping[str, Any], record: MigrationRecord) -> dict[str, Any]:
    """The ConfigMap holding ``record``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, migration_configmap_name(owner["metadata"]["name"]), "migration"),
        "data": {TARGET_KEY: record.model_dump_json(by_alias=True), "planId": record.plan_id},
    }


def parse_migration_configmap(configmap: Mapping[str, Any] | None) -> MigrationRecord:
    """The record of a migration ConfigMap; ValueError naming the key when it is missing or malformed."""
    data = (configmap or {}).get("data") or {}
    if TARGET_KEY not in data:
        raise ValueError(f"{TARGET_KEY}: missing")
    try:
        return MigrationRecord.model_validate_json(data[TARGET_KEY])
    except ValidationError as error:
        raise ValueError(format_validation_error(error, prefix=TARGET_KEY)) from None


# --------------------------------------------------------------------------------------------------
# The deployment's agent token


def build_agent_token_secret(owner: Mapping[str, Any], token: str, rotation: str) -> dict[str, Any]:
    """The operator-managed bearer token of one MoEDeployment's agents (``<name>-agent-token``).

    Labelled ``moeplace.io/agent-token-for: <name>`` (the operator sends a Secret's token only to the
    agents of the deployment it is labelled for) and annotated with the ``moeplace.io/rotate-agent-token``
    value of the MoEDeployment it was generated for: a new value there rotates the token."""
    name = owner["metadata"]["name"]
    metadata = _metadata(
        owner, agent_token_secret_name(name), "agent-token", annotations={ANNOTATION_TOKEN_ROTATION: rotation}
    )
    metadata["labels"][LABEL_AGENT_TOKEN_FOR] = name
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata,
        "stringData": {AGENT_TOKEN_KEY: token},
    }


def agent_token_source(owner: Mapping[str, Any], resolved: ResolvedSpec) -> tuple[str, str]:
    """(Secret name, key) of the deployment's agent token: ``spec.metrics.tokenSecretRef`` or the
    operator-managed ``<name>-agent-token``."""
    ref = resolved.spec.metrics.token_secret_ref
    if ref is not None:
        return ref.name, ref.key
    return agent_token_secret_name(owner["metadata"]["name"]), AGENT_TOKEN_KEY


# --------------------------------------------------------------------------------------------------
# Agents: Service, Endpoints, monitoring


def agent_ports(resolved: ResolvedSpec) -> list[dict[str, Any]]:
    """``rank-<r>`` ports of one pod's (node's) agents: local rank r listens on agentPort + r."""
    base = resolved.spec.metrics.agent_port
    return [
        {"name": f"{RANK_PORT_PREFIX}{rank}", "port": base + rank, "targetPort": base + rank, "protocol": "TCP"}
        for rank in range(resolved.topology.gpus_per_node)
    ]


def build_agents_service(
    owner: Mapping[str, Any], resolved: ResolvedSpec, selector: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Headless Service of the agents; selector-less (Endpoints written by others) unless ``selector``."""
    spec: dict[str, Any] = {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "ports": agent_ports(resolved),
    }
    if selector:
        spec["selector"] = dict(selector)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, agents_service_name(owner["metadata"]["name"]), "agents"),
        "spec": spec,
    }


def build_external_endpoints(
    name: str, namespace: str, agents: Mapping[int, tuple[str, int]]
) -> dict[str, Any]:
    """Endpoints announcing agents outside pods: rank -> (ip, port), as the demo and tests write them.

    Ranks sharing an IP go in one subset with ports ``rank-<r>`` (no targetRef: the rank is global).
    Loopback agents are announced at ``PLACEHOLDER_IP`` with the ``moeplace.io/agent-host`` annotation.
    """
    annotations: dict[str, str] = {}
    loopback = {ip for ip, _ in agents.values() if ip.startswith("127.") or ip in ("::1", "localhost")}
    if loopback:
        if len(loopback) != len({ip for ip, _ in agents.values()}) or len(loopback) > 1:
            raise ValueError("agents: loopback agents cannot be mixed with other addresses")
        annotations[ANNOTATION_AGENT_HOST] = loopback.pop()
        agents = {rank: (PLACEHOLDER_IP, port) for rank, (_, port) in agents.items()}
    by_ip: dict[str, list[dict[str, Any]]] = {}
    for rank, (ip, port) in sorted(agents.items()):
        by_ip.setdefault(ip, []).append(
            {"name": f"{RANK_PORT_PREFIX}{rank}", "port": int(port), "protocol": "TCP"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {
            "name": agents_service_name(name),
            "namespace": namespace,
            "labels": {LABEL_DEPLOYMENT: name},
            "annotations": annotations,
        },
        "subsets": [{"addresses": [{"ip": ip}], "ports": ports} for ip, ports in by_ip.items()],
    }


# The pod label leaderworkerset.sigs.k8s.io/group-index as Prometheus' Kubernetes discovery names it.
LWS_GROUP_INDEX_META = "__meta_kubernetes_pod_label_leaderworkerset_sigs_k8s_io_group_index"


def podmonitor_relabelings(namespace: str, name: str) -> list[dict[str, Any]]:
    """Relabelings giving every scraped agent series ``namespace`` and ``deployment`` (the
    MoEDeployment's name) as static labels: the operator's ``spec.metrics.matchLabels``, the chart's
    recording rules and its dashboard select and aggregate by them. Static rather than copied from a
    pod label, so pods selected by a workload's own labels get them too."""
    return [
        {"targetLabel": "namespace", "replacement": namespace, "action": "replace"},
        {"targetLabel": "deployment", "replacement": name, "action": "replace"},
    ]


def build_podmonitor(owner: Mapping[str, Any], resolved: ResolvedSpec) -> dict[str, Any]:
    """A prometheus-operator PodMonitor scraping every agent port (``rank-<r>``) of the deployment's
    pods, the series labelled ``namespace`` and ``deployment`` (podmonitor_relabelings), and for a
    LeaderWorkerSet ``group`` (the pod's group-index: the load check counts ranks per group)."""
    meta = owner["metadata"]
    name = meta["name"]
    relabelings = podmonitor_relabelings(meta["namespace"], name)
    workload = resolved.spec.serving.workload_ref
    if workload is not None and workload.kind == "LeaderWorkerSet":
        relabelings.append({
            "sourceLabels": [LWS_GROUP_INDEX_META], "targetLabel": "group", "action": "replace",
        })
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(owner, podmonitor_name(name), "agents"),
        "spec": {
            "selector": {"matchLabels": {LABEL_DEPLOYMENT: name}},
            "podMetricsEndpoints": [
                {
                    "port": port["name"],
                    "path": "/metrics",
                    "interval": "15s",
                    "relabelings": relabelings,
                }
                for port in agent_ports(resolved)
            ],
        },
    }


# --------------------------------------------------------------------------------------------------
# Alerts: one definition for the chart's rules file and the operator's per-deployment PrometheusRule
#
# The three alerts whose thresholds a MoEDeployment sets (``spec.alerts``) are defined here, once:
#
# * the chart's charts/moeplace/files/rules.yaml holds ``deployment_alert_rules()`` (the CRD's default
#   thresholds, every deployment, next to the chart's other alerts; tests/chart/test_chart.py keeps
#   the file equal to it, and promtool tests it);
# * the operator's ``<name>-alerts`` PrometheusRule holds ``deployment_alert_rules(alerts, namespace,
#   name)``: the same alerts (names, severities, annotations, runbooks) with the resource's thresholds,
#   scoped to its series, plus the ``moeplace:deployment_alerts:info`` marker series, by which the
#   chart's copies step aside for that deployment. Each alert fires once per deployment, at its
#   thresholds, with or without the chart; without the operator's rule (no prometheus-operator, or a
#   Prometheus that does not select it) the chart's defaults apply.

DEPLOYMENT_ALERTS_MARKER = "moeplace:deployment_alerts:info"
ALERT_IMBALANCE = "MoEPlaceImbalanceHigh"
ALERT_MIGRATION_STALLED = "MoEPlaceMigrationStalled"
ALERT_METRICS_MISSING = "MoEPlaceMetricsMissing"
DEPLOYMENT_ALERTS = (ALERT_IMBALANCE, ALERT_MIGRATION_STALLED, ALERT_METRICS_MISSING)
IMBALANCE_FOR_SECONDS = 600
_WHO = "{{ $labels.namespace }}/{{ $labels.deployment }}"


def prometheus_duration(seconds: int) -> str:
    """``600`` -> ``10m``: a PromQL duration in the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def human_duration(seconds: int) -> str:
    """``600`` -> ``10 minutes``, for alert descriptions."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _threshold(value: float) -> str:
    return repr(float(value)).removesuffix(".0") if float(value).is_integer() else repr(float(value))


def _alert(
    name: str, expr: str, severity: str, summary: str, description: str, runbook_base_url: str,
    for_seconds: float | None = None,
) -> dict[str, Any]:
    """One Prometheus alerting rule with its runbook link."""
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_seconds is not None:
        rule["for"] = prometheus_duration(for_seconds)
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {
        "summary": summary, "description": description, "runbook_url": f"{runbook_base_url}{name}.md"
    }
    return rule


def deployment_alert_rules(
    alerts: AlertsSpec | None = None,
    namespace: str | None = None,
    deployment: str | None = None,
    runbook_base_url: str = settings.DEFAULT_RUNBOOK_BASE_URL,
) -> list[dict[str, Any]]:
    """The alerts that ``spec.alerts`` parameterises, with ``alerts``' thresholds (default: the
    CRD's). With ``namespace`` and ``deployment``: scoped to that MoEDeployment's series (the
    operator's PrometheusRule); without: every deployment that has no rule of its own (the chart).
    Runbook links start with ``runbook_base_url`` (the chart swaps the default prefix of its copy)."""
    alerts = alerts if alerts is not None else AlertsSpec()
    if (namespace is None) != (deployment is None):
        raise ValueError("deployment_alert_rules: give both namespace and deployment, or neither")
    scope = "" if deployment is None else f'{{namespace="{namespace}", deployment="{deployment}"}}'
    rest = "" if deployment is not None else f" unless on (namespace, deployment) {DEPLOYMENT_ALERTS_MARKER}"

    def series(metric: str) -> str:
        return metric + scope

    imbalance = _threshold(alerts.imbalance_threshold)
    stalled = alerts.migration_stalled_seconds
    missing = alerts.metrics_missing_seconds
    in_progress = series("moeplace_operator_migration_in_progress")
    return [
        # The operator's live imbalance (max / mean GPU load, mean over layers) has stayed above the
        # threshold: the rebalancer is not keeping up, is paused, or its gain gate rejects every
        # new placement.
        _alert(
            ALERT_IMBALANCE, f"{series('moeplace_operator_imbalance')} > {imbalance}{rest}", "warning",
            "Expert load imbalance stays high.",
            f"MoEDeployment {_WHO} has a token imbalance of {{{{ $value | printf \"%.2f\" }}}} "
            f"(max / mean GPU load; threshold {imbalance}) for more than {human_duration(IMBALANCE_FOR_SECONDS)}.",
            runbook_base_url, IMBALANCE_FOR_SECONDS,
        ),
        # A migration has run for the whole window (it was running already at its start) and
        # completed no step in it: an expert copy hangs or keeps failing, and the deployment sits
        # between two placements.
        _alert(
            ALERT_MIGRATION_STALLED,
            f"min_over_time({in_progress}[{prometheus_duration(stalled)}]) == 1"
            f" and on (namespace, deployment) ({in_progress} offset {prometheus_duration(stalled)}) == 1"
            f" unless on (namespace, deployment)"
            f" (time() - {series('moeplace_operator_migration_last_progress_timestamp_seconds')}) < {stalled}"
            f"{rest}",
            "critical", "Expert migration makes no progress.",
            f"The migration of MoEDeployment {_WHO} has not completed a step for more than {human_duration(stalled)}.",
            runbook_base_url,
        ),
        # Without usable load statistics the operator cannot re-solve the placement; it keeps the
        # live one.
        _alert(
            ALERT_METRICS_MISSING, f"{series('moeplace_operator_metrics_available')} == 0{rest}", "warning",
            "The operator gets no usable expert load from Prometheus.",
            f"The operator's Prometheus queries for MoEDeployment {_WHO} have returned no usable expert load "
            f"for more than {human_duration(missing)}; rebalancing is suspended.",
            runbook_base_url, missing,
        ),
    ]


def build_prometheusrule(owner: Mapping[str, Any], resolved: ResolvedSpec) -> dict[str, Any]:
    """The deployment's own copies of the chart's ``spec.alerts`` alerts (deployment_alert_rules) with
    this resource's thresholds, and the marker series that makes the chart's copies skip it."""
    meta = owner["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(owner, prometheusrule_name(name), "alerts"),
        "spec": {
            "groups": [
                {
                    "name": f"moeplace-{namespace}-{name}",
                    "rules": [
                        {
                            "record": DEPLOYMENT_ALERTS_MARKER,
                            "expr": "vector(1)",
                            "labels": {"namespace": namespace, "deployment": name},
                        },
                        *deployment_alert_rules(
                            resolved.spec.alerts, namespace, name, settings.current().runbook_base_url
                        ),
                    ],
                }
            ]
        },
    }


# --------------------------------------------------------------------------------------------------
# Serving workload


def engine_selector(name: str) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: name, LABEL_COMPONENT: "engine"}


def _engine_container(resolved: ResolvedSpec) -> dict[str, Any]:
    """The engine's container: its image, command, env, GPUs and the placement ConfigMap mounted; for
    engineKind sglang / vllm also the engine directory and the variables the plugins read."""
    engine = resolved.spec.serving.engine
    kind = resolved.spec.serving.engine_kind
    resources = json.loads(json.dumps(engine.resources)) if engine.resources else {}
    resources.setdefault("limits", {}).setdefault("nvidia.com/gpu", resolved.topology.gpus_per_node)
    for resource_kind in ("limits", "requests"):  # quantities are strings in the API
        if isinstance(resources.get(resource_kind), dict):
            resources[resource_kind] = {name: str(value) for name, value in resources[resource_kind].items()}
    env = [{"name": "MOEPLACE_PLACEMENT", "value": f"{PLACEMENT_MOUNT}/{SGLANG_KEY}"}]
    mounts = [{"name": "placement", "mountPath": PLACEMENT_MOUNT, "readOnly": True}]
    if kind != "agent":
        env += [{"name": PLACEMENT_DIR_ENV, "value": PLACEMENT_MOUNT}, {"name": ENGINE_DIR_ENV, "value": ENGINE_DIR_MOUNT}]
        mounts.append({"name": "engine-dir", "mountPath": ENGINE_DIR_MOUNT})
    if kind == "sglang":
        env.append({"name": SGLANG_RECORDER_DIR_ENV, "value": ENGINE_DIR_MOUNT})
    container = {
        "name": "engine",
        "image": engine.image,
        "env": env + [{"name": var.name, "value": var.value} for var in engine.env],
        "resources": resources,
        "volumeMounts": mounts,
    }
    if engine.command:
        container["command"] = list(engine.command)
    if engine.args:
        container["args"] = list(engine.args)
    return container


def _global_rank(resolved: ResolvedSpec, local: int) -> str:
    """Shell arithmetic for the global rank of local rank ``local``: pod ordinal * gpusPerNode + local."""
    return f"$(( ${{POD_NAME##*-}} * {resolved.topology.gpus_per_node} + {local} ))"


def _rank_container(resolved: ResolvedSpec, local: int, name: str, command: str, mounts: list[dict[str, Any]],
                    env: list[dict[str, Any]]) -> dict[str, Any]:
    """A per-GPU container serving the agent contract on agentPort + local (port ``rank-<local>``)."""
    port = resolved.spec.metrics.agent_port + local
    return {
        "name": name,
        "image": resolved.spec.serving.engine.agent_image,
        "command": ["sh", "-c"],
        "args": [command],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}, *env],
        "ports": [{"name": f"{RANK_PORT_PREFIX}{local}", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 5},
        "volumeMounts": [
            {"name": "placement", "mountPath": PLACEMENT_MOUNT, "readOnly": True},
            {"name": "agent-token", "mountPath": TOKEN_MOUNT, "readOnly": True},
            *mounts,
        ],
    }


def _agent_sidecar(resolved: ResolvedSpec, local: int) -> dict[str, Any]:
    """engineKind agent: moeplace's agent of local rank ``local``, which copies expert weights itself."""
    engine = resolved.spec.serving.engine
    topology = resolved.topology
    command = (
        "exec python -m moe_agent agent"
        f" --rank {_global_rank(resolved, local)}"
        # the agent listens on 127.0.0.1 by default: in a pod, probes and scrapes come from
        # outside the pod's loopback
        f" --host 0.0.0.0 --port {resolved.spec.metrics.agent_port + local}"
        f" --topology {topology.num_nodes}x{topology.gpus_per_node}"
        f" --redundant-slots {resolved.spec.placement.redundant_slots}"
        f" --placement {PLACEMENT_MOUNT}/{PLACEMENT_KEY} --token-file {TOKEN_MOUNT}/{AGENT_TOKEN_KEY} "
        + " ".join(engine.agent_args)
    )
    model = {"name": "MOEPLACE_MODEL", "value": json.dumps(resolved.model.model_dump(by_alias=True))}
    return _rank_container(resolved, local, f"agent-{local}", command, [], [model])


def _engine_sidecar(resolved: ResolvedSpec, local: int) -> dict[str, Any]:
    """engineKind sglang / vllm: the engine sidecar of local rank ``local`` (``python -m
    moe_agent.engines sidecar``), reporting what the engine serves and its loads.

    vLLM: every sidecar reads its rank's loads file. SGLang writes recorder dumps on global rank 0's
    pod only, so the sidecar of global rank 0 asks SGLang for them and exports every rank's share; the
    others export none. The pod template is the same for every pod, so the choice is made in the shell.
    """
    kind = resolved.spec.serving.engine_kind
    if kind == "vllm":
        loads = "--loads vllm"
    else:
        dumps = f"--loads sglang-dumps --sglang-url {SGLANG_URL}"
        loads = f'$(if [ "$GLOBAL_RANK" -eq 0 ]; then echo "{dumps}"; else echo "--loads none"; fi)'
    command = (
        f"GLOBAL_RANK={_global_rank(resolved, local)}; exec python -m moe_agent.engines sidecar --rank $GLOBAL_RANK"
        f" --host 0.0.0.0 --port {resolved.spec.metrics.agent_port + local}"
        f" --placement-dir {PLACEMENT_MOUNT} --engine-dir {ENGINE_DIR_MOUNT}"
        f" --token-file {TOKEN_MOUNT}/{AGENT_TOKEN_KEY} {loads} "
        + " ".join(resolved.spec.serving.engine.agent_args)
    )
    # SGLang's rank-0 sidecar deletes the dumps it has read; vLLM's sidecars only read.
    mount = {"name": "engine-dir", "mountPath": ENGINE_DIR_MOUNT, "readOnly": kind == "vllm"}
    return _rank_container(resolved, local, f"sidecar-{local}", command, [mount], [])


def build_engine_statefulset(owner: Mapping[str, Any], resolved: ResolvedSpec) -> dict[str, Any]:
    """One pod per node: the engine container plus one container per GPU (local rank r on agentPort +
    r, global rank = pod ordinal * gpusPerNode + r), all mounting the placement ConfigMap, which
    ``MOEPLACE_PLACEMENT`` names to the engine (SGLang's ``--init-expert-location``).

    engineKind agent: the per-GPU containers are moeplace's agents (``agent-<r>``). sglang / vllm:
    they are engine sidecars (``sidecar-<r>``), and an emptyDir at ``ENGINE_DIR_MOUNT`` is shared by
    the engine (the plugins write the live map and loads there, SGLang its recorder dumps) and them.
    """
    name = owner["metadata"]["name"]
    if resolved.spec.serving.engine is None:
        raise ValueError("spec.serving.engine: not set")
    gpus = resolved.topology.gpus_per_node
    token_secret, token_key = agent_token_source(owner, resolved)
    # A mounted file, not an env var: kubelet refreshes it when the token rotates and the agent re-reads it.
    volumes: list[dict[str, Any]] = [
        {"name": "placement", "configMap": {"name": placement_configmap_name(name)}},
        {
            "name": "agent-token",
            "secret": {"secretName": token_secret, "items": [{"key": token_key, "path": AGENT_TOKEN_KEY}]},
        },
    ]
    per_gpu = _agent_sidecar
    if resolved.spec.serving.engine_kind != "agent":
        volumes.append({"name": "engine-dir", "emptyDir": {}})
        per_gpu = _engine_sidecar
    containers = [_engine_container(resolved)] + [per_gpu(resolved, local) for local in range(gpus)]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(owner, engine_statefulset_name(name), "engine"),
        "spec": {
            "serviceName": agents_service_name(name),
            "replicas": resolved.topology.num_nodes,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": engine_selector(name)},
            "template": {
                "metadata": {"labels": {**labels_for(name, "engine")}},
                "spec": {"containers": containers, "volumes": volumes},
            },
        },
    }


def workload_selector(workload: Mapping[str, Any]) -> dict[str, str]:
    """Pod labels of an existing StatefulSet or LeaderWorkerSet (for the agents Service)."""
    kind = workload.get("kind")
    if kind == "LeaderWorkerSet":
        return {"leaderworkerset.sigs.k8s.io/name": workload["metadata"]["name"]}
    selector = ((workload.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return dict(selector)
