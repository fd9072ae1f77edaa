"""moeplace's vLLM plugin, loaded by vLLM's plugin loader and called through vLLM's EPLB policy
interface (vllm/plugins/__init__.py, vllm/distributed/eplb/policy/)."""

from __future__ import annotations

import json

import numpy as np

from engines_helpers import run_script
from moe_agent.engines import contract
from moe_operator import builders
from moe_operator.crd import resolve_spec
from moe_placement.files import fill_empty_slots
from moe_placement.models import Placement, placement_hash

SHAPE = {"numLayers": 4, "numExperts": 16, "topK": 2, "hiddenSize": 64, "expertIntermediateSize": 32}
OWNER = {"apiVersion": "moeplace.io/v1alpha1", "kind": "MoEDeployment",
         "metadata": {"name": "demo", "namespace": "ns", "uid": "uid-1", "generation": 1}}


def test_vllm_applies_the_published_map_and_falls_back_to_its_default_policy(engines_python, tmp_path):
    resolved = resolve_spec({"model": {"shape": SHAPE}, "topology": {"nodes": 1, "gpusPerNode": 4},
                             "placement": {"redundantSlots": 4}})  # 4 ranks x 5 slots
    rng = np.random.default_rng(1)
    rows = [np.concatenate([rng.permutation(16), rng.integers(0, 16, 3), [-1]]) for _ in range(4)]
    target = Placement(np.stack(rows), 16, 5)
    configmap = builders.build_placement_configmap(OWNER, target, 9, "test", resolved)
    contract.write_published(tmp_path / "placement", configmap["data"])
    args = {"workdir": str(tmp_path), "placement_dir": str(tmp_path / "placement"),
            "num_layers": 4, "num_experts": 16, "num_replicas": 20, "num_ranks": 4}
    result = run_script(engines_python, "vllm_policy.py", json.dumps(args))

    assert result["policy"] == "MoeplaceEplbPolicy"
    filled = fill_empty_slots(target).physical_to_logical_map
    assert np.array_equal(result["published"], filled)
    assert result["misfit_equals_default"] and result["unpublished_equals_default"]
    assert any("does not fit this engine" in line for line in result["log"])
    assert any("no placement published" in line for line in result["log"])
    # the live map is reported with the published generation; vLLM's own map as generation 0
    assert result["status"]["generation"] == 9 and result["status"]["source"] == "published"
    assert result["status"]["hash"] == placement_hash(filled)
    assert result["status_after_default"]["generation"] == 0
    assert result["status_after_default"]["source"] == "engine"
    # three windows went through the policy: their global load adds up in the loads file
    assert result["loads"]["windows"] == 3
    assert np.allclose(result["loads"]["expert_tokens_total"], 3 * np.asarray(result["weight"]))
