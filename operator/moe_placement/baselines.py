"""Baseline placements: contiguous, round robin, and DeepSeek's EPLB greedy; the token-balance bound.

EPLB is written from its published description (see REFERENCES.md): pack expert groups onto nodes,
replicate hot experts inside each node (each extra slot to the expert with the largest load per
replica), then pack the replicas onto the node's GPUs (heaviest first, to the lightest GPU with room,
equal counts per GPU). With groups not divisible by nodes it runs the same steps with one group and
one node (the global policy).

Shapes: L layers, E logical experts, N physical slots, G GPUs.
"""

from __future__ import annotations

import numpy as np

from moe_placement.models import PlacementError


def linear_placement(num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """Experts in order over the slots, extra slots cycling from expert 0 again -> [L, N]."""
    row = np.arange(num_slots) % num_experts
    return np.tile(row, (num_layers, 1))


def round_robin_placement(
    num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int
) -> np.ndarray:
    """Expert e on GPU e mod G, dealt like cards; extra slots cycle from expert 0 -> [L, N]."""
    num_slots = num_gpus * slots_per_gpu
    dealt = np.arange(num_slots) % num_experts  # the i-th card dealt
    gpu, rank = np.arange(num_slots) % num_gpus, np.arange(num_slots) // num_gpus
    row = np.empty(num_slots, dtype=np.int64)
    row[gpu * slots_per_gpu + rank] = dealt
    return np.tile(row, (num_layers, 1))


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items into packs of exactly n / num_packs items, heaviest item to the lightest pack.

    weight: [X, n] -> pack_index [X, n], rank_in_pack [X, n].
    """
    num_rows, num_items = weight.shape
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = np.tile(np.arange(num_items), (num_rows, 1))
        return pack_index, np.zeros_like(pack_index)
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    for row in range(num_rows):
        pack_weight = np.zeros(num_packs)
        pack_items = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[row], kind="stable"):
            open_weight = np.where(pack_items < items_per_pack, pack_weight, np.inf)
            pack = int(np.argmin(open_weight))
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_items[pack]
            pack_weight[pack] += weight[row, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: np.ndarray, num_physical: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each extra slot to the expert with the largest load per replica.

    weight: [X, E] -> physical_to_logical [X, num_physical], replica_rank [X, num_physical],
    replica_count [X, E].
    """
    num_rows, num_logical = weight.shape
    physical_to_logical = np.tile(np.arange(num_physical), (num_rows, 1))
    replica_rank = np.zeros((num_rows, num_physical), dtype=np.int64)
    replica_count = np.ones((num_rows, num_logical), dtype=np.int64)
    rows = np.arange(num_rows)
    for slot in range(num_logical, num_physical):
        hottest = np.argmax(weight / replica_count, axis=-1)
        physical_to_logical[:, slot] = hottest
        replica_rank[:, slot] = replica_count[rows, hottest]
        replica_count[rows, hottest] += 1
    return physical_to_logical, replica_rank, replica_count


def _inverse(permutation: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations, [X, n] -> [X, n]."""
    inverse = np.empty_like(permutation)
    np.put_along_axis(inverse, permutation, np.arange(permutation.shape[1])[None, :], axis=1)
    return inverse


def eplb_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy. weight: [L, E] -> (physical_to_logical [L, N],
    replica_rank [L, N], replica_count [L, E])."""
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    logical_per_node = num_logical // num_nodes

    # 1. Expert groups onto nodes; "mlog" numbers experts node by node.
    group_weight = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_weight, num_nodes)
    group_start = (group_pack * groups_per_node + group_rank) * group_size
    logical_to_mlog = (group_start[:, :, None] + np.arange(group_size)).reshape(num_layers, -1)
    mlog_to_logical = _inverse(logical_to_mlog)

    # 2. Replicas inside each node.
    mlog_weight = np.take_along_axis(weight, mlog_to_logical, -1).reshape(-1, logical_per_node)
    physical_to_mlog, physical_rank, mlog_count = replicate_experts(
        mlog_weight, num_physical // num_nodes
    )

    # 3. Replicas onto the node's GPUs.
    physical_weight = np.take_along_axis(mlog_weight / mlog_count, physical_to_mlog, -1)
    gpu_pack, gpu_rank = balanced_packing(physical_weight, num_gpus // num_nodes)
    slot_of_physical = gpu_pack * slots_per_gpu + gpu_rank
    physical_of_slot = _inverse(slot_of_physical)

    slot_to_mlog = np.take_along_axis(physical_to_mlog, physical_of_slot, -1)
    node_offset = np.arange(0, num_logical, logical_per_node)[None, :, None]
    slot_to_mlog = (slot_to_mlog.reshape(num_layers, num_nodes, -1) + node_offset).reshape(
        num_layers, -1
    )
    slot_to_logical = np.take_along_axis(mlog_to_logical, slot_to_mlog, -1)
    slot_rank = np.take_along_axis(physical_rank, physical_of_slot, -1).reshape(num_layers, -1)
    replica_count = np.take_along_axis(mlog_count.reshape(num_layers, -1), logical_to_mlog, -1)
    return slot_to_logical, slot_rank, replica_count


def eplb_rebalance(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB ``rebalance_experts``. weight: [L, E] ->
    (physical_to_logical [L, N], logical_to_physical [L, E, N - E + 1], replica_count [L, E])."""
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_logical = weight.shape
    _check_eplb_shape(num_logical, num_physical, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes == 0:
        physical_to_logical, rank, count = eplb_hierarchical(
            weight, num_physical, num_groups, num_nodes, num_gpus
        )
    else:
        physical_to_logical, rank, count = eplb_hierarchical(weight, num_physical, 1, 1, num_gpus)
    max_replicas = num_physical - num_logical + 1
    logical_to_physical = np.full((num_layers, num_logical * max_replicas), -1, dtype=np.int64)
    np.put_along_axis(
        logical_to_physical,
        physical_to_logical * max_replicas + rank,
        np.tile(np.arange(num_physical), (num_layers, 1)),
        axis=1,
    )
    return physical_to_logical, logical_to_physical.reshape(num_layers, num_logical, -1), count


def _check_eplb_shape(
    num_logical: int, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    if num_physical < num_logical:
        raise PlacementError(f"num_physical: {num_physical} slots < {num_logical} experts")
    if num_physical % num_gpus:
        raise PlacementError(f"num_physical: {num_physical} slots not divisible by {num_gpus} GPUs")
    if num_groups % num_nodes == 0:
        if num_logical % num_groups:
            raise PlacementError(f"num_groups: {num_logical} experts not divisible by {num_groups}")
        if num_gpus % num_nodes or num_physical % num_nodes:
            raise PlacementError(f"num_nodes: {num_nodes} does not divide the GPUs and slots")


def token_balance_lower_bound(load: np.ndarray, num_gpus: int, num_slots: int) -> np.ndarray:
    """A lower bound on the busiest GPU's tokens for any placement with ``num_slots`` slots.

    The busiest GPU carries at least the mean, and at least the heaviest replica when each expert's
    tokens split evenly over its replicas; giving each extra slot to the expert with the largest load
    per replica minimises that heaviest replica exactly. load: [L, E] -> [L].
    """
    load = np.asarray(load, dtype=np.float64)
    _, _, replica_count = replicate_experts(load, num_slots)
    heaviest_replica = (load / replica_count).max(axis=-1)
    return np.maximum(load.sum(-1) / num_gpus, heaviest_replica)
