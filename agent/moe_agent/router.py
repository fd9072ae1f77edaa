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

from moe_placement.models import Placement, PlacementError, Topology, lookup


@dataclass(frozen=True)
class TorchLayout:
    """The replicas of every layer, on one device.

    replica_slots: [L, E, R] slots of each expert in slot order, -1 padded; replica_counts: [L, E];
    gpu_of_slot: [N]; node_of_gpu: [G];
    local_slots: [L, E, G, R] for a token on GPU g, the expert's most local replicas (on g, else on
        g's node, else all) in slot order, -1 padded; local_counts: [L, E, G] how many;
    max_replicated: the most experts with more than one replica in any layer (the number of greedy
        steps ``metro`` takes).

    ``local_first``'s choice depends on a token only through (layer, expert, GPU), so its candidates
    are tabulated once per placement instead of per token.
    """

    replica_slots: torch.Tensor
    replica_counts: torch.Tensor
    gpu_of_slot: torch.Tensor
    node_of_gpu: torch.Tensor
    local_slots: torch.Tensor
    local_counts: torch.Tensor
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
        replica_slots = placement.logical_to_physical_map()
        counts = placement.replica_count()
        gpu_of_slot = np.arange(placement.num_slots) // placement.slots_per_gpu
        node_of_gpu = np.arange(placement.num_gpus) // topology.gpus_per_node
        local_slots, local_counts = _most_local(replica_slots, gpu_of_slot, node_of_gpu)
        return TorchLayout(
            replica_slots=torch.as_tensor(replica_slots, device=device),
            replica_counts=torch.as_tensor(counts, device=device),
            gpu_of_slot=torch.as_tensor(gpu_of_slot, device=device),
            node_of_gpu=torch.as_tensor(node_of_gpu, device=device),
            local_slots=torch.as_tensor(local_slots, device=device),
            local_counts=torch.as_tensor(local_counts, device=device),
            max_replicated=int((counts > 1).sum(axis=1).max()),
        )

    @property
    def num_layers(self) -> int:
        return self.replica_slots.shape[0]

    def layer(self, layer: int) -> TorchLayout:
        """The layout of one layer, as a one-layer layout."""
        one = slice(layer, layer + 1)
        return TorchLayout(
            self.replica_slots[one],
            self.replica_counts[one],
            self.gpu_of_slot,
            self.node_of_gpu,
            self.local_slots[one],
            self.local_counts[one],
            self.max_replicated,
        )


