"""Helpers of the operator's end-to-end tests (tests/e2e/test_operator_*.py) and its benchmark.

Real processes throughout: replay agents (``python -m moe_agent agent``), the operator
(``python -m moe_operator``) with a kubeconfig whose user is bound only to deploy/rbac.yaml's
ClusterRole, and the API server and Prometheus of the e2e fixtures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from moe_operator import builders
from moe_operator.crd import GROUP, PLURAL, VERSION, build_crd

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(REPO / "operator"), str(REPO / "agent")])
RBAC_FILE = REPO / "deploy" / "rbac.yaml"
AGENT_TOKEN = "e2e-agent-token"

TINY_SHAPE = {
    "name": "tiny-e2e", "numLayers": 4, "numExperts": 16, "topK": 2,
    "hiddenSize": 64, "expertIntermediateSize": 128,
}


def env() -> dict[str, str]:
    values = dict(os.environ)
    values["PYTHONPATH"] = PYTHONPATH + (os.pathsep + values["PYTHONPATH"] if values.get("PYTHONPATH") else "")
    values.setdefault("OMP_NUM_THREADS", "1")
    return values


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
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
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def skewed_trace(path: Path, skew: float = 1.6, seed: int = 7) -> Path:
    """A replay trace of the tiny model with a few hot experts (so linear placement is imbalanced)."""
    from moe_placement.synthetic import SyntheticConfig, generate
    from moe_placement.traces import save_trace

    config_ = SyntheticConfig(
        name="tiny-e2e", num_layers=TINY_SHAPE["numLayers"], num_experts=TINY_SHAPE["numExperts"],
        top_k=TINY_SHAPE["topK"], num_sequences=64, tokens_per_sequence=64, popularity_skew=skew,
        domains=("only",), domain_weights=(1.0,),
    )
    save_trace(generate(config_, seed), path)
    return path


# --------------------------------------------------------------------------------------------------
# Kubernetes


class Api:
    """Admin access for test setup and assertions (the operator itself uses its own user)."""

    def __init__(self, kubeconfig: Path) -> None:
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.ext = client.ApiextensionsV1Api(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)

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
            try:
                self.ext.create_custom_resource_definition(crd)
            except ApiException as error:
                if error.status != 409:
                    raise

    def install_crd(self) -> None:
        crd = build_crd()
        try:
            self.ext.create_custom_resource_definition(crd)
        except ApiException as error:
            if error.status != 409:
                raise
        wait_for(lambda: self._crd_established(), 30, "CRD established")

    def _crd_established(self) -> bool:
        crd = self.ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))

    def bind_operator_role(self, user: str) -> None:
        role = yaml.safe_load(RBAC_FILE.read_text())
        try:
            self.rbac.create_cluster_role(role)
        except ApiException as error:
            if error.status != 409:
                raise
            self.rbac.replace_cluster_role(role["metadata"]["name"], role)
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"moeplace-operator-{user}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        try:
            self.rbac.create_cluster_role_binding(binding)
        except ApiException as error:
            if error.status != 409:
                raise

    def namespace(self, name: str) -> str:
        try:
            self.core.create_namespace({"metadata": {"name": name}})
        except ApiException as error:
            if error.status != 409:
                raise
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
        cm = self.configmap(namespace, builders.placement_configmap_name(name))
        if cm is None:
            return None
        data = cm["data"]
        return np.asarray(json.loads(data[builders.SGLANG_KEY])["physical_to_logical_map"]), int(data["generation"])

    def announce(self, namespace: str, name: str, ports: dict[int, int]) -> None:
        body = builders.build_external_endpoints(name, namespace, {r: ("127.0.0.1", p) for r, p in ports.items()})
        try:
            self.core.create_namespaced_endpoints(namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.core.replace_namespaced_endpoints(builders.agents_service_name(name), namespace, body)

    def events(self, namespace: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(namespace).items
        return [{"reason": e.reason, "message": e.message, "type": e.type} for e in items]


def manifest(name: str, namespace: str, prometheus_url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"shape": dict(TINY_SHAPE)},
        "topology": {"nodes": 2, "gpusPerNode": 2},
        "placement": {
            "policy": "eplb_global", "redundantSlots": 4, "rebalanceIntervalSeconds": 2,
            "minPredictedGain": 0.05, "evaluationBatches": 2,
            "objective": {"prefill": "tokenImbalance", "decode": "tokenImbalance",
                          "prefillRouter": "random", "decodeRouter": "random"},
        },
        "migration": {"maxStepsInFlight": 4, "maxConcurrentTransfers": 4, "stepRetries": 2,
                      "stepTimeoutSeconds": 10},
        "metrics": {"prometheusUrl": prometheus_url, "windowSeconds": 10, "minTokens": 50},
    }
    for key, value in sections.items():
        spec.setdefault(key, {}).update(value)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MoEDeployment",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


# --------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Agents:
    """G replay agents on loopback, restartable one by one."""

    workdir: Path
    trace: Path
    num_gpus: int = 4
    topology: str = "2x2"
    redundant_slots: int = 4
    tokens_per_second: float = 300.0
    extra: dict[int, list[str]] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token_file = self.workdir / "agent-token"
        self.token_file.write_text(AGENT_TOKEN + "\n")

    def start(self, rank: int | None = None, placement: Path | None = None) -> None:
        ranks = range(self.num_gpus) if rank is None else [rank]
        for r in ranks:
            port = self.ports.get(r) or free_port()
            self.ports[r] = port
            argv = [
                sys.executable, "-m", "moe_agent", "agent", "--replay", str(self.trace),
                "--model", json.dumps(TINY_SHAPE), "--topology", self.topology,
                "--redundant-slots", str(self.redundant_slots), "--rank", str(r), "--port", str(port),
                "--token-file", str(self.token_file), "--tokens-per-second", str(self.tokens_per_second),
                "--window-seconds", "10", "--batch-tokens", "64", "--seed", str(r), "--router", "random",
            ] + self.extra.get(r, [])
            if placement is not None:
                argv += ["--placement", str(placement)]
            log = open(self.workdir / f"agent-{r}.log", "ab")
            self.procs[r] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env())
        for r in ranks:
            wait_for(lambda r=r: self.placement(r) is not None, 90, f"agent {r} up")

    def url(self, rank: int) -> str:
        return f"http://127.0.0.1:{self.ports[rank]}"

    def placement(self, rank: int, timeout: float = 2.0) -> dict[str, Any] | None:
        request = urllib.request.Request(self.url(rank) + "/v1/placement", headers={"Authorization": f"Bearer {AGENT_TOKEN}"})
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
        return [f"127.0.0.1:{port}" for _, port in sorted(self.ports.items())]


@dataclass
class Operator:
    """``python -m moe_operator`` as a process."""

    workdir: Path
    kubeconfig: Path
    token_file: Path
    metrics_port: int = field(default_factory=free_port)
    solver_workers: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"operator-{self.starts}.log", "wb")
        argv = [
            sys.executable, "-m", "moe_operator", "--kubeconfig", str(self.kubeconfig), "--all-namespaces",
            "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1",
            "--agent-token-file", str(self.token_file), "--solver-workers", str(self.solver_workers),
        ]
        run_env = env()
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


class ReplicaChecker:
    """Samples every agent's /v1/placement in a background thread and records each (layer, expert)
    that no answering agent serves live, in two consecutive samples (a sample reads the agents one
    after another, so one sample alone can straddle an activation). Also checks that every map an
    agent serves gives every expert a slot. Agents listed in ``dead`` are left out of the count
    together with the experts their slots held."""

    def __init__(self, agents: Agents, num_layers: int, num_experts: int, period: float = 0.1) -> None:
        self.agents = agents
        self.num_layers, self.num_experts = num_layers, num_experts
        self.period = period
        self.samples = 0
        self.violations: list[str] = []
        self.dead: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="replica-checker")
        self._previous: set[tuple[int, int]] = set()

    def __enter__(self) -> ReplicaChecker:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period)

    def sample(self) -> None:
        answers = {}
        for rank in list(self.agents.ports):
            if rank in self.dead:
                continue
            answer = self.agents.placement(rank, timeout=1.0)
            if answer is not None:
                answers[rank] = answer
        if not answers:
            return
        live = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        excused = np.zeros_like(live, dtype=bool)
        slots_per_gpu = next(iter(answers.values()))["slots_per_gpu"]
        for rank, answer in answers.items():
            mapping = np.asarray(answer["physical_to_logical_map"])
            for layer in range(self.num_layers):
                served = set(mapping[layer][mapping[layer] >= 0].tolist())
                if len(served) != self.num_experts:
                    self.violations.append(f"rank {rank} gen {answer['generation']} serves a map without experts "
                                           f"{sorted(set(range(self.num_experts)) - served)} at layer {layer}")
            for entry in answer["slots"]:
                if entry["state"] == "live":
                    live[entry["layer"], entry["expert"]] += 1
        missing_ranks = set(self.agents.ports) - set(answers)
        if missing_ranks:
            reference = np.asarray(next(iter(answers.values()))["physical_to_logical_map"])
            for rank in missing_ranks:
                block = reference[:, rank * slots_per_gpu:(rank + 1) * slots_per_gpu]
                for layer in range(self.num_layers):
                    excused[layer, block[layer][block[layer] >= 0]] = True
        zero = {(int(l), int(e)) for l, e in np.argwhere((live == 0) & ~excused)}
        confirmed = zero & self._previous
        if confirmed:
            self.violations.append(f"no live replica of (layer, expert) {sorted(confirmed)[:5]}")
        self._previous = zero
        self.samples += 1
