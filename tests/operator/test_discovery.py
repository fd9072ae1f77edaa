"""The rank mapping of agents announced in Endpoints and EndpointSlices (moe_operator.discovery).

The same objects against a real API server (EndpointSlice vs Endpoints chosen by discovery,
LeaderWorkerSet pods) are in tests/e2e/test_production_fit.py."""

from __future__ import annotations

import pytest

from moe_operator import builders, settings
from moe_operator.crd import WorkloadRef
from moe_operator.discovery import (
    AgentGroups,
    EndpointsError,
    agents_from_endpoint_slices,
    agents_from_endpoints,
    pod_position,
)
from moe_operator.plan_runner import GroupLayout

LWS = WorkloadRef(kind="LeaderWorkerSet", name="vllm-2")
STS = WorkloadRef(kind="StatefulSet", name="engine")


@pytest.fixture
def override(monkeypatch):
    monkeypatch.setattr(settings, "_current", settings.OperatorSettings(agent_host_override=True))


def test_external_endpoints_map_to_global_ranks(override):
    endpoints = builders.build_external_endpoints("demo", "ns", {0: ("127.0.0.1", 1000), 1: ("127.0.0.1", 1001),
                                                                 2: ("127.0.0.1", 1002), 3: ("127.0.0.1", 1003)})
    assert endpoints["subsets"][0]["addresses"] == [{"ip": builders.PLACEHOLDER_IP}]
    assert endpoints["metadata"]["annotations"][builders.ANNOTATION_AGENT_HOST] == "127.0.0.1"
    found = agents_from_endpoints(endpoints, gpus_per_node=2)
    assert found.source == "Endpoints" and found.groups == {0: {r: f"http://127.0.0.1:{1000 + r}" for r in range(4)}}
    plain = builders.build_external_endpoints("demo", "ns", {0: ("10.0.0.5", 9400), 1: ("10.0.0.6", 9400)})
    assert agents_from_endpoints(plain, 2).group(0) == {0: "http://10.0.0.5:9400", 1: "http://10.0.0.6:9400"}


def test_the_agent_host_annotation_is_ignored_unless_the_operator_opts_in():
    """Off by default: an Endpoints object cannot redirect the operator (and the token) elsewhere."""
    endpoints = builders.build_external_endpoints("demo", "ns", {0: ("127.0.0.1", 1000)})
    assert agents_from_endpoints(endpoints, 2).group(0) == {0: f"http://{builders.PLACEHOLDER_IP}:1000"}


def test_statefulset_pods_use_ordinal_times_gpus_per_node():
    endpoints = {
        "subsets": [
            {
                "addresses": [
                    {"ip": "10.1.0.1", "targetRef": {"kind": "Pod", "name": "demo-engine-0"}},
                    {"ip": "10.1.0.2", "targetRef": {"kind": "Pod", "name": "demo-engine-1"}},
                ],
                "notReadyAddresses": [{"ip": "10.1.0.3", "targetRef": {"kind": "Pod", "name": "demo-engine-2"}}],
                "ports": [{"name": "rank-0", "port": 9400}, {"name": "rank-1", "port": 9401}, {"name": "http", "port": 80}],
            }
        ]
    }
    assert agents_from_endpoints(endpoints, 2).groups == {0: {
        0: "http://10.1.0.1:9400", 1: "http://10.1.0.1:9401", 2: "http://10.1.0.2:9400", 3: "http://10.1.0.2:9401",
    }}
    assert agents_from_endpoints(None, 2).groups == {}
    duplicate = {"subsets": [{"addresses": [{"ip": "a"}, {"ip": "b"}], "ports": [{"name": "rank-0", "port": 1}]}]}
    with pytest.raises(EndpointsError, match="rank 0 announced twice"):
        agents_from_endpoints(duplicate, 2)
    bad = {"subsets": [{"addresses": [{"ip": "a"}], "ports": [{"name": "rank-x", "port": 1}]}]}
    with pytest.raises(EndpointsError, match="rank-x"):
        agents_from_endpoints(bad, 2)


