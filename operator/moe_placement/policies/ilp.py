"""MoETuner's two-stage placement as integer programs (PuLP; HiGHS through highspy, CBC as fallback).

Stage 1, per layer: give each extra slot to the expert with the largest load per replica, then pack
the replicas into G equal-size GPU groups (one replica of an expert per GPU) so that the busiest
group carries the fewest tokens: an ILP, ``minimise z s.t. sum_e w_e x[e, g] <= z``. MoETuner
minimises the sum of |group load - mean|; the busiest group is what the cost model's slowest GPU
pays, so that is the objective here. Where one ILP over all GPUs is too large (DeepSeek-V3: 320
replicas x 64 GPUs) it is decomposed: replicas onto nodes first, then each node's onto its GPUs.

Stage 2: map the groups of consecutive layers to GPUs so that tokens stay on their GPU (or node)
between layers. With the flow F_l[a, b] (tokens from group a at layer l to group b at l+1) and
the link cost D[g, h] (0 on one GPU, 1/NVLink in a node, 1/InfiniBand across), the chain objective
sum_l sum_ab F_l[a, b] D[pi_l(a), pi_l+1(b)] is quadratic; fixing every layer but one makes it a
linear assignment, solved exactly (Hungarian), layer after layer, until no layer improves. The
bound it reports is provable: a pair of layers moves at least the flow that the best one-to-one
matching of groups cannot keep on one GPU, at the cheapest link.

Every ILP is warm-started from the greedy packing and never returns worse than it; a solver that
fails or runs out of time leaves the greedy (or its best incumbent) in place, and the status says so.

Shapes: L layers, E experts, G GPUs, N nodes, S slots per GPU, n items of one packing problem.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pulp

from moe_placement.milp import MIP_GAP, STATUS_ORDER, MilpResult, solve_milp, worst_status
from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.packing import greedy_packing, replica_counts
from moe_placement.parallel import even_chunks, run_chunks, worker_count
from moe_placement.policies.base import PolicyOptions, SolverInfo

MONOLITHIC_VARIABLES = 2048  # larger packings are decomposed (nodes first, then GPUs)
MIN_SOLVE_S = 0.05  # below this much time left, a subproblem keeps its greedy packing
PACKING_SHARE = 0.75  # of the time limit for stage 1; stage 2 stops at 0.95 of it
ASSIGNMENT_S_PER_GROUP_PAIR = 1.5e-5  # a first guess at one layer assignment's seconds / G^2


def pack_ilp(
    weight: np.ndarray,
    copies: np.ndarray,
    cap: np.ndarray,
    num_groups: int,
    group_slots: int,
    time_limit_s: float,
) -> tuple[np.ndarray, MilpResult, float]:
    """Balanced packing as an ILP, warm-started from ``greedy_packing``.

    weight [n] (tokens per replica), copies [n], cap [n] -> (copies per group [n, num_groups],
    the solver's result, the greedy packing's busiest group). The packing returned is the better
    of the solver's and the greedy one, so never worse than the warm start."""
    greedy = greedy_packing(weight, copies, cap, num_groups, group_slots)
    greedy_max = float((weight @ greedy).max())
    if time_limit_s < MIN_SOLVE_S:
        return greedy, MilpResult("time_limit", greedy_max, None, "none"), greedy_max
    scale = max(float(weight.sum()) / num_groups, 1e-12)  # the ILP sees loads relative to the mean
    problem, x = _packing_problem(
        weight / scale, copies, cap, group_slots, greedy, greedy_max / scale
    )
    result = solve_milp(problem, time_limit_s)
    if result.status == "fallback":
        return greedy, result, greedy_max
    solution = np.array(
        [[round(x[i, g].value() or 0) for g in range(num_groups)] for i in range(len(weight))],
        dtype=np.int64,
    )
    bound = None if result.lower_bound is None else result.lower_bound * scale
    valid = _is_packing(solution, copies, cap, group_slots)
    if not valid or float((weight @ solution).max()) > greedy_max:
        return greedy, MilpResult(result.status, greedy_max, bound, result.solver), greedy_max
    return (
        solution,
        MilpResult(result.status, float((weight @ solution).max()), bound, result.solver),
        greedy_max,
    )


