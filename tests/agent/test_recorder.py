"""The routing recorder on real torch modules: Hugging Face MoE models built from tiny random configs
(no weights downloaded), our replay model, and the explicit ``record`` API."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from moe_placement.models import PlacementError
from moe_agent.model import ReplayMoEModel
from moe_agent.recorder import RoutingRecorder, attach, find_moe_blocks, routing_of, topk_ids_of_gate_output
from moe_agent.store import ExpertStore

from agent_helpers import TINY

transformers = pytest.importorskip("transformers")

NUM_EXPERTS, TOP_K, LAYERS = 8, 2, 3
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64)


def _mixtral():
    config = transformers.MixtralConfig(
        **COMMON, num_key_value_heads=2, intermediate_size=64, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K
    )
    return transformers.MixtralForCausalLM(config), LAYERS


def _qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        **COMMON, num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
    )
    return transformers.Qwen2MoeForCausalLM(config), LAYERS


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        **COMMON, num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
        num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
    )
    return transformers.Qwen3MoeForCausalLM(config), LAYERS


def _deepseek_v3():
    if not hasattr(transformers, "DeepseekV3ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepseekV3ForCausalLM")
    # Layer 0 dense (first_k_dense_replace=1): the recorder must count MoE layers only.
    config = transformers.DeepseekV3Config(
        **COMMON, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, n_group=2, topk_group=1,
        first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )
    return transformers.DeepseekV3ForCausalLM(config), LAYERS - 1


def brute_force(ids_per_layer: list[np.ndarray], num_experts: int):
    """Load [L, E], transitions and co-activation as Counters of (layer, first, second), by loops."""
    load = np.zeros((len(ids_per_layer), num_experts), dtype=np.int64)
    transitions: Counter = Counter()
    coactivation: Counter = Counter()
    for layer, ids in enumerate(ids_per_layer):
        for token, choices in enumerate(ids.tolist()):
            for position, expert in enumerate(choices):
                load[layer, expert] += 1
                for other in choices[position + 1 :]:
                    coactivation[(layer, min(expert, other), max(expert, other))] += 1
                if layer + 1 < len(ids_per_layer):
                    for following in ids_per_layer[layer + 1][token].tolist():
                        transitions[(layer, expert, following)] += 1
    return load, transitions, coactivation


def as_counter(pairs) -> Counter:
    return Counter(
        {(int(l), int(f), int(s)): int(c) for l, f, s, c in zip(pairs.layer, pairs.first, pairs.second, pairs.count)}
    )


@pytest.mark.parametrize("build", [_mixtral, _qwen2_moe, _qwen3_moe, _deepseek_v3], ids=["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3"])
def test_attach_records_hugging_face_models(build):
    torch.manual_seed(0)
    model, moe_layers = build()
    model.eval()
    blocks = find_moe_blocks(model)
    assert len(blocks) == moe_layers
    recorder = attach(model)
    assert (recorder.num_layers, recorder.num_experts) == (moe_layers, NUM_EXPERTS)

    # Brute force: the gates' inputs, routed again by the gates themselves after the forward pass.
    gate_inputs: list[torch.Tensor] = []
    handles = [block.gate.register_forward_pre_hook(lambda _m, args: gate_inputs.append(args[0])) for _, block in blocks]
    batches = [torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (3, 7))]
    with torch.no_grad():
        for input_ids in batches:
            model(input_ids)
    for handle in handles:
        handle.remove()
    snapshot = recorder.snapshot(top_pairs=NUM_EXPERTS * NUM_EXPERTS)
    recorder.detach()  # the brute force below calls the gates again
    ids_per_layer = []
    with torch.no_grad():
        for layer, (_, block) in enumerate(blocks):
            chosen = [topk_ids_of_gate_output(block.gate(x), routing_of(block, TOP_K)) for x in gate_inputs[layer::moe_layers]]
            ids_per_layer.append(torch.cat(chosen).numpy())

    tokens = sum(batch.numel() for batch in batches)
    load, transitions, coactivation = brute_force(ids_per_layer, NUM_EXPERTS)
    assert snapshot.tokens == tokens
    np.testing.assert_array_equal(snapshot.load, load)
    assert snapshot.load.sum(axis=1).tolist() == [tokens * TOP_K] * moe_layers
    assert as_counter(snapshot.transitions) == transitions
    assert as_counter(snapshot.coactivation) == coactivation

    with torch.no_grad():
        model(batches[0])
    assert recorder.snapshot().tokens == tokens  # hooks gone


def test_attach_records_our_replay_model():
    model = ReplayMoEModel(TINY.num_layers, TINY.hidden_size, TINY.num_experts, TINY.top_k, seed=1)
    store = ExpertStore(TINY, TINY.num_experts, 0)
    weights = [[store.initial_weights(layer, e) for e in range(TINY.num_experts)] for layer in range(TINY.num_layers)]
    recorder = attach(model)
    ids_per_layer: list[list[torch.Tensor]] = [[] for _ in range(TINY.num_layers)]
    for layer, block in enumerate(model.layers):
        block.gate.register_forward_hook(lambda _m, _i, out, layer=layer: ids_per_layer[layer].append(out[2]))
    with torch.no_grad():
        hidden = torch.randn(40, TINY.hidden_size)
        output = model(hidden, weights)
    assert output.shape == hidden.shape and torch.isfinite(output).all()
    load, transitions, coactivation = brute_force([torch.cat(i).numpy() for i in ids_per_layer], TINY.num_experts)
    snapshot = recorder.snapshot(top_pairs=64)
    np.testing.assert_array_equal(snapshot.load, load)
    assert as_counter(snapshot.transitions) == transitions
    assert as_counter(snapshot.coactivation) == coactivation


class _LinearGateBlock(nn.Module):
    """A pre-5.x Mixtral-style block: the gate is a linear layer returning logits."""

    def __init__(self, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.gate(hidden)
        return hidden


def test_linear_gates_route_by_softmax_top_k():
    model = nn.Sequential(_LinearGateBlock(16, 6, 2), _LinearGateBlock(16, 6, 2))
    recorder = attach(model)
    hidden = torch.randn(30, 16)
    with torch.no_grad():
        model(hidden)
        load = recorder.snapshot().load
        recorder.detach()
        expected = [torch.topk(torch.softmax(block.gate(hidden), -1), 2).indices.numpy() for block in model]
    np.testing.assert_array_equal(load, brute_force(expected, 6)[0])


class _ReplicatedLinearGate(nn.Linear):
    """A gate shaped like vLLM's ``ReplicatedLinear`` (vllm/model_executor/layers/linear.py): its
    forward returns the tuple (output, output_bias), the bias None unless skip_bias_add."""

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(hidden), None


class _VllmStyleBlock(nn.Module):
    """A DeepSeek-V3 block as vLLM builds it (vllm/model_executor/models/deepseek_v2.py): the gate
    holds ``e_score_correction_bias``; the experts' router holds the grouped top-k settings."""

    def __init__(self, hidden: int, experts: int, top_k: int, groups: int, topk_group: int):
        super().__init__()
        self.gate = _ReplicatedLinearGate(hidden, experts, bias=False)
        self.gate.e_score_correction_bias = nn.Parameter(torch.randn(experts) * 0.5, requires_grad=False)
        self.experts = nn.Module()
        self.experts.top_k = top_k
        self.experts.router = nn.Module()
        self.experts.router.num_expert_group, self.experts.router.topk_group = groups, topk_group
        self.experts.router.scoring_func = "sigmoid"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.gate(hidden)
        return hidden + logits.sum()