@pytest.mark.parametrize(
    "pod, workload, position",
    [
        ("vllm-2-0", LWS, (0, 0)),        # group 0's leader
        ("vllm-2-1", LWS, (1, 0)),        # group 1's leader
        ("vllm-2-0-1", LWS, (0, 1)),      # group 0, worker 1
        ("vllm-2-1-1", LWS, (1, 1)),
        ("vllm-2-12-3", LWS, (12, 3)),
        ("engine-3", STS, (0, 3)),
        ("demo-engine-1", None, (0, 1)),
        ("agents", None, None),
    ],
)
def test_pod_positions(pod, workload, position):
    assert pod_position(pod, workload) == position


def test_a_pod_that_is_not_the_leaderworkersets_is_refused():
    with pytest.raises(EndpointsError, match="LeaderWorkerSet vllm-2"):
        pod_position("other-0-1", LWS)
    with pytest.raises(EndpointsError):
        pod_position("vllm-2-0-1-2", LWS)


def endpoint_slice(family, endpoints, ports, annotations=None):
    return {
        "metadata": {"name": "x", "annotations": annotations or {}},
        "addressType": family,
        "endpoints": endpoints,
        "ports": ports,
    }


def test_endpoint_slices_map_leaderworkerset_groups_apart():
    """Group 1's leader and group 0's worker 1 were both rank 2 when ranks came from the pod-name
    suffix alone; now each group has its own ranks."""
    ports = [{"name": "rank-0", "port": 9400}, {"name": "rank-1", "port": 9401}]
    pods = {"vllm-2-0": "10.0.0.1", "vllm-2-0-1": "10.0.0.2", "vllm-2-1": "10.0.1.1", "vllm-2-1-1": "10.0.1.2"}
    entries = [{"addresses": [ip], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": pod}}
               for pod, ip in pods.items()]
    not_ready = {"addresses": ["10.0.9.9"], "conditions": {"ready": False}, "targetRef": {"name": "vllm-2-2"}}
    slices = [
        endpoint_slice("IPv4", entries[:3] + [not_ready], ports),
        endpoint_slice("IPv4", entries[3:], ports),
        endpoint_slice("IPv6", [{"addresses": ["fd00::1"], "targetRef": {"name": "vllm-2-0"}}], ports),
    ]
    found = agents_from_endpoint_slices(slices, 2, LWS)
    assert found.source == "EndpointSlice" and found.count == 8
    for group in (0, 1):
        assert found.group(group) == {
            0: f"http://10.0.{group}.1:9400", 1: f"http://10.0.{group}.1:9401",
            2: f"http://10.0.{group}.2:9400", 3: f"http://10.0.{group}.2:9401",
        }


def test_ipv6_only_slices_and_the_override_annotation(override):
    ports = [{"name": "rank-0", "port": 9400}]
    v6 = endpoint_slice("IPv6", [{"addresses": ["fd00::1"], "targetRef": {"name": "engine-1"}}], ports)
    assert agents_from_endpoint_slices([v6], 4, STS).group(0) == {4: "http://[fd00::1]:9400"}
    local = endpoint_slice("IPv4", [{"addresses": [builders.PLACEHOLDER_IP]}], ports,
                           {builders.ANNOTATION_AGENT_HOST: "127.0.0.1"})
    assert agents_from_endpoint_slices([local], 4).group(0) == {0: "http://127.0.0.1:9400"}


def test_groups_are_keyed_group_times_ranks_and_agents_outside_the_layout_are_named():
    found = AgentGroups("EndpointSlice", {0: {0: "a", 1: "b"}, 1: {0: "c", 1: "d", 2: "x"}, 2: {0: "y"}})
    keyed = found.keyed(GroupLayout(ranks=2, groups=2))
    assert keyed.agents == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert keyed.stray == ("group 1 rank 2", "group 2 rank 0")
    # One group announced as group 0 keeps its ranks as they are (the caller reports extra ranks).
    single = AgentGroups("Endpoints", {0: {0: "a", 1: "b", 2: "x"}}).keyed(GroupLayout(ranks=2))
    assert single.agents == {0: "a", 1: "b", 2: "x"} and single.stray == ()
