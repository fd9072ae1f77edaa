"""A whole moeplace deployment on this machine, from real processes: the local demo, the end-to-end
tests and the operator benchmark all use it.

``Api`` is admin access to the (local) API server for setting up and watching; ``Agents`` runs one
replay agent process per EP rank (``python -m moe_agent agent``) on loopback; ``OperatorProcess``
runs the operator (``python -m moe_operator``) with a kubeconfig of its own, usually a user bound only
to ``deploy/rbac.yaml``'s ClusterRole. The API server and Prometheus come from ``moeplace_dev.cluster``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from moe_operator import builders
from moe_operator.crd import GROUP, PLURAL, VERSION, build_crd
from moeplace_dev.cluster import free_port

REPO = Path(__file__).resolve().parents[2]
RBAC_FILE = REPO / "deploy" / "rbac.yaml"


def subprocess_env() -> dict[str, str]:
    """This environment, with our packages importable by child processes however they were found."""
    values = dict(os.environ)
    roots = [
        str(Path(next(iter(importlib.import_module(package).__path__))).parent)
        for package in ("moe_operator", "moe_agent", "moe_placement")
    ]
    if values.get("PYTHONPATH"):
        roots.append(values["PYTHONPATH"])
    values["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots))
    values.setdefault("OMP_NUM_THREADS", "1")
    return values


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - keep polling; report the last error
            last_error = error
        time.sleep(interval)
    detail = f" (last error: {last_error})" if last_error else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")


class Api:
    """Admin access for setting up and watching (the operator itself uses its own user)."""

    def __init__(self, kubeconfig: Path) -> None:
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.ext = client.ApiextensionsV1Api(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)

    def _create(self, create: Callable[[], Any], replace: Callable[[], Any] | None = None) -> None:
        try:
            create()
        except ApiException as error:
            if error.status != 409:
                raise
            if replace is not None:
                replace()

    def install_monitoring_crds(self) -> None:
        """Minimal stand-ins of prometheus-operator's PodMonitor and PrometheusRule CRDs."""
        for kind, plural in (("PodMonitor", "podmonitors"), ("PrometheusRule", "prometheusrules")):
            crd = {
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.monitoring.coreos.com"},
                "spec": {
                    "group": "monitoring.coreos.com", "scope": "Namespaced",
                    "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                    "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
                },
            }
            self._create(lambda crd=crd: self.ext.create_custom_resource_definition(crd))

    def install_crd(self) -> None:
        """The MoEDeployment CRD, waited for until established."""
        crd = build_crd()
        self._create(lambda: self.ext.create_custom_resource_definition(crd))
        wait_for(self._crd_established, 30, "CRD established")

    def _crd_established(self) -> bool:
        crd = self.ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))

    def bind_operator_role(self, user: str) -> None:
        """Bind ``user`` to deploy/rbac.yaml's ClusterRole (and nothing else)."""
        role = yaml.safe_load(RBAC_FILE.read_text())
        self._create(
            lambda: self.rbac.create_cluster_role(role),
            lambda: self.rbac.replace_cluster_role(role["metadata"]["name"], role),
        )
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"moeplace-operator-{user}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        self._create(lambda: self.rbac.create_cluster_role_binding(binding))

    def namespace(self, name: str) -> str:
        self._create(lambda: self.core.create_namespace({"metadata": {"name": name}}))
        return name

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get(namespace, name).get("status") or {}

    def condition(self, namespace: str, name: str, kind: str) -> dict[str, Any]:
        for entry in self.status(namespace, name).get("conditions") or []:
            if entry.get("type") == kind:
                return entry
        return {}

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api_client.sanitize_for_serialization(self.core.read_namespaced_config_map(name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def published(self, namespace: str, name: str) -> tuple[np.ndarray, int] | None:
        """The published placement map [L, N] and its generation, from the placement ConfigMap."""
        configmap = self.configmap(namespace, builders.placement_configmap_name(name))
        if configmap is None:
            return None
        data = configmap["data"]
        mapping = json.loads(data[builders.PLACEMENT_KEY])["physical_to_logical_map"]
        return np.asarray(mapping), int(data["generation"])

    def announce(self, namespace: str, name: str, ports: dict[int, int], token: str) -> None:
        """Write the agents' Endpoints (rank -> a loopback port of this machine) and seed the
        deployment's agent-token Secret with the token the agents were started with (the operator
        adopts a Secret of that name labelled for the deployment instead of generating one)."""
        body = builders.build_external_endpoints(name, namespace, {r: ("127.0.0.1", p) for r, p in ports.items()})
        self._create(
            lambda: self.core.create_namespaced_endpoints(namespace, body),
            lambda: self.core.replace_namespaced_endpoints(builders.agents_service_name(name), namespace, body),
        )
        secret = {
            "metadata": {
                "name": builders.agent_token_secret_name(name),
                "namespace": namespace,
                "labels": {builders.LABEL_AGENT_TOKEN_FOR: name},
            },
            "stringData": {builders.AGENT_TOKEN_KEY: token},
        }
        self._create(
            lambda: self.core.create_namespaced_secret(namespace, secret),
            lambda: self.core.patch_namespaced_secret(secret["metadata"]["name"], namespace, secret),
        )

    def events(self, namespace: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(namespace).items
        return [{"reason": e.reason, "message": e.message, "type": e.type} for e in items]


@dataclass
class Agents:
    """One replay agent process per EP rank on loopback, restartable one by one.

    ``replay`` is a trace path or ``synthetic``; ``model`` a preset name or ModelShape JSON;
    ``extra`` more agent flags per rank (``all_ranks_extra`` for every rank).
    """

    workdir: Path
    replay: Path | str
    model: str = "deepseek-v2-lite"
    token: str = "local-agent-token"
    num_gpus: int = 4
    topology: str = "2x2"
    redundant_slots: int = 4
    tokens_per_second: float = 300.0
    batch_tokens: int = 64
    window_seconds: float = 10.0
    router: str = "random"
    same_seed: bool = False
    all_ranks_extra: Sequence[str] = ()
    extra: dict[int, list[str]] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token_file = self.workdir / "agent-token"
        self.token_file.write_text(self.token + "\n")

    def start(self, rank: int | None = None, placement: Path | None = None, timeout: float = 90) -> None:
        ranks = range(self.num_gpus) if rank is None else [rank]
        for r in ranks:
            port = self.ports.get(r) or free_port()
            self.ports[r] = port
            argv = [
                sys.executable, "-m", "moe_agent", "agent", "--replay", str(self.replay),
                "--model", self.model, "--topology", self.topology,
                "--redundant-slots", str(self.redundant_slots), "--rank", str(r), "--port", str(port),
                "--token-file", str(self.token_file), "--tokens-per-second", str(self.tokens_per_second),
                "--window-seconds", str(self.window_seconds), "--batch-tokens", str(self.batch_tokens),
                "--seed", "0" if self.same_seed else str(r), "--router", self.router,
                *self.all_ranks_extra, *self.extra.get(r, []),
            ]
            if placement is not None:
                argv += ["--placement", str(placement)]
            log = open(self.workdir / f"agent-{r}.log", "ab")
            self.procs[r] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
        for r in ranks:
            wait_for(lambda r=r: self._up_or_dead(r), timeout, f"agent {r} up")

    def _up_or_dead(self, rank: int) -> bool:
        if self.procs[rank].poll() is not None:
            log = (self.workdir / f"agent-{rank}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"agent {rank} exited with {self.procs[rank].returncode}:\n{log}")
        return self.placement(rank) is not None

    def url(self, rank: int) -> str:
        return f"http://127.0.0.1:{self.ports[rank]}"

    def placement(self, rank: int, timeout: float = 2.0) -> dict[str, Any] | None:
        """The rank's ``GET /v1/placement`` answer, None when it does not answer."""
        request = urllib.request.Request(
            self.url(rank) + "/v1/placement", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def kill(self, rank: int) -> None:
        proc = self.procs.get(rank)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    @property
    def targets(self) -> list[str]:
        """Prometheus scrape targets (host:port) of the agents, in rank order."""
        return [f"127.0.0.1:{port}" for _, port in sorted(self.ports.items())]


@dataclass
class OperatorProcess:
    """``python -m moe_operator`` as a process."""

    workdir: Path
    kubeconfig: Path
    metrics_port: int = field(default_factory=free_port)
    solver_workers: int = 0
    prometheus_url: str | None = None
    # Watch only these namespaces (every namespace when empty), so that operators of several test
    # modules on one API server leave each other's deployments alone.
    namespaces: Sequence[str] = ()
    extra_args: Sequence[str] = ()  # further flags of python -m moe_operator
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"operator-{self.starts}.log", "wb")
        argv = [
            sys.executable, "-m", "moe_operator", "--kubeconfig", str(self.kubeconfig),
            *([f"--namespace={namespace}" for namespace in self.namespaces] or ["--all-namespaces"]),
            "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1",
            "--solver-workers", str(self.solver_workers),
            # The agents run on this machine, announced under a placeholder address (build_external_endpoints).
            "--agent-host-override",
            *self.extra_args,
        ]
        if self.prometheus_url:
            argv += ["--prometheus-url", self.prometheus_url]
        run_env = subprocess_env()
        # While waiting for agents or a placement, cycle every second rather than every 3 s.
        run_env["MOEPLACE_WAIT_INTERVAL_S"] = "1"
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=run_env)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def log(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-4000:] for path in sorted(self.workdir.glob("operator-*.log"))
        )