def _packing_problem(
    relative: np.ndarray,
    copies: np.ndarray,
    cap: np.ndarray,
    group_slots: int,
    greedy: np.ndarray,
    greedy_busiest: float,
) -> tuple[pulp.LpProblem, dict[tuple[int, int], pulp.LpVariable]]:
    """The packing ILP (minimise the busiest group's load) and its variables x[i, g] (copies of item
    i in group g), warm-started at ``greedy`` [n, G] whose busiest group carries ``greedy_busiest``.
    relative [n]: each replica's load over the mean group load; copies [n], cap [n]."""
    items, groups = range(len(relative)), range(greedy.shape[1])
    problem = pulp.LpProblem("stage1_packing", pulp.LpMinimize)
    busiest = problem.add_variable("busiest", lowBound=0)
    x = {
        (i, g): problem.add_variable(f"x_{i}_{g}", 0, int(cap[i]), cat=pulp.LpInteger)
        for i in items
        for g in groups
    }
    problem += busiest
    for i in items:
        problem += pulp.lpSum(x[i, g] for g in groups) == int(copies[i])
    for g in groups:
        problem += pulp.lpSum(x[i, g] for i in items) <= group_slots
        problem += pulp.LpAffineExpression([(x[i, g], relative[i]) for i in items]) <= busiest
    for (i, g), var in x.items():
        var.setInitialValue(int(greedy[i, g]))
    busiest.setInitialValue(greedy_busiest)
    return problem, x


def _is_packing(
    solution: np.ndarray, copies: np.ndarray, cap: np.ndarray, group_slots: int
) -> bool:
    """Whether ``solution`` [n, G] places exactly copies [n] of each item, at most cap [n] per group
    and at most ``group_slots`` per group (a solver may return an infeasible incumbent)."""
    return bool(
        np.array_equal(solution.sum(1), copies)
        and np.all(solution.sum(0) <= group_slots)
        and np.all(solution >= 0)
        and np.all(solution <= cap[:, None])
    )


@dataclass(frozen=True)
class LayerPacking:
    """Stage 1's answer for one layer.

    replicas_on_gpu: [E, G] replicas of each expert on each GPU group (0 or 1).
    busiest, greedy_busiest: tokens of the busiest group, of this packing and of the greedy one.
    lower_bound: a bound on ``busiest`` for these replica counts.
    """

    replicas_on_gpu: np.ndarray
    busiest: float
    greedy_busiest: float
    lower_bound: float
    status: str
    solver: str


def pack_layer(
    load: np.ndarray, counts: np.ndarray, topology: Topology, time_limit_s: float
) -> LayerPacking:
    """Stage 1 for one layer: load [E], counts [E] replicas -> a LayerPacking, monolithic when small
    enough, else nodes first and then each node's GPUs."""
    weight = load / counts
    num_gpus, num_nodes, gpus_per_node = (
        topology.num_gpus,
        topology.num_nodes,
        topology.gpus_per_node,
    )
    # Valid for any packing with these replica counts: the mean, and the heaviest replica.
    simple_bound = max(float(load.sum()) / num_gpus, float(weight.max()))
    ones = np.ones(len(load), dtype=np.int64)
    if num_nodes == 1 or len(load) * num_gpus <= MONOLITHIC_VARIABLES:
        packing, result, greedy_max = pack_ilp(
            weight, counts, ones, num_gpus, topology.slots_per_gpu, time_limit_s
        )
        bound = max(simple_bound, result.lower_bound or 0.0)
        busiest = float((weight @ packing).max())
        return LayerPacking(
            packing, busiest, greedy_max, min(bound, busiest), result.status, result.solver
        )

    started = time.perf_counter()
    node_cap = np.minimum(counts, gpus_per_node)
    on_node, node_result, _ = pack_ilp(
        weight,
        counts,
        node_cap,
        num_nodes,
        gpus_per_node * topology.slots_per_gpu,
        time_limit_s / 2,
    )
    # A GPU carries at least 1/gpus_per_node of its node's tokens, so the node bound bounds it too.
    node_bound = (node_result.lower_bound or 0.0) / gpus_per_node
    packing = np.zeros((len(load), num_gpus), dtype=np.int64)
    greedy_max, statuses = 0.0, [node_result.status]
    for node in range(num_nodes):
        members = np.nonzero(on_node[:, node])[0]
        left = time_limit_s - (time.perf_counter() - started)
        sub, result, sub_greedy = pack_ilp(
            weight[members],
            on_node[members, node],
            ones[members],
            gpus_per_node,
            topology.slots_per_gpu,
            left / (num_nodes - node),
        )
        packing[np.ix_(members, np.arange(node * gpus_per_node, (node + 1) * gpus_per_node))] = sub
        greedy_max = max(greedy_max, sub_greedy)
        statuses.append(result.status)
    # The decomposition's greedy reference is the plain LPT over all GPUs, which it must not lose to.
    flat = greedy_packing(weight, counts, ones, num_gpus, topology.slots_per_gpu)
    flat_max = float((weight @ flat).max())
    busiest = float((weight @ packing).max())
    if flat_max < busiest:
        packing, busiest = flat, flat_max
    bound = max(simple_bound, node_bound)
    status = worst_status(statuses)
    if status == "optimal":
        status = "feasible"  # optimal parts of a decomposition do not prove the whole optimal
    return LayerPacking(packing, busiest, flat_max, min(bound, busiest), status, node_result.solver)


