"""Token -> replica routers in torch, on the device of the routing tensors.

Each router gives, for every (layer, token, choice), the slot that serves it, and gives exactly the
slots of the numpy reference in ``moe_placement.routing`` on the same input, tie-breaking included
(see that module's docstring). Uniform draws are taken in float64, as numpy computes
``uniform * replicas``; pass float64 draws to get bit-identical choices.

All layers of a placement are routed in one call: ``random`` and ``local_first`` are plain gathers
and comparisons; ``metro``'s greedy is sequential over the replicated experts of a layer, so it steps
over the i-th replicated expert of every layer at once, with as many steps as the layout's most
replicated experts in a layer (known from the placement, so no device value is read on the host).

Shapes: L layers, B tokens, k choices, E experts, R most replicas of an expert, N slots, G GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moe_placement.models import Placement, PlacementError, Topology


@dataclass(frozen=True)
class TorchLayout:
    """The replicas of every layer, on one device.

    replica_slots: [L, E, R] slots of each expert in slot order, -1 padded; replica_counts: [L, E];
    gpu_of_slot: [N]; node_of_gpu: [G]; max_replicated: the most experts with more than one
    replica in any layer (the number of greedy steps ``metro`` takes).
    """

    replica_slots: torch.Tensor
    replica_counts: torch.Tensor
    gpu_of_slot: torch.Tensor
    node_of_gpu: torch.Tensor
    max_replicated: int

    @staticmethod
    def from_placement(
        placement: Placement, topology: Topology, device: torch.device | str = "cpu"
    ) -> TorchLayout:
        """The layout of a placement (the torch twin of ``moe_placement.routing.replica_layouts``)."""
        if placement.num_gpus != topology.num_gpus:
            raise PlacementError(
                f"topology: {topology.num_gpus} GPUs, placement has {placement.num_gpus}"
            )
        counts = placement.replica_count()
        return TorchLayout(
            replica_slots=torch.as_tensor(placement.logical_to_physical_map(), device=device),
            replica_counts=torch.as_tensor(counts, device=device),
            gpu_of_slot=torch.arange(placement.num_slots, device=device) // placement.slots_per_gpu,
            node_of_gpu=torch.arange(placement.num_gpus, device=device) // topology.gpus_per_node,
            max_replicated=int((counts > 1).sum(axis=1).max()),
        )

    @property
    def num_layers(self) -> int:
        return self.replica_slots.shape[0]

    def layer(self, layer: int) -> TorchLayout:
        """The layout of one layer, as a one-layer layout."""
        counts = self.replica_counts[layer : layer + 1]
        return TorchLayout(
            self.replica_slots[layer : layer + 1],
            counts,
            self.gpu_of_slot,
            self.node_of_gpu,
            self.max_replicated,
        )


def _check(layout: TorchLayout, expert_ids: torch.Tensor) -> None:
    if expert_ids.dim() != 3 or expert_ids.shape[0] != layout.num_layers:
        raise PlacementError(
            f"expert_ids: expected [L={layout.num_layers}, B, k], got {tuple(expert_ids.shape)}"
        )


def _layer_rows(layout: TorchLayout, expert_ids: torch.Tensor) -> torch.Tensor:
    """Layer index broadcast against expert_ids [L, B, k]."""
    return torch.arange(layout.num_layers, device=expert_ids.device)[:, None, None]


def route_random(
    layout: TorchLayout, expert_ids: torch.Tensor, source_gpu: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Replica ``floor(u * replicas)``. expert_ids, uniform: [L, B, k]; source_gpu: [L, B] (unused)
    -> slots [L, B, k]."""
    _check(layout, expert_ids)
    layer = _layer_rows(layout, expert_ids)
    counts = layout.replica_counts[layer, expert_ids]
    choice = torch.minimum((uniform.to(torch.float64) * counts).to(torch.int64), counts - 1)
    return layout.replica_slots[layer, expert_ids, choice]


