"""The operator end to end: real kube-apiserver + etcd, real Prometheus, replay agents, the operator
as a process whose token is bound only to deploy/rbac.yaml's ClusterRole.

apply -> owned objects -> metrics -> skewed load -> rebalance -> migration -> new generation live on
every agent (the ConfigMap's map), lower imbalance; Prometheus down -> MetricsAvailable=False and no
change; 20+ invalid manifests rejected or marked Invalid naming the field; least-privilege RBAC.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest
import yaml
from kubernetes.client.rest import ApiException

from e2e_support import (
    AGENT_TOKEN,
    TINY_SHAPE,
    Agents,
    Api,
    Operator,
    ReplicaChecker,
    manifest,
    skewed_trace,
    wait_for,
)
from moe_operator import builders
from moe_placement.models import Placement, placement_hash

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "moe"
L, E = TINY_SHAPE["numLayers"], TINY_SHAPE["numExperts"]


@pytest.fixture(scope="module")
def api(api: Api) -> Api:
    """conftest's admin access, with the prometheus-operator CRDs installed before the operator starts
    (it looks for them at reconcile)."""
    api.install_monitoring_crds()
    return api


# What a kube-prometheus-stack release selects its PodMonitors and PrometheusRules by (the chart passes
# its monitoring.labels as --inherited-label).
INHERITED = {"release": "kps"}


@pytest.fixture(scope="module")
def operator(api, control_plane, tmp_path_factory):
    """The operator as the ``operator`` user, every namespace, with ``--inherited-label release=kps``."""
    args = [f"--inherited-label={key}={value}" for key, value in INHERITED.items()]
    process = Operator(tmp_path_factory.mktemp("operator"), control_plane.kubeconfig_for("operator"), extra_args=args)
    process.start()
    yield process
    process.stop()
    print(process.log()[-4000:])


@pytest.fixture(scope="module")
def stack(api, operator, prometheus_factory, tmp_path_factory):
    """Four agents replaying a skewed trace, a Prometheus scraping them, their Endpoints."""
    workdir = tmp_path_factory.mktemp("agents")
    agents = Agents(workdir, skewed_trace(workdir / "trace.npz"))
    agents.start()
    prometheus = prometheus_factory(agents.targets, "1s")
    namespace = api.namespace("e2e-rebalance")
    api.announce(namespace, NAME, agents.ports, AGENT_TOKEN)
    yield agents, prometheus, namespace
    agents.stop()


def served(agents: Agents) -> list[dict]:
    return [agents.placement(rank) for rank in sorted(agents.ports)]


def check_deployment_rule(rule: dict, namespace: str, deployment: dict) -> None:
    from moe_operator.crd import resolve_spec

    (group,) = rule["spec"]["groups"]
    marker, *alerts = group["rules"]
    assert marker["record"] == builders.DEPLOYMENT_ALERTS_MARKER
    assert marker["labels"] == {"namespace": namespace, "deployment": NAME}
    assert [a["alert"] for a in alerts] == list(builders.DEPLOYMENT_ALERTS)
    expected = builders.deployment_alert_rules(resolve_spec(deployment["spec"]).spec.alerts, namespace, NAME)
    assert alerts == expected
    chart = builders.deployment_alert_rules()
    assert [a["annotations"]["runbook_url"] for a in alerts] == [a["annotations"]["runbook_url"] for a in chart]
    promtool = shutil.which("promtool")
    if promtool is not None:  # what the API server stored is a valid Prometheus rules file
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
            yaml.safe_dump(rule["spec"], handle)
            handle.flush()
            result = subprocess.run([promtool, "check", "rules", handle.name], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_operator_runs_with_least_privilege(api, control_plane, operator):
    """The operator's user is not system:masters: only deploy/rbac.yaml's rules apply."""
    restricted = Api(control_plane.kubeconfig_for("operator"))
    with pytest.raises(ApiException) as error:
        restricted.core.list_namespace()
    assert error.value.status == 403
    with pytest.raises(ApiException) as error:
        restricted.core.create_namespace({"metadata": {"name": "not-allowed"}})
    assert error.value.status == 403
    with pytest.raises(ApiException) as error:
        restricted.core.list_secret_for_all_namespaces()
    assert error.value.status == 403
    restricted.custom.list_cluster_custom_object("moeplace.io", "v1alpha1", "moedeployments")  # allowed
    time.sleep(1)
    assert operator.proc.poll() is None, operator.log()


def test_apply_rebalance_migrate(api, operator, stack):
    agents, prometheus, namespace = stack
    with ReplicaChecker(agents, L, E) as checker:
        api.create(namespace, manifest(NAME, namespace, prometheus.url))

        # Owned objects appear, with owner references.
        deployment = api.get(namespace, NAME)
        uid = deployment["metadata"]["uid"]
        service = wait_for(
            lambda: api.core.read_namespaced_service(builders.agents_service_name(NAME), namespace), 30, "agents Service"
        )
        assert service.metadata.owner_references[0].uid == uid
        assert [p.name for p in service.spec.ports] == ["rank-0", "rank-1"]
        configmap = wait_for(lambda: api.configmap(namespace, builders.placement_configmap_name(NAME)), 30, "ConfigMap")
        assert configmap["metadata"]["ownerReferences"][0]["uid"] == uid
        assert builders.SGLANG_KEY in configmap["data"] and builders.PLACEMENT_KEY in configmap["data"]
        wait_for(lambda: api.status(namespace, NAME).get("gpus") == 4, 30, "status.gpus")
        owned = {}
        for plural, object_name in (("podmonitors", f"{NAME}-agents"), ("prometheusrules", f"{NAME}-alerts")):
            owned[plural] = api.custom.get_namespaced_custom_object(
                "monitoring.coreos.com", "v1", namespace, plural, object_name
            )
            assert owned[plural]["metadata"]["ownerReferences"][0]["uid"] == uid
        # The agents' series get the labels the chart's recording rules and dashboard filter by.
        for endpoint in owned["podmonitors"]["spec"]["podMetricsEndpoints"]:
            assert {r["targetLabel"]: r["replacement"] for r in endpoint["relabelings"]} == {
                "namespace": namespace, "deployment": NAME,
            }
        # The PrometheusRule holds the chart's spec.alerts alerts (same names and runbooks) for this
        # deployment only, with its thresholds (the CRD's defaults here), and the marker series by
        # which the chart's copies skip it: one alert per deployment, one definition.
        check_deployment_rule(owned["prometheusrules"], namespace, deployment)
        # Every object the operator created carries the inherited labels, as the API server stored them.
        created = [service.metadata.labels, configmap["metadata"]["labels"]]
        created += [owned[plural]["metadata"]["labels"] for plural in owned]
        for labels in created:
            assert INHERITED.items() <= (labels or {}).items(), labels

        # Metrics flow from the agents through Prometheus into the operator.
        wait_for(lambda: api.condition(namespace, NAME, "MetricsAvailable").get("status") == "True", 60,
                 "MetricsAvailable=True")

        # The live imbalance of the linear placement the agents started with, on Prometheus' load.
        rows = prometheus.query(f"sum by (layer, expert) (increase(moeplace_expert_tokens_total[10s]))")
        load = np.zeros((L, E))
        for row in rows:
            load[int(row["metric"]["layer"]), int(row["metric"]["expert"])] = float(row["value"][1])
        from moe_operator.solver import token_imbalance
        from moe_placement.baselines import linear_placement

        before = token_imbalance(load, Placement(linear_placement(L, E, 20), E, 5))
        assert before > 1.2, f"the trace should be skewed (imbalance {before:.2f})"

        # The skewed load triggers a rebalance; the migration completes.
        status = wait_for(
            lambda: (s := api.status(namespace, NAME)).get("lastRebalanceTime") and s.get("migration", {}).get("state") == "Completed" and s,
            120, "a completed migration",
        )
        migration = status["migration"]
        assert migration["stage"] == migration["stages"] >= 1 and migration["bytesMoved"] > 0
        assert status["placement"]["generation"] > 0

        # Status shows the new generation and lower imbalance; every agent serves the ConfigMap's map.
        def converged():
            published = api.published(namespace, NAME)
            answers = served(agents)
            if published is None or any(a is None for a in answers):
                return None
            mapping, generation = published
            same = all(a["hash"] == placement_hash(mapping) and a["generation"] == generation for a in answers)
            status = api.status(namespace, NAME)
            fresh = status.get("placement", {}).get("generation") == generation and status.get("imbalance")
            return same and fresh and (mapping, generation, status)

        mapping, generation, status = wait_for(converged, 60, "agents serving the published placement")
        wait_for(lambda: api.status(namespace, NAME).get("lastCycleTime") != status.get("lastCycleTime"), 30, "a new cycle")
        after = api.status(namespace, NAME)["imbalance"]
        assert after < before, f"imbalance {after} not below {before}"
        assert api.status(namespace, NAME)["phase"] in ("Ready", "Migrating")
        reasons = {event["reason"] for event in api.events(namespace)}
        assert {"Rebalancing", "MigrationCompleted", "PlacementPublished"} <= reasons, reasons
        text = operator.metrics()
        assert 'moeplace_operator_rebalances_total{deployment="moe",namespace="e2e-rebalance",result="applied"}' in text
        assert "moeplace_operator_migration_bytes_total" in text
    assert checker.samples > 10
    assert checker.violations == [], checker.violations[:5]


def test_prometheus_down_keeps_the_placement(api, operator, stack):
    agents, prometheus, namespace = stack
    # Under the deployment's own gate (the load has not changed since the last rebalance), a cycle
    # keeps the placement; with metrics gone, nothing may move either.
    wait_for(
        lambda: (s := api.status(namespace, NAME)).get("lastCycleResult") == "skipped"
        and (s.get("migration") or {}).get("state") != "Running",
        90, "a cycle that keeps the placement",
    )
    published = api.published(namespace, NAME)
    generations = {a["generation"] for a in served(agents)}
    prometheus.stop()
    condition = wait_for(
        lambda: (c := api.condition(namespace, NAME, "MetricsAvailable")).get("status") == "False" and c, 60,
        "MetricsAvailable=False",
    )
    assert condition["reason"] == "PrometheusUnavailable"
    first = api.status(namespace, NAME)["lastCycleTime"]
    wait_for(lambda: api.status(namespace, NAME)["lastCycleTime"] > first, 30, "another cycle")
    after = api.published(namespace, NAME)
    assert after[1] == published[1] and np.array_equal(after[0], published[0])
    assert {a["generation"] for a in served(agents)} == generations
    assert 'moeplace_operator_metrics_available{deployment="moe",namespace="e2e-rebalance"} 0.0' in operator.metrics()


SHAPE = dict(TINY_SHAPE)
BAD_MANIFESTS = [
    # (what, spec patch, field the rejection or the Invalid message names)
    ("numLayers is a string", {"model": {"shape": {**SHAPE, "numLayers": "four"}}}, "spec.model.shape.numLayers"),
    ("numExperts is 0", {"model": {"shape": {**SHAPE, "numExperts": 0}}}, "spec.model.shape.numExperts"),
    ("topK missing", {"model": {"shape": {k: v for k, v in SHAPE.items() if k != "topK"}}}, "spec.model.shape.topK"),
    ("unknown preset", {"model": {"preset": "gpt-5"}}, "spec.model.preset"),
    ("preset and shape", {"model": {"preset": "deepseek-v3", "shape": SHAPE}}, "spec.model"),
    ("no preset, no shape", {"model": {}}, "spec.model"),
    ("topK above numExperts", {"model": {"shape": {**SHAPE, "topK": 17}}}, "spec.model.shape"),
    ("nodes 0", {"topology": {"nodes": 0, "gpusPerNode": 2}}, "spec.topology.nodes"),
    ("gpusPerNode 65", {"topology": {"nodes": 1, "gpusPerNode": 65}}, "spec.topology.gpusPerNode"),
    ("gpusPerNode is a list", {"topology": {"nodes": 1, "gpusPerNode": [2]}}, "spec.topology.gpusPerNode"),
    ("unknown gpu", {"topology": {"nodes": 2, "gpusPerNode": 2, "gpu": "tpu"}}, "spec.topology.gpu"),
    ("topology cannot hold the experts", {"topology": {"nodes": 4, "gpusPerNode": 8}}, "spec.topology"),
    ("topology missing", {"topology": None}, "spec.topology"),
    ("unknown policy", {"placement": {"policy": "magic"}}, "spec.placement.policy"),
    ("redundantSlots negative", {"placement": {"redundantSlots": -4}}, "spec.placement.redundantSlots"),
    ("redundantSlots do not divide", {"placement": {"redundantSlots": 3}}, "spec.placement.redundantSlots"),
    ("minPredictedGain 2", {"placement": {"minPredictedGain": 2}}, "spec.placement.minPredictedGain"),
    ("interval 0", {"placement": {"rebalanceIntervalSeconds": 0}}, "spec.placement.rebalanceIntervalSeconds"),
    ("unknown objective", {"placement": {"objective": {"decode": "vibes"}}}, "spec.placement.objective.decode"),
    ("unknown router", {"placement": {"objective": {"prefillRouter": "fastest"}}}, "spec.placement.objective.prefillRouter"),
    ("paused is a string", {"placement": {"paused": "maybe"}}, "spec.placement.paused"),
    ("maxCopiesPerStage 0", {"migration": {"maxCopiesPerStage": 0}}, "spec.migration.maxCopiesPerStage"),
    ("agentPort 70000", {"metrics": {"agentPort": 70000}}, "spec.metrics.agentPort"),
    ("windowSeconds 0", {"metrics": {"windowSeconds": 0}}, "spec.metrics.windowSeconds"),
    ("prometheusUrl not http", {"metrics": {"prometheusUrl": "ftp://x"}}, "spec.metrics.prometheusUrl"),
    ("engine and workloadRef", {"serving": {"engine": {"image": "x"}, "workloadRef": {"kind": "StatefulSet", "name": "y"}}}, "spec.serving"),
    ("workloadRef kind", {"serving": {"workloadRef": {"kind": "Deployment", "name": "y"}}}, "spec.serving.workloadRef.kind"),
    ("imbalanceThreshold 0.5", {"alerts": {"imbalanceThreshold": 0.5}}, "spec.alerts.imbalanceThreshold"),
    ("placement too big for its ConfigMap",
     {"model": {"shape": {**SHAPE, "numLayers": 1024, "numExperts": 4096, "topK": 8}},
      "topology": {"nodes": 2, "gpusPerNode": 2}}, "spec.model and spec.topology"),
]


def test_invalid_manifests_are_rejected_or_marked_invalid(api, operator):
    namespace = api.namespace("e2e-invalid")
    rejected, created = {}, {}
    for index, (what, patch, field) in enumerate(BAD_MANIFESTS):
        body = manifest(f"bad-{index}", namespace, "http://127.0.0.1:9")
        for key, value in patch.items():
            if value is None:
                body["spec"].pop(key)
            elif key in ("model", "topology"):
                body["spec"][key] = value
            else:
                merged = dict(body["spec"].get(key, {}))
                for sub, sub_value in value.items():
                    if isinstance(sub_value, dict) and isinstance(merged.get(sub), dict):
                        merged[sub] = {**merged[sub], **sub_value}
                    else:
                        merged[sub] = sub_value
                body["spec"][key] = merged
        try:
            api.create(namespace, body)
            created[index] = (what, field)
        except ApiException as error:
            assert error.status == 422, (what, error.status, error.body)
            rejected[index] = (what, field, error.body)
    assert len(BAD_MANIFESTS) >= 20
    for index, (what, field, message) in rejected.items():
        assert field in message, f"{what}: the API server's message does not name {field}: {message}"

    def all_invalid():
        done = {}
        for index, (what, field) in created.items():
            status = api.status(namespace, f"bad-{index}")
            if status.get("phase") != "Invalid":
                return None
            done[index] = status["message"]
        return done

    messages = wait_for(all_invalid, 60, "every accepted bad manifest marked Invalid")
    for index, message in messages.items():
        what, field = created[index]
        assert message.startswith(field), f"{what}: {message!r} does not start with {field}"
    print(f"{len(rejected)} rejected by the API server, {len(created)} marked Invalid by the operator")
    assert rejected and created


def test_serving_workload_engine_and_reference(api, operator):
    """spec.serving.engine: the operator deploys a StatefulSet with agent sidecars (no kubelet here:
    what it writes is checked); spec.serving.workloadRef to a missing workload: Ready=False."""
    namespace = api.namespace("e2e-serving")
    body = manifest("engine", namespace, "http://127.0.0.1:9", serving={"engine": {"image": "sglang:test"}})
    api.create(namespace, body)
    apps = __import__("kubernetes").client.AppsV1Api(api.api_client)
    sts = wait_for(lambda: apps.read_namespaced_stateful_set("engine-engine", namespace), 30, "the StatefulSet")
    assert sts.metadata.owner_references[0].name == "engine" and sts.spec.replicas == 2
    names = [c.name for c in sts.spec.template.spec.containers]
    assert names == ["engine", "agent-0", "agent-1"]
    service = api.core.read_namespaced_service("engine-agents", namespace)
    assert service.spec.selector == builders.engine_selector("engine")
    wait_for(lambda: api.status(namespace, "engine").get("phase") == "Ready", 30, "Ready")

    api.create(namespace, manifest("ref", namespace, "http://127.0.0.1:9",
                                   serving={"workloadRef": {"kind": "StatefulSet", "name": "missing"}}))
    condition = wait_for(
        lambda: (c := api.condition(namespace, "ref", "Ready")).get("reason") == "WorkloadMissing" and c, 30,
        "Ready=False WorkloadMissing",
    )
    assert condition["status"] == "False" and "spec.serving.workloadRef" in condition["message"]