def _most_local(
    replica_slots: np.ndarray, gpu_of_slot: np.ndarray, node_of_gpu: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For replica_slots [L, E, R]: the most local replicas from each GPU, [L, E, G, R] in slot order
    (-1 padded), and their counts [L, E, G]; the distances of ``moe_placement.routing.route_local_first``."""
    valid = replica_slots >= 0
    replica_gpu = gpu_of_slot[np.where(valid, replica_slots, 0)][:, :, None, :]  # [L, E, 1, R]
    source = np.arange(len(node_of_gpu))[None, None, :, None]  # [1, 1, G, 1]
    distance = np.where(
        replica_gpu == source, 0, np.where(node_of_gpu[replica_gpu] == node_of_gpu[source], 1, 2)
    )
    distance = np.where(valid[:, :, None, :], distance, 3)
    best = distance == distance.min(axis=-1, keepdims=True)
    # Best replicas first, each group in slot order (a stable sort keeps replica_slots' order).
    order = np.argsort(~best, axis=-1, kind="stable")
    counts = best.sum(axis=-1)
    slots = np.take_along_axis(np.broadcast_to(replica_slots[:, :, None, :], best.shape), order, axis=-1)
    slots = np.where(np.arange(best.shape[-1]) < counts[..., None], slots, -1)
    return slots, counts


def _check(layout: TorchLayout, expert_ids: torch.Tensor) -> None:
    if expert_ids.dim() != 3 or expert_ids.shape[0] != layout.num_layers:
        raise PlacementError(
            f"expert_ids: expected [L={layout.num_layers}, B, k], got {tuple(expert_ids.shape)}"
        )


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table.flatten()[index], shaped as index (index_select is torch's fastest gather on CPU)."""
    return table.reshape(-1).index_select(0, index.reshape(-1)).reshape(index.shape)


def _pick(uniform: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``floor(u * count)`` in float64 as numpy computes it, capped at count - 1."""
    return torch.minimum((uniform.to(torch.float64) * count).to(torch.int64), count - 1)


def route_random(
    layout: TorchLayout, expert_ids: torch.Tensor, source_gpu: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Replica ``floor(u * replicas)``. expert_ids, uniform: [L, B, k]; source_gpu: [L, B] (unused)
    -> slots [L, B, k]."""
    _check(layout, expert_ids)
    num_layers, num_experts, max_replicas = layout.replica_slots.shape
    layer = torch.arange(num_layers, device=expert_ids.device)[:, None, None]
    key = layer * num_experts + expert_ids  # (layer, expert)
    choice = _pick(uniform, _take(layout.replica_counts, key))
    return _take(layout.replica_slots, key * max_replicas + choice)


def route_local_first(
    layout: TorchLayout, expert_ids: torch.Tensor, source_gpu: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """A replica on the token's GPU, else its node, else any; among the most local, the
    ``floor(u * n)``-th in slot order. Shapes as ``route_random``."""
    _check(layout, expert_ids)
    num_layers, num_experts, num_gpus, max_replicas = layout.local_slots.shape
    layer = torch.arange(num_layers, device=expert_ids.device)[:, None, None]
    key = (layer * num_experts + expert_ids) * num_gpus + source_gpu[:, :, None]  # (layer, expert, GPU)
    choice = _pick(uniform, _take(layout.local_counts, key))
    return _take(layout.local_slots, key * max_replicas + choice)


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
    most_tokens = flat_ids.shape[1]
    tokens = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
    tokens.scatter_add_(1, flat_ids, torch.ones_like(flat_ids))
    counts = layout.replica_counts
    single = counts == 1
    present = tokens > 0

    # A GPU's state is one integer, activated * (most_tokens + 1) + tokens, so that comparing
    # states compares (activated, tokens) and one scatter-add updates both.
    chosen = layout.replica_slots[:, :, 0].clone()  # [L, E]; single-replica experts are final
    state = torch.zeros(num_layers, num_gpus, dtype=torch.int64, device=device)
    state.scatter_add_(1, layout.gpu_of_slot[chosen], torch.where(single & present, tokens + most_tokens + 1, 0))

    steps = layout.max_replicated
    if steps:
        # The replicated experts with tokens, in numpy's lexsort order; the rest sort after them
        # and their steps change nothing.
        todo = present & ~single
        expert_index = torch.arange(num_experts, device=device)
        order_key = (counts * (most_tokens + 1) + (most_tokens - tokens)) * num_experts + expert_index
        order_key = torch.where(todo, order_key, torch.iinfo(torch.int64).max - num_experts + expert_index)
        order = torch.argsort(order_key, dim=1)[:, :steps]  # [L, M]
        active = todo.gather(1, order)
        increment = torch.where(active, tokens.gather(1, order) + most_tokens + 1, 0)  # [L, M]
        slots = layout.replica_slots[torch.arange(num_layers, device=device)[:, None], order]  # [L, M, R]
        gpus = layout.gpu_of_slot[slots.clamp(min=0)]
        # (state, slot) compared as one integer; padding replicas never win.
        never = torch.iinfo(torch.int64).max // 2
        slot_term = torch.where(slots >= 0, slots, never)
        best = torch.empty(num_layers, steps, dtype=torch.int64, device=device)
        for step in range(steps):
            step_gpus = gpus[:, step]
            key = state.gather(1, step_gpus) * num_slots + slot_term[:, step]
            pick = key.argmin(dim=1, keepdim=True)
            best[:, step : step + 1] = pick
            state.scatter_add_(1, step_gpus.gather(1, pick), increment[:, step : step + 1])
        picked = slots.gather(2, best[:, :, None]).squeeze(2)
        chosen.scatter_(1, order, torch.where(active, picked, chosen.gather(1, order)))
    return chosen.gather(1, flat_ids).reshape(expert_ids.shape)


Router = Callable[[TorchLayout, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ROUTERS: dict[str, Router] = {
    "random": route_random,
    "local_first": route_local_first,
    "metro": route_metro,
}


def get_router(name: str) -> Router:
    """The torch router called ``name``."""
    return lookup(ROUTERS, name, "router")