def route_local_first(
    layout: TorchLayout, expert_ids: torch.Tensor, source_gpu: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """A replica on the token's GPU, else its node, else any; among the most local, the
    ``floor(u * n)``-th in slot order. Shapes as ``route_random``."""
    _check(layout, expert_ids)
    layer = _layer_rows(layout, expert_ids)
    candidates = layout.replica_slots[layer, expert_ids]  # [L, B, k, R]
    valid = candidates >= 0
    candidate_gpu = layout.gpu_of_slot[candidates.clamp(min=0)]
    source = source_gpu[:, :, None, None]
    same_node = layout.node_of_gpu[candidate_gpu] == layout.node_of_gpu[source]
    distance = torch.where(candidate_gpu == source, 0, torch.where(same_node, 1, 2))
    distance = torch.where(valid, distance, 3)
    best = distance == distance.min(dim=-1, keepdim=True).values
    best_count = best.sum(dim=-1)
    rank_among_best = torch.cumsum(best, dim=-1) - 1
    pick = torch.minimum((uniform.to(torch.float64) * best_count).to(torch.int64), best_count - 1)
    chosen = best & (rank_among_best == pick[..., None])
    # Exactly one candidate is chosen per (token, choice): the index of the largest True.
    return candidates.gather(-1, chosen.to(torch.int8).argmax(dim=-1, keepdim=True)).squeeze(-1)


def route_metro(
    layout: TorchLayout, expert_ids: torch.Tensor, source_gpu: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """METRO greedy, fewest activated experts per GPU. Shapes as ``route_random``.

    Every expert's tokens go to one replica. Experts with one replica are placed first; the others,
    in order of (fewest replicas, most tokens, lowest id), each take the replica whose GPU has the
    fewest activated experts so far, then the fewest tokens, then the lowest slot.
    """
    _check(layout, expert_ids)
    num_layers, num_experts, max_replicas = layout.replica_slots.shape
    num_gpus = layout.node_of_gpu.shape[0]
    num_slots = layout.gpu_of_slot.shape[0]
    device = expert_ids.device
    flat_ids = expert_ids.reshape(num_layers, -1)
    tokens = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
    tokens.scatter_add_(1, flat_ids, torch.ones_like(flat_ids))
    present = tokens > 0
    counts = layout.replica_counts
    single = counts == 1

    chosen = layout.replica_slots[:, :, 0].clone()  # [L, E]; single-replica experts are final
    first_gpu = layout.gpu_of_slot[chosen]
    activated = torch.zeros(num_layers, num_gpus, dtype=torch.int64, device=device)
    activated.scatter_add_(1, first_gpu, (present & single).to(torch.int64))
    gpu_tokens = torch.zeros(num_layers, num_gpus, dtype=torch.int64, device=device)
    gpu_tokens.scatter_add_(1, first_gpu, torch.where(single, tokens, 0))

    # One sort key orders each layer's replicated experts that have tokens, as numpy's lexsort
    # does; the rest sort after them and their steps change nothing.
    most_tokens = flat_ids.shape[1]
    todo = present & ~single
    expert_index = torch.arange(num_experts, device=device)
    order_key = (counts * (most_tokens + 1) + (most_tokens - tokens)) * num_experts + expert_index
    order_key = torch.where(todo, order_key, torch.iinfo(torch.int64).max - num_experts + expert_index)
    order = torch.argsort(order_key, dim=1)
    rows = torch.arange(num_layers, device=device)
    replica_rank = torch.arange(max_replicas, device=device)
    for step in range(layout.max_replicated):
        expert = order[:, step]  # [L]
        active = todo[rows, expert]
        slots = layout.replica_slots[rows, expert]  # [L, R]
        gpus = layout.gpu_of_slot[slots.clamp(min=0)]
        # (activated, tokens, slot) compared as one integer; padding replicas never win.
        key = (activated.gather(1, gpus) * (most_tokens + 1) + gpu_tokens.gather(1, gpus)) * num_slots + slots
        key = torch.where(replica_rank < counts[rows, expert][:, None], key, torch.iinfo(torch.int64).max)
        best = key.argmin(dim=1, keepdim=True)
        best_gpu = gpus.gather(1, best)
        chosen[rows, expert] = torch.where(active, slots.gather(1, best).squeeze(1), chosen[rows, expert])
        activated.scatter_add_(1, best_gpu, active.to(torch.int64)[:, None])
        gpu_tokens.scatter_add_(1, best_gpu, torch.where(active, tokens[rows, expert], 0)[:, None])
    return chosen.gather(1, flat_ids).reshape(expert_ids.shape)


Router = Callable[[TorchLayout, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ROUTERS: dict[str, Router] = {
    "random": route_random,
    "local_first": route_local_first,
    "metro": route_metro,
}


def get_router(name: str) -> Router:
    """The torch router called ``name``."""
    try:
        return ROUTERS[name]
    except KeyError:
        raise PlacementError(f"router: unknown {name!r}; known: {', '.join(ROUTERS)}") from None


def as_numpy_slots(slots: torch.Tensor) -> np.ndarray:
    """Slots on the host, int64 (for comparisons with the numpy reference)."""
    return slots.cpu().numpy().astype(np.int64)
