"""``policy: migration_aware``: a re-solve near the placement serving now.

It starts from ``PolicyOptions.previous`` and applies, one at a time, the replica moves that best
improve the layer's token balance and the tokens kept on their node, each moved replica charged a
penalty (or capped by ``move_budget``): a small workload shift gives a small migration. Without
a previous placement it is ``locality`` from scratch.

Shapes: L layers, E experts, N slots (G GPUs x S slots per GPU), M nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from moe_placement.models import ModelShape, Topology, WorkloadProfile
from moe_placement.pairs import COACTIVATION_WEIGHT, node_affinity, pair_matrices
from moe_placement.policies.base import PolicyOptions, SolverInfo
from moe_placement.policies.locality import policy_locality
from moe_placement.presence import gpu_holders, node_presence

LOCALITY_WEIGHT = 4.0  # one point of flow kept on its node is worth four points of max/mean tokens
MOVE_PENALTY = 0.01  # objective points one moved replica must buy (per layer's objective)
RETARGET_EXPERTS = 32  # experts considered for a freed slot: the most tokens per replica
CANDIDATES_PER_LAYER = 8  # best moves kept per layer, tried in order until one is confirmed


@dataclass(frozen=True)
class Move:
    """One change to one layer's map and its worth (negative is better).

    A swap trades the contents of ``slot`` and ``other`` (either may be empty); a retarget
    (``other`` == -1) puts ``expert`` into ``slot`` instead of a redundant replica or nothing.
    moved: change in replicas away from their previous GPU."""

    score: float
    layer: int
    slot: int
    other: int
    expert: int
    moved: int


@dataclass(frozen=True)
class _LayerView:
    """One layer's map as the move search sees it. row, gpu, node, valid, expert, slot_tokens: [N];
    holder, excess (replicas beyond the previous map's): [G, E]; node_count: [M, E]; counts,
    weight (tokens per replica): [E]; tokens: [G]; affinity: [E, M]."""

    layer: int
    row: np.ndarray
    num_experts: int
    num_gpus: int
    gpu: np.ndarray
    node: np.ndarray
    holder: np.ndarray
    excess: np.ndarray
    node_count: np.ndarray
    counts: np.ndarray
    weight: np.ndarray
    valid: np.ndarray
    expert: np.ndarray
    slot_tokens: np.ndarray
    tokens: np.ndarray
    mean: float
    busiest: float
    affinity: np.ndarray

    def balance(self, new_max: np.ndarray, square_change: np.ndarray) -> np.ndarray:
        """Change of max/mean GPU tokens plus a tenth of the change of their spread."""
        return (new_max - self.busiest) / self.mean + 0.1 * square_change / (
            self.num_gpus * self.mean * self.mean
        )


def _layer_view(
    layer: int,
    mapping: np.ndarray,
    previous: np.ndarray,
    load: np.ndarray,
    presence: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    topology: Topology,
) -> _LayerView:
    """The ``_LayerView`` of ``layer``; arguments as ``best_moves``."""
    transitions, coactivation = pairs
    row, num_experts = mapping[layer], load.shape[1]
    num_gpus, gpus_per_node = topology.num_gpus, topology.gpus_per_node
    gpu = np.arange(len(row)) // topology.slots_per_gpu
    holder = gpu_holders(row, num_gpus, num_experts)
    counts = holder.sum(0)
    weight = np.where(counts > 0, load[layer] / np.maximum(counts, 1), 0.0)
    valid = row >= 0
    expert = np.maximum(row, 0)
    slot_tokens = np.where(valid, weight[expert], 0.0)
    tokens = np.bincount(gpu, weights=slot_tokens, minlength=num_gpus)
    return _LayerView(
        layer=layer,
        row=row,
        num_experts=num_experts,
        num_gpus=num_gpus,
        gpu=gpu,
        node=gpu // gpus_per_node,
        holder=holder,
        excess=holder - gpu_holders(previous[layer], num_gpus, num_experts),
        node_count=holder.reshape(topology.num_nodes, gpus_per_node, num_experts).sum(1),
        counts=counts,
        weight=weight,
        valid=valid,
        expert=expert,
        slot_tokens=slot_tokens,
        tokens=tokens,
        mean=max(float(load[layer].sum()) / num_gpus, 1e-12),
        busiest=float(tokens.max()),
        affinity=node_affinity(
            layer,
            np.minimum(presence, 1),
            np.maximum(presence.sum(-1), 1),
            transitions,
            coactivation,
            COACTIVATION_WEIGHT,
        ),
    )


def best_moves(
    layer: int,
    mapping: np.ndarray,
    previous: np.ndarray,
    load: np.ndarray,
    presence: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    topology: Topology,
    penalty: float,
    room: float,
    tabu: set[tuple[int, int, int]],
    flow: float,
) -> list[Move]:
    """The best swaps and retargets at ``layer``, best first, by max/mean GPU tokens (plus a tenth
    of their spread) minus LOCALITY_WEIGHT x the share of the layer's token flow kept on its node,
    plus ``penalty`` per replica moved away from ``previous``, moving at most ``room`` more;
    ``tabu`` moves (slot, other, expert) are skipped. The locality gain is an estimate
    (``window_objective`` is exact). mapping, previous [L, N]; load [L, E]; presence [L, E, M]
    replicas per node; pairs: ``pair_matrices``; flow: ``_mean_flow(pairs)``. At most
    CANDIDATES_PER_LAYER moves."""
    view = _layer_view(layer, mapping, previous, load, presence, pairs, topology)
    candidates = _swap_moves(view, penalty, room, tabu, flow) + _retarget_moves(
        view, load, penalty, room, tabu, flow
    )
    return sorted(candidates, key=lambda move: move.score)[:CANDIDATES_PER_LAYER]


def _swap_moves(
    view: _LayerView, penalty: float, room: float, tabu: set[tuple[int, int, int]], flow: float
) -> list[Move]:
    """The best swaps of two slots on different GPUs (as ``best_moves`` scores them)."""
    row, gpu, node, holder = view.row, view.gpu, view.node, view.holder
    excess, node_count, valid, expert = view.excess, view.node_count, view.valid, view.expert
    slot_tokens, tokens, affinity, layer = view.slot_tokens, view.tokens, view.affinity, view.layer
    candidates: list[Move] = []
    # Swaps of two slots on different GPUs.
    fits = ~valid[:, None] | (
        holder[gpu[None, :], expert[:, None]] == 0
    )  # slot i's expert into j's GPU
    legal = fits & fits.T & (gpu[:, None] != gpu[None, :]) & (row[:, None] != row[None, :])
    legal &= valid[:, None] | valid[None, :]
    new_i = tokens[gpu][:, None] - slot_tokens[:, None] + slot_tokens[None, :]
    new_j = tokens[gpu][None, :] - slot_tokens[None, :] + slot_tokens[:, None]
    other_max = _max_excluding(tokens, gpu[:, None], gpu[None, :])
    square = new_i**2 + new_j**2 - tokens[gpu][:, None] ** 2 - tokens[gpu][None, :] ** 2
    leave = np.where(valid & (node_count[node, expert] == 1), affinity[expert, node], 0.0)
    arrive = np.where(
        valid[:, None] & (node_count[node[None, :], expert[:, None]] == 0),
        affinity[expert[:, None], node[None, :]],
        0.0,
    )
    kept = np.where(
        node[:, None] == node[None, :], 0.0, arrive + arrive.T - leave[:, None] - leave[None, :]
    )
    left = np.where(valid & (excess[gpu, expert] > 0), 1, 0)
    came = np.where(valid[:, None] & (excess[gpu[None, :], expert[:, None]] >= 0), 1, 0)
    moved = came + came.T - left[:, None] - left[None, :]
    score = (
        view.balance(np.maximum(other_max, np.maximum(new_i, new_j)), square)
        - LOCALITY_WEIGHT * kept / flow
        + penalty * moved
    )
    score = np.where(legal & (moved <= room), score, np.inf)
    for slot, other, _ in tabu:
        if other >= 0:
            score[slot, other] = score[other, slot] = np.inf
    for flat in _smallest(score, CANDIDATES_PER_LAYER):
        i, j = np.unravel_index(flat, score.shape)
        if i < j:  # a swap appears twice, (i, j) and (j, i)
            candidates.append(Move(float(score[i, j]), layer, int(i), int(j), -1, int(moved[i, j])))
    return candidates


def _retarget_moves(
    view: _LayerView,
    load: np.ndarray,
    penalty: float,
    room: float,
    tabu: set[tuple[int, int, int]],
    flow: float,
) -> list[Move]:
    """The best retargets: a redundant replica's (or an empty) slot to one of the
    RETARGET_EXPERTS experts with the most tokens per replica (as ``best_moves`` scores them)."""
    row, num_gpus, gpu, node = view.row, view.num_gpus, view.gpu, view.node
    holder, excess, node_count, counts = view.holder, view.excess, view.node_count, view.counts
    weight, valid, expert, tokens = view.weight, view.valid, view.expert, view.tokens
    affinity, layer = view.affinity, view.layer
    candidates: list[Move] = []
    # Retargets: a redundant replica's (or an empty) slot to one of the experts with the most
    # tokens per replica.
    slots = np.nonzero(~valid | (counts[expert] >= 2))[0]
    experts = np.argsort(-load[layer] / (counts + 1), kind="stable")[:RETARGET_EXPERTS]
    if len(slots):
        old = row[slots]
        old_e = np.maximum(old, 0)
        has_old = old >= 0
        on_gpu = np.arange(num_gpus)[None, :] == gpu[slots][:, None]  # [s, G]
        old_part = np.where(has_old[:, None], holder[:, old_e].T * weight[old_e][:, None], 0.0)
        old_after = np.where(
            has_old[:, None],
            (holder[:, old_e].T - on_gpu)
            * (load[layer, old_e] / np.maximum(counts[old_e] - 1, 1))[:, None],
            0.0,
        )
        base = tokens[None, :] - old_part + old_after  # [s, G]
        new_part = holder[:, experts].T * weight[experts][:, None]  # [y, G]
        new_after = (holder[:, experts].T[None, :, :] + on_gpu[:, None, :]) * (
            load[layer, experts] / (counts[experts] + 1)
        )[None, :, None]
        after = base[:, None, :] - new_part[None, :, :] + new_after  # [s, y, G]
        square_change = (after**2).sum(-1) - (tokens**2).sum()
        slot_node = node[slots]
        lost = np.where(
            has_old & (node_count[slot_node, old_e] == 1), affinity[old_e, slot_node], 0.0
        )
        gained = np.where(
            node_count[slot_node[:, None], experts[None, :]] == 0,
            affinity[experts[None, :], slot_node[:, None]],
            0.0,
        )
        kept_r = gained - lost[:, None]
        moved_r = (excess[gpu[slots][:, None], experts[None, :]] >= 0).astype(int) - np.where(
            has_old & (excess[gpu[slots], old_e] > 0), 1, 0
        )[:, None]
        score_r = (
            view.balance(after.max(-1), square_change)
            - LOCALITY_WEIGHT * kept_r / flow
            + penalty * moved_r
        )
        legal_r = (holder[gpu[slots][:, None], experts[None, :]] == 0) & (
            old[:, None] != experts[None, :]
        )
        score_r = np.where(legal_r & (moved_r <= room), score_r, np.inf)
        position = {int(slot): index for index, slot in enumerate(slots)}
        column = {int(e): index for index, e in enumerate(experts)}
        for slot, other, new_expert in tabu:
            if other < 0 and slot in position and new_expert in column:
                score_r[position[slot], column[new_expert]] = np.inf
        for flat in _smallest(score_r, CANDIDATES_PER_LAYER):
            a, b = np.unravel_index(flat, score_r.shape)
            candidates.append(
                Move(
                    float(score_r[a, b]),
                    layer,
                    int(slots[a]),
                    -1,
                    int(experts[b]),
                    int(moved_r[a, b]),
                )
            )
    return candidates


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the ``2 * count`` smallest finite values, [<= 2 * count]."""
    flat = values.ravel()
    keep = min(2 * count, flat.size)
    index = np.argpartition(flat, keep - 1)[:keep] if keep < flat.size else np.arange(flat.size)
    index = index[np.isfinite(flat[index])]
    return index[np.argsort(flat[index], kind="stable")]


def _mean_flow(pairs: tuple[np.ndarray, np.ndarray]) -> float:
    """Token flow per layer that locality counts (transitions and weighted co-activation)."""
    transitions, coactivation = pairs
    return max(
        float(transitions.sum() + COACTIVATION_WEIGHT * coactivation.sum()) / len(coactivation),
        1e-12,
    )


def window_objective(
    layer: int,
    mapping: np.ndarray,
    load: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    topology: Topology,
    flow: float,
) -> float:
    """The re-solve's objective over what a change at ``layer`` touches: that layer's max/mean GPU
    tokens (plus a tenth of their spread) minus LOCALITY_WEIGHT x the flow kept on its node
    between layer-1, layer and layer+1 and within the layer, per mean layer flow ``flow``
    (``_mean_flow``). mapping [L, N]."""
    transitions, coactivation = pairs
    num_layers, num_experts = load.shape
    low, high = max(layer - 1, 0), min(layer + 2, num_layers)
    presence = node_presence(mapping[low:high], topology, num_experts)
    indicator = np.minimum(presence, 1).astype(np.float64)
    share = indicator / np.maximum(presence.sum(-1), 1)[..., None]
    here = layer - low
    kept = COACTIVATION_WEIGHT * float(
        (share[here] * (coactivation[layer] @ indicator[here])).sum()
    )
    for first in range(low, high - 1):
        kept += float(
            (share[first - low] * (transitions[first] @ indicator[first + 1 - low])).sum()
        )
    row = mapping[layer]
    counts = np.bincount(row[row >= 0], minlength=num_experts)
    weight = load[layer] / np.maximum(counts, 1)
    tokens = (
        np.where(row >= 0, weight[np.maximum(row, 0)], 0.0).reshape(topology.num_gpus, -1).sum(1)
    )
    mean = max(float(load[layer].sum()) / topology.num_gpus, 1e-12)
    balance = tokens.max() / mean + 0.1 * float((tokens**2).sum()) / (
        topology.num_gpus * mean * mean
    )
    return float(balance) - LOCALITY_WEIGHT * kept / flow


def _max_excluding(values: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Largest of ``values`` [G] outside indices ``first`` and ``second`` (broadcast), -inf if none."""
    order = np.argsort(-values, kind="stable")[:3]
    result = np.full(np.broadcast(first, second).shape, -np.inf)
    for index in order[::-1]:
        result = np.where((first != index) & (second != index), values[index], result)
    return result


def policy_migration_aware(
    profile: WorkloadProfile, model: ModelShape, topology: Topology, options: PolicyOptions
) -> tuple[np.ndarray, SolverInfo]:
    """Re-solve near ``options.previous`` -> ([L, N], SolverInfo).

    From the previous map, apply the best swap or retarget of any layer (token balance plus tokens
    kept on their node, as ``locality`` values them) while it gains more than MOVE_PENALTY per
    replica moved, or, with ``move_budget``, while the budget lasts (no penalty then). Without a
    previous placement this is ``locality`` from scratch."""
    if options.previous is None:
        mapping, info = policy_locality(profile, model, topology, options)
        return mapping, replace(
            info, notes=["no previous placement: solved from scratch (locality)", *info.notes]
        )
    deadline = time.perf_counter() + options.time_limit_s
    previous = options.previous.physical_to_logical_map
    mapping = previous.copy()
    num_layers, num_experts = profile.load.shape
    budget = options.move_budget
    penalty = MOVE_PENALTY if budget is None else 0.0
    pairs = pair_matrices(profile)
    presence = node_presence(mapping, topology, num_experts)

    tabu: list[set[tuple[int, int, int]]] = [set() for _ in range(num_layers)]
    flow = _mean_flow(pairs)

    def search(layer: int, room: float) -> list[Move]:
        return best_moves(
            layer, mapping, previous, profile.load, presence, pairs, topology, penalty, room,
            tabu[layer], flow,
        )

    moved_per_layer = np.zeros(num_layers, dtype=np.int64)
    applied = 0
    room = _room(budget, 0)
    # past the deadline, layers not yet searched get no candidates (the loop below then stops)
    candidates = [
        search(layer, room) if time.perf_counter() < deadline else [] for layer in range(num_layers)
    ]
    stop = f"no move gains {'more than its penalty' if budget is None else 'within the budget'}"
    while True:
        if time.perf_counter() > deadline:
            stop = "time limit"
            break
        candidates = _within_room(candidates, room, search)
        layer = _best_layer(candidates)
        if layer is None:
            break
        move = candidates[layer].pop(0)
        moved_here = _apply_if_better(
            move, mapping, previous, profile.load, pairs, topology, flow, penalty,
            int(moved_per_layer[layer]),
        )
        if moved_here is None:  # the estimate was wrong: never try this move here again
            tabu[layer].add((move.slot, move.other, move.expert))
            if not candidates[layer]:
                candidates[layer] = search(layer, room)
            continue
        moved_per_layer[layer] = moved_here
        presence[layer] = node_presence(mapping[layer : layer + 1], topology, num_experts)[0]
        applied += 1
        room = _room(budget, moved_per_layer.sum())
        # A change alters its layer's and its neighbours' affinities (a smaller room: above).
        for other in range(max(layer - 1, 0), min(layer + 2, num_layers)):
            tabu[other].clear()
            candidates[other] = search(other, room)
    return mapping, _search_info(stop, applied, int(moved_per_layer.sum()), budget)


def _room(budget: int | None, used: int) -> float:
    """Replicas that may still move: unlimited without a budget."""
    return np.inf if budget is None else float(budget - used)


def _within_room(
    candidates: list[list[Move]], room: float, search: Callable[[int, float], list[Move]]
) -> list[list[Move]]:
    """Per layer, its candidate moves that fit in ``room``; a layer whose every candidate would
    overdraw it is searched again with ``search(layer, room)``, since a smaller move may fit."""
    return [
        [move for move in moves if move.moved <= room] or search(layer, room)
        if moves and any(move.moved > room for move in moves)
        else moves
        for layer, moves in enumerate(candidates)
    ]


def _best_layer(candidates: list[list[Move]]) -> int | None:
    """The layer whose first candidate (each layer's best) gains most, None if no move gains (score
    below -1e-9); ties go to the lowest layer."""
    heads = [(moves[0].score, layer) for layer, moves in enumerate(candidates) if moves]
    if not heads or min(heads)[0] >= -1e-9:
        return None
    return min(heads)[1]


def _search_info(stop: str, applied: int, moved: int, budget: int | None) -> SolverInfo:
    """What the search did: ``applied`` changes moving ``moved`` replicas, and why it stopped."""
    limit = f"budget {budget}" if budget is not None else f"penalty {MOVE_PENALTY} per replica"
    return SolverInfo(
        status="heuristic" if stop != "time limit" else "time_limit",
        objective=float(moved),
        objective_name="replicas moved from the previous placement",
        notes=[f"{applied} changes, {moved} replicas moved ({limit})", f"stopped: {stop}"],
    )


def _apply_if_better(
    move: Move,
    mapping: np.ndarray,
    previous: np.ndarray,
    load: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    topology: Topology,
    flow: float,
    penalty: float,
    moved_before: int,
) -> int | None:
    """Apply ``move`` to ``mapping`` [L, N] if ``window_objective`` falls by more than ``penalty``
    per replica it moves away from ``previous`` [L, N] (the layer had ``moved_before``): the
    layer's replicas moved after it, or None with the mapping unchanged."""
    row = mapping[move.layer]
    before = window_objective(move.layer, mapping, load, pairs, topology, flow)
    kept_row = row.copy()
    if move.other >= 0:
        row[move.slot], row[move.other] = row[move.other], row[move.slot]
    else:
        row[move.slot] = move.expert
    num_gpus, num_experts = topology.num_gpus, load.shape[1]
    moved = int(
        np.clip(
            gpu_holders(row, num_gpus, num_experts)
            - gpu_holders(previous[move.layer], num_gpus, num_experts),
            0,
            None,
        ).sum()
    )
    change = window_objective(move.layer, mapping, load, pairs, topology, flow) - before
    if change + penalty * (moved - moved_before) >= -1e-9:
        row[:] = kept_row
        return None
    return moved
