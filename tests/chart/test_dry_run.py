"""The rendered chart against a real kube-apiserver 1.20 (tests/e2e's local control plane).

The chart's CRDs and stand-ins for the Prometheus Operator's CRDs are applied for real; every rendered
object of every values case is then applied with server-side apply and dryRun=All, so the API server
validates it (schemas, CRD structural schemas, RBAC references), and the answer must keep every field
the chart sent (1.20 silently drops unknown fields of built-in kinds and prunes unknown CR fields).
The RBAC is applied for real and SubjectAccessReviews check what the operator's service account may and
may not do. Last, a real `helm install` and `helm upgrade` (helm-python-sdk) of a release.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
CHART = HERE.parents[1] / "charts" / "moeplace"
CHART_CRDS = CHART / "crds"
MONITORING_CRDS = HERE / "fixtures" / "monitoring-crds.yaml"
FIELD_MANAGER = "moeplace-chart-test"
Manifest = dict[str, Any]


def crd_manifests() -> list[Manifest]:
    crds = [
        doc
        for path in sorted(CHART_CRDS.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    return crds + yaml.safe_load(MONITORING_CRDS.read_text())["items"]


def apply(dynamic: DynamicClient, obj: Manifest, dry_run: bool = False) -> Manifest:
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    answer = resource.server_side_apply(
        body=obj,
        namespace=obj["metadata"].get("namespace"),
        field_manager=FIELD_MANAGER,
        dry_run="All" if dry_run else None,
    )
    return answer.to_dict()


def dropped_fields(sent: Any, got: Any, path: str = "") -> list[str]:
    """Paths of fields in ``sent`` that ``got`` lacks or changed (``got`` may add defaults)."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [path or "."]
        return [
            p for key, value in sent.items() for p in dropped_fields(value, got.get(key), f"{path}.{key}")
        ]
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [path]
        return [
            p
            for i, (s, g) in enumerate(zip(sent, got, strict=True))
            for p in dropped_fields(s, g, f"{path}[{i}]")
        ]
    return [] if sent == got else [f"{path}: sent {sent!r}, got {got!r}"]


def wait_established(api: client.ApiClient, names: list[str], timeout: float = 30.0) -> None:
    extensions = client.ApiextensionsV1Api(api)
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            conditions = extensions.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                pending.discard(name)
        time.sleep(0.2)
    assert not pending, f"CRDs not established after {timeout:.0f}s: {sorted(pending)}"


@pytest.fixture(scope="module")
def admin(control_plane: Any) -> Iterator[client.ApiClient]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        yield api


@pytest.fixture(scope="module")
def dynamic(admin: client.ApiClient) -> DynamicClient:
    """A dynamic client that knows the chart's CRDs and the monitoring stand-ins (applied for real)."""
    crds = crd_manifests()
    assert any(crd["spec"]["group"] == "moeplace.io" for crd in crds), "the chart ships no moeplace.io CRD"
    bootstrap = DynamicClient(admin)
    for crd in crds:
        apply(bootstrap, crd)
    wait_established(admin, [crd["metadata"]["name"] for crd in crds])
    # Discovery is cached per client: a new one sees the new kinds.
    return DynamicClient(admin)


@pytest.fixture(scope="module")
def namespaces(dynamic: DynamicClient, render: Any) -> None:
    """Every namespace some values case renders into, created for real (the chart creates none)."""
    wanted = {"moeplace-system", "team-a", "team-b", "team-c", "monitoring"}
    for name in sorted(wanted):
        apply(dynamic, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def test_chart_crds_are_accepted_by_kube_apiserver_1_20(dynamic: DynamicClient) -> None:
    resource = dynamic.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    for crd in crd_manifests():
        stored = resource.get(name=crd["metadata"]["name"]).to_dict()
        assert not dropped_fields(crd["spec"], stored["spec"]), crd["metadata"]["name"]


def test_every_rendered_object_passes_server_side_dry_run(
    dynamic: DynamicClient, namespaces: None, render: Any, values: dict[str, Any]
) -> None:
    objects = render(values)
    assert objects
    for obj in objects:
        answer = apply(dynamic, obj, dry_run=True)
        where = f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
        assert answer["metadata"]["name"] == obj["metadata"]["name"], where
        dropped = [p for p in dropped_fields(obj, answer) if not p.startswith(".metadata.annotations")]
        assert not dropped, f"{where}: the API server dropped or changed {dropped}"


def can(
    admin: client.ApiClient, user: str, verb: str, group: str, resource: str, namespace: str | None
) -> bool:
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", f"system:serviceaccounts:{user.split(':')[2]}"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb,
                group=group,
                resource=resource.split("/")[0],
                subresource=resource.split("/")[1] if "/" in resource else None,
                namespace=namespace,
            ),
        )
    )
    return bool(client.AuthorizationV1Api(admin).create_subject_access_review(review).status.allowed)


