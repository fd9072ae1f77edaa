"""The local control plane is a real Kubernetes API (CRDs, RBAC) and a real Prometheus."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import prometheus_client
import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from moeplace_dev.cluster import (
    Binaries,
    LocalCluster,
    PrometheusServer,
    free_port,
    is_up,
    read_state,
    state_file,
)

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
GROUP = "e2e.moeplace.io"
T = TypeVar("T")

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "color": {"type": "string", "nullable": True},
                                },
                            },
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """Poll ``probe`` until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result is not None:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def api_client(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="module")
def admin(control_plane: LocalCluster) -> Iterator[client.ApiClient]:
    with api_client(control_plane.kubeconfig) as api:
        yield api


@pytest.fixture
def namespace(admin: client.ApiClient) -> str:
    # Namespaces never finish terminating without a controller-manager, so each test gets a fresh one.
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(admin).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


def test_apiserver_is_ready_and_serves_1_20(control_plane: LocalCluster, admin: client.ApiClient) -> None:
    assert control_plane.server.startswith("https://127.0.0.1:")
    assert control_plane.is_running()
    version = client.VersionApi(admin).get_code()
    assert (version.major, version.minor) == ("1", "20")


def test_namespace_and_configmap_round_trip(admin: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(admin)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="placement"), data={"layer0": "[0, 1, 2]"}),
    )
    assert core.read_namespaced_config_map("placement", namespace).data == {"layer0": "[0, 1, 2]"}


def test_custom_resource_definition_and_object(admin: client.ApiClient, namespace: str) -> None:
    extensions = client.ApiextensionsV1Api(admin)
    extensions.create_custom_resource_definition(WIDGET_CRD)

    def established() -> bool | None:
        crd = extensions.read_custom_resource_definition(WIDGET_CRD["metadata"]["name"])
        conditions = {c.type: c.status for c in crd.status.conditions or []}
        return True if conditions.get("Established") == "True" else None

    eventually(established, "the Widget CRD to be established")

    custom = client.CustomObjectsApi(admin)
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
    eventually(lambda: _create_when_served(custom, namespace, body), "the Widget API to be served")
    custom.patch_namespaced_custom_object_status(
        GROUP, "v1", namespace, "widgets", "w1", {"status": {"phase": "Ready"}}
    )
    widget = custom.get_namespaced_custom_object(GROUP, "v1", namespace, "widgets", "w1")
    assert widget["spec"] == {"size": 3}
    assert widget["status"] == {"phase": "Ready"}

    # The structural schema is enforced, so it is a real validation test bed for the operator's CRDs.
    invalid = {**body, "metadata": {"name": "w2"}, "spec": {"size": 0}}
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(GROUP, "v1", namespace, "widgets", invalid)
    assert rejected.value.status == 422


def _create_when_served(custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> bool | None:
    # An established CRD can still 404 for a moment until the apiserver's discovery catches up.
    try:
        custom.create_namespaced_custom_object(GROUP, "v1", namespace, "widgets", body)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return True


def test_rbac_denies_a_user_without_bindings(control_plane: LocalCluster) -> None:
    with api_client(control_plane.kubeconfig_for("nobody")) as nobody:
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(nobody).list_namespace()
    assert denied.value.status == 403


def test_rbac_grants_exactly_what_is_bound(
    control_plane: LocalCluster, admin: client.ApiClient, namespace: str
) -> None:
    rbac = client.RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="configmap-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
        ),
    )
    subjects = [
        client.RbacV1Subject(kind="User", name="operator", api_group="rbac.authorization.k8s.io"),
        client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace),
    ]
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="configmap-reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"
            ),
            subjects=subjects,
        ),
    )
    account_token = control_plane.service_account_token(namespace, "reader")
    kubeconfigs = [
        control_plane.kubeconfig_for("operator"),
        control_plane.kubeconfig_for(f"system:serviceaccount:{namespace}:reader", account_token),
    ]
    for kubeconfig in kubeconfigs:
        with api_client(kubeconfig) as api:
            core = client.CoreV1Api(api)
            # RBAC bindings reach the authorizer's cache asynchronously.
            eventually(lambda: _allowed(lambda: core.list_namespaced_config_map(namespace)), "the binding")
            with pytest.raises(ApiException) as denied:
                core.list_namespaced_secret(namespace)
            assert denied.value.status == 403


def _allowed(call: Callable[[], object]) -> bool | None:
    try:
        call()
    except ApiException as error:
        if error.status == 403:
            return None
        raise
    return True


