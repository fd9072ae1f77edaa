"""``policy: eplb_global``: DeepSeek EPLB's global policy (one group, one node)."""

from __future__ import annotations

import numpy as np

from moe_placement.baselines import eplb_rebalance
from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.policies.base import PolicyOptions, SolverInfo


def policy_eplb_global(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """DeepSeek EPLB's global policy -> ([L, N], SolverInfo)."""
    mapping, _, _ = eplb_rebalance(profile.load, topology.num_slots, 1, 1, topology.num_gpus)
    return mapping, SolverInfo(notes=["eplb global policy"])
