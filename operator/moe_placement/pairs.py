"""Pair matrices: the layer-to-layer transitions and the co-activation of a profile as dense
matrices, and the tokens each node keeps given where experts' replicas are.

Shapes: L layers, E experts, N nodes.
"""

from __future__ import annotations

import numpy as np

from moe_placement.models import WorkloadProfile

COACTIVATION_WEIGHT = 0.25  # a co-activated pair counts a quarter of a layer-to-layer transition


def pair_matrices(profile: WorkloadProfile) -> tuple[np.ndarray, np.ndarray]:
    """Dense per-token pair weights: transitions [L-1, E, E] (divided by k: a token's first choice at
    l is where its k experts at l+1 start from) and symmetric co-activation [L, E, E]."""
    num_layers, num_experts = profile.load.shape
    transitions = np.zeros((max(num_layers - 1, 0), num_experts, num_experts))
    coactivation = np.zeros((num_layers, num_experts, num_experts))
    if profile.transitions is not None:
        for layer in range(num_layers - 1):
            transitions[layer] = profile.transitions.dense(layer, num_experts) / profile.top_k
    if profile.coactivation is not None:
        for layer in range(num_layers):
            pairs = profile.coactivation.dense(layer, num_experts)
            coactivation[layer] = pairs + pairs.T
    return transitions, coactivation


def node_affinity(
    layer: int,
    presence: np.ndarray,
    counts: np.ndarray,
    transitions: np.ndarray,
    coactivation: np.ndarray,
    coactivation_weight: float,
) -> np.ndarray:
    """Tokens that stay on node m if expert e of ``layer`` has a replica there, [E, N].

    presence: [L, E, N] replicas per node (0/1); counts: [L, E]. Tokens that arrive from layer-1
    replicas on m, tokens that leave e's replica on m for layer+1 experts on m, and tokens that also
    use a co-activated expert on m."""
    num_layers = presence.shape[0]
    share = presence / counts[..., None]
    affinity = (
        coactivation_weight * (coactivation[layer] @ presence[layer]) / counts[layer][:, None]
    )
    if layer > 0:
        affinity += transitions[layer - 1].T @ share[layer - 1]
    if layer < num_layers - 1:
        affinity += (transitions[layer] @ presence[layer + 1]) / counts[layer][:, None]
    return affinity


def locality_score(presence: np.ndarray, counts: np.ndarray, transitions: np.ndarray) -> float:
    """Share of the layer-to-layer token flow that finds its next expert on its node. presence
    [L, E, N], counts [L, E], transitions [L-1, E, E]."""
    if len(transitions) == 0 or transitions.sum() <= 0:
        return 1.0
    share = presence / counts[..., None]
    kept = sum(
        float((share[layer].T @ transitions[layer] @ presence[layer + 1]).trace())
        for layer in range(len(transitions))
    )
    return kept / float(transitions.sum())
