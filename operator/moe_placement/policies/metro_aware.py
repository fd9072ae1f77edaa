"""``policy: metro_aware``: in memory-bound decode a GPU's MoE time is the experts it streams from
HBM; this placement makes typical decode batches activate few experts on the busiest GPU under METRO
routing (``moe_placement.routing.route_metro``).

Shapes: B tokens, k choices, E experts, G GPUs, N slots, L layers.
"""

from __future__ import annotations

import time

import numpy as np

from moe_placement.models import ModelShape, Placement, Topology, WorkloadProfile
from moe_placement.packing import BALANCE_TOLERANCE, coplace_nodes, greedy_nodes_per_layer
from moe_placement.pairs import locality_score, pair_matrices
from moe_placement.parallel import even_chunks, run_chunks, worker_count
from moe_placement.policies.base import PolicyOptions, SolverInfo
from moe_placement.presence import node_presence
from moe_placement.routing import replica_layouts, route_metro
from moe_placement.traces import sample_expert_ids

SIMULATED_BATCHES = 8  # decode batches drawn from the profile to compare replica counts
MAX_BALANCE_TOLERANCE = 0.3  # most extra tokens a node may carry when memory time dominates


def activation_chance(profile: WorkloadProfile) -> np.ndarray:
    """Chance that each expert is activated in one batch of ``profile.batch_size`` tokens, [L, E]:
    1 - (1 - q)^B with q the share of tokens choosing it."""
    share = np.clip(profile.load / max(profile.num_tokens, 1e-12), 0.0, 1.0)
    return 1.0 - (1.0 - share) ** profile.batch_size


