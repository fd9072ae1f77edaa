"""The CRD's schema follows the rules kube-apiserver 1.20 enforces; spec resolution names fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_operator.crd import (
    GROUP,
    PLURAL,
    VERSION,
    MoEDeploymentSpec,
    SpecError,
    build_crd,
    resolve_spec,
)
from moe_placement.policies import POLICIES

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "moedeployment.yaml"

SHAPE = {"numLayers": 4, "numExperts": 16, "topK": 2, "hiddenSize": 64, "expertIntermediateSize": 32}


def walk(schema, path="$"):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def root_schema():
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural_for_1_20():
    for path, node in walk(root_schema()):
        for banned in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title", "uniqueItems"):
            assert banned not in node, f"{path}: {banned}"
        for flag in ("exclusiveMinimum", "exclusiveMaximum"):
            if flag in node:
                assert isinstance(node[flag], bool), f"{path}: {flag} must be a boolean"
        if "properties" in node:
            assert node.get("additionalProperties") is not False, path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), f"{path}: arrays need items"
        if path.count(".") > 1 and not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" in node, f"{path}: every node needs a type"
        assert node.get("default") not in ("",), f"{path}: empty-string defaults are read back as null"


def test_status_keeps_unknown_fields_and_printer_columns():
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert version["subresources"] == {"status": {}}
    names = [column["name"] for column in version["additionalPrinterColumns"]]
    assert names[:4] == ["Ready", "Phase", "Imbalance", "GPUs"] and "Last-Rebalance" in names and "Age" in names
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}" and version["name"] == VERSION
    assert crd["spec"]["names"]["shortNames"] == ["moed"]


def test_enums_ranges_defaults_descriptions():
    spec = root_schema()["properties"]["spec"]
    placement = spec["properties"]["placement"]
    assert placement["properties"]["policy"]["enum"] == list(POLICIES)
    redundant = placement["properties"]["redundantSlots"]
    assert redundant["minimum"] == 0 and redundant["default"] == 0 and redundant["description"]
    gain = placement["properties"]["minPredictedGain"]
    assert gain["minimum"] == 0 and gain["maximum"] == 1
    shape = spec["properties"]["model"]["properties"]["shape"]
    assert shape["nullable"] is True and "numExperts" in shape["required"]
    assert shape["properties"]["numExperts"]["exclusiveMinimum"] is True
    assert placement["default"] == {}, "nested defaults apply only below a defaulted object"
    assert spec["required"] == ["model", "topology"]
    for path, node in walk(spec):
        if path != "$" and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path}: kubectl explain needs a description"


def test_example_manifest_is_valid():
    document = yaml.safe_load(EXAMPLE.read_text())
    assert document["apiVersion"] == f"{GROUP}/{VERSION}" and document["kind"] == "MoEDeployment"
    resolved = resolve_spec(document["spec"])
    assert resolved.topology.slots_per_gpu == 5
    assert resolved.spec.placement.redundant_slots == 4


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"model": {}}, "spec.model"),
        ({"model": {"preset": "deepseek-v3", "shape": SHAPE}}, "spec.model"),
        ({"model": {"shape": {**SHAPE, "topK": 32}}}, "spec.model.shape"),
        ({"placement": {"redundantSlots": 3}}, "spec.placement.redundantSlots"),
        ({"topology": {"nodes": 2, "gpusPerNode": 16}}, "spec.topology"),
        ({"placement": {"policy": "nope"}}, "spec.placement.policy"),
        ({"migration": {"maxCopiesPerStage": 0}}, "spec.migration.maxCopiesPerStage"),
        ({"serving": {"engine": {"image": "x"}, "workloadRef": {"kind": "StatefulSet", "name": "y"}}}, "spec.serving"),
        ({"metrics": {"prometheusUrl": "ftp://x"}}, "spec.metrics.prometheusUrl"),
    ],
)
def test_invalid_specs_name_the_field(patch, field):
    spec = {"model": {"shape": SHAPE}, "topology": {"nodes": 2, "gpusPerNode": 2}, **patch}
    with pytest.raises(SpecError) as error:
        resolve_spec(spec)
    assert str(error.value).startswith(field), str(error.value)


def test_camel_case_round_trip():
    spec = MoEDeploymentSpec.model_validate(
        {"model": {"preset": "deepseek-v3"}, "topology": {"nodes": 8, "gpusPerNode": 8},
         "placement": {"redundantSlots": 64, "moveBudget": 10}}
    )
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["placement"]["redundantSlots"] == 64 and dumped["placement"]["moveBudget"] == 10
    assert resolve_spec(dumped).topology.slots_per_gpu == 5


@pytest.mark.parametrize(
    "model, topology, redundant",
    [
        ({"numLayers": 1024, "numExperts": 4096}, {"nodes": 1, "gpusPerNode": 1}, 0),
        ({"numLayers": 1024, "numExperts": 4096}, {"nodes": 16, "gpusPerNode": 8}, 0),
        ({"numLayers": 256, "numExperts": 1024}, {"nodes": 32, "gpusPerNode": 8}, 1024),
    ],
)
def test_a_placement_too_big_for_its_configmap_is_invalid_at_once(model, topology, redundant):
    """Schema-valid but absurd: refused (naming the fields) before any map is built."""
    from moe_operator.crd import SpecError, resolve_spec

    spec = {
        "model": {"shape": {**model, "topK": 8, "hiddenSize": 7168, "expertIntermediateSize": 2048}},
        "topology": topology,
        "placement": {"redundantSlots": redundant},
    }
    with pytest.raises(SpecError) as error:
        resolve_spec(spec)
    message = str(error.value)
    assert message.startswith("spec.model and spec.topology:") and "ConfigMap" in message
    assert "spec.placement.redundantSlots" in message


def test_a_placement_knob_reaches_the_policy_options():
    """The one path of a CRD placement knob: spec -> PlacementSpec.policy_options -> PolicyOptions."""
    from moe_operator.crd import resolve_spec
    from moe_placement.baselines import linear_placement
    from moe_placement.models import Placement

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "moedeployment.yaml").read_text())["spec"]
    spec["placement"] = {**spec.get("placement", {}), "moveBudget": 7, "solverTimeLimitSeconds": 3}
    resolved = resolve_spec(spec)
    previous = Placement(
        linear_placement(resolved.model.num_layers, resolved.model.num_experts, resolved.topology.num_slots),
        resolved.model.num_experts, resolved.topology.slots_per_gpu,
    )
    options = resolved.spec.placement.policy_options(previous, seed=5)
    assert (options.move_budget, options.time_limit_s, options.seed) == (7, 3, 5)
    assert options.previous is previous


def test_the_router_knobs_reach_the_policy_options():
    """routerUrl makes auto weigh the router's groups (request_router signature); phases both is
    auto's joint objective; bad values name the field."""
    from moe_operator.crd import SpecError, resolve_spec
    from moe_placement.baselines import linear_placement
    from moe_placement.models import Placement

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "moedeployment.yaml").read_text())["spec"]
    resolved = resolve_spec(spec)
    previous = Placement(
        linear_placement(resolved.model.num_layers, resolved.model.num_experts, resolved.topology.num_slots),
        resolved.model.num_experts, resolved.topology.slots_per_gpu,
    )
    plain = resolved.spec.placement.policy_options(previous, seed=0)
    assert resolved.spec.placement.router_url is None and resolved.spec.placement.group_drift_threshold == 0.1
    assert plain.request_router == "round_robin"
    spec["placement"] = {
        **spec.get("placement", {}), "routerUrl": "http://router:8300", "groupDriftThreshold": 0.25,
        "objective": {"phases": "both"},
    }
    routed = resolve_spec(spec).spec.placement.policy_options(previous, seed=0)
    assert routed.request_router == "signature" and routed.phases == ("prefill", "decode")
    for field, value in (("routerUrl", "router:8300"), ("groupDriftThreshold", 0)):
        with pytest.raises(SpecError, match=f"spec.placement.{field}"):
            resolve_spec({**spec, "placement": {**spec["placement"], field: value}})
