"""``policy: grouped``: each request group's experts on the node the request router sends it to.

The router (``moe_placement.request_routing``) sends each domain's requests to nodes in the shares
``assign_domain_nodes`` gives; under the engines' data flow a token is dispatched from its home rank
every layer, so a token stays on its node when all its experts have a replica there. Per layer, each
node holds the experts its groups use most (hot experts shared by several groups get a replica on
every node that wants them); an expert no node picked goes to the node that wants it most, in place
of that node's least useful replica of an expert held elsewhere too. Within a node, replicas are
packed over its GPUs by the tokens they serve (local ones, and remote ones for experts held only
there). Pair with ``local_first`` routing (prefill); for decode, ``metro``.

Shapes: L layers, E experts, N nodes, D domains, G GPUs, S slots per GPU.
"""

from __future__ import annotations

import numpy as np

from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.packing import greedy_packing, replica_counts
from moe_placement.policies.base import PolicyOptions, SolverInfo
from moe_placement.request_routing import assign_domain_nodes, domain_signatures_of_profile


def node_loads(profile: WorkloadProfile, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens each node's requests bring to each expert, [N, L, E], and the domain shares [D, N]."""
    _, signatures, tokens = domain_signatures_of_profile(profile)
    share = assign_domain_nodes(tokens, num_nodes)
    return np.einsum("dn,dle->nle", share * tokens[:, None], signatures), share


def node_sets(wanted: np.ndarray, node_slots: int) -> np.ndarray:
    """Which experts each node holds at one layer, [E, N] 0/1, of the tokens each node's requests
    bring to each expert, wanted [N, E]: each node its ``node_slots`` most wanted, then every
    expert no node holds to the node where it displaces the least (wanted gained minus wanted of
    the replica it replaces, a replica of an expert held on another node too)."""
    num_nodes, num_experts = wanted.shape
    held = np.zeros((num_experts, num_nodes), dtype=np.int64)
    for node in range(num_nodes):
        held[np.argsort(-wanted[node], kind="stable")[:node_slots], node] = 1
    for expert in np.argsort(-wanted.sum(0), kind="stable"):
        if held[expert].any():
            continue
        best_gain, best = -np.inf, None
        for node in range(num_nodes):
            spare = np.nonzero((held[:, node] == 1) & (held.sum(1) > 1))[0]
            if not len(spare):
                continue
            drop = spare[np.argmin(wanted[node, spare])]
            gain = wanted[node, expert] - wanted[node, drop]
            if gain > best_gain:
                best_gain, best = gain, (node, drop)
        node, drop = best
        held[drop, node], held[expert, node] = 0, 1
    return held


def node_partition(wanted: np.ndarray) -> np.ndarray:
    """Each expert on exactly one node at one layer, [E, N] 0/1, of wanted [N, E]: (expert, node)
    pairs in order of wanted, each taken while the expert is unplaced and the node holds fewer
    than ceil(E / N) (decode: one replica per expert keeps the experts a step activates fewest)."""
    num_nodes, num_experts = wanted.shape
    capacity = -(-num_experts // num_nodes)
    held = np.zeros((num_experts, num_nodes), dtype=np.int64)
    order = np.argsort(-wanted.T, axis=None, kind="stable")
    for expert, node in zip(*np.unravel_index(order, (num_experts, num_nodes))):
        if not held[expert].any() and held[:, node].sum() < capacity:
            held[expert, node] = 1
    return held


def pack_node(
    experts: np.ndarray,
    served: np.ndarray,
    gpus_per_node: int,
    slots_per_gpu: int,
    fill: bool = True,
) -> list[np.ndarray]:
    """A node's experts [n] onto its GPUs, tokens each expert serves [n] balanced (LPT) -> experts
    of each GPU. With ``fill``, slots left over (a node with room for more than every expert) hold
    more replicas of the busiest, at most one per GPU; without, each expert has one replica and a
    GPU at most ceil(n / GPUs) (decode: the experts a GPU streams stay few, spare slots stay empty)."""
    ones = np.ones(len(experts), dtype=np.int64)
    if not fill:
        per_gpu = -(-len(experts) // gpus_per_node)
        packing = greedy_packing(served, ones, ones, gpus_per_node, per_gpu)
        return [experts[np.nonzero(packing[:, gpu])[0]] for gpu in range(gpus_per_node)]
    room = gpus_per_node * slots_per_gpu
    copies = replica_counts(served[None], min(room, len(experts) * gpus_per_node), gpus_per_node)[0]
    packing = greedy_packing(served / copies, copies, ones, gpus_per_node, slots_per_gpu)
    return [experts[np.nonzero(packing[:, gpu])[0]] for gpu in range(gpus_per_node)]


def policy_grouped(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Request groups' experts co-placed on their nodes -> ([L, G*S], SolverInfo)."""
    num_nodes, gpus_per_node, slots_per_gpu = (
        topology.num_nodes,
        topology.gpus_per_node,
        topology.slots_per_gpu,
    )
    wanted, share = node_loads(profile, num_nodes)
    node_slots = gpus_per_node * slots_per_gpu
    mapping = np.full((profile.num_layers, topology.num_slots), -1, dtype=np.int64)
    local_choices = 0.0
    for layer in range(profile.num_layers):
        held = (
            node_partition(wanted[:, layer])
            if profile.phase == "decode"
            else node_sets(wanted[:, layer], min(node_slots, profile.num_experts))
        )
        local_choices += float((wanted[:, layer] * held.T).sum())
        # Tokens a replica serves: its node's, plus other nodes' when it is the only one.
        remote = (wanted[:, layer] * (1 - held.T)).sum(0) / np.maximum(held.sum(1), 1)
        for node in range(num_nodes):
            experts = np.nonzero(held[:, node])[0]
            served = wanted[node, layer, experts] + remote[experts]
            packed = pack_node(
                experts, served, gpus_per_node, slots_per_gpu, fill=profile.phase != "decode"
            )
            for local_gpu, on_gpu in enumerate(packed):
                start = (node * gpus_per_node + local_gpu) * slots_per_gpu
                mapping[layer, start : start + len(on_gpu)] = on_gpu
    total = max(float(wanted.sum()), 1e-12)
    groups = ", ".join(
        f"{name or 'all'}->" + "+".join(f"n{node}:{s:.0%}" for node, s in enumerate(row) if s > 0)
        for name, row in zip(domain_signatures_of_profile(profile)[0], share)
    )
    return mapping, SolverInfo(
        status="heuristic",
        objective=1.0 - local_choices / total,
        objective_name="share of expert choices without a replica on the request's node",
        notes=[f"request groups to nodes: {groups}"],
    )
