"""Token -> replica routers, numpy reference versions.

A router decides, for each (token, choice) of one layer, which slot (replica) serves it. The agent's
torch routers must give the same slots on the same input, so tie-breaking is part of the contract:

- ``random`` (vLLM): replica ``floor(u * replicas)`` of the expert, u one uniform draw per (token, k).
- ``local_first`` (SGLang static dispatch): a replica on the token's GPU, else on its node, else any;
  among equally local replicas, the ``floor(u * n)``-th in slot order.
- ``metro`` (METRO greedy): all tokens of an expert go to one replica. Experts are taken in order of
  (fewest replicas, most tokens, lowest id); each picks, among the GPUs holding it, the one with the
  fewest activated experts so far, then the fewest tokens, then the lowest slot.
- ``exact`` (evaluation only): the fewest activated experts on the busiest
  GPU, by augmenting paths; each expert's tokens to its lowest slot on the GPU it is matched to.

Shapes: B tokens, k choices, E experts, R most replicas of an expert, N slots, G GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moe_placement.models import Placement, Topology, lookup


@dataclass(frozen=True)
class ReplicaLayout:
    """One layer's replicas as routers need them.

    replica_slots: [E, R] slots of each expert, -1 padded; replica_counts: [E];
    gpu_of_slot: [N]; node_of_gpu: [G].
    """

    replica_slots: np.ndarray
    replica_counts: np.ndarray
    gpu_of_slot: np.ndarray
    node_of_gpu: np.ndarray

    @cached_property
    def most_local_replicas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For a token on GPU g choosing expert e, its most local replicas (on g, else on g's node,
        else any), in slot order, as a run of one flat array: (slots [n], start [G, E], count
        [G, E]). The runs come from three copies of the replica list: sorted by (GPU, expert), by
        (node, expert), and as listed (by expert)."""
        num_gpus, num_experts = len(self.node_of_gpu), len(self.replica_counts)
        num_nodes = int(self.node_of_gpu.max()) + 1
        experts, ranks = np.nonzero(self.replica_slots >= 0)  # per expert in slot order
        slots = self.replica_slots[experts, ranks]
        gpu = self.gpu_of_slot[slots]
        on_gpu, gpu_start, gpu_count = _runs(gpu, experts, slots, num_gpus, num_experts)
        on_node, node_start, node_count = _runs(
            self.node_of_gpu[gpu], experts, slots, num_nodes, num_experts
        )
        any_start = np.cumsum(self.replica_counts) - self.replica_counts
        node_start = node_start[self.node_of_gpu] + len(on_gpu)  # [G, E]
        node_count = node_count[self.node_of_gpu]
        any_start = np.broadcast_to(any_start + len(on_gpu) + len(on_node), (num_gpus, num_experts))
        any_count = np.broadcast_to(self.replica_counts, (num_gpus, num_experts))
        here, near = gpu_count > 0, node_count > 0
        start = np.where(here, gpu_start, np.where(near, node_start, any_start))
        count = np.where(here, gpu_count, np.where(near, node_count, any_count))
        return np.concatenate([on_gpu, on_node, slots]), start, count


def replica_layouts(placement: Placement, topology: Topology) -> list[ReplicaLayout]:
    """Per-layer replica layouts of a placement, length L."""
    replica_slots = placement.logical_to_physical_map()
    replica_counts = placement.replica_count()
    gpu_of_slot = np.arange(placement.num_slots) // placement.slots_per_gpu
    node_of_gpu = np.arange(placement.num_gpus) // topology.gpus_per_node
    return [
        ReplicaLayout(replica_slots[layer], replica_counts[layer], gpu_of_slot, node_of_gpu)
        for layer in range(placement.num_layers)
    ]