def primary_capacity(num_experts: int, topology: Topology) -> np.ndarray:
    """Primary replicas each GPU holds, [G]: ceil or floor of E / G, the larger ones spread over
    nodes first (so every node ends up with about E / nodes)."""
    num_gpus = topology.num_gpus
    capacity = np.full(num_gpus, num_experts // num_gpus, dtype=np.int64)
    # GPU order node 0 GPU 0, node 1 GPU 0, ...: the remainder goes round the nodes.
    order = np.arange(num_gpus).reshape(topology.num_nodes, topology.gpus_per_node).T.ravel()
    capacity[order[: num_experts % num_gpus]] += 1
    return np.minimum(capacity, topology.slots_per_gpu)


def place_primaries(
    presence: np.ndarray,
    chance: np.ndarray,
    load: np.ndarray,
    capacity: np.ndarray,
    topology: Topology,
) -> np.ndarray:
    """One replica of each expert onto its node's GPUs, balancing expected activated experts and
    tokens alike (each relative to its mean per expert), heaviest first to the lightest GPU with
    room: presence [E, N], chance, load [E], capacity [G] -> GPU of each expert [E]."""
    weight = chance / max(chance.mean(), 1e-12) + load / max(load.mean(), 1e-12)
    gpu_of_expert = np.full(len(load), -1, dtype=np.int64)
    gpus_per_node = topology.gpus_per_node
    for node in range(presence.shape[1]):
        gpus = np.arange(node * gpus_per_node, (node + 1) * gpus_per_node)
        members = np.nonzero(presence[:, node])[0]
        gpu_weight = np.zeros(len(gpus))
        free = capacity[gpus].copy()
        for expert in members[np.argsort(-weight[members], kind="stable")]:
            pick = int(np.argmin(np.where(free > 0, gpu_weight, np.inf)))
            gpu_of_expert[expert] = gpus[pick]
            gpu_weight[pick] += weight[expert]
            free[pick] -= 1
    return gpu_of_expert


def add_replicas(
    mapping: np.ndarray, chance: np.ndarray, load: np.ndarray, topology: Topology, extra: int
) -> np.ndarray:
    """Fill ``extra`` empty slots of one layer with replicas of the experts with the most tokens
    per replica, each on the GPU (with room, without that expert) of the fewest expected activated
    experts, then tokens, preferring the expert's own node. mapping [N] -> [N]."""
    mapping = mapping.copy()
    slots_per_gpu, gpus_per_node = topology.slots_per_gpu, topology.gpus_per_node
    grid = mapping.reshape(topology.num_gpus, slots_per_gpu)
    counts = np.bincount(mapping[mapping >= 0], minlength=len(load))
    for _ in range(extra):
        holder = np.zeros((topology.num_gpus, len(load)), dtype=bool)
        rows, cols = np.nonzero(grid >= 0)
        holder[rows, grid[rows, cols]] = True
        free = (grid < 0).sum(1)
        expected = (holder * chance).sum(1)
        tokens = (holder * (load / np.maximum(counts, 1))).sum(1)
        for expert in np.argsort(-(load / np.maximum(counts, 1)), kind="stable"):
            allowed = np.nonzero((free > 0) & ~holder[:, expert])[0]
            if len(allowed):
                break
        else:
            break
        home = np.nonzero(holder[:, expert])[0][0] // gpus_per_node
        away = allowed // gpus_per_node != home
        gpu = allowed[np.lexsort((tokens[allowed], expected[allowed], away))[0]]
        grid[gpu, np.nonzero(grid[gpu] < 0)[0][0]] = expert
        counts[expert] += 1
    return grid.ravel()


def simulated_time(
    mapping: np.ndarray, model: ModelShape, topology: Topology, batches: np.ndarray
) -> float:
    """Mean over batches of the slowest GPU's roofline time of one layer under METRO greedy routing:
    mapping [N], batches [X, B, k] of one layer -> seconds."""
    placement = Placement(mapping[None, :], int(mapping.max()) + 1, topology.slots_per_gpu)
    layout = replica_layouts(placement, topology)[0]
    num_gpus = topology.num_gpus
    total = 0.0
    for ids in batches:
        slots = route_metro(layout, ids, np.zeros(len(ids), dtype=np.int64), np.zeros(ids.shape))
        gpu_tokens = np.bincount(layout.gpu_of_slot[slots.ravel()], minlength=num_gpus)
        activated = np.bincount(layout.gpu_of_slot[np.unique(slots)], minlength=num_gpus)
        compute = gpu_tokens * model.flops_per_token / (topology.gpu.peak_tflops * 1e12)
        memory = activated * model.expert_bytes / (topology.gpu.hbm_bandwidth_gb_s * 1e9)
        total += float(np.maximum(compute, memory).max())
    return total / len(batches)


def node_tolerance(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, activated: int
) -> float:
    """How many more tokens than the mean a node may carry: where streaming ``activated`` experts
    takes longer than computing a GPU's tokens (decode), until compute catches up (locality then
    buys more than token balance), between BALANCE_TOLERANCE and MAX_BALANCE_TOLERANCE."""
    tokens_per_gpu = profile.batch_size * profile.top_k / topology.num_gpus
    compute = tokens_per_gpu * model.flops_per_token / (topology.gpu.peak_tflops * 1e12)
    memory = activated * model.expert_bytes / (topology.gpu.hbm_bandwidth_gb_s * 1e9)
    return float(np.clip(memory / compute - 1.0, BALANCE_TOLERANCE, MAX_BALANCE_TOLERANCE))


def primaries_row(gpu_of_expert: np.ndarray, topology: Topology) -> np.ndarray:
    """One layer's slots [N] from each expert's GPU [E]: a GPU's experts in its first slots, by id."""
    row = np.full(topology.num_slots, -1, dtype=np.int64)
    for gpu in range(topology.num_gpus):
        experts = np.sort(np.nonzero(gpu_of_expert == gpu)[0])
        start = gpu * topology.slots_per_gpu
        row[start : start + len(experts)] = experts
    return row


def best_replica_level(
    row: np.ndarray,
    chance: np.ndarray,
    load: np.ndarray,
    model: ModelShape,
    topology: Topology,
    batches: np.ndarray,
    levels: list[int],
    deadline: float = float("inf"),
) -> tuple[np.ndarray, float, int]:
    """Of ``levels`` (ascending) redundant replicas added to one layer's primaries ``row`` [N], the
    one with the lowest simulated time on ``batches`` [X, B, k] (more replicas only for a real
    gain): (row [N], seconds, level). chance, load: [E]. Past ``deadline`` (time.perf_counter())
    no further level is tried once one has been simulated."""
    best_row, best_time, best_level = row, np.inf, 0
    candidate, added = row, 0
    for level in levels:
        if best_time < np.inf and time.perf_counter() > deadline:
            break
        # add_replicas goes on from where it stopped: each level extends the one before
        candidate = add_replicas(candidate, chance, load, topology, level - added)
        added = level
        seconds = simulated_time(candidate, model, topology, batches)
        if seconds < best_time * (1.0 - 1e-3):
            best_row, best_time, best_level = candidate, seconds, level
    return best_row, best_time, best_level


def layer_profile(profile: WorkloadProfile, layers: slice) -> WorkloadProfile:
    """The loads (and domain loads) of ``layers`` of ``profile``: what sampling tokens needs."""
    return WorkloadProfile(
        load=profile.load[layers],
        top_k=profile.top_k,
        domain_loads={name: load[layers] for name, load in profile.domain_loads.items()},
        phase=profile.phase,
        batch_size=profile.batch_size,
    )


def simulated_batches(profile: WorkloadProfile, layer: int, seed: int) -> np.ndarray:
    """SIMULATED_BATCHES decode batches of one layer of a one-layer ``profile``, [X, B, k], drawn
    from a generator of its own (seed, layer): the same tokens however the layers are split up."""
    batch_tokens = min(profile.batch_size, 8192)
    rng = np.random.default_rng([seed, layer])
    tokens, _, _ = sample_expert_ids(profile, SIMULATED_BATCHES * batch_tokens, rng)
    return tokens.reshape(SIMULATED_BATCHES, batch_tokens, profile.top_k)


def search_layers(
    profile: WorkloadProfile,
    first_layer: int,
    presence: np.ndarray,
    chance: np.ndarray,
    capacity: np.ndarray,
    model: ModelShape,
    topology: Topology,
    levels: list[int],
    seed: int,
    deadline: float,
) -> tuple[np.ndarray, list[int | None], float]:
    """Primaries and the best replica level for the consecutive layers of ``profile`` (layer
    ``first_layer`` of the model onwards), until ``deadline`` (time.perf_counter()); a layer reached
    after it keeps its primaries only, unsimulated. presence [l, E, N], chance [l, E], capacity [G]
    -> (mapping [l, N], level of each layer (None: not simulated), simulated seconds summed)."""
    load = profile.load
    mapping = np.full((len(load), topology.num_slots), -1, dtype=np.int64)
    chosen_levels: list[int | None] = []
    simulated = 0.0
    for layer in range(len(load)):
        gpu_of_expert = place_primaries(
            presence[layer], chance[layer], load[layer], capacity, topology
        )
        row = primaries_row(gpu_of_expert, topology)
        if time.perf_counter() > deadline:  # out of time: primaries only, not simulated
            mapping[layer] = add_replicas(row, chance[layer], load[layer], topology, 0)
            chosen_levels.append(None)
            continue
        batches = simulated_batches(
            layer_profile(profile, slice(layer, layer + 1)), first_layer + layer, seed
        )
        mapping[layer], seconds, level = best_replica_level(
            row, chance[layer], load[layer], model, topology, batches, levels, deadline
        )
        chosen_levels.append(level)
        simulated += seconds
    return mapping, chosen_levels, simulated


def policy_metro_aware(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Decode-aware placement -> ([L, N], SolverInfo).

    1. One primary replica per expert, ceil(E/G) at most per GPU, so that METRO routing never needs
       more than ceil(E/G) activated experts on a GPU when every expert is active. Primaries go to
       nodes by co-placement (transitions and co-activation keep tokens on their node) and to GPUs
       balancing each GPU's expected activated experts (chance of activation in a batch of
       ``profile.batch_size`` tokens), then tokens.
    2. Redundant slots: per layer, 0, 1/4, 1/2 or all of them get replicas (most tokens per replica
       first), whichever gives the lowest simulated slowest-GPU time under METRO routing on batches
       drawn from the profile; slots that do not pay stay empty (their HBM is free for KV cache).
    """
    started = time.perf_counter()
    # the per-layer replica search stops here; what follows it takes well under a tenth
    deadline = started + 0.9 * options.time_limit_s
    load = profile.load
    num_layers, num_experts = load.shape
    chance = activation_chance(profile)
    capacity = primary_capacity(num_experts, topology)
    node_slots = capacity.reshape(topology.num_nodes, topology.gpus_per_node).sum(1)
    ones = np.ones((num_layers, num_experts), dtype=np.int64)
    start = greedy_nodes_per_layer(load, ones, node_slots, options.workers)
    tolerance = node_tolerance(profile, model, topology, int(capacity.max()))
    presence = coplace_nodes(
        profile, ones, node_slots, initial=start, balance_tolerance=tolerance,
        deadline=started + 0.5 * options.time_limit_s,
    )
    transitions, _ = pair_matrices(profile)

    extra_slots = topology.num_slots - num_experts
    levels = sorted({0, extra_slots // 4, extra_slots // 2, extra_slots})
    chunks = even_chunks(num_layers, worker_count(num_layers, options.workers))
    searched = run_chunks(
        search_layers,
        [
            (layer_profile(profile, chunk), chunk.start, presence[chunk], chance[chunk], capacity,
             model, topology, levels, options.seed, deadline)
            for chunk in chunks
        ],
    )
    mapping = np.concatenate([rows for rows, _, _ in searched])
    chosen_levels = [level for _, chunk_levels, _ in searched for level in chunk_levels]
    simulated = float(sum(seconds for _, _, seconds in searched))
    unsimulated = chosen_levels.count(None)
    chosen_levels = [level or 0 for level in chosen_levels]
    presence = node_presence(mapping, topology, num_experts)
    kept = locality_score(np.minimum(presence, 1), np.maximum(presence.sum(-1), 1), transitions)
    activated_cap = int(capacity.max())
    notes = []
    if unsimulated:
        notes.append(f"time limit: {unsimulated} layers kept their primaries only, unsimulated")
    return mapping, SolverInfo(
        status="time_limit" if unsimulated else "heuristic",
        objective=simulated,
        objective_name="slowest GPU's roofline seconds per step, summed over layers, under METRO "
        "routing on batches drawn from the profile",
        notes=[
            f"primaries: at most {activated_cap} per GPU, nodes within {tolerance:.0%} of the mean tokens; "
            "replicas added per layer: "
            f"{np.mean(chosen_levels):.1f} of {extra_slots} redundant slots on average",
            f"tokens kept on their node between layers: {kept:.1%}",
            f"batch of {profile.batch_size} tokens activates {chance.sum(1).mean():.1f} of {num_experts} experts per layer (expected)",
            *notes,
        ],
        router="metro",
    )
