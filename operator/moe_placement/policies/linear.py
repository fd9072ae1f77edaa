"""``policy: linear``: contiguous blocks of experts per GPU (what an engine does with no balancer)."""

from __future__ import annotations

import numpy as np

from moe_placement.baselines import linear_placement
from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.policies.base import PolicyOptions, SolverInfo


def policy_linear(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Contiguous blocks of experts per GPU -> ([L, N], SolverInfo)."""
    mapping = linear_placement(model.num_layers, model.num_experts, topology.num_slots)
    return mapping, SolverInfo()
