"""build_* functions return the objects the operator owns, with owner references and labels."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from moe_agent.cli import add_arguments  # the agent's flags (no torch import)
from moe_operator import builders
from moe_operator.crd import resolve_spec
from moe_placement.baselines import linear_placement
from moe_placement.files import PlacementFile, sglang_json
from moe_placement.models import Placement, placement_hash

SHAPE = {"numLayers": 4, "numExperts": 16, "topK": 2, "hiddenSize": 64, "expertIntermediateSize": 32}
OWNER = {
    "apiVersion": "moeplace.io/v1alpha1",
    "kind": "MoEDeployment",
    "metadata": {"name": "demo", "namespace": "ns", "uid": "uid-1", "generation": 3},
}


def resolved(**extra):
    spec = {"model": {"shape": SHAPE}, "topology": {"nodes": 2, "gpusPerNode": 2},
            "placement": {"redundantSlots": 4}, **extra}
    return resolve_spec(spec)


def placement():
    return Placement(linear_placement(4, 16, 20), 16, 5)


def test_owner_reference_and_labels():
    service = builders.build_agents_service(OWNER, resolved())
    ref = service["metadata"]["ownerReferences"][0]
    assert ref == {
        "apiVersion": "moeplace.io/v1alpha1", "kind": "MoEDeployment", "name": "demo", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True,
    }
    assert service["metadata"]["labels"][builders.LABEL_DEPLOYMENT] == "demo"
    assert service["metadata"]["namespace"] == "ns"


def test_placement_configmap_round_trip_and_sglang_key():
    cm = builders.build_placement_configmap(OWNER, placement(), 7, "eplb", resolved())
    assert cm["metadata"]["name"] == "demo-placement"
    data = cm["data"]
    # SGLang's key is written by moe_placement's SGLang writer (every transformer layer, no -1)
    assert data[builders.SGLANG_KEY] == sglang_json(placement(), resolved().model)
    assert data["generation"] == "7" and data["hash"] == placement_hash(placement().physical_to_logical_map)
    # moeplace's placement file format, readable by moe_placement.files
    document = PlacementFile.model_validate(json.loads(data[builders.PLACEMENT_KEY]))
    assert document.placement().num_slots == 20
    parsed, generation, policy = builders.parse_placement_configmap(cm, 16, 5)
    assert generation == 7 and policy == "eplb"
    assert np.array_equal(parsed.physical_to_logical_map, placement().physical_to_logical_map)
    cm["data"]["hash"] = "0" * 16
    with pytest.raises(ValueError):
        builders.parse_placement_configmap(cm, 16, 5)


def test_migration_configmap_round_trips():
    target = Placement(np.roll(linear_placement(4, 16, 20), 1, axis=1), 16, 5)
    record = builders.MigrationRecord(
        plan_id="plan1", policy="eplb", from_generation=3, max_copies_per_stage=4, rollback_of="plan0",
        source=placement().physical_to_logical_map.tolist(), target=target.physical_to_logical_map.tolist(),
    )
    cm = builders.build_migration_configmap(OWNER, record)
    document = json.loads(cm["data"][builders.TARGET_KEY])
    assert document["planId"] == "plan1" and document["fromGeneration"] == 3 and document["rollbackOf"] == "plan0"
    assert document["maxCopiesPerStage"] == 4
    assert builders.parse_migration_configmap(cm) == record
    with pytest.raises(ValueError, match="target.json"):
        builders.parse_migration_configmap({"data": {builders.TARGET_KEY: '{"planId": 3}'}})
    with pytest.raises(ValueError, match="target.json: missing"):
        builders.parse_migration_configmap(None)


def test_selectorless_service_and_engine_service():
    service = builders.build_agents_service(OWNER, resolved())
    assert "selector" not in service["spec"] and service["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in service["spec"]["ports"]] == ["rank-0", "rank-1"]
    assert [p["port"] for p in service["spec"]["ports"]] == [9400, 9401]
    selected = builders.build_agents_service(OWNER, resolved(), builders.engine_selector("demo"))
    assert selected["spec"]["selector"] == builders.engine_selector("demo")


def test_engine_statefulset():
    spec = resolved(serving={"engine": {"image": "sglang:1", "args": ["--x"], "env": [{"name": "A", "value": "1"}]}},
                    metrics={"tokenSecretRef": {"name": "tok"}})
    sts = builders.build_engine_statefulset(OWNER, spec)
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == "demo-agents"
    pod = sts["spec"]["template"]
    assert pod["metadata"]["labels"][builders.LABEL_DEPLOYMENT] == "demo"
    containers = pod["spec"]["containers"]
    assert [c["name"] for c in containers] == ["engine", "agent-0", "agent-1"]
    assert containers[0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "A", "value": "1"} in containers[0]["env"]
    assert containers[2]["ports"][0] == {"name": "rank-1", "containerPort": 9401, "protocol": "TCP"}
    assert "--rank $(( ${POD_NAME##*-} * 2 + 1 ))" in containers[2]["args"][0]
    assert f"--token-file {builders.TOKEN_MOUNT}/token" in containers[1]["args"][0]
    assert {"name": "agent-token", "mountPath": builders.TOKEN_MOUNT, "readOnly": True} in containers[1]["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["placement"]["configMap"]["name"] == "demo-placement"
    assert volumes["agent-token"]["secret"] == {"secretName": "tok", "items": [{"key": "token", "path": "token"}]}
    managed = builders.build_engine_statefulset(OWNER, resolved(serving={"engine": {"image": "sglang:1"}}))
    assert {v["name"]: v for v in managed["spec"]["template"]["spec"]["volumes"]}["agent-token"]["secret"][
        "secretName"] == "demo-agent-token"
    with pytest.raises(ValueError):
        builders.build_engine_statefulset(OWNER, resolved())


def test_engine_agents_listen_on_every_address_with_their_rank_and_port(tmp_path):
    """Each agent sidecar's shell command, run as its container would (POD_NAME set), starts
    ``python -m moe_agent agent`` with flags the agent's own parser accepts: it listens on 0.0.0.0
    (not its default 127.0.0.1, which the kubelet's probes and Prometheus cannot reach) on the port of
    its rank-<r> container port, with the global rank ordinal x gpusPerNode + r."""
    spec = resolved(serving={"engine": {"image": "sglang:1", "agentArgs": ["--router", "metro"]}})
    pod = builders.build_engine_statefulset(OWNER, spec)["spec"]["template"]["spec"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for ordinal in (0, 1):
        for local, container in enumerate(pod["containers"][1:]):
            argv = run_container_command(container, ordinal, tmp_path)
            assert argv[:3] == ["-m", "moe_agent", "agent"]
            args = parser.parse_args(argv[3:])
            assert args.host == "0.0.0.0"
            port = container["ports"][0]
            assert port["name"] == f"rank-{local}" and args.port == port["containerPort"] == 9400 + local
            assert container["readinessProbe"]["httpGet"]["port"] == args.port
            assert args.rank == ordinal * 2 + local
            assert args.topology == "2x2" and args.redundant_slots == 4
            assert str(args.placement) == f"{builders.PLACEMENT_MOUNT}/{builders.PLACEMENT_KEY}"
            assert args.router == "metro"
            assert str(args.token_file) == f"{builders.TOKEN_MOUNT}/token"
    # agentArgs come last, so a deployment can still choose another address.
    assert shlex.split(pod["containers"][1]["args"][0])[-2:] == ["--router", "metro"]


def run_container_command(container, ordinal, tmp_path):
    """The argv ``python`` gets when ``container``'s shell command runs in pod ``demo-engine-<ordinal>``."""
    shim = tmp_path / "python"  # stands in for the interpreter: prints its arguments
    shim.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    shim.chmod(0o755)
    assert container["command"] == ["sh", "-c"]
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "POD_NAME": f"demo-engine-{ordinal}"}
    out = subprocess.run(["sh", "-c", *container["args"]], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_engine_kinds_run_engine_sidecars_sharing_the_engine_directory(kind, tmp_path):
    """engineKind sglang / vllm: one ``python -m moe_agent.engines sidecar`` per GPU, with flags the
    sidecar's own parser accepts, reading the engine's files from an emptyDir the engine shares;
    the engine gets the variables the plugins read (contract's) and, for SGLang, the recorder's
    directory. Loads: every vLLM sidecar reads its rank's file; of SGLang's, only global rank 0's asks
    the server for recorder dumps (the same pod template runs on every node)."""
    from moe_agent.engines import contract, sidecar

    spec = resolved(serving={"engineKind": kind, "engine": {"image": "engine:1", "agentArgs": ["--interval", "5"],
                                                             "env": [{"name": "A", "value": "1"}]}})
    pod = builders.build_engine_statefulset(OWNER, spec)["spec"]["template"]["spec"]
    engine, *sidecars = pod["containers"]
    assert [c["name"] for c in sidecars] == ["sidecar-0", "sidecar-1"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["engine-dir"] == {"name": "engine-dir", "emptyDir": {}}
    assert builders.ENGINE_DIR_MOUNT == contract.DEFAULT_ENGINE_DIR
    assert builders.PLACEMENT_MOUNT == contract.DEFAULT_PLACEMENT_DIR
    env = {var["name"]: var["value"] for var in engine["env"]}
    assert env[contract.PLACEMENT_DIR_ENV] == builders.PLACEMENT_MOUNT
    assert env[contract.ENGINE_DIR_ENV] == builders.ENGINE_DIR_MOUNT
    assert env["A"] == "1"
    assert (env.get("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR") == builders.ENGINE_DIR_MOUNT) == (kind == "sglang")
    assert {"name": "engine-dir", "mountPath": builders.ENGINE_DIR_MOUNT} in engine["volumeMounts"]
    parser = argparse.ArgumentParser()
    sidecar.add_arguments(parser)
    loads = {}
    for ordinal in (0, 1):
        for local, container in enumerate(sidecars):
            argv = run_container_command(container, ordinal, tmp_path)
            assert argv[:3] == ["-m", "moe_agent.engines", "sidecar"]
            args = parser.parse_args(argv[3:])
            assert args.rank == ordinal * 2 + local and args.host == "0.0.0.0"
            assert args.port == container["ports"][0]["containerPort"] == 9400 + local
            assert container["ports"][0]["name"] == f"rank-{local}"
            assert container["readinessProbe"]["httpGet"]["port"] == args.port
            assert str(args.placement_dir) == builders.PLACEMENT_MOUNT
            assert str(args.engine_dir) == builders.ENGINE_DIR_MOUNT
            assert str(args.token_file) == f"{builders.TOKEN_MOUNT}/token"
            assert args.interval == 5.0  # agentArgs reach the sidecars
            loads[args.rank] = (args.loads, args.sglang_url)
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts["engine-dir"]["mountPath"] == builders.ENGINE_DIR_MOUNT
            assert mounts["engine-dir"]["readOnly"] == (kind == "vllm")  # SGLang's rank 0 deletes the dumps
            assert mounts["placement"]["readOnly"] and mounts["agent-token"]["readOnly"]
    if kind == "vllm":
        assert loads == {rank: ("vllm", None) for rank in range(4)}
    else:
        assert loads == {0: ("sglang-dumps", builders.SGLANG_URL), 1: ("none", None), 2: ("none", None),
                         3: ("none", None)}
    # The replay agents' engine directory and variables are not there for engineKind agent.
    agent_pod = builders.build_engine_statefulset(OWNER, resolved(serving={"engine": {"image": "x"}}))
    assert "engine-dir" not in {v["name"] for v in agent_pod["spec"]["template"]["spec"]["volumes"]}
    agent_env = {var["name"] for var in agent_pod["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert agent_env == {"MOEPLACE_PLACEMENT"}


def test_podmonitor_labels_agents_series_with_namespace_and_deployment():
    monitor = builders.build_podmonitor(OWNER, resolved())
    assert monitor["kind"] == "PodMonitor" and monitor["metadata"]["name"] == "demo-agents"
    # The pods the operator's StatefulSet runs carry the selector's label.
    pod_labels = builders.build_engine_statefulset(OWNER, resolved(serving={"engine": {"image": "x"}}))[
        "spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ["rank-0", "rank-1"]
    for endpoint in endpoints:
        # Static labels (no source label): the chart's recording rules and dashboard and
        # spec.metrics.matchLabels select the agents' series by them.
        assert endpoint["relabelings"] == [
            {"targetLabel": "namespace", "replacement": "ns", "action": "replace"},
            {"targetLabel": "deployment", "replacement": "demo", "action": "replace"},
        ]
    assert relabel({"__address__": "10.0.0.1:9400", "rank": "0"}, endpoints[0]["relabelings"]) == {
        "__address__": "10.0.0.1:9400", "rank": "0", "namespace": "ns", "deployment": "demo",
    }


def test_podmonitor_labels_a_leaderworkersets_series_with_their_group():
    spec = resolved(serving={"workloadRef": {"kind": "LeaderWorkerSet", "name": "vllm"}})
    (endpoint, _) = builders.build_podmonitor(OWNER, spec)["spec"]["podMetricsEndpoints"]
    discovered = {"__address__": "10.0.0.1:9400", "rank": "1", builders.LWS_GROUP_INDEX_META: "1"}
    assert relabel(discovered, endpoint["relabelings"])["group"] == "1"


def relabel(labels: dict[str, str], relabelings: list[dict]) -> dict[str, str]:
    """Prometheus' ``replace`` relabeling (the defaults prometheus-operator leaves in place: source
    labels joined by ``;``, regex ``(.*)`` anchored, replacement ``$1``)."""
    out = dict(labels)
    for rule in relabelings:
        assert rule.get("action", "replace") == "replace"
        value = ";".join(out.get(name, "") for name in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            out[rule["targetLabel"]] = match.expand(rule.get("replacement", "$1").replace("$1", r"\1"))
    return out


def test_prometheusrule_has_the_charts_alerts_with_the_deployments_thresholds():
    alerts = {"imbalanceThreshold": 1.7, "migrationStalledSeconds": 900, "metricsMissingSeconds": 90}
    rule = builders.build_prometheusrule(OWNER, resolved(alerts=alerts))
    assert rule["kind"] == "PrometheusRule" and rule["metadata"]["name"] == "demo-alerts"
    assert rule["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    (group,) = rule["spec"]["groups"]
    marker, *rules = group["rules"]
    # The marker by which the chart's copies of these alerts skip this deployment.
    assert marker == {"record": builders.DEPLOYMENT_ALERTS_MARKER, "expr": "vector(1)",
                      "labels": {"namespace": "ns", "deployment": "demo"}}
    by_name = {r["alert"]: r for r in rules}
    # The chart's names (charts/moeplace/files/rules.yaml), so one runbook each and no second alert.
    assert list(by_name) == ["MoEPlaceImbalanceHigh", "MoEPlaceMigrationStalled", "MoEPlaceMetricsMissing"]
    scope = '{namespace="ns", deployment="demo"}'
    for alert in rules:
        assert alert["annotations"]["runbook_url"] == (
            f"https://github.com/moeplace/moeplace/blob/main/docs/runbooks/{alert['alert']}.md"
        )
        assert "moeplace_operator_" in alert["expr"]
        for metric in re.findall(r"moeplace_operator_[a-z_]+", alert["expr"]):
            assert f"{metric}{scope}" in alert["expr"], (alert["alert"], metric)
        assert builders.DEPLOYMENT_ALERTS_MARKER not in alert["expr"]
    imbalance = by_name["MoEPlaceImbalanceHigh"]
    assert imbalance["expr"] == f"moeplace_operator_imbalance{scope} > 1.7"
    assert imbalance["for"] == "10m" and "threshold 1.7" in imbalance["annotations"]["description"]
    stalled = by_name["MoEPlaceMigrationStalled"]
    assert f"moeplace_operator_migration_in_progress{scope}[15m]" in stalled["expr"]
    assert "offset 15m" in stalled["expr"] and stalled["expr"].endswith(") < 900")
    assert "for more than 15 minutes" in stalled["annotations"]["description"]
    missing = by_name["MoEPlaceMetricsMissing"]
    assert missing["for"] == "90s" and "for more than 90 seconds" in missing["annotations"]["description"]
    # Without spec.alerts: the CRD's defaults, the same alerts as the chart's rules file but scoped.
    default = builders.build_prometheusrule(OWNER, resolved())["spec"]["groups"][0]["rules"][1:]
    chart = builders.deployment_alert_rules()
    for scoped, fleet in zip(default, chart):
        assert scoped["annotations"] == fleet["annotations"] and scoped["labels"] == fleet["labels"]
        assert scoped.get("for") == fleet.get("for")
        assert fleet["expr"] == (
            scoped["expr"].replace(scope, "")
            + f" unless on (namespace, deployment) {builders.DEPLOYMENT_ALERTS_MARKER}"
        )
    with pytest.raises(ValueError):
        builders.deployment_alert_rules(namespace="ns")


@pytest.mark.parametrize(
    "seconds, promql, human",
    [(600, "10m", "10 minutes"), (300, "5m", "5 minutes"), (60, "1m", "1 minute"), (90, "90s", "90 seconds"),
     (1, "1s", "1 second"), (3600, "1h", "1 hour"), (5400, "90m", "90 minutes"), (604800, "7d", "7 days")],
)
def test_alert_durations(seconds, promql, human):
    assert builders.prometheus_duration(seconds) == promql
    assert builders.human_duration(seconds) == human




def test_inherited_labels_and_runbook_base_url_reach_every_object_but_no_selector(monkeypatch):
    """``--inherited-label release=kps`` (the label kube-prometheus-stack selects by) lands on every
    object the operator builds, never on a selector or pod template; ``--runbook-base-url`` on every
    runbook link of the per-deployment rule."""
    from moe_operator import settings

    monkeypatch.setattr(settings, "_current", settings.build_settings(
        inherited_labels={"release": "kps"}, runbook_base_url="https://runbooks.example.com/moe"))
    spec = resolved(serving={"engine": {"image": "x"}})
    published = placement()
    objects = [
        builders.build_podmonitor(OWNER, spec), builders.build_prometheusrule(OWNER, spec),
        builders.build_agents_service(OWNER, spec, {"a": "b"}), builders.build_engine_statefulset(OWNER, spec),
        builders.build_placement_configmap(OWNER, published, 0, "initial", spec),
        builders.build_migration_configmap(OWNER, builders.MigrationRecord(
            plan_id="p", max_copies_per_stage=4, source=published.physical_to_logical_map.tolist(),
            target=published.physical_to_logical_map.tolist(),
        )),
        builders.build_agent_token_secret(OWNER, "t", ""),
    ]
    for obj in objects:
        assert obj["metadata"]["labels"]["release"] == "kps", obj["kind"]
    monitor, rule, service, sts = objects[:4]
    assert "release" not in monitor["spec"]["selector"]["matchLabels"]
    assert "release" not in service["spec"]["selector"]
    assert "release" not in sts["spec"]["selector"]["matchLabels"]
    assert "release" not in sts["spec"]["template"]["metadata"]["labels"]
    urls = [r["annotations"]["runbook_url"] for r in rule["spec"]["groups"][0]["rules"] if "alert" in r]
    assert urls and all(url.startswith("https://runbooks.example.com/moe/MoEPlace") for url in urls)


def test_inherited_labels_are_checked():
    from moe_operator import settings

    with pytest.raises(ValueError, match="moeplace.io/deployment"):
        settings.build_settings(inherited_labels={"moeplace.io/deployment": "x"})
    with pytest.raises(ValueError, match="not a valid Kubernetes label value"):
        settings.build_settings(inherited_labels={"release": "a b"})
    with pytest.raises(ValueError, match="expected key=value"):
        settings.parse_label_pairs(["release"])
