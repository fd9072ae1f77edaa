"""The Helm chart rendered offline with helm-python-sdk: lint, the objects' shape for each values
case, and the repository files the chart must stay equal to (CRDs, RBAC, rules, runbooks, metrics)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "moeplace"
RULES_FILE = CHART / "files" / "rules.yaml"
DASHBOARD_FILE = CHART / "files" / "dashboard.json"
RUNBOOKS = REPO_ROOT / "docs" / "runbooks"
METRIC_DOCS = [REPO_ROOT / "docs" / "agent-api.md", REPO_ROOT / "docs" / "operator-metrics.md"]
DEFAULT_RUNBOOK_BASE = "https://github.com/moeplace/moeplace/blob/main/docs/runbooks/"
RELEASE_NAMESPACE = "moeplace-system"
# The operator's cluster-wide RBAC in the repository, which the chart's rules must equal.
DEPLOY_RBAC = REPO_ROOT / "deploy" / "rbac.yaml"
# The chart's RBAC rules: deploy/rbac.yaml's, byte for byte.
RBAC_RULES_FILE = CHART / "files" / "rbac-rules.yaml"

# What the chart promises to alert on: each needs a runbook and promtool unit tests.
EXPECTED_ALERTS = {
    "MoEPlaceImbalanceHigh",
    "MoEPlaceMigrationStalled",
    "MoEPlaceMetricsMissing",
    "MoEPlaceSolverFailing",
    "MoEPlaceSolverTimingOut",
    "MoEPlaceAgentUnreachable",
}

Manifest = dict[str, Any]


def by_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def operator_container(objects: list[Manifest]) -> Manifest:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def rule_triples(rules: list[Manifest]) -> set[tuple[str, str, str]]:
    """RBAC rules flattened to (apiGroup, resource, verb), so equal grants compare equal."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def alerts() -> list[Manifest]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def metric_names(expr: str) -> set[str]:
    """moeplace metric and recording-rule names in a PromQL expression, histogram suffixes removed."""
    names = set(re.findall(r"\bmoeplace[a-z0-9_:]*", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


def test_chart_lints_clean(helm: Any, values: dict[str, Any]) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=RELEASE_NAMESPACE, kube_version="v1.20.2")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert not report["errors"] and not problems, report


def test_operator_runs_once_non_root_read_only_with_liveness(render: Any, values: dict[str, Any]) -> None:
    objects = render(values)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0

    container = operator_container(objects)
    assert container["args"][0] == "operator"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # A writable /tmp, since the root filesystem is not.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]

    # The probe asks kopf's liveness endpoint, on the port the operator was told to serve it.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert f"--liveness=http://0.0.0.0:{ports[probe['port']]}/healthz" in container["args"]
    assert f"--metrics-port={ports['metrics']}" in container["args"]


def test_default_values_watch_all_namespaces_and_carry_no_shared_agent_token(render: Any) -> None:
    objects = render("default")
    container = operator_container(objects)
    assert "--all-namespaces" in container["args"]
    assert not [arg for arg in container["args"] if arg.startswith("--namespace")]
    assert container["image"] == "ghcr.io/moeplace/moeplace:0.1.0"

    # Each MoEDeployment's agents get their own token from the operator: the chart holds none.
    assert not by_kind(objects, "Secret")
    assert not [env for env in container["env"] if "TOKEN" in env["name"]]
    assert "--agent-host-override" not in container["args"]
    assert not [arg for arg in container["args"] if arg.startswith(("--prometheus-ca", "--prometheus-insecure"))]
    assert one(objects, "ServiceAccount")["metadata"]["name"] == "moeplace"


def test_custom_image_resources_and_existing_service_account(render: Any) -> None:
    objects = render("custom-image-resources")
    container = operator_container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    # A digest pins the image and wins over the tag.
    assert container["image"] == (
        "registry.example.com/ml/moeplace@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert container["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "4", "memory": "4Gi"},
    }
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
    assert "--prometheus-url=http://prometheus.monitoring.svc:9090" in container["args"]
    assert container["args"][-1] == "--solver-workers=2"

    assert not by_kind(objects, "Secret") and not by_kind(objects, "ServiceAccount")
    assert pod["serviceAccountName"] == "moeplace-operator"
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "moeplace-operator", "namespace": RELEASE_NAMESPACE}
    ]


def test_cluster_scoped_rbac_binds_one_cluster_role(render: Any) -> None:
    objects = render("default")
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    role = one(objects, "ClusterRole")
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "moeplace", "namespace": RELEASE_NAMESPACE}
    ]


