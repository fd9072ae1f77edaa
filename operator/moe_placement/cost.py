"""Roofline and all-to-all cost model of the MoE layers of one forward step.

Per layer and GPU: time = max(tokens x FLOP per token / peak FLOP/s,
activated slots x expert bytes / HBM bandwidth). Layer time = slowest GPU + all-to-all time.

Data flow, two kinds (``DATA_FLOWS``). ``home`` (SGLang and vLLM with DP attention and DeepEP): a
token lives on its attention data-parallel rank (its home GPU, ``RoutingBatch.source_gpu``); every
layer dispatches it from there to its experts and combines it back, so the home decides the
cross-node bytes. ``follow`` (MoETuner's): a token starts layer 0 on its home and each later layer
from the GPU that served its first choice in the layer before, so placing experts that tokens chain
between layers on one GPU keeps tokens local. A token is sent once to each GPU it needs and, across
nodes, once to each node, to the GPU with the sender's local index there, which forwards it over
NVLink (DeepEP's rail-aligned internode dispatch); the combine sends the same bytes back, so each
transfer counts twice.

Shapes: L layers, B tokens, k choices, G GPUs, N slots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moe_placement.models import ModelShape, Placement, PlacementError, RoutingBatch, Topology
from moe_placement.parallel import in_order_on_threads
from moe_placement.routing import ReplicaLayout, get_router, replica_layouts

DataFlow = Literal["home", "follow"]
DATA_FLOWS: tuple[DataFlow, ...] = ("home", "follow")


@dataclass(frozen=True)
class CostReport:
    """Modelled cost of one forward step, averaged over the batches evaluated.

    token_imbalance (max / mean GPU tokens) and max_activated_experts (on the busiest GPU) are taken
    per layer and batch, then averaged; times and bytes are summed over layers.

    gpu_tokens: [L, G] (token, choice) pairs each GPU serves per step.
    gpu_activated: [L, G] distinct slots each GPU activates per step.
    """

    token_imbalance: float
    max_activated_experts: float
    cross_gpu_bytes: float
    cross_node_bytes: float
    compute_time_s: float
    comm_time_s: float
    moe_time_s: float
    gpu_tokens: np.ndarray
    gpu_activated: np.ndarray

    def summary(self) -> dict[str, float]:
        """The scalar figures, for tables and JSON."""
        return {
            "token_imbalance": self.token_imbalance,
            "max_activated_experts": self.max_activated_experts,
            "cross_gpu_mb": self.cross_gpu_bytes / 1e6,
            "cross_node_mb": self.cross_node_bytes / 1e6,
            "compute_ms": self.compute_time_s * 1e3,
            "comm_ms": self.comm_time_s * 1e3,
            "moe_ms": self.moe_time_s * 1e3,
        }


@dataclass(frozen=True)
class LayerCost:
    """One layer of one batch. gpu_tokens, gpu_activated: [G]."""

    gpu_tokens: np.ndarray
    gpu_activated: np.ndarray
    compute_time_s: float
    comm_time_s: float
    cross_gpu_bytes: float
    cross_node_bytes: float


def layer_cost(
    slots: np.ndarray,
    source_gpu: np.ndarray,
    layout: ReplicaLayout,
    model: ModelShape,
    topology: Topology,
) -> LayerCost:
    """Cost of one layer. slots: [B, k] slot serving each (token, choice); source_gpu: [B]."""
    num_gpus = len(layout.node_of_gpu)
    gpu_of_slot, node_of_gpu = layout.gpu_of_slot, layout.node_of_gpu
    destination_gpu = gpu_of_slot[slots]

    gpu_tokens = np.bincount(destination_gpu.ravel(), minlength=num_gpus).astype(np.float64)
    used = np.zeros(len(gpu_of_slot), dtype=bool)
    used[slots.ravel()] = True
    gpu_activated = np.bincount(gpu_of_slot[used], minlength=num_gpus).astype(np.float64)
    compute = gpu_tokens * model.flops_per_token / (topology.gpu.peak_tflops * 1e12)
    memory = gpu_activated * model.expert_bytes / (topology.gpu.hbm_bandwidth_gb_s * 1e9)
    compute_time = float(np.max(np.maximum(compute, memory)))

    # Each token is sent once to each GPU it needs but its own: its k destinations sorted, the first
    # of each GPU kept. Everything below is a [B, k] mask over these entries (masks over the sorted
    # rows beat listing the unique pairs by 2x).
    home = source_gpu[:, None]
    destinations = np.sort(destination_gpu, axis=1)
    sent = destinations != home
    sent[:, 1:] &= destinations[:, 1:] != destinations[:, :-1]
    destination_node = node_of_gpu[destinations]
    same_node = sent & (destination_node == node_of_gpu[home])
    # Cross-node: one transfer per (token, destination node), the first entry of each node of the
    # sorted row. DeepEP's internode dispatch is rail-aligned: the token crosses to the GPU with its
    # sender's local index (its relay), which forwards it over NVLink to the node's other
    # destination GPUs.
    other_node = sent & ~same_node
    crosses = other_node.copy()
    crosses[:, 1:] &= destination_node[:, 1:] != destination_node[:, :-1]
    gpus_per_node = topology.gpus_per_node
    relay = destination_node * gpus_per_node + home % gpus_per_node
    forwarded = other_node & (destinations != relay)
    intra = np.flatnonzero(same_node | forwarded)  # flat entries: faster to gather by than masks
    inter = np.flatnonzero(crosses)

    token_bytes = 2.0 * model.token_bytes  # dispatch + combine
    intra_out = np.bincount(
        np.where(same_node, home, relay).ravel()[intra], minlength=num_gpus
    )
    intra_in = np.bincount(destinations.ravel()[intra], minlength=num_gpus)
    inter_out = np.bincount(source_gpu[inter // destinations.shape[1]], minlength=num_gpus)
    inter_in = np.bincount(relay.ravel()[inter], minlength=num_gpus)
    intra_bw, inter_bw = topology.intra_node_gb_s * 1e9, topology.inter_node_gb_s * 1e9
    send = intra_out * token_bytes / intra_bw + inter_out * token_bytes / inter_bw
    receive = intra_in * token_bytes / intra_bw + inter_in * token_bytes / inter_bw
    comm_time = float(np.max(np.maximum(send, receive))) if num_gpus > 1 else 0.0

    inter_transfers, intra_transfers = len(inter), len(intra)
    return LayerCost(
        gpu_tokens=gpu_tokens,
        gpu_activated=gpu_activated,
        compute_time_s=compute_time,
        comm_time_s=comm_time,
        cross_gpu_bytes=(intra_transfers + inter_transfers) * token_bytes,
        cross_node_bytes=inter_transfers * token_bytes,
    )


def _layer_costs(
    layouts: Sequence[ReplicaLayout],
    batch: RoutingBatch,
    route: Callable[..., np.ndarray],
    rng: np.random.Generator,
    model: ModelShape,
    topology: Topology,
    data_flow: DataFlow,
) -> Iterator[LayerCost]:
    """Each layer's cost in order. ``follow``: a token starts layer l + 1 where its first choice at l
    was served, so one layer after another. ``home``: every layer starts from the batch's source GPUs,
    so layers are independent: their random draws are taken in layer order, as one layer after
    another would take them, and several layers are routed and costed at once on threads
    (``in_order_on_threads``)."""
    source_gpu = batch.source_gpu % len(layouts[0].node_of_gpu)
    if data_flow == "follow":
        for layout, expert_ids in zip(layouts, batch.expert_ids):
            slots = route(layout, expert_ids, source_gpu, rng.random(expert_ids.shape))
            yield layer_cost(slots, source_gpu, layout, model, topology)
            source_gpu = layout.gpu_of_slot[slots[:, 0]]
        return

    def routed(layout: ReplicaLayout, expert_ids: np.ndarray, draws: np.ndarray) -> LayerCost:
        slots = route(layout, expert_ids, source_gpu, draws)
        return layer_cost(slots, source_gpu, layout, model, topology)

    yield from in_order_on_threads(
        (routed, (layout, expert_ids, rng.random(expert_ids.shape)))
        for layout, expert_ids in zip(layouts, batch.expert_ids)
    )


def evaluate(
    placement: Placement,
    model: ModelShape,
    topology: Topology,
    batches: Sequence[RoutingBatch],
    router: str = "random",
    seed: int = 0,
    data_flow: DataFlow = "home",
) -> CostReport:
    """Modelled cost of ``placement`` on ``batches`` with tokens routed by ``router``, each token
    starting every layer from where ``data_flow`` puts it."""
    if data_flow not in DATA_FLOWS:
        raise PlacementError(f"data_flow: {data_flow!r} is not one of {', '.join(DATA_FLOWS)}")
    placement.check_topology(model, topology)
    route = get_router(router)
    layouts = replica_layouts(placement, topology)
    rng = np.random.default_rng(seed)
    num_layers, num_gpus = placement.num_layers, placement.num_gpus
    gpu_tokens = np.zeros((num_layers, num_gpus))
    gpu_activated = np.zeros((num_layers, num_gpus))
    # compute, comm, cross-GPU bytes, cross-node bytes, token imbalance, max activated
    totals = np.zeros(6)
    if not batches:
        raise PlacementError("batches: nothing to evaluate")
    for batch in batches:
        if batch.expert_ids.shape[0] != num_layers:
            raise PlacementError(
                f"expert_ids: batch has {batch.expert_ids.shape[0]} layers, placement {num_layers}"
            )
        costs = _layer_costs(layouts, batch, route, rng, model, topology, data_flow)
        for layer, cost in enumerate(costs):
            gpu_tokens[layer] += cost.gpu_tokens
            gpu_activated[layer] += cost.gpu_activated
            totals += (
                cost.compute_time_s,
                cost.comm_time_s,
                cost.cross_gpu_bytes,
                cost.cross_node_bytes,
                cost.gpu_tokens.max() / max(cost.gpu_tokens.mean(), 1e-12) / num_layers,
                cost.gpu_activated.max() / num_layers,
            )
    count = len(batches)
    compute, comm, cross_gpu, cross_node, token_imbalance, max_activated = totals / count
    return CostReport(
        token_imbalance=float(token_imbalance),
        max_activated_experts=float(max_activated),
        cross_gpu_bytes=float(cross_gpu),
        cross_node_bytes=float(cross_node),
        compute_time_s=float(compute),
        comm_time_s=float(comm),
        moe_time_s=float(compute + comm),
        gpu_tokens=gpu_tokens / count,
        gpu_activated=gpu_activated / count,
    )