def pack_layers(
    load: np.ndarray, counts: np.ndarray, topology: Topology, deadline: float
) -> list[LayerPacking]:
    """Stage 1 for consecutive layers, load and counts [l, E], each layer given an equal share of
    the time left until ``deadline`` (time.perf_counter()) -> one LayerPacking per layer."""
    started = time.perf_counter()
    num_layers = len(load)
    packings: list[LayerPacking] = []
    granted = 0.0  # solver time handed to the layers packed so far
    for layer in range(num_layers):
        now = time.perf_counter()
        # building each problem costs time the solver's limit does not count: measured so far
        overhead = max(now - started - granted, 0.0) / layer if layer else 0.0
        share = (deadline - now) / (num_layers - layer) - overhead
        packing = pack_layer(load[layer], counts[layer], topology, share)
        # 0/1 per (expert, GPU): one byte each, not eight, on the way back from a worker
        packings.append(replace(packing, replicas_on_gpu=packing.replicas_on_gpu.astype(np.uint8)))
        granted += max(share, 0.0)
    return packings


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square matrix, cost [n, n] -> column of each row [n]
    (Hungarian method with potentials, O(n^3))."""
    size = cost.shape[0]
    padded = np.zeros((size + 1, size + 1))
    padded[1:, 1:] = cost
    row_potential, column_potential = np.zeros(size + 1), np.zeros(size + 1)
    row_of_column = np.zeros(size + 1, dtype=np.int64)  # 0 = unmatched; rows are 1-based
    previous_column = np.zeros(size + 1, dtype=np.int64)
    for row in range(1, size + 1):
        row_of_column[0] = row
        column = 0
        slack = np.full(size + 1, np.inf)
        used = np.zeros(size + 1, dtype=bool)
        while True:
            used[column] = True
            current_row = row_of_column[column]
            reduced = padded[current_row] - row_potential[current_row] - column_potential
            better = ~used & (reduced < slack)
            better[0] = False
            slack[better] = reduced[better]
            previous_column[better] = column
            candidates = np.where(used, np.inf, slack)
            candidates[0] = np.inf
            next_column = int(np.argmin(candidates))
            delta = candidates[next_column]
            row_potential[row_of_column[used]] += delta
            column_potential[used] -= delta
            slack[~used] -= delta
            column = next_column
            if row_of_column[column] == 0:
                break
        while column:
            prior = previous_column[column]
            row_of_column[column] = row_of_column[prior]
            column = prior
    column_of_row = np.empty(size, dtype=np.int64)
    column_of_row[row_of_column[1:] - 1] = np.arange(size)
    return column_of_row


def link_cost(topology: Topology, token_bytes: float) -> np.ndarray:
    """Seconds to send one token's activation (there and back) from GPU g to h, [G, G]."""
    node = topology.node_of_gpu()
    same_node = node[:, None] == node[None, :]
    per_byte = np.where(
        same_node, 1.0 / (topology.intra_node_gb_s * 1e9), 1.0 / (topology.inter_node_gb_s * 1e9)
    )
    np.fill_diagonal(per_byte, 0.0)
    return 2.0 * token_bytes * per_byte


