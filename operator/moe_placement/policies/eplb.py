"""``policy: eplb``: DeepSeek EPLB, hierarchical (one expert group per node) when the shapes allow."""

from __future__ import annotations

import numpy as np

from moe_placement.baselines import eplb_rebalance
from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.policies.base import PolicyOptions, SolverInfo


def policy_eplb(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """DeepSeek EPLB, hierarchical when the experts split evenly over nodes, else global
    -> ([L, N], SolverInfo)."""
    num_nodes = topology.num_nodes
    hierarchical = model.num_experts % num_nodes == 0
    num_groups, num_nodes = (num_nodes, num_nodes) if hierarchical else (1, 1)
    mapping, _, _ = eplb_rebalance(
        profile.load, topology.num_slots, num_groups, num_nodes, topology.num_gpus
    )
    kind = "hierarchical" if hierarchical and num_nodes > 1 else "global"
    return mapping, SolverInfo(notes=[f"eplb {kind} policy"])
