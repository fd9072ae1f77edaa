"""Replica counts and packing replicas onto nodes and GPUs: greedy LPT packing, node-level
co-placement of co-activated and chained experts (swap local search), and the GPUs within nodes.

A token leaves a node when one of its experts has no replica there. Two statistics say where that
happens: the transitions (a token's experts at layer l and l+1: the GPU of its first choice at l is
where it starts layer l+1) and the co-activation (experts one token uses together). Co-placement puts
each layer's experts on nodes so that the tokens these statistics count stay on one node, within a
token-balance tolerance.

Shapes: L layers, E experts, N nodes, G GPUs, S slots per GPU, n items of one packing problem.
"""

from __future__ import annotations

import time

import numpy as np

from moe_placement.models import Topology, WorkloadProfile
from moe_placement.pairs import COACTIVATION_WEIGHT, node_affinity, pair_matrices
from moe_placement.parallel import even_chunks, run_chunks, worker_count

BALANCE_TOLERANCE = 0.05  # a node may carry 5% more than the mean tokens
MAX_SWEEPS = 3


def replica_counts(load: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """Replicas of each expert, [L, E] from load [L, E]: one each, then every extra slot to the
    expert with the largest load per replica (which minimises the heaviest replica), at most
    ``max_replicas`` each (slots that no expert may take stay empty)."""
    num_layers, num_experts = load.shape
    counts = np.ones((num_layers, num_experts), dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(num_slots - num_experts):
        per_replica = np.where(counts < max_replicas, load / counts, -np.inf)
        hottest = np.argmax(per_replica, axis=1)
        room = np.isfinite(per_replica[rows, hottest])
        counts[rows[room], hottest[room]] += 1
    return counts


def greedy_packing(
    weight: np.ndarray, copies: np.ndarray, cap: np.ndarray, num_groups: int, group_slots: int
) -> np.ndarray:
    """Heaviest replica first to the lightest group with a free slot that holds fewer than ``cap``
    copies of its expert (LPT). weight, copies, cap: [n] -> copies per group [n, num_groups].

    Needs sum(copies) <= num_groups * group_slots and copies <= cap * num_groups."""
    count = np.zeros((len(weight), num_groups), dtype=np.int64)
    free = np.full(num_groups, group_slots)
    # kept up to date instead of weight @ count per replica, which made a packing O(n^2 G)
    group_load = np.zeros(num_groups)
    items = np.repeat(np.arange(len(weight)), copies)
    for item in items[np.argsort(-weight[items], kind="stable")]:
        allowed = (free > 0) & (count[item] < cap[item])
        if not allowed.any():
            _make_room(count, free, cap, item)
            group_load = weight @ count  # _make_room moved replicas between groups
            allowed = (free > 0) & (count[item] < cap[item])
        group = int(np.argmin(np.where(allowed, group_load, np.inf)))
        count[item, group] += 1
        free[group] -= 1
        group_load[group] += weight[item]
    return count


def _make_room(count: np.ndarray, free: np.ndarray, cap: np.ndarray, item: int) -> None:
    """Every group with a free slot holds ``item`` at its cap: move another item from a full group
    where ``item`` is below its cap into a group with a free slot. count [n, groups], free [groups]."""
    below_cap = np.nonzero(count[item] < cap[item])[0]
    for target in np.nonzero(free > 0)[0]:
        for source in below_cap:
            movable = np.nonzero((count[:, source] > 0) & (count[:, target] < cap))[0]
            movable = movable[movable != item]
            if len(movable):
                count[movable[0], source] -= 1
                count[movable[0], target] += 1
                free[source] += 1
                free[target] -= 1
                return
    raise AssertionError("no room: the caller guarantees copies <= cap * groups")


def greedy_nodes_per_layer(
    load: np.ndarray, counts: np.ndarray, node_slots: np.ndarray, workers: int | None = 1
) -> np.ndarray:
    """``greedy_nodes`` for every layer, load and counts [L, E] -> presence [L, E, N], the layers
    split over ``workers`` processes (None: every usable CPU; see ``moe_placement.parallel``)."""
    chunks = even_chunks(len(load), worker_count(len(load), workers))
    return np.concatenate(
        run_chunks(_greedy_nodes_chunk, [(load[c], counts[c], node_slots) for c in chunks])
    )


def _greedy_nodes_chunk(load: np.ndarray, counts: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    return np.stack([greedy_nodes(load[layer], counts[layer], node_slots) for layer in range(len(load))])


def greedy_nodes(load: np.ndarray, counts: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    """Replicas onto nodes, hottest first to the lightest node with room, one per node per expert.
    load, counts [E], node_slots [N] -> presence [E, N]."""
    weight = load / counts
    cap = np.ones(len(load), dtype=np.int64)
    if counts.max() > len(node_slots):
        cap = np.maximum(cap, -(-counts // len(node_slots)))
    uniform = int(node_slots.min()) if np.all(node_slots == node_slots[0]) else None
    if uniform is not None:
        return greedy_packing(weight, counts, cap, len(node_slots), uniform)
    presence = np.zeros((len(load), len(node_slots)), dtype=np.int64)
    free = node_slots.astype(np.int64).copy()
    node_load = np.zeros(len(node_slots))
    items = np.repeat(np.arange(len(load)), counts)
    for item in items[np.argsort(-weight[items], kind="stable")]:
        allowed = (free > 0) & (presence[item] < cap[item])
        node = int(np.argmin(np.where(allowed, node_load, np.inf)))
        presence[item, node] += 1
        node_load[node] += weight[item]
        free[node] -= 1
    return presence


def coplace_nodes(
    profile: WorkloadProfile,
    counts: np.ndarray,
    node_slots: np.ndarray,
    *,
    initial: np.ndarray | None = None,
    keep_bonus: np.ndarray | None = None,
    coactivation_weight: float = COACTIVATION_WEIGHT,
    balance_tolerance: float = BALANCE_TOLERANCE,
    deadline: float = float("inf"),
    sweeps: int = MAX_SWEEPS,
) -> np.ndarray:
    """Experts onto nodes per layer so that tokens stay on one node: swap local search.

    counts [L, E] replicas (at most one per node); node_slots [N] replicas each node holds.
    initial [L, E, N]: the start (default ``greedy_nodes``). keep_bonus [L, E, N]: tokens' worth
    credited for keeping a replica where it is (the migration-aware re-solve). Each layer in turn,
    the best swap of two replicas between nodes is applied while it keeps more tokens local and no
    node exceeds (1 + balance_tolerance) x the mean tokens (or its tokens before the swap).
    -> presence [L, E, N]."""
    load = profile.load
    num_layers, num_experts = load.shape
    num_nodes = len(node_slots)
    transitions, coactivation = pair_matrices(profile)
    presence = (
        greedy_nodes_per_layer(load, counts, node_slots)
        if initial is None
        else initial.astype(np.int64).copy()
    )
    if num_nodes == 1:
        return presence
    bonus = np.zeros(presence.shape) if keep_bonus is None else keep_bonus
    for _ in range(sweeps):
        improved = False
        for layer in range(num_layers):
            if time.perf_counter() > deadline:
                return presence
            improved |= _improve_layer(
                layer,
                presence,
                counts,
                transitions,
                coactivation,
                bonus[layer],
                load[layer],
                coactivation_weight,
                balance_tolerance,
            )
        if not improved:
            break
    return presence


def _improve_layer(
    layer: int,
    presence: np.ndarray,
    counts: np.ndarray,
    transitions: np.ndarray,
    coactivation: np.ndarray,
    bonus: np.ndarray,
    load: np.ndarray,
    coactivation_weight: float,
    balance_tolerance: float,
) -> bool:
    """Best-improvement swaps at one layer (presence updated in place); True if any was made."""
    weight = load / counts[layer]
    cap = (1.0 + balance_tolerance) * load.sum() / presence.shape[2]
    coupling = coactivation_weight * coactivation[layer]
    improved = False
    for _ in range(4 * presence.shape[1]):
        here = presence[layer]
        affinity = (
            node_affinity(layer, presence, counts, transitions, coactivation, coactivation_weight)
            + bonus
        )
        expert, node = np.nonzero(here)
        # gain of moving replica i to node b (-inf where its expert is already there)
        move = affinity[expert] - affinity[expert, node][:, None]
        move = np.where(here[expert] > 0, -np.inf, move)
        swap = move[:, node] + move[:, node].T
        swap -= coupling[np.ix_(expert, expert)] * (2.0 / counts[layer][expert])[:, None]
        node_load = weight @ here
        load_a = node_load[node][:, None] - weight[expert][:, None] + weight[expert][None, :]
        load_b = node_load[node][None, :] - weight[expert][None, :] + weight[expert][:, None]
        limit_a = np.maximum(cap, node_load[node])[:, None]
        limit_b = np.maximum(cap, node_load[node])[None, :]
        allowed = (
            (node[:, None] != node[None, :])
            & (load_a <= limit_a + 1e-9)
            & (load_b <= limit_b + 1e-9)
        )
        swap = np.where(allowed, swap, -np.inf)
        i, j = np.unravel_index(int(np.argmax(swap)), swap.shape)
        if not swap[i, j] > 1e-9 * max(float(load.sum()), 1.0):
            break
        presence[layer, expert[i], node[i]] -= 1
        presence[layer, expert[i], node[j]] += 1
        presence[layer, expert[j], node[j]] -= 1
        presence[layer, expert[j], node[i]] += 1
        improved = True
    return improved


def gpus_within_nodes(
    presence: np.ndarray, load: np.ndarray, topology: Topology, workers: int | None = 1
) -> np.ndarray:
    """Each node's replicas onto its GPUs, tokens balanced (LPT, one replica of an expert per GPU).
    presence [L, E, N], load [L, E] -> physical_to_logical_map [L, G*S]; the layers split over
    ``workers`` processes (None: every usable CPU)."""
    chunks = even_chunks(len(load), worker_count(len(load), workers))
    return np.concatenate(
        run_chunks(_gpus_within_nodes_chunk, [(presence[c], load[c], topology) for c in chunks])
    )


def _gpus_within_nodes_chunk(presence: np.ndarray, load: np.ndarray, topology: Topology) -> np.ndarray:
    num_layers, num_experts, num_nodes = presence.shape
    gpus_per_node, slots_per_gpu = topology.gpus_per_node, topology.slots_per_gpu
    counts = presence.sum(-1)
    mapping = np.full((num_layers, topology.num_slots), -1, dtype=np.int64)
    ones = np.ones(num_experts, dtype=np.int64)
    for layer in range(num_layers):
        weight = load[layer] / np.maximum(counts[layer], 1)
        for node in range(num_nodes):
            members = np.nonzero(presence[layer, :, node])[0]
            packing = greedy_packing(
                weight[members],
                presence[layer, members, node],
                ones[members],
                gpus_per_node,
                slots_per_gpu,
            )
            for local_gpu in range(gpus_per_node):
                experts = members[np.nonzero(packing[:, local_gpu])[0]]
                start = (node * gpus_per_node + local_gpu) * slots_per_gpu
                mapping[layer, start : start + len(experts)] = experts
    return mapping


def spread_counts(load: np.ndarray, topology: Topology) -> np.ndarray:
    """Replicas per expert for co-placement, [L, E]: extra slots to the largest load per replica,
    at most one replica per node (so hot experts get a local replica on several nodes)."""
    max_replicas = topology.num_nodes
    if load.shape[1] * max_replicas < topology.num_slots:
        max_replicas = topology.num_gpus
    return replica_counts(load, topology.num_slots, max_replicas)
