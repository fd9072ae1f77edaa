"""moeplace's SGLang files through SGLang's own loader (``compute_initial_expert_location_metadata``
in sglang/srt/eplb/expert_location.py), for the layer layouts of three real models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines_helpers import run_script
from moe_placement.files import fill_empty_slots, write_sglang
from moe_placement.models import Placement
from moe_placement.presets import model_preset

EP_SIZE = 8
# The models' HF configs, the fields SGLang reads (config.json of each model).
HF_CONFIGS = {
    "deepseek-v2-lite": ("deepseek", {"num_hidden_layers": 27, "n_routed_experts": 64, "n_group": 1}),
    "deepseek-v3": ("deepseek", {"num_hidden_layers": 61, "n_routed_experts": 256, "n_group": 8}),
    "qwen3-30b-a3b": ("qwen3_moe", {"num_hidden_layers": 48, "num_experts": 128}),
}


def placement_with_spares(num_layers: int, num_experts: int, redundant: int, seed: int) -> tuple[Placement, np.ndarray]:
    """Every expert once, `redundant` spare slots: half replicas, half left empty; and a load [L, E]."""
    rng = np.random.default_rng(seed)
    load = rng.pareto(1.5, (num_layers, num_experts)) + 1
    rows = []
    for layer in range(num_layers):
        spares = np.concatenate([np.argsort(-load[layer])[: redundant // 2], np.full(redundant - redundant // 2, -1)])
        rows.append(rng.permutation(np.concatenate([np.arange(num_experts), spares])))
    slots = num_experts + redundant
    return Placement(np.stack(rows), num_experts, slots // EP_SIZE), load


@pytest.fixture(scope="module")
def loaded(engines_python, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sglang")
    cases, expected = [], {}
    for seed, (name, (architecture, hf_config)) in enumerate(HF_CONFIGS.items()):
        model = model_preset(name)
        placement, load = placement_with_spares(model.num_layers, model.num_experts, 16, seed)
        path = directory / f"{name}.json"
        write_sglang(path, placement, model, load)
        cases.append({"file": str(path), "architecture": architecture, "hf_config": hf_config,
                      "ep_size": EP_SIZE, "redundant": 16})
        expected[name] = (model, fill_empty_slots(placement, load), json.loads(path.read_text()))
    # What the issue found: a file of MoE rows only loads without a word, one layer short, and a -1
    # slot counts as a replica of the last expert.
    model = model_preset("deepseek-v2-lite")
    placement, _ = placement_with_spares(model.num_layers, model.num_experts, 16, 7)
    old_style = directory / "moe-rows-only.json"
    old_style.write_text(json.dumps({"physical_to_logical_map": placement.physical_to_logical_map.tolist()}))
    cases.append({**cases[0], "file": str(old_style)})
    results = run_script(engines_python, "sglang_expert_location.py", json.dumps(cases))
    return dict(zip(HF_CONFIGS, results)), expected, (placement, results[-1])


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_sglang_loads_every_transformer_layer_with_the_planned_experts(loaded, name):
    results, expected, _ = loaded
    model, filled, written = expected[name]
    result = results[name]
    assert result["num_layers"] == model.num_hidden_layers == len(written["physical_to_logical_map"])
    served = np.asarray(result["physical_to_logical_map"])
    assert np.array_equal(served, written["physical_to_logical_map"])
    moe = model.moe_layer_ids()
    assert np.array_equal(served[moe], filled.physical_to_logical_map)
    # SGLang's replica count of each (layer, expert) is the plan's, on the layer SGLang runs it at
    assert np.array_equal(np.asarray(result["num_valid"])[moe], filled.replica_count())
    dense = np.setdiff1d(np.arange(model.num_hidden_layers), moe)
    assert (np.asarray(result["num_valid"])[dense] >= 1).all()


def test_the_old_moe_rows_file_shifts_layers_and_counts_empty_slots_as_the_last_expert(loaded):
    _, _, (placement, result) = loaded
    assert result["num_layers"] == 26  # DeepSeek-V2-Lite has 27: row l lands on layer l, not l + 1
    empty = (placement.physical_to_logical_map < 0).sum(axis=1)
    last_expert = placement.replica_count()[:, -1]
    assert np.array_equal(np.asarray(result["num_valid"])[:, -1], last_expert + empty)


def test_sglang_plugin_applies_the_published_map_through_sglangs_metadata(engines_python, tmp_path):
    from moe_agent.engines import contract
    from moe_operator import builders
    from moe_operator.crd import resolve_spec
    from moe_placement.files import sglang_physical_to_logical_map

    shape = {"numLayers": 3, "numExperts": 8, "topK": 2, "hiddenSize": 64, "expertIntermediateSize": 32,
             "firstKDenseReplace": 1}
    resolved = resolve_spec({"model": {"shape": shape}, "topology": {"nodes": 1, "gpusPerNode": 2},
                             "placement": {"redundantSlots": 2}})
    owner = {"metadata": {"name": "demo", "namespace": "ns", "uid": "u"}}
    first, second = (Placement(placement_with_spares(3, 8, 2, seed)[0].physical_to_logical_map, 8, 5)
                     for seed in (1, 2))  # 2 GPUs x 5 slots
    data = {generation: builders.build_placement_configmap(owner, placement, generation, "test", resolved)["data"]
            for generation, placement in ((1, first), (2, second))}
    contract.write_published(tmp_path / "placement", data[1])
    args = {"placement_dir": str(tmp_path / "placement"), "engine_dir": str(tmp_path / "engine"),
            "hf_config": {"num_hidden_layers": 4, "n_routed_experts": 8, "n_group": 1},
            "ep_size": 2, "redundant": 2, "second": data[2]}
    result = run_script(engines_python, "sglang_plugin_rebalance.py", json.dumps(args))
    assert result["started"]["generation"] == 1 and result["started"]["source"] == "published"
    assert result["unchanged_calls"] == 0
    moved = result["moved"]
    assert moved["generation"] == 2 and moved["source"] == "published"
    assert moved["physical_to_logical_map"] == fill_empty_slots(second).physical_to_logical_map.tolist()
    assert result["live_full"] == sglang_physical_to_logical_map(second, resolved.model).tolist()
    assert result["own_algorithm_calls"] == 1