def test_namespaced_rbac_grants_the_same_rules_per_watched_namespace(render: Any) -> None:
    values = {"rbac": {"clusterScoped": False}, "operator": {"watchNamespaces": ["team-a", "team-b"]}}
    cluster_rules = rule_triples(one(render("default"), "ClusterRole")["rules"])
    objects = render(values)
    roles = by_kind(objects, "Role")
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    for role in roles:
        assert rule_triples(role["rules"]) == cluster_rules
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == RELEASE_NAMESPACE

    args = operator_container(objects)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    # The agents' PodMonitor looks in the same namespaces.
    monitored = render({**values, "monitoring": {"enabled": True, "agents": {"podMonitor": True}}})
    assert one(monitored, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_namespaced_rbac_without_namespaces_watches_the_release_namespace(render: Any) -> None:
    objects = render({"rbac": {"clusterScoped": False}})
    assert [r["metadata"]["namespace"] for r in by_kind(objects, "Role")] == [RELEASE_NAMESPACE]
    assert f"--namespace={RELEASE_NAMESPACE}" in operator_container(objects)["args"]


def test_rbac_is_least_privilege(render: Any) -> None:
    triples = rule_triples(one(render("default"), "ClusterRole")["rules"])
    assert triples
    assert not [t for t in triples if "*" in t], "no wildcards"
    assert not [t for t in triples if t[1] in {"pods/exec", "clusterroles", "roles", "rolebindings"}]
    # Agents' tokens are read by name (each MoEDeployment's token Secret), created and rotated, never
    # listed, watched or deleted.
    assert {verb for _, resource, verb in triples if resource == "secrets"} == {"get", "create", "patch"}
    assert not [t for t in triples if t[2] in {"escalate", "bind", "impersonate"}]


def deploy_rbac_rules_text() -> str:
    """What follows ``rules:`` in deploy/rbac.yaml, as text."""
    assert DEPLOY_RBAC.exists(), f"{DEPLOY_RBAC.relative_to(REPO_ROOT)} (the operator's RBAC) is missing"
    _, separator, rules = DEPLOY_RBAC.read_text().partition("\nrules:\n")
    assert separator, f"{DEPLOY_RBAC.relative_to(REPO_ROOT)} has no top-level rules:"
    return rules


def test_chart_rbac_rules_file_is_byte_equal_to_deploy_rbac() -> None:
    """The chart's rules are files/rbac-rules.yaml, which must be deploy/rbac.yaml's rules verbatim
    (comments included): one set of rules, two ways to install it."""
    fix = f"copy what follows `rules:` in deploy/rbac.yaml to {RBAC_RULES_FILE.relative_to(REPO_ROOT)}"
    assert RBAC_RULES_FILE.read_text() == deploy_rbac_rules_text(), fix
    documents = [doc for doc in yaml.safe_load_all(DEPLOY_RBAC.read_text()) if doc]
    assert [doc["kind"] for doc in documents] == ["ClusterRole"]


def test_rbac_equals_the_repository_deploy_rbac(render: Any) -> None:
    documents = [doc for doc in yaml.safe_load_all(DEPLOY_RBAC.read_text()) if doc]
    deploy_rules = [rule for doc in documents if doc["kind"] == "ClusterRole" for rule in doc["rules"]]
    # Exactly the same rules, in the same order, in the ClusterRole and in every namespaced Role.
    assert one(render("default"), "ClusterRole")["rules"] == deploy_rules
    namespaced = render({"rbac": {"clusterScoped": False}, "operator": {"watchNamespaces": ["a", "b"]}})
    assert [role["rules"] for role in by_kind(namespaced, "Role")] == [deploy_rules, deploy_rules]
    # What the operator needs beyond its own objects: agents' tokens by name, LeaderWorkerSets read
    # only, its monitoring objects.
    triples = rule_triples(deploy_rules)
    assert ("", "secrets", "get") in triples
    assert {v for g, r, v in triples if r == "leaderworkersets"} == {"get"}
    for resource in ("podmonitors", "prometheusrules"):
        assert {"get", "create", "patch"} <= {v for g, r, v in triples if (g, r) == ("monitoring.coreos.com", resource)}


def test_chart_crds_equal_the_repository_crds() -> None:
    repo = {path.name: path.read_text() for path in (REPO_ROOT / "crds").glob("*.yaml")}
    chart = {path.name: path.read_text() for path in (CHART / "crds").glob("*.yaml")}
    assert repo, "the repository's crds/ holds no CRD"
    fix = "run `make generate` (after removing stale files there)"
    assert sorted(chart) == sorted(repo), f"charts/moeplace/crds/ holds other files than crds/: {fix}"
    stale = sorted(name for name in repo if chart[name] != repo[name])
    assert not stale, f"charts/moeplace/crds/ differs from crds/ in {stale}: {fix}"


def test_chart_crd_equals_the_models() -> None:
    """The chart's CRD is the one generated from moe_operator/crd.py, not only a copy of crds/ (which
    tests/operator/test_crd_in_sync.py checks against the same models)."""
    crd = pytest.importorskip("moe_operator.crd", reason="moe_operator not importable (PYTHONPATH=operator:agent)")
    path = CHART / "crds" / crd.CRD_FILE
    assert path.read_text() == crd.crd_yaml(), "run `make generate`"


def test_monitoring_is_off_by_default_and_the_agents_pod_monitor_opt_in(render: Any) -> None:
    objects = render("default")
    assert not [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert not by_kind(objects, "ConfigMap")
    # The operator creates a PodMonitor per MoEDeployment; the chart's would scrape agents twice.
    kinds = {o["kind"] for o in render({"monitoring": {"enabled": True}})}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds and "PodMonitor" not in kinds


def test_monitoring_objects(render: Any) -> None:
    objects = render("monitoring")
    service = one(objects, "Service")
    service_monitor = one(objects, "ServiceMonitor")
    pod_monitor = one(objects, "PodMonitor")
    rule = one(objects, "PrometheusRule")
    for obj in (service_monitor, pod_monitor, rule):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    # The ServiceMonitor selects the operator's Service and a port it has; the operator's own
    # `namespace` label must win over the target's.
    selector = service_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    endpoint = service_monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["honorLabels"] is True
    assert service_monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}

    # Every agent port of the MoEDeployments' pods, with the deployment's name as a label.
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    assert pod_monitor["spec"]["selector"] == {
        "matchExpressions": [{"key": "moeplace.io/deployment", "operator": "Exists"}]
    }
    keep, deployment = pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert keep == {
        "sourceLabels": ["__meta_kubernetes_pod_container_port_name"],
        "regex": "rank-[0-9]+",
        "action": "keep",
    }
    assert deployment == {
        "sourceLabels": ["__meta_kubernetes_pod_label_moeplace_io_deployment"],
        "targetLabel": "deployment",
    }

    dashboard = one(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert json.loads(dashboard["data"]["moeplace.json"]) == json.loads(DASHBOARD_FILE.read_text())


def test_prometheus_rule_spec_is_the_rules_file(render: Any) -> None:
    rule = one(render({"monitoring": {"enabled": True}}), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())

    relinked = one(render("monitoring"), "PrometheusRule")
    for alert in (r for g in relinked["spec"]["groups"] for r in g["rules"] if "alert" in r):
        assert (
            alert["annotations"]["runbook_url"]
            == f"https://runbooks.example.com/moeplace/{alert['alert']}.md"
        )


def test_alerts_follow_kube_prometheus_conventions_and_have_runbooks() -> None:
    found = alerts()
    assert {a["alert"] for a in found} == EXPECTED_ALERTS
    for alert in found:
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert alert["annotations"]["summary"].endswith("."), name
        assert "{{ $labels.namespace }}/{{ $labels.deployment }}" in alert["annotations"]["description"], name
        assert alert["annotations"]["runbook_url"] == f"{DEFAULT_RUNBOOK_BASE}{name}.md"
        runbook = RUNBOOKS / f"{name}.md"
        assert runbook.exists(), f"missing runbook {runbook.relative_to(REPO_ROOT)}"
        text = runbook.read_text()
        for section in ("## Meaning", "## Check", "## Fix"):
            assert section in text, f"{runbook.name} lacks {section}"


def test_spec_alerts_alerts_are_generated_from_the_operators_definition() -> None:
    """MoEPlaceImbalanceHigh, MoEPlaceMigrationStalled and MoEPlaceMetricsMissing are defined once, in
    moe_operator.builders: the rules file holds them with the CRD's default thresholds, the operator's
    per-deployment PrometheusRule with the deployment's (tests/operator/test_builders.py)."""
    builders = pytest.importorskip("moe_operator.builders", reason="moe_operator not importable")
    expected = builders.deployment_alert_rules()
    found = [alert for alert in alerts() if alert["alert"] in builders.DEPLOYMENT_ALERTS]
    assert found == expected, (
        "charts/moeplace/files/rules.yaml: the spec.alerts alerts differ from "
        "moe_operator.builders.deployment_alert_rules(); they should read:\n"
        + yaml.safe_dump(expected, sort_keys=False, width=100)
    )
    assert set(builders.DEPLOYMENT_ALERTS) <= EXPECTED_ALERTS
    # The chart's copies skip deployments whose own rule records the marker.
    for alert in found:
        assert alert["expr"].endswith(f"unless on (namespace, deployment) {builders.DEPLOYMENT_ALERTS_MARKER}")


def test_every_alert_has_a_promtool_unit_test() -> None:
    tests = yaml.safe_load((Path(__file__).parent / "rules_test.yaml").read_text())["tests"]
    for name in EXPECTED_ALERTS:
        cases = [c for t in tests for c in t.get("alert_rule_test", []) if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in cases), f"{name}: no case where it stays silent"


def test_rules_and_dashboard_use_only_documented_metrics() -> None:
    documented = {
        name for doc in METRIC_DOCS for name in re.findall(r"`(moeplace_[a-z0-9_]+)`", doc.read_text())
    }
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    # ... and what the operator's per-deployment PrometheusRule records.
    recorded.add("moeplace:deployment_alerts:info")
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    used = set().union(*(metric_names(expr) for expr in exprs))
    assert used - documented - recorded == set()


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] == "moeplace"
    panels = {panel["title"]: panel for panel in dashboard["panels"] if panel["type"] != "row"}
    assert panels["Token imbalance per layer"]["type"] == "heatmap"
    for title in (
        "Max activated experts per GPU",
        "Cross-GPU and cross-node traffic",
        "Migration steps",
        "Solve time",
    ):
        assert title in panels
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "deployment"}
    for panel in panels.values():
        for target in panel["targets"]:
            assert 'namespace="$namespace", deployment="$deployment"' in target["expr"], panel["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_value_is_documented() -> None:
    """Each value of values.yaml, or a map it belongs to, has a row in docs/chart.md."""
    documented = set(re.findall(r"`([A-Za-z0-9_.]+)`", (REPO_ROOT / "docs" / "chart.md").read_text()))

    def undocumented(node: Any, path: str) -> list[str]:
        if path in documented:
            return []
        if isinstance(node, dict) and node:
            return [
                p
                for key, value in node.items()
                for p in undocumented(value, f"{path}.{key}" if path else key)
            ]
        return [path]

    assert undocumented(yaml.safe_load((CHART / "values.yaml").read_text()), "") == []


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"monitoring": {"enable": True}}, "additional properties 'enable'"),
        ({"rbac": {"clusterScoped": "false"}}, "/rbac/clusterScoped"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"operator": {"prometheusURL": "prometheus:9090"}}, "/operator/prometheusURL"),
    ],
)
def test_values_schema_rejects_misspelt_and_mistyped_values(
    render: Any, helm: Any, bad: dict[str, Any], where: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(bad)


def operator_settings(objects: list[Manifest]) -> Any:
    """The operator-wide settings the rendered Deployment's arguments give ``moeplace operator``,
    parsed by the operator's own parser."""
    import argparse

    run = pytest.importorskip("moe_operator.run", reason="moe_operator not importable")
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return run.settings_from_args(parser.parse_args(operator_container(objects)["args"][1:]))


def test_monitoring_labels_and_runbooks_reach_the_operators_objects(render: Any) -> None:
    """monitoring.labels (kube-prometheus-stack's `release`) and monitoring.runbookBaseURL become
    operator flags, so the PodMonitor and PrometheusRule the operator creates per MoEDeployment carry
    the labels Prometheus selects by and link the same runbooks as the chart's rules."""
    settings = operator_settings(render("production"))
    assert settings.inherited_labels == {"release": "kube-prometheus-stack"}
    assert settings.runbook_base_url == "https://runbooks.example.com/moeplace/"
    assert operator_settings(render("default")).inherited_labels == {}


def test_prometheus_ca_from_a_config_map_and_service_account_auth(render: Any) -> None:
    objects = render("production")
    settings = operator_settings(objects).prometheus
    assert settings.ca_file == "/etc/moeplace/prometheus-ca/ca.crt" and not settings.insecure_skip_verify
    assert settings.bearer_token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    container = operator_container(objects)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "prometheus-ca")
    assert settings.ca_file.startswith(mount["mountPath"] + "/")
    volume = next(v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "prometheus-ca")
    assert volume["configMap"] == {"name": "serving-ca", "items": [{"key": "service-ca.crt", "path": "ca.crt"}]}
    assert operator_settings(render("default")).prometheus.verify() is True


def test_agent_network_policy_admits_the_operator_agents_and_prometheus_to_agent_ports(render: Any) -> None:
    objects = render("production")
    policies = by_kind(objects, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]
    operator_labels = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    for policy in policies:
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        agents, opened = spec["ingress"]
        assert [p["port"] for p in agents["ports"]] == [9400, 9401, 9402, 9403]
        operator, peers, prometheus = agents["from"]
        assert operator["podSelector"]["matchLabels"] == operator_labels
        assert operator["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": RELEASE_NAMESPACE}}
        assert peers == {"podSelector": spec["podSelector"]}
        assert prometheus["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
        assert opened == {"ports": [{"port": 8000, "protocol": "TCP"}]}
    assert not by_kind(render("default"), "NetworkPolicy")


def test_agent_network_policy_needs_namespaces_when_watching_all(render: Any, helm: Any) -> None:
    with pytest.raises(Exception, match="agentNetworkPolicy.namespaces"):
        render({"agentNetworkPolicy": {"enabled": True}})
