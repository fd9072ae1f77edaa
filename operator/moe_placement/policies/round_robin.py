"""``policy: round_robin``: expert e on GPU e mod G."""

from __future__ import annotations

import numpy as np

from moe_placement.baselines import round_robin_placement
from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.policies.base import PolicyOptions, SolverInfo


def policy_round_robin(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Expert e on GPU e mod G -> ([L, N], SolverInfo)."""
    mapping = round_robin_placement(
        model.num_layers, model.num_experts, topology.num_gpus, topology.slots_per_gpu
    )
    return mapping, SolverInfo()
