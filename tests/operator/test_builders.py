"""build_* functions return the objects the operator owns, with owner references and labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_operator import builders
from moe_operator.agents import EndpointsError, agents_from_endpoints
from moe_operator.crd import resolve_spec
from moe_placement.baselines import linear_placement
from moe_placement.files import PlacementFile
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
    assert json.loads(data[builders.SGLANG_KEY]) == {"physical_to_logical_map": placement().physical_to_logical_map.tolist()}
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


def test_migration_configmap():
    target = Placement(np.roll(linear_placement(4, 16, 20), 1, axis=1), 16, 5)
    cm = builders.build_migration_configmap(OWNER, "plan1", placement(), target, 3, "eplb", 4)
    document = json.loads(cm["data"][builders.TARGET_KEY])
    assert document["planId"] == "plan1" and document["fromGeneration"] == 3
    assert document["target"] == target.physical_to_logical_map.tolist()
    assert document["maxCopiesPerStage"] == 4


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
    assert any(e["name"] == "MOEPLACE_AGENT_TOKEN" for e in containers[1]["env"])
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == "demo-placement"
    with pytest.raises(ValueError):
        builders.build_engine_statefulset(OWNER, resolved())


def test_monitoring_objects():
    monitor = builders.build_podmonitor(OWNER, resolved())
    assert monitor["kind"] == "PodMonitor"
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["rank-0", "rank-1"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["targetLabel"] == "deployment"
    rule = builders.build_prometheusrule(OWNER, resolved(alerts={"imbalanceThreshold": 1.7}))
    rules = rule["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"MoEDeploymentImbalanced", "MoEDeploymentMigrationStalled",
                                            "MoEDeploymentMetricsMissing"}
    assert "> 1.7" in rules[0]["expr"] and 'deployment="demo"' in rules[0]["expr"]


def test_external_endpoints_map_to_ranks():
    endpoints = builders.build_external_endpoints("demo", "ns", {0: ("127.0.0.1", 1000), 1: ("127.0.0.1", 1001),
                                                                 2: ("127.0.0.1", 1002), 3: ("127.0.0.1", 1003)})
    assert endpoints["metadata"]["name"] == "demo-agents"
    assert endpoints["subsets"][0]["addresses"] == [{"ip": builders.PLACEHOLDER_IP}]
    assert endpoints["metadata"]["annotations"][builders.ANNOTATION_AGENT_HOST] == "127.0.0.1"
    agents = agents_from_endpoints(endpoints, gpus_per_node=2)
    assert agents == {r: f"http://127.0.0.1:{1000 + r}" for r in range(4)}
    plain = builders.build_external_endpoints("demo", "ns", {0: ("10.0.0.5", 9400), 1: ("10.0.0.6", 9400)})
    assert agents_from_endpoints(plain, 2) == {0: "http://10.0.0.5:9400", 1: "http://10.0.0.6:9400"}


def test_pod_endpoints_use_ordinal_times_gpus_per_node():
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
    assert agents_from_endpoints(endpoints, 2) == {
        0: "http://10.1.0.1:9400", 1: "http://10.1.0.1:9401", 2: "http://10.1.0.2:9400", 3: "http://10.1.0.2:9401",
    }
    assert agents_from_endpoints(None, 2) == {}
    duplicate = {"subsets": [{"addresses": [{"ip": "a"}, {"ip": "b"}], "ports": [{"name": "rank-0", "port": 1}]}]}
    with pytest.raises(EndpointsError):
        agents_from_endpoints(duplicate, 2)
    bad = {"subsets": [{"addresses": [{"ip": "a"}], "ports": [{"name": "rank-x", "port": 1}]}]}
    with pytest.raises(EndpointsError):
        agents_from_endpoints(bad, 2)
