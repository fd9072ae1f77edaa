"""Expert store: real tensors of the model's size, their safetensors form, sha256, slots, checkpoints."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from safetensors.torch import save as safetensors_save

from moe_placement.presets import model_preset
from moe_agent.store import (
    ExpertStore,
    SlotBusy,
    WeightsError,
    read_checkpoint,
    write_checkpoint,
)

from agent_helpers import TINY


def test_weights_are_deterministic_and_sized_from_the_model():
    one, other = ExpertStore(TINY, 5, 0, seed=3), ExpertStore(TINY, 5, 1, seed=3)
    weights = one.initial_weights(2, 6)
    assert weights.w_gate.shape == (128, 64) and weights.w_down.shape == (64, 128)
    assert weights.w_gate.dtype == torch.bfloat16
    assert weights.nbytes == one.expert_nbytes == 3 * 64 * 128 * 2
    data = weights.to_bytes()
    assert data == other.initial_weights(2, 6).to_bytes()  # same bytes on every agent
    assert data != one.initial_weights(2, 7).to_bytes()
    assert data != ExpertStore(TINY, 5, 0, seed=4).initial_weights(2, 6).to_bytes()


def test_expert_scale_divides_the_width():
    shape = model_preset("deepseek-v2-lite")
    store = ExpertStore(shape, 10, 0, expert_scale=16)
    assert store.intermediate_size == math.ceil(1408 / 16)
    assert store.expert_nbytes == 3 * 2048 * 88 * 2
    assert shape.expert_bytes / store.expert_nbytes == pytest.approx(16, rel=0.01)


def test_parse_weights_round_trip_and_refusals():
    store = ExpertStore(TINY, 5, 0)
    weights = store.initial_weights(0, 1)
    parsed = store.parse_weights(weights.to_bytes())
    assert all(torch.equal(getattr(parsed, n), getattr(weights, n)) for n in ("w_gate", "w_up", "w_down"))
    with pytest.raises(WeightsError, match="safetensors"):
        store.parse_weights(b"garbage")
    with pytest.raises(WeightsError, match="tensors"):
        store.parse_weights(safetensors_save({"w_gate": weights.w_gate}))
    wrong_dtype = {"w_gate": weights.w_gate.float(), "w_up": weights.w_up, "w_down": weights.w_down}
    with pytest.raises(WeightsError, match="w_gate"):
        store.parse_weights(safetensors_save(wrong_dtype))
    other_width = ExpertStore(TINY, 5, 0, expert_scale=2).initial_weights(0, 1)
    with pytest.raises(WeightsError, match="expected"):
        store.parse_weights(other_width.to_bytes())


def test_slot_states_and_reservations():
    store = ExpertStore(TINY, 5, 1)  # owns slots 5..9
    assert store.owns(5) and store.owns(9) and not store.owns(4) and not store.owns(10)
    store.load_live(0, 5, 3)
    assert store.slot(0, 5).state == "live" and store.holding(0, 3) is store.slot(0, 5)
    with pytest.raises(SlotBusy, match="live"):
        store.reserve(0, 5)
    store.reserve(0, 6)
    with pytest.raises(SlotBusy, match="transfer"):
        store.reserve(0, 6)
    assert store.slot(0, 6).state == "empty"  # reserved slots are still empty to the world
    store.release(0, 6)
    store.reserve(0, 6)
    weights = store.initial_weights(0, 3)
    store.stage(0, 6, 3, weights, hashlib.sha256(weights.to_bytes()).hexdigest())
    assert store.slot(0, 6).state == "staged"
    assert store.holding(0, 3) is store.slot(0, 5)  # live preferred over staged
    assert store.occupancy() == {"live": 1, "staged": 1, "empty": TINY.num_layers * 5 - 2}
    store.set_live(0, 6)
    store.drop(0, 5)
    assert store.holding(0, 3) is store.slot(0, 6) and store.slot(0, 5).state == "empty"


def test_checkpoint_files(tmp_path):
    weights = ExpertStore(TINY, 5, 0).initial_weights(1, 2)
    digest = write_checkpoint(tmp_path, 1, 2, weights)
    assert (tmp_path / "layer1_expert2.safetensors").read_bytes() == weights.to_bytes()
    assert read_checkpoint(tmp_path, 1, 2) == (weights.to_bytes(), digest)
    assert digest == hashlib.sha256(weights.to_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path, 1, 3)
