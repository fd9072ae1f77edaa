"""What a multi-tenant production cluster needs of the operator, on the real kube-apiserver 1.20:

* RBAC (deploy/rbac.yaml, checked with SubjectAccessReviews): token Secrets by name, EndpointSlices;
  never a Secret list;
* each MoEDeployment's own agent token Secret (owned, labelled, rotated on request); a
  ``tokenSecretRef`` only when the Secret is labelled for that deployment;
* the operator as a process, with its user bound only to deploy/rbac.yaml: a capture server announced
  as one tenant's agents receives that tenant's token and never another's; an Endpoints object's
  ``moeplace.io/agent-host`` annotation redirects nothing unless the operator opts in;
* agents found from EndpointSlices when ``discovery.k8s.io/v1`` is served, else from Endpoints (1.20);
* a LeaderWorkerSet with 2 groups x 2 nodes x 2 GPUs: pods named and labelled as LWS makes them, the
  Endpoints and EndpointSlices as Kubernetes' controllers write them, 2 groups of 4 ranks;
* Prometheus behind TLS with a self-signed CA: queries work with the CA file and fail with reason
  ``PrometheusTLS`` without it.

The LeaderWorkerSet CRD is kubernetes-sigs/lws's published one (tests/e2e/fixtures/leaderworkerset-crd.yaml),
trimmed: the 1.3 MB of embedded PodTemplateSpec schema under spec.leaderWorkerTemplate is left open
(the file's header says why and what else is verbatim).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e_support import (
    LWS_GROUP,
    LWS_LABELS,
    LWS_VERSION,
    Api,
    install_lws_crd,
    lws_object,
    lws_pods,
    manifest,
    raw,
    wait_for,
)
from moe_operator import builders
from moe_operator.credentials import AgentTokenError, deployment_token, secret_value
from moe_operator.crd import resolve_spec
from moe_operator.discovery import agent_objects, agents_from_endpoint_slices, discover_agents
from moe_operator.kube import Kube, load_config
from moe_operator.metrics_source import MetricsUnavailable, fetch_load
from moe_operator.settings import PrometheusAuth
from moeplace_dev.cluster import free_port
from moeplace_dev.localstack import subprocess_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def admin(control_plane: Any) -> Api:
    api = Api(control_plane.kubeconfig)
    api.install_crd()
    api.bind_operator_role("operator")
    return api


@pytest.fixture(scope="module")
def operator_kubeconfig(control_plane: Any, admin: Api) -> Path:
    """The operator's user, bound to deploy/rbac.yaml's ClusterRole and nothing else."""
    return control_plane.kubeconfig_for("operator")


def kube_for(kubeconfig: Path) -> Kube:
    return Kube(load_config(str(kubeconfig)))


def create_deployment(admin: Api, namespace: str, name: str, **sections: dict[str, Any]) -> dict[str, Any]:
    admin.namespace(namespace)
    return admin.create(namespace, manifest(name, namespace, "http://127.0.0.1:9", **sections))


def secret(admin: Api, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return admin.api_client.sanitize_for_serialization(admin.core.read_namespaced_secret(name, namespace))
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


# --------------------------------------------------------------------------------------------------
# RBAC


def allowed(admin: Api, verb: str, group: str, resource: str, namespace: str) -> bool:
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user="operator",
            groups=["system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=group, resource=resource, namespace=namespace
            ),
        )
    )
    return bool(client.AuthorizationV1Api(admin.api_client).create_subject_access_review(review).status.allowed)


def test_operator_rbac_reads_creates_and_rotates_token_secrets_by_name_and_reads_endpoint_slices(
    admin: Api, operator_kubeconfig: Path
) -> None:
    for verb in ("get", "create", "patch"):
        assert allowed(admin, verb, "", "secrets", "tenant-a"), verb
    for verb in ("list", "watch", "delete", "update"):
        assert not allowed(admin, verb, "", "secrets", "tenant-a"), verb
    for verb in ("get", "list", "watch"):
        assert allowed(admin, verb, "discovery.k8s.io", "endpointslices", "tenant-a"), verb
        assert allowed(admin, verb, "", "endpoints", "tenant-a"), verb
    assert not allowed(admin, "create", "discovery.k8s.io", "endpointslices", "tenant-a")
    assert not allowed(admin, "list", "", "pods", "tenant-a")


# --------------------------------------------------------------------------------------------------
# Per-deployment token


def test_each_deployment_gets_its_own_owned_token_secret_rotated_on_request(
    admin: Api, operator_kubeconfig: Path
) -> None:
    kube = kube_for(operator_kubeconfig)
    first = create_deployment(admin, "token-a", "model")
    other = create_deployment(admin, "token-b", "model")
    resolved = resolve_spec(first["spec"])

    token = asyncio.run(deployment_token(kube, first, resolved))
    other_token = asyncio.run(deployment_token(kube, other, resolved))
    assert len(token) >= 40 and token != other_token
    stored = secret(admin, "token-a", "model-agent-token")
    assert stored is not None and secret_value(stored, "token") == token
    assert stored["metadata"]["labels"][builders.LABEL_AGENT_TOKEN_FOR] == "model"
    assert stored["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]
    assert asyncio.run(deployment_token(kube, first, resolved)) == token  # stable

    admin.custom.patch_namespaced_custom_object(
        "moeplace.io", "v1alpha1", "token-a", "moedeployments", "model",
        {"metadata": {"annotations": {builders.ANNOTATION_ROTATE_TOKEN: "2026-12-02"}}},
    )
    rotated_body = admin.get("token-a", "model")
    rotated = asyncio.run(deployment_token(kube, rotated_body, resolved))
    assert rotated != token and asyncio.run(deployment_token(kube, rotated_body, resolved)) == rotated
    assert secret_value(secret(admin, "token-a", "model-agent-token"), "token") == rotated
    assert secret_value(secret(admin, "token-b", "model-agent-token"), "token") == other_token


def test_token_secret_ref_must_be_labelled_for_the_deployment(admin: Api, operator_kubeconfig: Path) -> None:
    """A tokenSecretRef cannot make the operator send an arbitrary Secret of the namespace out."""
    kube = kube_for(operator_kubeconfig)
    namespace = admin.namespace("token-ref")
    for name, labels in (("db-password", {}), ("for-other", {builders.LABEL_AGENT_TOKEN_FOR: "other"}),
                         ("for-model", {builders.LABEL_AGENT_TOKEN_FOR: "model"})):
        admin.core.create_namespaced_secret(namespace, {
            "metadata": {"name": name, "labels": labels}, "stringData": {"token": f"value-of-{name}"}})
    for name, expected in (("db-password", "not labelled"), ("for-other", "not labelled"), ("missing", "not found")):
        body = create_deployment(admin, namespace, f"model-{name}", metrics={"tokenSecretRef": {"name": name}})
        body["metadata"]["name"] = "model"
        with pytest.raises(AgentTokenError, match=expected):
            asyncio.run(deployment_token(kube, body, resolve_spec(body["spec"])))
    body = create_deployment(admin, namespace, "model", metrics={"tokenSecretRef": {"name": "for-model"}})
    assert asyncio.run(deployment_token(kube, body, resolve_spec(body["spec"]))) == "value-of-for-model"
    # A Secret squatting on the managed name is not taken over.
    squatter = create_deployment(admin, namespace, "squat")
    admin.core.create_namespaced_secret(namespace, {
        "metadata": {"name": "squat-agent-token"}, "stringData": {"token": "someone-elses"}})
    with pytest.raises(AgentTokenError, match="not labelled"):
        asyncio.run(deployment_token(kube, squatter, resolve_spec(squatter["spec"])))


# --------------------------------------------------------------------------------------------------
# The operator as a process: who receives which token


def host_address() -> str | None:
    """A non-loopback IPv4 address of this machine (Kubernetes refuses loopback in Endpoints)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))  # no packet is sent: this only picks the outgoing address
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


