"""The cost model's layer cost and the ``local_first`` router as they were before the dense-mask
and precomputed-replica speedups (np.unique per layer; per-token distances to every replica).
Kept only to show that today's give the same numbers (tests/unit/test_routing_cost.py) and how
much faster they are (benchmarks/cycle_bench.py).

Shapes: B tokens, k choices, R most replicas of an expert, G GPUs.
"""

from __future__ import annotations

import numpy as np

from moe_placement.cost import LayerCost
from moe_placement.models import ModelShape, Topology
from moe_placement.routing import ReplicaLayout


def reference_layer_cost(
    slots: np.ndarray,
    source_gpu: np.ndarray,
    layout: ReplicaLayout,
    model: ModelShape,
    topology: Topology,
) -> LayerCost:
    """Cost of one layer. slots: [B, k] slot serving each (token, choice); source_gpu: [B]."""
    num_gpus = len(layout.node_of_gpu)
    num_tokens = slots.shape[0]
    gpu_of_slot, node_of_gpu = layout.gpu_of_slot, layout.node_of_gpu
    destination_gpu = gpu_of_slot[slots]

    gpu_tokens = np.bincount(destination_gpu.ravel(), minlength=num_gpus).astype(np.float64)
    used_slots = np.unique(slots)
    gpu_activated = np.bincount(gpu_of_slot[used_slots], minlength=num_gpus).astype(np.float64)
    compute = gpu_tokens * model.flops_per_token / (topology.gpu.peak_tflops * 1e12)
    memory = gpu_activated * model.expert_bytes / (topology.gpu.hbm_bandwidth_gb_s * 1e9)
    compute_time = float(np.max(np.maximum(compute, memory)))

    # Unique (token, destination GPU) pairs that leave the token's GPU.
    token_index = np.repeat(np.arange(num_tokens), slots.shape[1])
    pair_key = np.unique(token_index * num_gpus + destination_gpu.ravel())
    pair_token, pair_gpu = pair_key // num_gpus, pair_key % num_gpus
    pair_source = source_gpu[pair_token]
    remote = pair_gpu != pair_source
    pair_token, pair_gpu, pair_source = pair_token[remote], pair_gpu[remote], pair_source[remote]
    same_node = node_of_gpu[pair_gpu] == node_of_gpu[pair_source]

    # Cross-node: one transfer per (token, destination node). DeepEP's internode dispatch is
    # rail-aligned: the token crosses to the GPU with its sender's local index, which forwards it over
    # NVLink to the other destination GPUs of that node.
    gpus_per_node = topology.gpus_per_node
    remote_token, remote_gpu = pair_token[~same_node], pair_gpu[~same_node]
    remote_node = node_of_gpu[remote_gpu]
    node_keys = np.unique(remote_token * topology.num_nodes + remote_node)
    sender = source_gpu[node_keys // topology.num_nodes]
    receiver = (node_keys % topology.num_nodes) * gpus_per_node + sender % gpus_per_node
    relay = remote_node * gpus_per_node + source_gpu[remote_token] % gpus_per_node
    forwarded = remote_gpu != relay

    token_bytes = 2.0 * model.token_bytes  # dispatch + combine
    intra_out = np.bincount(pair_source[same_node], minlength=num_gpus) + np.bincount(
        relay[forwarded], minlength=num_gpus
    )
    intra_in = np.bincount(pair_gpu[same_node], minlength=num_gpus) + np.bincount(
        remote_gpu[forwarded], minlength=num_gpus
    )
    inter_out = np.bincount(sender, minlength=num_gpus)
    inter_in = np.bincount(receiver, minlength=num_gpus)
    intra_bw, inter_bw = topology.intra_node_gb_s * 1e9, topology.inter_node_gb_s * 1e9
    send = intra_out * token_bytes / intra_bw + inter_out * token_bytes / inter_bw
    receive = intra_in * token_bytes / intra_bw + inter_in * token_bytes / inter_bw
    comm_time = float(np.max(np.maximum(send, receive))) if num_gpus > 1 else 0.0

    inter_transfers = len(node_keys)
    intra_transfers = int(same_node.sum() + forwarded.sum())
    return LayerCost(
        gpu_tokens=gpu_tokens,
        gpu_activated=gpu_activated,
        compute_time_s=compute_time,
        comm_time_s=comm_time,
        cross_gpu_bytes=(intra_transfers + inter_transfers) * token_bytes,
        cross_node_bytes=inter_transfers * token_bytes,
    )


def reference_route_local_first(
    layout: ReplicaLayout, expert_ids: np.ndarray, source_gpu: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    """Most local replica, ties broken by ``uniform``. Shapes as ``route_random``."""
    candidates = layout.replica_slots[expert_ids]  # [B, k, R]
    valid = candidates >= 0
    candidate_gpu = layout.gpu_of_slot[np.where(valid, candidates, 0)]
    source = source_gpu[:, None, None]
    distance = np.where(
        candidate_gpu == source,
        0,
        np.where(layout.node_of_gpu[candidate_gpu] == layout.node_of_gpu[source], 1, 2),
    )
    distance = np.where(valid, distance, 3)
    best = distance == distance.min(axis=-1, keepdims=True)
    rank_among_best = np.cumsum(best, axis=-1) - 1
    pick = np.minimum((uniform * best.sum(axis=-1)).astype(np.int64), best.sum(axis=-1) - 1)
    chosen = best & (rank_among_best == pick[..., None])
    return candidates[chosen].reshape(expert_ids.shape)
