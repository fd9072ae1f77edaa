"""A LeaderWorkerSet of 2 groups x 2 nodes x 2 GPUs, end to end: kubernetes-sigs/lws's CRD, pods named
and labelled as LWS makes them, their Endpoints and EndpointSlices as Kubernetes' controllers write
them, 8 replay agent processes (2 expert-parallel groups of 4 ranks), a Prometheus scraping all of
them, and the operator as a process. The skewed load triggers a rebalance; one migration moves both
groups, each copying inside its own group, and ends with every agent of both groups on the published
map; status says so per group. An agent of one group killed mid-transfer takes every group back to
the map from before the migration.

The API server (1.20) serves EndpointSlices only as discovery.k8s.io/v1beta1, so the operator reads
the Endpoints (discovery's choice); the test checks that the published slices map to the same groups.
The agents run on this machine: the Endpoints announce each pod at a placeholder address with the
``moeplace.io/agent-host`` annotation, and the operator runs with --agent-host-override.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from e2e_support import (
    AGENT_TOKEN,
    LWS_GROUP,
    LWS_LABELS,
    LWS_VERSION,
    TINY_SHAPE,
    Agents,
    Api,
    Operator,
    ReplicaChecker,
    install_lws_crd,
    lws_object,
    lws_pods,
    manifest,
    raw,
    skewed_trace,
    wait_for,
)
from moe_operator import builders, settings
from moe_operator.crd import WorkloadRef
from moe_operator.discovery import agents_from_endpoint_slices
from moe_placement.models import placement_hash

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME, LWS = "moe", "vllm"
NAMESPACES = ("lws-migrate", "lws-rollback")
GROUPS, NODES, GPUS_PER_NODE = 2, 2, 2
L, E = TINY_SHAPE["numLayers"], TINY_SHAPE["numExperts"]


@pytest.fixture(scope="module")
def operator(api: Api, control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator watching only this module's namespace (others' deployments on this API server
    are not its business), with the LeaderWorkerSet CRD installed."""
    install_lws_crd(api)
    process = Operator(tmp_path_factory.mktemp("operator"), control_plane.kubeconfig_for("operator"),
                       namespaces=NAMESPACES)
    process.start()
    yield process
    process.stop()
    print(process.log()[-3000:])


@pytest.fixture
def start_groups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., list[Agents]]]:
    """Starts, per LWS group, its 4 replay agents (ranks 0..3 of the group, 2 per pod) on loopback,
    each with ``extra`` agent flags; stops them at the end of the test."""
    started: list[Agents] = []

    def start(extra: list[str] | None = None) -> list[Agents]:
        workdir = tmp_path_factory.mktemp("agents")
        trace = skewed_trace(workdir / "trace.npz")
        for group in range(GROUPS):
            agents = Agents(workdir / f"group-{group}", trace, num_gpus=NODES * GPUS_PER_NODE, topology="2x2",
                            all_ranks_extra=extra or [])
            started.append(agents)
            agents.start()
        return started[-GROUPS:]

    yield start
    for agents in started:
        agents.stop()


def lws_deployment(api: Api, namespace: str, groups: list[Agents], prometheus_factory: Any, **sections: Any) -> None:
    """The LeaderWorkerSet, its pods and endpoints, a Prometheus scraping every group, the MoEDeployment."""
    api.namespace(namespace)
    api.custom.create_namespaced_custom_object(LWS_GROUP, LWS_VERSION, namespace, "leaderworkersets",
                                               lws_object(LWS, GROUPS, NODES))
    publish_endpoints(api, namespace, groups)
    prometheus = prometheus_factory([target for agents in groups for target in agents.targets], "1s")
    api.create(namespace, manifest(NAME, namespace, prometheus.url,
                                   serving={"workloadRef": {"kind": "LeaderWorkerSet", "name": LWS}}, **sections))