@pytest.fixture
def probe_exporter() -> Iterator[tuple[str, prometheus_client.Gauge]]:
    """A prometheus_client HTTP server on a free loopback port exposing one gauge."""
    registry = prometheus_client.CollectorRegistry()
    gauge = prometheus_client.Gauge(
        "moeplace_e2e_probe", "A value the e2e test expects to read back.", registry=registry
    )
    port = free_port()
    server, thread = prometheus_client.start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{port}", gauge
    server.shutdown()
    thread.join(timeout=5)


def _sample(prometheus: PrometheusServer, promql: str) -> float | None:
    result = prometheus.query(promql)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_an_in_process_exporter(
    prometheus_factory: Callable[..., PrometheusServer], probe_exporter: tuple[str, prometheus_client.Gauge]
) -> None:
    target, gauge = probe_exporter
    gauge.set(42.5)
    prometheus = prometheus_factory([target], labels={"role": "probe"})
    assert prometheus.url.startswith("http://127.0.0.1:")
    promql = 'moeplace_e2e_probe{role="probe",job="moeplace"}'
    assert eventually(lambda: _sample(prometheus, promql), "a scrape") == 42.5


def test_prometheus_targets_change_at_runtime(
    prometheus_factory: Callable[..., PrometheusServer], probe_exporter: tuple[str, prometheus_client.Gauge]
) -> None:
    target, gauge = probe_exporter
    gauge.set(7)
    prometheus = prometheus_factory([])
    prometheus.reload()
    assert _sample(prometheus, "moeplace_e2e_probe") is None
    prometheus.set_targets([target], {"pod": "agent-0"})
    assert eventually(lambda: _sample(prometheus, 'moeplace_e2e_probe{pod="agent-0"}'), "the new target") == 7


# Runs only the dev stack's subcommands, in a fresh process as a user would: the full `moeplace` entry
# point also imports the agent (torch), which costs seconds per call. One test goes through it anyway.
_DEV_CLI = (
    "import argparse, sys\n"
    "from moeplace_dev import cli\n"
    "parser = argparse.ArgumentParser(prog='moeplace')\n"
    "cli.register(parser.add_subparsers(required=True))\n"
    "args = parser.parse_args()\n"
    "sys.exit(args.func(args))\n"
)


def _moeplace(*args: str, env: dict[str, str], entry_point: bool = False) -> subprocess.CompletedProcess[str]:
    command = ["-m", "moeplace.cli"] if entry_point else ["-c", _DEV_CLI]
    return subprocess.run(
        [sys.executable, *command, *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_cluster_up_env_down(
    tmp_path: Path, control_plane: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --use-existing-kubeconfig keeps the session's apiserver as the target, so this test starts only a
    # detached Prometheus; a detached apiserver runs the same start_control_plane code as the fixture.
    monkeypatch.setenv("MOEPLACE_CLUSTER_DIR", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / d) for d in ("operator", "agent", "dev"))}

    up = _moeplace("cluster", "up", "--use-existing-kubeconfig", env=env)
    assert up.returncode == 0, up.stderr
    state = read_state()
    assert state is not None
    try:
        again = _moeplace("cluster", "up", env=env)
        assert again.returncode == 0 and "already up" in again.stdout, again.stderr
        exported = _moeplace("cluster", "env", env=env, entry_point=True)
        assert exported.returncode == 0, exported.stderr
        assert exported.stdout.splitlines()[:2] == [
            f"export KUBECONFIG={control_plane.kubeconfig}",
            f"export MOEPLACE_PROMETHEUS_URL={state['prometheus']['url']}",
        ]
        # The state file holds tokens and pids: owner-only.
        assert state_file().stat().st_mode & 0o077 == 0
        prometheus = PrometheusServer.from_state(state["prometheus"])
        assert prometheus.is_running()
    finally:
        down = _moeplace("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not prometheus.is_running()
    assert read_state() is None
    assert _moeplace("cluster", "env", env=env).returncode == 1


@pytest.mark.slow
def test_cli_cluster_up_starts_a_detached_control_plane(
    binaries: Binaries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEPLACE_CLUSTER_DIR", str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / d) for d in ("operator", "agent", "dev"))}
    env.pop("MOEPLACE_USE_EXISTING_KUBECONFIG", None)
    up = _moeplace("cluster", "up", env=env)
    assert up.returncode == 0, up.stderr
    state = read_state()
    assert state is not None
    try:
        # The processes outlived the `up` command that started them, and the kubeconfig reaches them.
        assert is_up(state)
        with api_client(Path(state["kubeconfig"])) as api:
            assert client.VersionApi(api).get_code().minor == "20"
    finally:
        down = _moeplace("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not is_up(state)
    assert not (tmp_path / "control-plane" / "etcd-data").exists()
