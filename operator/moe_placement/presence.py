"""Where an expert's replicas are: per node or per GPU counts of a map.

Shapes: L layers, E experts, N nodes, G GPUs, S slots per GPU.
"""

from __future__ import annotations

import numpy as np

from moe_placement.models import Topology


def node_presence(mapping: np.ndarray, topology: Topology, num_experts: int) -> np.ndarray:
    """Replicas of each expert on each node, [L, E, N], of a map [L, G*S]."""
    num_layers = mapping.shape[0]
    presence = np.zeros((num_layers, num_experts, topology.num_nodes), dtype=np.int64)
    layer, slot = np.nonzero(mapping >= 0)
    node = slot // (topology.slots_per_gpu * topology.gpus_per_node)
    np.add.at(presence, (layer, mapping[layer, slot], node), 1)
    return presence


def gpu_holders(row: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """Replicas of each expert on each GPU, [G, E], of one layer's map [N]."""
    holder = np.zeros((num_gpus, num_experts), dtype=np.int64)
    slots = np.nonzero(row >= 0)[0]
    np.add.at(holder, (slots // (len(row) // num_gpus), row[slots]), 1)
    return holder
