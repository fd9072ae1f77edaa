"""SGLang's placement file and the dense layers of a model shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_placement.files import fill_empty_slots, moe_rows, sglang_physical_to_logical_map, write_sglang
from moe_placement.models import ModelShape, Placement, PlacementError
from moe_placement.presets import model_preset


def shape(**extra) -> ModelShape:
    fields = dict(num_layers=3, num_experts=4, top_k=2, hidden_size=8, expert_intermediate_size=8)
    return ModelShape(**{**fields, **extra})


@pytest.mark.parametrize(
    "name, hidden, first_moe",
    [("deepseek-v2-lite", 27, 1), ("deepseek-v3", 61, 3), ("qwen3-30b-a3b", 48, 0), ("mixtral-8x7b", 32, 0)],
)
def test_presets_know_their_dense_layers(name, hidden, first_moe):
    model = model_preset(name)
    assert model.num_hidden_layers == hidden
    assert model.moe_layer_ids().tolist() == list(range(first_moe, hidden))


def test_explicit_dense_layers_and_their_errors():
    model = shape(first_k_dense_replace=1, dense_layers=(3,))
    assert model.num_hidden_layers == 5 and model.moe_layer_ids().tolist() == [1, 2, 4]
    assert ModelShape.model_validate({**model.model_dump(by_alias=True)}) == model  # camelCase round trip
    with pytest.raises(ValueError, match="denseLayers"):
        shape(dense_layers=(1, 1))
    with pytest.raises(ValueError, match="denseLayers"):
        shape(first_k_dense_replace=2, dense_layers=(0,))
    with pytest.raises(ValueError, match="denseLayers"):
        shape(dense_layers=(9,))


def test_fill_gives_spare_slots_to_the_hottest_experts_not_already_on_the_gpu():
    mapping = np.array([[0, 1, 2, 3, -1, -1]])  # 3 GPUs x 2 slots
    load = np.array([[10.0, 50.0, 30.0, 5.0]])
    filled = fill_empty_slots(Placement(mapping, 4, 2), load).physical_to_logical_map
    assert filled.tolist() == [[0, 1, 2, 3, 1, 2]]
    # without a load, the most-replicated experts win, and a GPU never gets a second copy
    mapping = np.array([[0, 1, 1, 2, 3, -1]])
    assert fill_empty_slots(Placement(mapping, 4, 2)).physical_to_logical_map.tolist() == [[0, 1, 1, 2, 3, 1]]
    full = Placement(np.array([[0, 1, 2, 3]]), 4, 2)
    assert fill_empty_slots(full) is full


def test_sglang_map_has_every_transformer_layer_and_no_empty_slot(tmp_path):
    model = shape(first_k_dense_replace=1, dense_layers=(3,))
    mapping = np.array([[0, 1, 2, 3, -1, -1], [3, 2, 1, 0, 0, -1], [0, 0, 1, 2, 3, 3]])
    placement = Placement(mapping, 4, 2)
    rows = sglang_physical_to_logical_map(placement, model)
    assert rows.shape == (5, 6) and (rows >= 0).all()
    assert rows[0].tolist() == rows[3].tolist() == [0, 1, 2, 3, 0, 1]  # SGLang's trivial row
    assert np.array_equal(moe_rows(rows, model), fill_empty_slots(placement).physical_to_logical_map)
    write_sglang(tmp_path / "map.json", placement, model)
    assert json.loads((tmp_path / "map.json").read_text())["physical_to_logical_map"] == rows.tolist()
    with pytest.raises(PlacementError, match="MoE layers"):
        sglang_physical_to_logical_map(Placement(mapping[:2], 4, 2), model)
    with pytest.raises(PlacementError, match="transformer-layer rows"):
        moe_rows(rows[:4], model)