class Capture:
    """HTTP servers that record every request's path and Authorization header and answer 503."""

    def __init__(self, host: str, count: int) -> None:
        self.requests: list[tuple[int, str, str]] = []
        self.servers = []
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                capture.requests.append(
                    (self.server.server_address[1], self.path, self.headers.get("Authorization") or "")
                )
                body = json.dumps({"error": "capture server"}).encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *_args: Any) -> None:
                pass

        for _ in range(count):
            server = ThreadingHTTPServer((host, 0), Handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)
        self.host = host
        self.ports = [server.server_address[1] for server in self.servers]

    def tokens(self) -> set[str]:
        return {auth for _, _, auth in self.requests}

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def operator_process(operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``python -m moe_operator`` as the restricted user, without --agent-host-override."""
    workdir = tmp_path_factory.mktemp("operator")
    env = subprocess_env()
    env["MOEPLACE_WAIT_INTERVAL_S"] = "1"
    log = workdir / "operator.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moe_operator", "--kubeconfig", str(operator_kubeconfig), "--all-namespaces",
             "--prometheus-url", "http://127.0.0.1:9", "--solver-workers", "0"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    yield log
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
    print(log.read_text(errors="replace")[-3000:])


def test_agents_receive_only_their_own_deployments_token(admin: Api, operator_process: Path) -> None:
    """Two tenants' MoEDeployments of the same name; each tenant's Endpoints announce a capture server
    as its 4 agents. Each capture server receives its own tenant's token and never the other's. A
    third tenant announces placeholder addresses with ``moeplace.io/agent-host`` pointing at a
    capture server: the operator runs without --agent-host-override, so that server hears nothing."""
    host = host_address()
    if host is None:
        pytest.skip("no non-loopback IPv4 address to announce a capture server at")
    captures = {tenant: Capture(host, 4) for tenant in ("tenant-a", "tenant-b", "tenant-c")}
    try:
        for tenant in ("tenant-a", "tenant-b"):
            admin.namespace(tenant)
            ports = dict(enumerate(captures[tenant].ports))
            endpoints = builders.build_external_endpoints("model", tenant, {r: (host, p) for r, p in ports.items()})
            admin.core.create_namespaced_endpoints(tenant, endpoints)
        admin.namespace("tenant-c")
        redirect = builders.build_external_endpoints(
            "model", "tenant-c", {r: ("127.0.0.1", p) for r, p in enumerate(captures["tenant-c"].ports)})
        redirect["metadata"]["annotations"][builders.ANNOTATION_AGENT_HOST] = host
        admin.core.create_namespaced_endpoints("tenant-c", redirect)
        for tenant in captures:
            create_deployment(admin, tenant, "model")

        wait_for(lambda: all(len(captures[t].requests) >= 8 for t in ("tenant-a", "tenant-b")), 90,
                 "both tenants' capture servers called on every rank, twice")
        tokens = {t: secret_value(secret(admin, t, "model-agent-token"), "token") for t in ("tenant-a", "tenant-b")}
        assert tokens["tenant-a"] != tokens["tenant-b"]
        for tenant, own in tokens.items():
            assert captures[tenant].tokens() == {f"Bearer {own}"}, tenant
            assert {port for port, _, _ in captures[tenant].requests} == set(captures[tenant].ports)
        assert captures["tenant-c"].requests == []
        # tenant-c's deployment is reconciled (it has a phase) and still nothing reached its redirect.
        wait_for(lambda: admin.status("tenant-c", "model").get("phase"), 120, "tenant-c reconciled")
        assert not captures["tenant-c"].requests
    finally:
        for capture in captures.values():
            capture.stop()


# --------------------------------------------------------------------------------------------------
# Discovery: EndpointSlice or Endpoints, LeaderWorkerSet groups


def test_agents_come_from_endpoints_on_a_server_without_discovery_v1(admin: Api, operator_kubeconfig: Path) -> None:
    kube = kube_for(operator_kubeconfig)
    versions = asyncio.run(kube.served_versions("discovery.k8s.io"))
    assert versions and "v1" not in versions  # 1.20 serves discovery.k8s.io/v1beta1 only
    assert asyncio.run(agent_objects(kube)) == "Endpoints"


def test_leaderworkerset_groups_map_to_separate_rank_spaces(admin: Api, operator_kubeconfig: Path) -> None:
    """2 groups x 2 nodes x 2 GPUs: 2 groups of ranks 0..3, each rank at the pod LWS gave that
    group-index and worker-index, whether read from Endpoints or from EndpointSlices."""
    install_lws_crd(admin)
    namespace = admin.namespace("lws")
    admin.custom.create_namespaced_custom_object(LWS_GROUP, LWS_VERSION, namespace, "leaderworkersets",
                                                 lws_object("vllm", 2, 2))
    body = create_deployment(admin, namespace, "model",
                             serving={"workloadRef": {"kind": "LeaderWorkerSet", "name": "vllm"}})
    resolved = resolve_spec(body["spec"])
    kube = kube_for(operator_kubeconfig)
    workload = asyncio.run(kube.get_workload(namespace, "LeaderWorkerSet", "vllm"))
    service = builders.build_agents_service(body, resolved, builders.workload_selector(workload))
    asyncio.run(kube.ensure_service(service))

    for pod in lws_pods("vllm", 2, 2):
        admin.core.create_namespaced_pod(namespace, pod)
    selector = ",".join(f"{k}={v}" for k, v in service["spec"]["selector"].items())
    pods = admin.core.list_namespaced_pod(namespace, label_selector=selector).items
    assert len(pods) == 4
    ip = {pod.metadata.name: f"10.{pod.metadata.labels[f'{LWS_LABELS}/group-index']}.0."
          f"{10 + int(pod.metadata.labels[f'{LWS_LABELS}/worker-index'])}" for pod in pods}
    ports = [{"name": p["name"], "port": p["port"], "protocol": "TCP"} for p in service["spec"]["ports"]]
    refs = [{"kind": "Pod", "namespace": namespace, "name": pod.metadata.name, "uid": pod.metadata.uid}
            for pod in pods]
    # What the endpoints and endpointslice controllers write for the selected pods.
    admin.core.create_namespaced_endpoints(namespace, {
        "metadata": {"name": service["metadata"]["name"]},
        "subsets": [{"addresses": [{"ip": ip[r["name"]], "targetRef": r} for r in refs], "ports": ports}]})
    slices_path = f"/apis/discovery.k8s.io/v1beta1/namespaces/{namespace}/endpointslices"  # what 1.20 serves
    slice_body = {
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "model-agents-x1", "labels": {"kubernetes.io/service-name": "model-agents"}},
        "addressType": "IPv4", "ports": ports,
        "endpoints": [{"addresses": [ip[r["name"]]], "conditions": {"ready": True}, "targetRef": r} for r in refs],
    }
    raw(admin.api_client, "POST", slices_path, body=slice_body)
    stored_slices = raw(admin.api_client, "GET", slices_path,
                        query=[("labelSelector", "kubernetes.io/service-name=model-agents")])["items"]

    from_endpoints = asyncio.run(discover_agents(kube, namespace, "model", resolved))
    from_slices = agents_from_endpoint_slices(stored_slices, 2, resolved.spec.serving.workload_ref)
    assert from_endpoints.source == "Endpoints" and from_slices.source == "EndpointSlice"
    expected = {}
    for pod in pods:
        labels = pod.metadata.labels
        group, worker = int(labels[f"{LWS_LABELS}/group-index"]), int(labels[f"{LWS_LABELS}/worker-index"])
        for local in range(2):
            expected.setdefault(group, {})[worker * 2 + local] = f"http://{ip[pod.metadata.name]}:{9400 + local}"
    assert from_endpoints.groups == from_slices.groups == expected
    assert sorted(expected) == [0, 1] and all(sorted(ranks) == [0, 1, 2, 3] for ranks in expected.values())


# --------------------------------------------------------------------------------------------------
# Prometheus over TLS


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def self_signed_ca_and_server_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key): a CA, and a server certificate for 127.0.0.1 it signed."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=moeplace test CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=directory)
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


@pytest.fixture(scope="module")
def tls_prometheus(binaries: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(https URL, CA file) of a Prometheus serving TLS with a self-signed CA's certificate and
    scraping an exporter of a moving ``moeplace_expert_tokens_total``."""
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter

    workdir = tmp_path_factory.mktemp("tls-prometheus")
    ca, cert, key = self_signed_ca_and_server_certificate(workdir)
    registry = CollectorRegistry()
    tokens = Counter("moeplace_expert_tokens", "tokens", ["rank", "layer", "expert"], registry=registry)
    exporter_port = free_port()
    exporter, _thread = prometheus_client.start_http_server(exporter_port, "127.0.0.1", registry=registry)
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            for layer in range(4):
                for expert in range(16):
                    tokens.labels("0", str(layer), str(expert)).inc(10 + expert)
            time.sleep(0.2)

    threading.Thread(target=feed, daemon=True).start()
    (workdir / "web.yml").write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    (workdir / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n"
        f"  - job_name: agents\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n")
    port = free_port()
    process = subprocess.Popen(
        [str(binaries.prometheus),
         f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", f"--web.config.file={workdir / 'web.yml'}"],
        stdout=open(workdir / "prometheus.log", "wb"), stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        auth = PrometheusAuth(ca_file=str(ca))

        def has_load() -> bool:
            try:
                return fetch_load(url, 10, {}, 4, 16, 1, auth=auth)[1].used == 64
            except MetricsUnavailable:
                return False

        wait_for(has_load, 60, "the TLS Prometheus to hold 10 s of load")
        yield url, ca
    finally:
        stop.set()
        process.terminate()
        process.wait(20)
        exporter.shutdown()


def test_prometheus_over_tls_works_with_the_ca_file(tls_prometheus: tuple[str, Path]) -> None:
    url, ca = tls_prometheus
    load, report, _ = fetch_load(url, 10, {}, 4, 16, 1, auth=PrometheusAuth(ca_file=str(ca)))
    assert report.used == 64 and load.shape == (4, 16) and (load[:, 15] > load[:, 0]).all()


def test_prometheus_over_tls_fails_clearly_without_the_ca(tls_prometheus: tuple[str, Path]) -> None:
    url, _ = tls_prometheus
    with pytest.raises(MetricsUnavailable) as failure:
        fetch_load(url, 10, {}, 4, 16, 1, auth=PrometheusAuth())
    assert failure.value.reason == "PrometheusTLS"
    assert "TLS verification against the system's CAs (set --prometheus-ca-file) failed" in str(failure.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(failure.value)
    # Skipping verification is possible, but only when asked for.
    assert fetch_load(url, 10, {}, 4, 16, 1, auth=PrometheusAuth(insecure_skip_verify=True))[1].used == 64



# --------------------------------------------------------------------------------------------------
# Status conditions


def test_conditions_are_a_list_map_with_observed_generation_and_a_ready_column(admin: Api) -> None:
    body = create_deployment(admin, "conditions", "model")
    generation = body["metadata"]["generation"]
    condition = {"type": "Ready", "status": "True", "reason": "Reconciled", "message": "ok",
                 "lastTransitionTime": "2026-12-02T17:00:00Z", "observedGeneration": generation}
    admin.custom.patch_namespaced_custom_object_status(
        "moeplace.io", "v1alpha1", "conditions", "moedeployments", "model",
        {"status": {"phase": "Ready", "conditions": [condition, {**condition, "type": "Degraded", "status": "False"}]}},
    )
    stored = admin.status("conditions", "model")["conditions"]
    assert stored[0] == condition
    # kubectl get's table: the Ready column reads the Ready condition.
    table = raw(admin.api_client, "GET", "/apis/moeplace.io/v1alpha1/namespaces/conditions/moedeployments/model",
                accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    names = [column["name"] for column in table["columnDefinitions"]]
    assert names[:3] == ["Name", "Ready", "Phase"]
    assert table["rows"][0]["cells"][1:3] == ["True", "Ready"]
    # A list-map keyed by type: two field managers applying different condition types both keep
    # theirs (an atomic list would go to the last applier whole).
    path = "/apis/moeplace.io/v1alpha1/namespaces/conditions/moedeployments/model/status"
    for manager, kind in (("writer-a", "Balanced"), ("writer-b", "Migrating")):
        entry = {**condition, "type": kind, "status": "False"}
        raw(admin.api_client, "PATCH", path, content_type="application/apply-patch+yaml",
            query=[("fieldManager", manager), ("force", "true")],
            body={"apiVersion": "moeplace.io/v1alpha1", "kind": "MoEDeployment",
                  "metadata": {"name": "model", "namespace": "conditions"},
                  "status": {"conditions": [entry]}})
    types = [c["type"] for c in admin.status("conditions", "model")["conditions"]]
    assert {"Balanced", "Migrating", "Ready"} <= set(types) and len(types) == len(set(types))
