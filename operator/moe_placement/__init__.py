"""Placement library for expert-parallel MoE serving: models, cost model, policies, routers, traces.

Pure Python (numpy, pulp, pydantic): imports nothing from kopf, kubernetes or torch.
"""

from moe_placement.models import (
    GpuSpec,
    ModelShape,
    Placement,
    PlacementError,
    RoutingBatch,
    SparsePairs,
    Topology,
    WorkloadProfile,
    placement_hash,
)

__all__ = [
    "GpuSpec",
    "ModelShape",
    "Placement",
    "PlacementError",
    "RoutingBatch",
    "SparsePairs",
    "Topology",
    "WorkloadProfile",
    "placement_hash",
]
