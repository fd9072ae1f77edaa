"""``policy: spread``: each layer's experts dealt over the GPUs in order of load, the extra slots
to the experts with the most tokens per replica (a test-sized policy, written by CONTRIBUTING.md's
recipe).

Shapes: L layers, E experts, G GPUs, S slots per GPU, N = G x S slots.
"""

from __future__ import annotations

import numpy as np

from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.packing import replica_counts
from moe_placement.policies.base import PolicyOptions, SolverInfo


def policy_spread(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Replicas by most tokens per replica, hottest first, one per GPU in turn -> ([L, N],
    SolverInfo)."""
    counts = replica_counts(profile.load, topology.num_slots, topology.num_gpus)
    mapping = np.empty((model.num_layers, topology.num_slots), dtype=np.int64)
    for layer in range(model.num_layers):
        replicas = np.repeat(np.arange(model.num_experts), counts[layer])
        weight = (profile.load[layer] / counts[layer])[replicas]
        dealt = replicas[np.argsort(-weight, kind="stable")]
        # slot s of GPU g takes the (s * G + g)-th replica: hot replicas land on different GPUs
        mapping[layer] = dealt.reshape(topology.slots_per_gpu, topology.num_gpus).T.ravel()
    return mapping, SolverInfo(status="heuristic", notes=["replicas dealt over the GPUs by load"])