def group_flows(profile: WorkloadProfile, shares: np.ndarray) -> np.ndarray:
    """Token flow between the groups of consecutive layers, [L-1, G, G], from shares [L, E, G]
    (fraction of an expert's tokens each group serves) and the profile's transitions."""
    num_layers, num_experts, num_groups = shares.shape
    flows = np.zeros((max(num_layers - 1, 0), num_groups, num_groups))
    if profile.transitions is None:
        return flows
    for layer in range(num_layers - 1):
        transitions = profile.transitions.dense(layer, num_experts) / profile.top_k
        flows[layer] = shares[layer].T @ transitions @ shares[layer + 1]
    return flows


def align_layers(
    flows: np.ndarray, cost: np.ndarray, deadline: float, max_sweeps: int = 4
) -> tuple[np.ndarray, float, float]:
    """Stage 2: GPU of each group per layer, [L, G], minimising the chain cost
    sum_l sum_ab flows[l, a, b] cost[gpu_l(a), gpu_l+1(b)] by exact per-layer assignments, until no
    layer improves, ``max_sweeps`` sweeps or ``deadline`` (time.perf_counter()).

    flows [L-1, G, G], cost [G, G] -> (gpu of each group [L, G], the cost reached, a lower bound)."""
    num_layers = flows.shape[0] + 1
    num_groups = cost.shape[0]
    gpu = np.tile(np.arange(num_groups), (num_layers, 1))

    def chain_cost() -> float:
        return float(
            sum(
                (flows[layer] * cost[np.ix_(gpu[layer], gpu[layer + 1])]).sum()
                for layer in range(num_layers - 1)
            )
        )

    def best_for(layer: int) -> np.ndarray:
        assign = np.zeros((num_groups, num_groups))  # [group of this layer, GPU]
        if layer > 0:
            # inverse placement of the previous layer: cost from its groups' GPUs to each GPU h
            assign += flows[layer - 1].T @ cost[gpu[layer - 1]]
        if layer < num_layers - 1:
            assign += flows[layer] @ cost[gpu[layer + 1]].T
        return linear_assignment(assign)

    best = chain_cost()
    # the longest assignment so far: one more must fit before the deadline; until one is measured,
    # a guess on the slow side (one took 0.1-0.9 s over 256 GPUs on a loaded 2-core machine)
    step = ASSIGNMENT_S_PER_GROUP_PAIR * num_groups**2
    measured = 0.0
    for sweep in range(max_sweeps):
        start_of_sweep = best
        # Layer 0 stays put in the first sweep: the chain is symmetric under relabelling GPUs.
        for layer in range(1, num_layers) if sweep == 0 else range(num_layers):
            if time.perf_counter() + step > deadline:
                break
            started = time.perf_counter()
            kept = gpu[layer].copy()
            gpu[layer] = best_for(layer)
            value = chain_cost()
            if value < best - 1e-15:
                best = value
            else:
                gpu[layer] = kept
            measured = step = max(measured, time.perf_counter() - started)
        if best >= start_of_sweep - 1e-15 or time.perf_counter() + step > deadline:
            break
    off_diagonal = cost[~np.eye(num_groups, dtype=bool)]
    cheapest = float(off_diagonal.min()) if off_diagonal.size else 0.0
    # Each layer pair adds a term >= 0: the terms computed before the deadline bound the cost too.
    bound = 0.0
    for layer in range(num_layers - 1):
        if time.perf_counter() + step > deadline:
            break
        started = time.perf_counter()
        kept = linear_assignment(-flows[layer])
        bound += cheapest * float(
            flows[layer].sum() - flows[layer][np.arange(num_groups), kept].sum()
        )
        step = max(step, time.perf_counter() - started)
    return gpu, best, min(bound, best)