def test_vllm_tuple_gates_with_deepseek_v3_routing_match_hugging_faces_router():
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V3")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    block = _VllmStyleBlock(32, 16, 4, groups=4, topk_group=2)
    model = nn.Sequential(block)
    recorder = attach(model)
    hidden = torch.randn(64, 32)
    with torch.no_grad():
        model(hidden)
    config = transformers.DeepseekV3Config(
        hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True
    )
    reference = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        reference.weight.copy_(block.gate.weight)
        reference.e_score_correction_bias.copy_(block.gate.e_score_correction_bias)
        hf_ids = reference(hidden)[-1]
    assert recorder.hook_errors == 0
    np.testing.assert_array_equal(recorder.snapshot().load, brute_force([hf_ids.numpy()], 16)[0])


class _BrokenGateBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.gate.top_k = 2
        self.experts = nn.ModuleList()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gate(hidden)


def test_a_failing_hook_is_counted_and_logged_once_and_the_forward_pass_goes_on(caplog):
    block = _BrokenGateBlock()
    recorder = attach(block)
    recorder.num_layers = 0  # every record() now raises: layer 0 out of range
    hidden = torch.randn(5, 8)
    with caplog.at_level("WARNING", logger="moe_agent.recorder"):
        outputs = [block(hidden) for _ in range(3)]
    expected = nn.functional.linear(hidden, block.gate.weight, block.gate.bias)
    assert all(torch.equal(output, expected) for output in outputs)
    assert recorder.hook_errors == 3
    assert len([record for record in caplog.records if "not recorded" in record.message]) == 1