def all_groups_serve_published(api: Api, namespace: str, groups: list[Agents]) -> tuple[int, dict[str, Any]] | None:
    """(generation, status) once every agent of every group serves the published map at its
    generation and status.placement says that generation."""
    published = api.published(namespace, NAME)
    answers = [agents.placement(rank) for agents in groups for rank in sorted(agents.ports)]
    if published is None or any(answer is None for answer in answers):
        return None
    mapping, generation = published
    if not all(a["hash"] == placement_hash(mapping) and a["generation"] == generation for a in answers):
        return None
    current = api.status(namespace, NAME)
    return (generation, current) if current.get("placement", {}).get("generation") == generation else None


def publish_endpoints(api: Api, namespace: str, groups: list[Agents]) -> None:
    """The pods, their Endpoints and EndpointSlices as the endpoints controllers write them for the
    agents Service: each pod's ``rank-<r>`` ports resolve to its own agents' ports, so every pod is its
    own subset and its own slice; the agents' token Secret."""
    pods = {}
    for pod in lws_pods(LWS, GROUPS, NODES, GPUS_PER_NODE):
        stored = api.core.create_namespaced_pod(namespace, pod)
        pods[pod["metadata"]["name"]] = stored
    service = builders.agents_service_name(NAME)
    subsets, slices_path = [], f"/apis/discovery.k8s.io/v1beta1/namespaces/{namespace}/endpointslices"
    for name, pod in sorted(pods.items()):
        labels = pod.metadata.labels
        group, worker = int(labels[f"{LWS_LABELS}/group-index"]), int(labels[f"{LWS_LABELS}/worker-index"])
        ip = f"10.{group}.0.{10 + worker}"  # a placeholder: the annotation sends calls to 127.0.0.1
        ref = {"kind": "Pod", "namespace": namespace, "name": name, "uid": pod.metadata.uid}
        ports = [{"name": f"rank-{local}", "port": groups[group].ports[worker * GPUS_PER_NODE + local],
                  "protocol": "TCP"} for local in range(GPUS_PER_NODE)]
        subsets.append({"addresses": [{"ip": ip, "targetRef": ref}], "ports": ports})
        raw(api.api_client, "POST", slices_path, body={
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-{name}", "labels": {"kubernetes.io/service-name": service},
                         "annotations": {builders.ANNOTATION_AGENT_HOST: "127.0.0.1"}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "targetRef": ref}],
        })
    api.core.create_namespaced_endpoints(namespace, {
        "metadata": {"name": service, "annotations": {builders.ANNOTATION_AGENT_HOST: "127.0.0.1"}},
        "subsets": subsets,
    })
    secret = {"metadata": {"name": builders.agent_token_secret_name(NAME),
                           "labels": {builders.LABEL_AGENT_TOKEN_FOR: NAME}},
              "stringData": {builders.AGENT_TOKEN_KEY: AGENT_TOKEN}}
    api.core.create_namespaced_secret(namespace, secret)


def test_one_migration_moves_every_leaderworkerset_group(
    api: Api, operator: Operator, start_groups: Callable[..., list[Agents]], prometheus_factory: Any, monkeypatch: Any
) -> None:
    namespace = NAMESPACES[0]
    groups = start_groups()
    with ReplicaChecker(groups[0], L, E) as first, ReplicaChecker(groups[1], L, E) as second:
        lws_deployment(api, namespace, groups, prometheus_factory)
        slices_path = f"/apis/discovery.k8s.io/v1beta1/namespaces/{namespace}/endpointslices"
        slices = raw(api.api_client, "GET", slices_path, query=[
            ("labelSelector", f"kubernetes.io/service-name={builders.agents_service_name(NAME)}")])["items"]
        monkeypatch.setattr(settings, "_current", settings.OperatorSettings(agent_host_override=True))
        workload = WorkloadRef(kind="LeaderWorkerSet", name=LWS)
        from_slices = agents_from_endpoint_slices(slices, GPUS_PER_NODE, workload)
        assert from_slices.groups == {g: {r: agents.url(r) for r in agents.ports} for g, agents in enumerate(groups)}
        status = wait_for(
            lambda: (s := api.status(namespace, NAME)).get("lastRebalanceTime")
            and s.get("migration", {}).get("state") == "Completed" and s,
            180, "a completed migration",
        )
        migration = status["migration"]
        assert migration["stage"] == migration["stages"] >= 1
        # bytesTotal is the plan's bytes times the 2 groups; more than half of it moved means both
        # groups copied (the agents count a copy's bytes as sent, a little above the plan's estimate).
        assert migration["bytesMoved"] > 0.9 * migration["bytesTotal"] > 0

        generation, current = wait_for(lambda: all_groups_serve_published(api, namespace, groups), 60,
                                       "both groups' agents on the published placement")
        assert generation > 0
        assert current["groups"] == GROUPS and current["agentsExpected"] == GROUPS * NODES * GPUS_PER_NODE
        wait_for(lambda: api.status(namespace, NAME).get("groupStatus") == [
            {"index": g, "agents": 4, "reachable": 4, "generation": generation, "serving": True}
            for g in range(GROUPS)
        ], 30, "status.groupStatus: both groups serving the published generation")
        reasons = {event["reason"] for event in api.events(namespace)}
        assert {"Rebalancing", "MigrationCompleted"} <= reasons, reasons
    for checker in (first, second):
        assert checker.samples > 10
        assert checker.violations == [], checker.violations[:5]


