"""Helpers of the operator's end-to-end tests (tests/e2e/test_operator_*.py).

Real processes throughout: replay agents (``python -m moe_agent agent``), the operator
(``python -m moe_operator``) with a kubeconfig whose user is bound only to deploy/rbac.yaml's
ClusterRole, and the API server and Prometheus of control_plane_fixtures.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Self

import numpy as np
import yaml
from kubernetes import client

from moeplace_dev.localstack import Agents as LocalAgents
from moeplace_dev.localstack import Api, wait_for
from moeplace_dev.localstack import OperatorProcess as Operator
from moeplace_dev.manifests import TINY_SHAPE, manifest

__all__ = ["AGENT_TOKEN", "LWS_GROUP", "LWS_LABELS", "LWS_VERSION", "TINY_SHAPE", "Agents", "Api", "Operator",
           "ReplicaChecker", "install_lws_crd", "lws_object", "lws_pods", "manifest", "raw", "skewed_trace", "wait_for"]

AGENT_TOKEN = "e2e-agent-token"
LWS_GROUP, LWS_VERSION = "leaderworkerset.x-k8s.io", "v1"
LWS_LABELS = "leaderworkerset.sigs.k8s.io"
LWS_CRD = Path(__file__).resolve().parents[1] / "e2e" / "fixtures" / "leaderworkerset-crd.yaml"


def raw(api: client.ApiClient, method: str, path: str, body: Any = None,
        query: list[tuple[str, str]] | None = None, accept: str = "application/json",
        content_type: str = "application/json") -> Any:
    """One API call by path (for what the typed client lacks: v1beta1 EndpointSlices, Tables, apply)."""
    headers = {"Accept": accept, "Content-Type": content_type}
    method, url, headers, body, _ = api.param_serialize(
        method, path, query_params=query, header_params=headers, body=body, auth_settings=["BearerToken"]
    )
    response = api.call_api(method, url, headers, body)
    response.read()
    return json.loads(response.data)


def install_lws_crd(api: Api) -> None:
    """Apply kubernetes-sigs/lws's LeaderWorkerSet CRD (the fixture file; its header says what is
    trimmed) and wait until it is established."""
    crd = yaml.safe_load(LWS_CRD.read_text())
    try:
        api.ext.create_custom_resource_definition(crd)
    except client.ApiException as error:
        if error.status != 409:
            raise
    wait_for(lambda: any(c.type == "Established" and c.status == "True" for c in
                         api.ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []),
             30, "LWS CRD established")


def lws_pods(name: str, groups: int, size: int, gpus_per_node: int = 2) -> list[dict[str, Any]]:
    """Pods as the LWS controller makes them: the leader ``<name>-<group>`` (worker 0) and workers
    ``<name>-<group>-<worker>``, labelled with the group and worker index, LWS_WORKER_INDEX set,
    one container port ``rank-<r>`` per GPU."""
    pods = []
    for group in range(groups):
        for worker in range(size):
            pod = f"{name}-{group}" if worker == 0 else f"{name}-{group}-{worker}"
            pods.append({
                "metadata": {"name": pod, "labels": {
                    f"{LWS_LABELS}/name": name, f"{LWS_LABELS}/group-index": str(group),
                    f"{LWS_LABELS}/worker-index": str(worker), f"{LWS_LABELS}/group-key": f"key{group}"}},
                "spec": {"containers": [{
                    "name": "agent", "image": "moeplace:test",
                    "env": [{"name": "LWS_WORKER_INDEX", "value": str(worker)},
                            {"name": "LWS_LEADER_ADDRESS", "value": f"{name}-{group}.{name}"}],
                    "ports": [{"name": f"rank-{r}", "containerPort": 9400 + r} for r in range(gpus_per_node)],
                }]},
            })
    return pods


def lws_object(name: str, replicas: int, size: int) -> dict[str, Any]:
    """A LeaderWorkerSet as a user writes it (valid against the published CRD)."""
    template = {"spec": {"containers": [{"name": "agent", "image": "moeplace:test"}]}}
    return {
        "apiVersion": f"{LWS_GROUP}/{LWS_VERSION}", "kind": "LeaderWorkerSet", "metadata": {"name": name},
        "spec": {"replicas": replicas, "leaderWorkerTemplate": {"size": size, "workerTemplate": template}},
    }


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


@dataclass
class Agents(LocalAgents):
    """The e2e tests' agents: the tiny model, the e2e token."""

    model: str = json.dumps(TINY_SHAPE)
    token: str = AGENT_TOKEN


class BackgroundLoop:
    """A context manager running ``self._run`` on a daemon thread until the ``with`` block ends;
    ``_run`` watches ``self._stop``."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        raise NotImplementedError


def poll_until(
    poll: Callable[[], None], done: Callable[[], Any], timeout: float, what: str, progress: Callable[[], str]
) -> None:
    """``poll()`` then ``done()`` every 0.1 s until ``done()`` is truthy; AssertionError naming ``what``
    and ``progress()`` after ``timeout`` seconds (an assertion inside ``poll`` fails at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poll()
        if done():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} ({progress()})")


class ReplicaChecker(BackgroundLoop):
    """Samples every agent's /v1/placement in a background thread and records each (layer, expert)
    that no answering agent serves live, in two consecutive samples (a sample reads the agents one
    after another, so one sample alone can straddle an activation). Also checks that every map an
    agent serves gives every expert a slot. Agents listed in ``dead`` are left out of the count
    together with the experts their slots held."""

    def __init__(self, agents: Agents, num_layers: int, num_experts: int, period: float = 0.1) -> None:
        super().__init__("replica-checker")
        self.agents = agents
        self.num_layers, self.num_experts = num_layers, num_experts
        self.period = period
        self.samples = 0
        self.violations: list[str] = []
        self.dead: set[int] = set()
        self._previous: set[tuple[int, int]] = set()

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