def route_random(
    layout: ReplicaLayout, expert_ids: np.ndarray, source_gpu: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    """Uniformly random replica. expert_ids, uniform: [B, k]; source_gpu: [B] -> slots [B, k]."""
    counts = layout.replica_counts[expert_ids]
    choice = np.minimum((uniform * counts).astype(np.int64), counts - 1)
    return layout.replica_slots[expert_ids, choice]


def route_local_first(
    layout: ReplicaLayout, expert_ids: np.ndarray, source_gpu: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    """Most local replica (on the token's GPU, else on its node, else any; in slot order), ties
    broken by ``uniform``. Shapes as ``route_random``."""
    slots, start, count = layout.most_local_replicas
    runs = source_gpu[:, None] * count.shape[1] + expert_ids  # flat [G, E] index: one gather each
    counts = count.ravel()[runs]
    pick = np.minimum((uniform * counts).astype(np.int64), counts - 1)
    return slots[start.ravel()[runs] + pick]


def route_metro(
    layout: ReplicaLayout, expert_ids: np.ndarray, source_gpu: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    """METRO greedy: fewest activated experts per GPU. Shapes as ``route_random``."""
    num_gpus = len(layout.node_of_gpu)
    experts, inverse, tokens = np.unique(expert_ids.ravel(), return_inverse=True, return_counts=True)
    counts = layout.replica_counts[experts]
    chosen_slot = np.empty(len(experts), dtype=np.int64)
    # Experts with one replica have no choice: place them first in one vectorised step.
    single = counts == 1
    chosen_slot[single] = layout.replica_slots[experts[single], 0]
    activated = np.bincount(layout.gpu_of_slot[chosen_slot[single]], minlength=num_gpus)
    gpu_tokens = np.bincount(
        layout.gpu_of_slot[chosen_slot[single]], weights=tokens[single], minlength=num_gpus
    )
    multi = np.nonzero(~single)[0]
    order = multi[np.lexsort((experts[multi], -tokens[multi], counts[multi]))]
    for index in order:
        slots = layout.replica_slots[experts[index], : counts[index]]
        gpus = layout.gpu_of_slot[slots]
        best = np.lexsort((slots, gpu_tokens[gpus], activated[gpus]))[0]
        chosen_slot[index] = slots[best]
        activated[gpus[best]] += 1
        gpu_tokens[gpus[best]] += tokens[index]
    return chosen_slot[inverse].reshape(expert_ids.shape)


def min_max_assignment(candidates: list[np.ndarray], num_gpus: int) -> tuple[np.ndarray, int]:
    """Assign each activated expert to one of its candidate GPUs so that the most experts on one
    GPU is minimal. candidates: per expert, the GPUs holding it -> (GPU of each expert [A], that
    minimum). Augmenting paths (Kuhn) at capacity lambda, starting from max(ceil(A/G), the experts
    that have one GPU only) and raised by one until every expert is matched: exact."""
    count = len(candidates)
    assigned = np.full(count, -1, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(num_gpus)]
    forced = np.bincount([int(c[0]) for c in candidates if len(c) == 1], minlength=num_gpus)
    limit = max(-(-count // num_gpus), int(forced.max()) if count else 0, 1)

    def augment(expert: int, visited: set[int]) -> bool:
        for gpu in candidates[expert]:
            if gpu not in visited and len(members[gpu]) < limit:
                visited.add(gpu)
                members[gpu].append(expert)
                assigned[expert] = gpu
                return True
        for gpu in candidates[expert]:
            if gpu in visited:
                continue
            visited.add(gpu)
            for other in members[gpu]:
                if augment(other, visited):  # ``other`` moved to another GPU
                    members[gpu].remove(other)
                    members[gpu].append(expert)
                    assigned[expert] = gpu
                    return True
        return False

    pending = sorted(range(count), key=lambda e: (len(candidates[e]), e))
    while pending:
        pending = [expert for expert in pending if not augment(expert, set())]
        if pending:
            limit += 1
    return assigned, limit


def route_exact(
    layout: ReplicaLayout, expert_ids: np.ndarray, source_gpu: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    """Exact METRO: the fewest activated experts on the busiest GPU; each expert's tokens go to its
    lowest slot on the GPU it is matched to. expert_ids, uniform: [B, k]; source_gpu: [B] -> slots
    [B, k]. For evaluation on small instances (Python augmenting paths)."""
    num_gpus = len(layout.node_of_gpu)
    experts, inverse = np.unique(expert_ids.ravel(), return_inverse=True)
    replica_slots = [layout.replica_slots[e, : layout.replica_counts[e]] for e in experts]
    candidates = [np.unique(layout.gpu_of_slot[slots]) for slots in replica_slots]
    gpu, _ = min_max_assignment(candidates, num_gpus)
    chosen = np.array(
        [slots[layout.gpu_of_slot[slots] == g].min() for slots, g in zip(replica_slots, gpu)],
        dtype=np.int64,
    )
    return chosen[inverse].reshape(expert_ids.shape)


def busiest_activated(layout: ReplicaLayout, slots: np.ndarray) -> int:
    """Activated slots on the busiest GPU for routed slots [B, k]."""
    used = np.unique(slots)
    return int(np.bincount(layout.gpu_of_slot[used], minlength=len(layout.node_of_gpu)).max())


def greedy_vs_exact(placement: Placement, topology: Topology, expert_ids: np.ndarray) -> np.ndarray:
    """Busiest GPU's activated experts, METRO greedy / exact, per layer: expert_ids [L, B, k] -> [L]."""
    ratios = []
    for layer, layout in enumerate(replica_layouts(placement, topology)):
        ids = expert_ids[layer]
        zeros, uniform = np.zeros(len(ids), dtype=np.int64), np.zeros(ids.shape)
        greedy = busiest_activated(layout, route_metro(layout, ids, zeros, uniform))
        exact = busiest_activated(layout, route_exact(layout, ids, zeros, uniform))
        ratios.append(greedy / exact)
    return np.array(ratios)


Router = Callable[[ReplicaLayout, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

ROUTERS: dict[str, Router] = {
    "random": route_random,
    "local_first": route_local_first,
    "metro": route_metro,
    "exact": route_exact,
}


def get_router(name: str) -> Router:
    """The router called ``name``."""
    return lookup(ROUTERS, name, "router")


def _runs(
    group: np.ndarray, experts: np.ndarray, slots: np.ndarray, num_groups: int, num_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replica slots [n] of experts [n] in groups [n] (GPUs or nodes), each expert's listed in slot
    order -> (the slots by (group, expert), in slot order within one [n]; where each (group,
    expert)'s run starts [num_groups, E]; how long it is [num_groups, E])."""
    key = group * num_experts + experts
    order = np.argsort(key, kind="stable")  # stable: slot order within a (group, expert)
    count = np.bincount(key, minlength=num_groups * num_experts)
    start = np.cumsum(count) - count
    return slots[order], start.reshape(num_groups, num_experts), count.reshape(num_groups, num_experts)
