"""``policy: locality``: node-level co-placement of co-activated and chained experts, hot experts
replicated on several nodes, tokens balanced over each node's GPUs (the multi-node paper).

Shapes: L layers, E experts, N nodes, G GPUs, S slots per GPU.
"""

from __future__ import annotations

import time

import numpy as np

from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.packing import (
    coplace_nodes,
    gpus_within_nodes,
    greedy_nodes_per_layer,
    spread_counts,
)
from moe_placement.pairs import locality_score, pair_matrices
from moe_placement.policies.base import PolicyOptions, SolverInfo


def policy_locality(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Node-level co-placement of co-activated and chained experts, hot experts replicated on
    several nodes, tokens balanced over each node's GPUs -> ([L, G*S], SolverInfo). Pairs with
    ``local_first`` routing, which keeps a token on its node when a replica is there."""
    started = time.perf_counter()
    counts = spread_counts(profile.load, topology)
    node_slots = np.full(topology.num_nodes, topology.gpus_per_node * topology.slots_per_gpu)
    transitions, _ = pair_matrices(profile)
    start = greedy_nodes_per_layer(profile.load, counts, node_slots, options.workers)
    # the GPUs are packed after the search, an LPT packing per layer like the start's: its time
    # is kept free (a second or two at DeepSeek-V3's size, more at 512 experts on 256 GPUs)
    start_s = time.perf_counter() - started
    deadline = started + 0.9 * options.time_limit_s - start_s
    presence = coplace_nodes(
        profile, counts, node_slots, initial=start, deadline=deadline
    )
    # the search returns at its deadline or when no swap helps: past it, it was cut short
    stopped_early = time.perf_counter() > deadline
    before, after = (
        locality_score(start, counts, transitions),
        locality_score(presence, counts, transitions),
    )
    mapping = gpus_within_nodes(presence, profile.load, topology, options.workers)
    return mapping, SolverInfo(
        status="time_limit" if stopped_early else "heuristic",
        objective=1.0 - after,
        objective_name="share of layer-to-layer token flow leaving its node",
        notes=[
            f"tokens kept on their node between layers: {after:.1%} (balanced greedy start {before:.1%})",
            f"{int((counts > 1).sum())} (layer, expert) pairs replicated on several nodes",
        ],
        router="local_first",
    )