def layer_busiest(mapping: np.ndarray, load: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Stage 1's objective: tokens of the busiest GPU per layer when replicas split their expert's
    tokens evenly. mapping [L, N], load [L, E] -> [L]."""
    num_layers, num_slots = mapping.shape
    counts = np.zeros_like(load)
    for layer in range(num_layers):
        np.add.at(counts[layer], mapping[layer][mapping[layer] >= 0], 1)
    per_replica = np.where(counts > 0, load / np.maximum(counts, 1), 0.0)
    slot_tokens = np.where(
        mapping >= 0, np.take_along_axis(per_replica, np.maximum(mapping, 0), 1), 0.0
    )
    return slot_tokens.reshape(num_layers, -1, slots_per_gpu).sum(-1).max(-1)


def mapping_from_groups(
    replicas_on_gpu: np.ndarray, gpu_of_group: np.ndarray, slots_per_gpu: int
) -> np.ndarray:
    """Slots of one layer, [G*S], from replicas per group [E, G] and the GPU of each group [G]."""
    num_gpus = replicas_on_gpu.shape[1]
    row = np.full(num_gpus * slots_per_gpu, -1, dtype=np.int64)
    for group in range(num_gpus):
        experts = np.nonzero(replicas_on_gpu[:, group])[0]
        start = gpu_of_group[group] * slots_per_gpu
        row[start : start + len(experts)] = experts
    return row


def policy_ilp(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """MoETuner's two stages with redundant replicas for hot experts -> ([L, N], SolverInfo).

    SolverInfo.objective: sum over layers of the busiest GPU's tokens (stage 1; stage 2 permutes
    whole groups and leaves it unchanged); lower_bound: sum of the per-layer bounds for the same
    replica counts. Stage 2's transfer cost and its bound are in the notes."""
    started = time.perf_counter()
    budget = options.time_limit_s
    load = profile.load
    num_layers = load.shape[0]
    counts = replica_counts(load, topology.num_slots, topology.num_gpus)
    packing_deadline = started + PACKING_SHARE * budget
    chunks = even_chunks(num_layers, worker_count(num_layers, options.workers))
    packings = [
        packing
        for chunk in run_chunks(
            pack_layers,
            [(load[chunk], counts[chunk], topology, packing_deadline) for chunk in chunks],
        )
        for packing in chunk
    ]
    shares = np.stack(
        [p.replicas_on_gpu / counts[layer][:, None] for layer, p in enumerate(packings)]
    )
    flows = group_flows(profile, shares)
    cost = link_cost(topology, model.token_bytes)
    if num_layers > 1 and topology.num_gpus > 1:
        gpu_of_group, chain, chain_bound = align_layers(flows, cost, started + 0.95 * budget)
    else:
        gpu_of_group = np.tile(np.arange(topology.num_gpus), (num_layers, 1))
        chain = chain_bound = 0.0
    unaligned = float(sum((flows[layer] * cost).sum() for layer in range(num_layers - 1)))
    mapping = np.stack(
        [
            mapping_from_groups(p.replicas_on_gpu, gpu_of_group[layer], topology.slots_per_gpu)
            for layer, p in enumerate(packings)
        ]
    )
    statuses = [p.status for p in packings]
    objective = float(sum(p.busiest for p in packings))
    greedy = float(sum(p.greedy_busiest for p in packings))
    notes = [
        f"stage 1: {num_layers} layers, "
        + ", ".join(f"{statuses.count(s)} {s}" for s in STATUS_ORDER if statuses.count(s))
        + f"; busiest-GPU tokens {objective:.1f} (greedy warm start {greedy:.1f})",
        f"stage 2: transfer time of the profile's layer-to-layer tokens {chain:.4g} s "
        f"(groups unaligned {unaligned:.4g} s, bound {chain_bound:.4g} s)",
        f"solver {packings[0].solver}, mip gap tolerance {MIP_GAP}",
    ]
    return mapping, SolverInfo(
        status=worst_status(statuses),
        objective=objective,
        lower_bound=float(sum(p.lower_bound for p in packings)),
        objective_name="sum over layers of the busiest GPU's tokens (replicas split evenly)",
        notes=notes,
    )
