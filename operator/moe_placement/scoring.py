"""Scoring placements on sampled batches: the one routine the CLI, the benchmarks and the operator's
gate use, so that their predictions agree.

Per phase, every placement is scored on the same batches (tokens of a trace, or tokens sampled from
a profile) with that phase's router. ``RECOMMENDED_ROUTERS`` are the routers a phase is served with
when the policy names none (``SolverInfo.router``).

Shapes: G GPUs, L layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from moe_placement.cost import CostReport, evaluate
from moe_placement.models import (
    ModelShape,
    Phase,
    Placement,
    RoutingBatch,
    Topology,
    WorkloadProfile,
)
from moe_placement.policies.base import SolverInfo
from moe_placement.traces import Trace, sample_batches, sample_tokens

RECOMMENDED_ROUTERS: dict[Phase, str] = {"prefill": "local_first", "decode": "metro"}
TOKENS_PER_GPU: dict[Phase, int] = {"prefill": 128, "decode": 16}
SCORED_BATCHES = 2


def phase_batches(
    source: Trace | WorkloadProfile,
    num_gpus: int,
    tokens_per_gpu: int,
    num_batches: int,
    phase: Phase,
    rng: np.random.Generator,
) -> list[RoutingBatch]:
    """``num_batches`` batches of G x ``tokens_per_gpu`` tokens of ``phase``: a trace's tokens,
    or tokens sampled from a profile (its per-layer loads)."""
    if isinstance(source, WorkloadProfile):
        source = sample_tokens(source, num_gpus * tokens_per_gpu * num_batches, rng, phase=phase)
    return sample_batches(source, num_gpus, tokens_per_gpu, num_batches, phase, rng)


def routers_for(solver: SolverInfo, phase: Phase) -> dict[Phase, str]:
    """Per phase, the router a placement is predicted with: what its policy recommends for the
    phases it solved (``phase_routers``, else ``router`` for ``phase``), the phase's
    ``RECOMMENDED_ROUTERS`` otherwise."""
    recommended = dict(solver.phase_routers) or ({phase: solver.router} if solver.router else {})
    return {**RECOMMENDED_ROUTERS, **recommended}


def score_placements(
    placements: Sequence[Placement],
    model: ModelShape,
    topology: Topology,
    batches: Mapping[Phase, Sequence[RoutingBatch]],
    routers: Mapping[Phase, str],
    seed: int = 0,
) -> list[dict[Phase, CostReport]]:
    """Each placement's cost per phase of ``batches``, routed by that phase's router."""
    return [
        {
            phase: evaluate(placement, model, topology, scored, routers[phase], seed)
            for phase, scored in batches.items()
        }
        for placement in placements
    ]