def test_attach_refuses_models_without_moe_blocks():
    with pytest.raises(PlacementError, match="no MoE block"):
        attach(nn.Linear(4, 4))


def test_windows_roll_on_the_clock():
    now = [100.0]
    recorder = RoutingRecorder(2, 4, window_seconds=10.0, clock=lambda: now[0])
    ids = torch.tensor([[0, 1], [2, 3]])
    recorder.record(0, ids)
    now[0] += 6
    assert recorder.window_age_seconds() == pytest.approx(6.0)
    recorder.record(0, ids)
    now[0] += 6  # the first window is 12 s old: it becomes the previous one
    recorder.record(0, ids)
    snapshot = recorder.snapshot()
    assert snapshot.tokens == 6 and snapshot.window_seconds == pytest.approx(12.0)
    assert recorder.window_age_seconds() == pytest.approx(0.0)
    now[0] += 11  # rolls again: the first two records leave the window
    snapshot = recorder.snapshot()
    assert snapshot.tokens == 2 and snapshot.load[0].tolist() == [1, 1, 1, 1]
    now[0] += 25  # nothing recorded for two windows: nothing left
    snapshot = recorder.snapshot()
    assert snapshot.tokens == 0 and snapshot.load.sum() == 0
    assert snapshot.window_seconds == pytest.approx(10.0)


def test_explicit_record_pairs_and_top_pairs():
    recorder = RoutingRecorder(3, 4)
    recorder.record(0, torch.tensor([[0, 1], [0, 1], [2, 3]]))
    recorder.record(1, torch.tensor([[1, 2], [1, 2], [1, 2]]))
    recorder.record(0, torch.tensor([[3, 2]]))
    recorder.record(2, torch.tensor([[0, 1]]))  # not right after layer 1: no 1 -> 2 transition
    snapshot = recorder.snapshot(top_pairs=2)
    assert snapshot.tokens == 4
    assert snapshot.transitions.layer.tolist() == [0, 0]  # layer 1 -> 2 never paired
    # Layer 0 -> 1: (0,1),(0,2),(1,1),(1,2) twice each, (2,1),(2,2),(3,1),(3,2) once: top 2 by
    # count, ties by the lower pair key.
    assert list(zip(snapshot.transitions.first, snapshot.transitions.second, snapshot.transitions.count)) == [
        (0, 1, 2.0), (0, 2, 2.0)
    ]
    co = as_counter(snapshot.coactivation)
    assert co[(0, 0, 1)] == 2 and co[(0, 2, 3)] == 2 and co[(1, 1, 2)] == 3
    with pytest.raises(PlacementError, match="layer"):
        recorder.record(3, torch.tensor([[0, 1]]))
    recorder.reset()
    assert recorder.snapshot().tokens == 0


def test_recording_never_reads_the_device():
    # Meta tensors have no data: any host read (.item(), .cpu(), bincount sizing) would raise.
    recorder = RoutingRecorder(2, 8, device="meta")
    ids = torch.empty(64, 2, dtype=torch.int64, device="meta")
    recorder.record(0, ids)
    recorder.record(1, ids)
    assert recorder._current.tokens == 64
