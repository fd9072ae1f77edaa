"""A small Mixtral-style MoE model whose experts live in slots, for the replay engine.

Each block has a ``gate`` (router: linear -> softmax -> top-k, renormalised, returning
``(logits, weights, ids)`` as Hugging Face's 5.x routers do) and ``experts`` (the SwiGLU experts of
the slots given to it), so ``moe_agent.attach`` records it like any Hugging Face MoE model.

In expert parallelism a rank runs the gate on the tokens its attention produced and the experts of
its own slots on the tokens routed there from every rank; the replay engine calls ``block.gate`` and
``block.experts`` separately for that. ``MoEBlock.forward`` is the one-rank composition (every expert
in the slot of its own id), for use as an ordinary model.

A replayed trace fixes which experts each token chose: ``gate(hidden, forced_ids=...)`` returns those
ids with the gate's own softmax weights for them, so recording and weighting stay real.

Shapes: T tokens, H hidden size, E experts, k experts per token, n (token, choice) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe_agent.store import ExpertWeights


class MoEGate(nn.Module):
    """Top-k router: weight [E, H]."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        weight = torch.randn(num_experts, hidden_size, generator=generator) / hidden_size**0.5
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(
        self, hidden: torch.Tensor, forced_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, H] (forced_ids [T, k]) -> logits [T, E], weights [T, k], ids [T, k]."""
        logits = nn.functional.linear(hidden.to(self.weight.dtype), self.weight)
        probabilities = torch.softmax(logits.float(), dim=-1)
        if forced_ids is None:
            weights, ids = torch.topk(probabilities, self.top_k, dim=-1)
        else:
            ids = forced_ids.to(torch.int64)
            weights = probabilities.gather(1, ids)
        return logits, weights / weights.sum(dim=-1, keepdim=True), ids


class SlotExperts(nn.Module):
    """The experts held in a rank's slots. Holds no parameters: weights come with each call, since
    migrations replace them while the model runs."""

    def forward(
        self,
        hidden: torch.Tensor,
        local_slot: torch.Tensor,
        route_weight: torch.Tensor,
        slot_weights: Sequence[ExpertWeights | None],
    ) -> torch.Tensor:
        """hidden [n, H] of each (token, choice) pair, local_slot [n] (index into slot_weights),
        route_weight [n] -> [n, H] each pair's expert output times its routing weight."""
        output = torch.zeros_like(hidden)
        for slot in torch.unique(local_slot).tolist():
            weights = slot_weights[slot]
            if weights is None:
                raise RuntimeError(f"slot {slot}: tokens routed to a slot without weights")
            rows = torch.nonzero(local_slot == slot).squeeze(1)
            # The store may keep weights elsewhere (CPU) than the routing runs (--device).
            expert_out = weights.forward(hidden[rows].to(weights.w_gate.device, weights.w_gate.dtype))
            weighted = expert_out * route_weight[rows, None].to(expert_out.device, expert_out.dtype)
            output[rows] = weighted.to(output.device, output.dtype)
        return output


class MoEBlock(nn.Module):
    """One MoE layer: ``gate`` and ``experts``."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator | None = None):
        super().__init__()
        self.gate = MoEGate(hidden_size, num_experts, top_k, generator)
        self.experts = SlotExperts()

    def forward(self, hidden: torch.Tensor, slot_weights: Sequence[ExpertWeights | None]) -> torch.Tensor:
        """One-rank forward, expert e in slot e: hidden [T, H] -> hidden + MoE(hidden) [T, H]."""
        _, weights, ids = self.gate(hidden)
        token = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(ids.shape[1])
        moe = self.experts(hidden[token], ids.reshape(-1), weights.reshape(-1), slot_weights)
        return hidden + torch.zeros_like(hidden).index_add_(0, token, moe)


class ReplayMoEModel(nn.Module):
    """L MoE blocks (``layers``); gates are deterministic from ``seed``."""

    def __init__(self, num_layers: int, hidden_size: int, num_experts: int, top_k: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(
            MoEBlock(hidden_size, num_experts, top_k, generator) for _ in range(num_layers)
        )

    def forward(
        self, hidden: torch.Tensor, slot_weights: Sequence[Sequence[ExpertWeights | None]]
    ) -> torch.Tensor:
        """One-rank forward: hidden [T, H], slot_weights[l][e] the weights of expert e of layer l."""
        for block, layer_weights in zip(self.layers, slot_weights):
            hidden = block(hidden, layer_weights)
        return hidden