def rule_triples(rules: list[Manifest]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def apply_rbac(dynamic: DynamicClient, objects: list[Manifest]) -> None:
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    for obj in objects:
        if obj["kind"] in kinds:
            apply(dynamic, obj)


def test_cluster_scoped_rbac_grants_exactly_the_operator_rules(
    admin: client.ApiClient, dynamic: DynamicClient, namespaces: None, render: Any
) -> None:
    objects = render({"fullnameOverride": "moeplace-cluster"})
    apply_rbac(dynamic, objects)
    user = "system:serviceaccount:moeplace-system:moeplace-cluster"
    rules = next(o for o in objects if o["kind"] == "ClusterRole")["rules"]
    for group, resource, verb in sorted(rule_triples(rules)):
        for namespace in ("team-a", "team-c"):
            assert can(admin, user, verb, group, resource, namespace), (verb, group, resource, namespace)
    assert not can(admin, user, "list", "", "secrets", "team-a")
    assert not can(admin, user, "create", "rbac.authorization.k8s.io", "rolebindings", "team-a")
    assert not can(admin, user, "delete", "moeplace.io", "moedeployments", "team-a")


def test_namespaced_rbac_stays_inside_the_watched_namespaces(
    admin: client.ApiClient, dynamic: DynamicClient, namespaces: None, render: Any
) -> None:
    objects = render(
        {
            "fullnameOverride": "moeplace-ns",
            "rbac": {"clusterScoped": False},
            "operator": {"watchNamespaces": ["team-a", "team-b"]},
        }
    )
    apply_rbac(dynamic, objects)
    user = "system:serviceaccount:moeplace-system:moeplace-ns"
    role_rules = rule_triples(next(o for o in objects if o["kind"] == "Role")["rules"])
    for group, resource, verb in sorted(role_rules):
        for namespace in ("team-a", "team-b"):
            assert can(admin, user, verb, group, resource, namespace), (verb, group, resource, namespace)
        assert not can(admin, user, verb, group, resource, "team-c"), (verb, group, resource, "team-c")
    assert not can(admin, user, "list", "", "secrets", "team-a")
    assert not [o for o in objects if o["kind"] in {"ClusterRole", "ClusterRoleBinding"}]


def test_rbac_rules_name_only_namespaced_resources(dynamic: DynamicClient, render: Any) -> None:
    """Namespaced RBAC puts every rule into Roles, which cannot grant cluster-scoped resources."""
    rules = next(o for o in render("default") if o["kind"] == "ClusterRole")["rules"]
    checked = 0
    for group, resource in sorted({(g, r.split("/")[0]) for g, r, _ in rule_triples(rules)}):
        # The core group's name is "" (which search() would ignore): ask for its only version.
        where = {"group": group} if group else {"api_version": "v1"}
        found = [r for r in dynamic.resources.search(name=resource, **where) if r.kind != "APIResourceList"]
        if not found:
            continue  # an optional API this server lacks (LeaderWorkerSet)
        assert all(r.namespaced for r in found), f"{resource}.{group} is cluster-scoped"
        checked += 1
    assert checked >= 5


def test_helm_install_then_upgrade(
    helm: Any, control_plane: Any, admin: client.ApiClient, dynamic: DynamicClient
) -> None:
    """A real release (helm-python-sdk's install and upgrade, not a dry run): the upgrade reaches the
    Deployment, and the chart holds no agent token (each MoEDeployment gets its own from the operator)."""
    namespace, release = "moeplace-release", "real"
    values = {"monitoring": {"enabled": True, "agents": {"podMonitor": True}}}
    core, apps = client.CoreV1Api(admin), client.AppsV1Api(admin)
    with helm.Config(kubeconfig_path=str(control_plane.kubeconfig), namespace=namespace) as helm_config:
        helm_config.install(
            str(CHART), release, values, namespace=namespace, create_namespace=True, timeout=60
        )
        upgraded = {**values, "operator": {"logLevel": "debug"}}
        helm_config.upgrade(str(CHART), release, upgraded, namespace=namespace, timeout=60)
    assert not [s for s in core.list_namespaced_secret(namespace).items if "agent-token" in s.metadata.name]
    container = apps.read_namespaced_deployment("real-moeplace", namespace).spec.template.spec.containers[0]
    assert "--log-level=debug" in container.args


def test_operator_monitoring_objects_pass_server_side_dry_run(dynamic: DynamicClient, namespaces: None) -> None:
    """The PodMonitor and PrometheusRule the operator creates per MoEDeployment (moe_operator.builders)
    fit the monitoring CRDs' schemas: nothing pruned (a relabeling or rule field the real CRDs lack
    would be)."""
    builders = pytest.importorskip("moe_operator.builders", reason="moe_operator not importable")
    from moe_operator.crd import resolve_spec

    owner = {
        "apiVersion": "moeplace.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "00000000-0000-0000-0000-000000000001"},
    }
    spec = {
        "model": {"shape": {"numLayers": 2, "numExperts": 8, "topK": 2, "hiddenSize": 64, "expertIntermediateSize": 32}},
        "topology": {"nodes": 1, "gpusPerNode": 2},
        "alerts": {"imbalanceThreshold": 1.25, "migrationStalledSeconds": 5400, "metricsMissingSeconds": 90},
    }
    resolved = resolve_spec(spec)
    for obj in (builders.build_podmonitor(owner, resolved), builders.build_prometheusrule(owner, resolved)):
        answer = apply(dynamic, obj, dry_run=True)
        dropped = [p for p in dropped_fields(obj, answer) if not p.startswith(".metadata.annotations")]
        assert not dropped, f"{obj['kind']}: the API server dropped or changed {dropped}"


def test_operator_objects_carry_the_charts_monitoring_labels(
    dynamic: DynamicClient, namespaces: None, render: Any
) -> None:
    """The chart's monitoring.labels and runbookBaseURL, passed as operator flags (parsed by the
    operator's own parser), land on the PodMonitor and PrometheusRule the operator creates per
    MoEDeployment, and the API server keeps them."""
    import argparse

    builders = pytest.importorskip("moe_operator.builders", reason="moe_operator not importable")
    from moe_operator import run, settings
    from moe_operator.crd import resolve_spec

    objects = render("production")
    container = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    previous = settings.configure(run.settings_from_args(parser.parse_args(container["args"][1:])))
    try:
        owner = {
            "apiVersion": "moeplace.io/v1alpha1", "kind": "MoEDeployment",
            "metadata": {"name": "labelled", "namespace": "team-a", "uid": "00000000-0000-0000-0000-000000000002"},
        }
        resolved = resolve_spec({
            "model": {"shape": {"numLayers": 2, "numExperts": 8, "topK": 2, "hiddenSize": 64,
                                "expertIntermediateSize": 32}},
            "topology": {"nodes": 1, "gpusPerNode": 2},
        })
        built = [builders.build_podmonitor(owner, resolved), builders.build_prometheusrule(owner, resolved),
                 builders.build_agent_token_secret(owner, "t", "")]
    finally:
        settings.configure(previous)
    for obj in built:
        answer = apply(dynamic, obj, dry_run=True)
        assert answer["metadata"]["labels"]["release"] == "kube-prometheus-stack", obj["kind"]
    rules = built[1]["spec"]["groups"][0]["rules"]
    assert all(r["annotations"]["runbook_url"].startswith("https://runbooks.example.com/moeplace/")
               for r in rules if "alert" in r)