def test_a_group_failing_mid_migration_takes_every_group_back(
    api: Api, operator: Operator, start_groups: Callable[..., list[Agents]], prometheus_factory: Any
) -> None:
    """An agent of group 1 killed while it receives an expert: the stage is undone in both groups and
    the deployment goes back to the map from before the migration; with the agent back (started on the
    published map), every agent of both groups serves exactly that map."""
    namespace = NAMESPACES[1]
    # Slow transfers (weights served at 100 kB/s: ~0.5 s per expert) so that the kill lands mid-copy.
    groups = start_groups(["--test-throttle-bytes-per-second", "100000"])
    victims, victim = groups[1], 1
    with ReplicaChecker(groups[0], L, E) as first, ReplicaChecker(victims, L, E) as second:
        lws_deployment(api, namespace, groups, prometheus_factory, migration={
            "maxCopiesPerStage": 4, "maxConcurrentTransfers": 2, "stepRetries": 1, "stepTimeoutSeconds": 5})
        original = wait_for(lambda: (api.status(namespace, NAME).get("placement") or {}).get("hash"), 60,
                            "the initial placement")

        def victim_staging() -> bool:
            answer = victims.placement(victim, timeout=1)
            return bool(answer) and any(slot["state"] == "staged" for slot in answer["slots"])

        wait_for(victim_staging, 120, f"group 1 rank {victim} receiving an expert", interval=0.05)
        second.dead.add(victim)
        victims.kill(victim)
        wait_for(
            lambda: (m := api.status(namespace, NAME).get("migration") or {}).get("state") == "RolledBack"
            or (m.get("state") == "Running" and m.get("rollbackOf")),
            90, "the migration being rolled back",
        )
        mapping, _ = api.published(namespace, NAME)
        for g, agents in enumerate(groups):
            for rank in sorted(agents.ports):
                if (g, rank) != (1, victim):
                    answer = agents.placement(rank)
                    assert not any(slot["state"] == "staged" for slot in answer["slots"]), "staged slots retired"
                    assert answer["hash"] == placement_hash(mapping), f"group {g} rank {rank} on the published map"

        placement_file = victims.workdir / "published.json"
        placement_file.write_text(json.dumps({"physical_to_logical_map": np.asarray(mapping).tolist()}))
        victims.all_ranks_extra = []
        victims.start(victim, placement=placement_file)
        second.dead.discard(victim)
        rolled_back = wait_for(
            lambda: (s := api.status(namespace, NAME)).get("migration", {}).get("state") == "RolledBack" and s,
            120, "the rollback completed", interval=0.1,
        )
        assert rolled_back["placement"]["hash"] == original, "exactly the map from before the migration"
        wait_for(lambda: all_groups_serve_published(api, namespace, groups), 90,
                 "every agent of both groups on the published map")
        assert api.status(namespace, NAME)["placement"]["hash"] == original
    for checker in (first, second):
        assert checker.samples > 10
        assert checker.violations == [], checker.violations[:5]
