"""Migration-aware re-solve, and the plan that takes a live placement to a new one step by step.

``policy_migration_aware`` starts from the placement serving now (``PolicyOptions.previous``) and
applies, one at a time, the replica moves that best improve the layer's token balance and the tokens
kept on their node, each moved replica charged a penalty (or capped by ``move_budget``): a small
workload shift gives a small migration. ``plan_migration`` turns old -> new into stages of copies and
retirements that never leave an expert without a replica; ``check_migration`` verifies a plan.

Shapes: L layers, E experts, N slots (G GPUs x S slots per GPU), M nodes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from moe_placement.locality import (
    COACTIVATION_WEIGHT,
    node_affinity,
    node_presence,
    pair_matrices,
    policy_locality,
)
from moe_placement.models import ModelShape, Placement, PlacementError, Topology, WorkloadProfile
from moe_placement.policies import PolicyOptions, SolverInfo

LOCALITY_WEIGHT = 4.0  # one point of flow kept on its node is worth four points of max/mean tokens
MOVE_PENALTY = 0.01  # objective points one moved replica must buy (per layer's objective)

# ---------------------------------------------------------------------------------------------
# Migration plans


@dataclass(frozen=True)
class ExpertCopy:
    """Copy expert ``expert`` of ``layer`` from ``source_slot`` (live) into ``target_slot`` (empty)."""

    layer: int
    expert: int
    source_slot: int
    target_slot: int
    bytes: float


@dataclass(frozen=True)
class MigrationStage:
    """One step: the copies, then the live map [L, N] after it (the previous map plus the copies,
    minus the slots retired, set to -1, in this stage)."""

    copies: tuple[ExpertCopy, ...]
    physical_to_logical_map: np.ndarray


@dataclass(frozen=True)
class MigrationPlan:
    """Ordered stages from the old placement to the new; at least one stage (a plan between equal
    placements is one stage without copies). bytes_per_link: "intra-gpu", "intra-node" and
    "nodeA->nodeB" keys."""

    stages: tuple[MigrationStage, ...]
    bytes_moved: float
    bytes_per_link: dict[str, float]

    def final_map(self) -> np.ndarray:
        """The map [L, N] once every stage is applied."""
        return self.stages[-1].physical_to_logical_map


def link_name(source_slot: int, target_slot: int, topology: Topology) -> str:
    """The link a copy crosses: "intra-gpu", "intra-node" or "nodeA->nodeB"."""
    source_gpu, target_gpu = (
        source_slot // topology.slots_per_gpu,
        target_slot // topology.slots_per_gpu,
    )
    if source_gpu == target_gpu:
        return "intra-gpu"
    source_node, target_node = (
        source_gpu // topology.gpus_per_node,
        target_gpu // topology.gpus_per_node,
    )
    return "intra-node" if source_node == target_node else f"node{source_node}->node{target_node}"


def _check_pair(old: Placement, new: Placement) -> None:
    if old.physical_to_logical_map.shape != new.physical_to_logical_map.shape:
        raise PlacementError(
            f"new: map shape {new.physical_to_logical_map.shape} != old {old.physical_to_logical_map.shape}"
        )
    if old.num_experts != new.num_experts or old.slots_per_gpu != new.slots_per_gpu:
        raise PlacementError("new: experts or slots per GPU differ from the old placement")


def plan_migration(
    old: Placement,
    new: Placement,
    model: ModelShape,
    topology: Topology,
    max_copies_per_stage: int = 8,
) -> MigrationPlan:
    """Stages that take ``old`` to ``new``.

    Each stage copies experts into slots that are empty before it (at most ``max_copies_per_stage``
    copies, from the live replica closest to the target: same GPU, then same node, then the
    least-used source), then retires every slot whose content is not its final one and whose expert
    keeps another replica. A cycle of full slots (x must go where y is and y where x is, each the
    only replica) is broken through a temporary slot: an empty slot that stays empty in ``new``, or
    a slot whose redundant replica is retired first. With no slack at all (no empty slot and no
    redundant replica in a layer that needs one) a PlacementError says so."""
    old.check_topology(model, topology)
    new.check_topology(model, topology)
    _check_pair(old, new)
    if max_copies_per_stage <= 0:
        raise PlacementError(f"max_copies_per_stage: {max_copies_per_stage} must be > 0")
    live = old.physical_to_logical_map.copy()
    final = new.physical_to_logical_map
    num_layers, num_slots = live.shape
    gpu_of_slot = np.arange(num_slots) // topology.slots_per_gpu
    node_of_slot = gpu_of_slot // topology.gpus_per_node
    # reserved[l, s] = expert a temporary copy is waiting to go into slot s (-1: none)
    reserved = np.full(live.shape, -1, dtype=np.int64)
    temporary = np.zeros(live.shape, dtype=bool)  # slots holding a temporary copy
    stages: list[MigrationStage] = []
    bytes_per_link: dict[str, float] = defaultdict(float)
    # Every slot needs at most a retirement, a temporary copy and a fill: a bound no plan reaches.
    max_stages = 4 * int((live != final).sum()) + num_layers + 8
    while not np.array_equal(live, final):
        if len(stages) > max_stages:
            raise PlacementError("migration: the planner did not converge (internal error)")
        copies: list[ExpertCopy] = []
        staged = live.copy()  # the live map plus this stage's copies (the "union" map)
        source_use = np.zeros(live.shape, dtype=np.int64)
        progress = np.zeros(num_layers, dtype=bool)
        for layer in range(num_layers):
            row, target = live[layer], final[layer]
            # Fills: empty slots whose final expert (or reserved temporary copy) is live.
            for slot in np.nonzero(row < 0)[0]:
                expert = reserved[layer, slot] if reserved[layer, slot] >= 0 else target[slot]
                if expert < 0 or len(copies) >= max_copies_per_stage:
                    continue
                source = _best_source(
                    row, expert, slot, gpu_of_slot, node_of_slot, source_use[layer]
                )
                copies.append(
                    ExpertCopy(layer, int(expert), int(source), int(slot), model.expert_bytes)
                )
                staged[layer, slot] = expert
                source_use[layer, source] += 1
                temporary[layer, slot] = reserved[layer, slot] >= 0
                reserved[layer, slot] = -1
                progress[layer] = True
        after = staged.copy()
        for layer in range(num_layers):
            progress[layer] |= _retire(after[layer], staged[layer], final[layer], temporary[layer])
        for layer in np.nonzero(~progress & np.any(live != final, axis=1))[0]:
            if len(copies) < max_copies_per_stage:
                _break_cycle(
                    layer,
                    live[layer],
                    after[layer],
                    staged[layer],
                    final[layer],
                    reserved[layer],
                    temporary[layer],
                    copies,
                    model,
                    gpu_of_slot,
                    node_of_slot,
                )
        for copy in copies:
            bytes_per_link[link_name(copy.source_slot, copy.target_slot, topology)] += copy.bytes
        after.setflags(write=False)
        stages.append(MigrationStage(tuple(copies), after))
        live = after.copy()
    if not stages:
        stages.append(MigrationStage((), final.copy()))
    return MigrationPlan(
        stages=tuple(stages),
        bytes_moved=float(sum(c.bytes for stage in stages for c in stage.copies)),
        bytes_per_link=dict(bytes_per_link),
    )


def _best_source(
    row: np.ndarray,
    expert: int,
    target: int,
    gpu_of_slot: np.ndarray,
    node_of_slot: np.ndarray,
    use: np.ndarray,
) -> int:
    """Live slot of ``expert`` closest to ``target`` (same GPU, then node), then least used as a
    source in this stage, then lowest. row, gpu_of_slot, node_of_slot, use: [N]."""
    slots = np.nonzero(row == expert)[0]
    distance = np.where(
        gpu_of_slot[slots] == gpu_of_slot[target],
        0,
        np.where(node_of_slot[slots] == node_of_slot[target], 1, 2),
    )
    return int(slots[np.lexsort((slots, use[slots], distance))[0]])


def _retire(
    after: np.ndarray, staged: np.ndarray, target: np.ndarray, temporary: np.ndarray
) -> bool:
    """Retire (set to -1 in ``after``) slots whose content is not final, while their expert keeps
    another replica in ``after``: first slots a final expert must go into, then slots that end
    empty, and temporary copies last (so that they outlive the slot they stand in for). Rows [N];
    True if any slot was retired."""
    wrong = np.nonzero((staged >= 0) & (staged != target))[0]
    wrong = wrong[np.lexsort((wrong, target[wrong] < 0, temporary[wrong]))]
    retired = False
    for slot in wrong:
        expert = after[slot]
        if np.count_nonzero(after == expert) > 1:
            after[slot] = -1
            temporary[slot] = False
            retired = True
    return retired


def _break_cycle(
    layer: int,
    live: np.ndarray,
    after: np.ndarray,
    staged: np.ndarray,
    target: np.ndarray,
    reserved: np.ndarray,
    temporary: np.ndarray,
    copies: list[ExpertCopy],
    model: ModelShape,
    gpu_of_slot: np.ndarray,
    node_of_slot: np.ndarray,
) -> None:
    """Open a cycle of full slots at ``layer`` (rows [N], updated in place): copy one stuck expert
    into a temporary slot, or retire a redundant replica to make one (its slot is reserved for the
    stuck expert and gets its own expert back later). The temporary slot is the closest to the
    stuck one (same GPU, then node)."""
    stuck = [
        s
        for s in np.nonzero((live >= 0) & (live != target))[0]
        if np.count_nonzero(live == live[s]) == 1
    ]
    if not stuck:
        return
    slot = stuck[0]
    expert = live[slot]
    slots = np.arange(len(live))
    distance = np.where(
        gpu_of_slot == gpu_of_slot[slot], 0, np.where(node_of_slot == node_of_slot[slot], 1, 2)
    )
    by_distance = np.lexsort((slots, distance))
    spare = by_distance[((staged < 0) & (target < 0) & (reserved < 0))[by_distance]]
    if len(spare):
        spare_slot = int(spare[0])
        copies.append(ExpertCopy(layer, int(expert), int(slot), spare_slot, model.expert_bytes))
        staged[spare_slot] = after[spare_slot] = expert
        temporary[spare_slot] = True
        after[slot] = -1  # the stuck expert lives on in the temporary slot
        return
    counts = np.bincount(after[after >= 0], minlength=model.num_experts)
    redundant = by_distance[
        ((after >= 0) & (counts[np.maximum(after, 0)] > 1) & (reserved < 0))[by_distance]
    ]
    if not len(redundant):
        raise PlacementError(
            f"migration: layer {layer} needs experts to trade places, but it has no slack: no empty "
            "slot and no redundant replica to use as a temporary slot; add an empty slot or a "
            "replica (e.g. migrate through an intermediate placement with one redundant slot)"
        )
    borrowed = int(redundant[0])
    after[borrowed] = -1
    reserved[borrowed] = expert


def check_migration(old: Placement, plan: MigrationPlan) -> None:
    """Raise PlacementError unless every stage of ``plan`` keeps the invariants: copies only into
    slots empty before the stage, from slots live with that expert; the stage's map is the previous
    map plus the copies, minus retired slots; every intermediate map is a valid placement (each
    expert keeps a replica, slots as before); bytes add up."""
    live = old.physical_to_logical_map.copy()
    if not plan.stages:
        raise PlacementError("plan: no stages")
    total = 0.0
    for index, stage in enumerate(plan.stages):
        union = live.copy()
        targets = set()
        for copy in stage.copies:
            where = f"stage {index}: copy of expert {copy.expert} (layer {copy.layer})"
            if not (
                0 <= copy.layer < live.shape[0]
                and 0 <= copy.source_slot < live.shape[1]
                and 0 <= copy.target_slot < live.shape[1]
            ):
                raise PlacementError(f"{where}: layer or slot out of range")
            if (
                live[copy.layer, copy.target_slot] != -1
                or (copy.layer, copy.target_slot) in targets
            ):
                raise PlacementError(f"{where}: target slot {copy.target_slot} is not empty")
            if live[copy.layer, copy.source_slot] != copy.expert:
                raise PlacementError(f"{where}: source slot {copy.source_slot} does not hold it")
            targets.add((copy.layer, copy.target_slot))
            union[copy.layer, copy.target_slot] = copy.expert
            total += copy.bytes
        stage_map = np.asarray(stage.physical_to_logical_map)
        if stage_map.shape != live.shape:
            raise PlacementError(f"stage {index}: map shape {stage_map.shape} != {live.shape}")
        changed = stage_map != union
        if np.any(stage_map[changed] != -1):
            raise PlacementError(
                f"stage {index}: the map changes slots other than by copies and retirements"
            )
        try:
            Placement(stage_map, old.num_experts, old.slots_per_gpu)
        except PlacementError as error:
            raise PlacementError(f"stage {index}: {error}") from None
        live = stage_map.copy()
    if not np.isclose(total, plan.bytes_moved):
        raise PlacementError(f"plan: bytes_moved {plan.bytes_moved} != copies' {total}")
    if not np.array_equal(live, plan.final_map()):
        raise PlacementError("plan: final_map is not the last stage's map")


# ---------------------------------------------------------------------------------------------
# Migration-aware re-solve

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
    """The best swaps and retargets at ``layer``, best first, by max/mean GPU tokens (plus a tenth of their spread)
    minus LOCALITY_WEIGHT x the share of the layer's token flow kept on its node, plus ``penalty``
    per replica moved away from ``previous``, moving at most ``room`` more; ``tabu`` moves
    (slot, other, expert) are skipped. The locality gain is an estimate (``window_objective`` is
    exact). mapping, previous [L, N]; load [L, E]; presence [L, E, M] replicas per node; pairs:
    ``pair_matrices``; flow: ``_mean_flow(pairs)``. At most CANDIDATES_PER_LAYER moves."""
    transitions, coactivation = pairs
    row, num_experts = mapping[layer], load.shape[1]
    num_gpus, gpus_per_node = topology.num_gpus, topology.gpus_per_node
    gpu = np.arange(len(row)) // topology.slots_per_gpu
    node = gpu // gpus_per_node
    holder, previous_holder = (
        _holders(row, num_gpus, num_experts),
        _holders(previous[layer], num_gpus, num_experts),
    )
    excess = holder - previous_holder
    node_count = holder.reshape(topology.num_nodes, gpus_per_node, num_experts).sum(1)
    counts = holder.sum(0)
    weight = np.where(counts > 0, load[layer] / np.maximum(counts, 1), 0.0)
    valid = row >= 0
    expert = np.maximum(row, 0)
    slot_tokens = np.where(valid, weight[expert], 0.0)
    tokens = np.bincount(gpu, weights=slot_tokens, minlength=num_gpus)
    mean = max(float(load[layer].sum()) / num_gpus, 1e-12)
    busiest = float(tokens.max())
    affinity = node_affinity(
        layer,
        np.minimum(presence, 1),
        np.maximum(presence.sum(-1), 1),
        transitions,
        coactivation,
        COACTIVATION_WEIGHT,
    )

    def balance(new_max: np.ndarray, square_change: np.ndarray) -> np.ndarray:
        return (new_max - busiest) / mean + 0.1 * square_change / (num_gpus * mean * mean)

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
        balance(np.maximum(other_max, np.maximum(new_i, new_j)), square)
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
            balance(after.max(-1), square_change)
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
    return sorted(candidates, key=lambda move: move.score)[:CANDIDATES_PER_LAYER]


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


def _holders(row: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """Replicas of each expert on each GPU, [G, E], of one layer's map [N]."""
    holder = np.zeros((num_gpus, num_experts), dtype=np.int64)
    slots = np.nonzero(row >= 0)[0]
    np.add.at(holder, (slots // (len(row) // num_gpus), row[slots]), 1)
    return holder


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
        return mapping, SolverInfo(
            status=info.status,
            objective=info.objective,
            lower_bound=info.lower_bound,
            objective_name=info.objective_name,
            notes=["no previous placement: solved from scratch (locality)", *info.notes],
        )
    deadline = time.perf_counter() + options.time_limit_s
    previous = options.previous.physical_to_logical_map
    mapping = previous.copy()
    num_layers, num_experts = profile.load.shape
    budget = options.move_budget
    penalty = MOVE_PENALTY if budget is None else 0.0
    pairs = pair_matrices(profile)
    presence = node_presence(mapping, topology, num_experts)

    def moved_at(layer: int) -> int:
        holder = _holders(mapping[layer], topology.num_gpus, num_experts)
        return int(
            np.clip(
                holder - _holders(previous[layer], topology.num_gpus, num_experts), 0, None
            ).sum()
        )

    tabu: list[set[tuple[int, int, int]]] = [set() for _ in range(num_layers)]
    flow = _mean_flow(pairs)

    def search(layer: int, room: float) -> list[Move]:
        return best_moves(
            layer,
            mapping,
            previous,
            profile.load,
            presence,
            pairs,
            topology,
            penalty,
            room,
            tabu[layer],
            flow,
        )

    moved_per_layer = np.zeros(num_layers, dtype=np.int64)
    applied = 0
    room = np.inf if budget is None else float(budget)
    candidates = [search(layer, room) for layer in range(num_layers)]
    stop = (
        "no move gains more than its penalty"
        if budget is None
        else "no move gains within the budget"
    )
    while True:
        if time.perf_counter() > deadline:
            stop = "time limit"
            break
        for layer, moves in enumerate(candidates):
            if moves and any(move.moved > room for move in moves):
                candidates[layer] = [move for move in moves if move.moved <= room] or search(
                    layer, room
                )
        heads = [(moves[0].score, layer) for layer, moves in enumerate(candidates) if moves]
        if not heads or min(heads)[0] >= -1e-9:
            break
        layer = min(heads)[1]
        move = candidates[layer].pop(0)
        row = mapping[layer]
        before, kept_row = (
            window_objective(layer, mapping, profile.load, pairs, topology, flow),
            row.copy(),
        )
        if move.other >= 0:
            row[move.slot], row[move.other] = row[move.other], row[move.slot]
        else:
            row[move.slot] = move.expert
        moved_here = moved_at(layer)
        change = window_objective(layer, mapping, profile.load, pairs, topology, flow) - before
        if change + penalty * (moved_here - moved_per_layer[layer]) >= -1e-9:
            row[:] = kept_row  # the estimate was wrong: undo, and never try this move here again
            tabu[layer].add((move.slot, move.other, move.expert))
            if not candidates[layer]:
                candidates[layer] = search(layer, room)
            continue
        moved_per_layer[layer] = moved_here
        presence[layer] = node_presence(mapping[layer : layer + 1], topology, num_experts)[0]
        applied += 1
        room = np.inf if budget is None else float(budget - moved_per_layer.sum())
        # A change alters its layer's and its neighbours' affinities (a smaller room is handled above).
        for other in range(max(layer - 1, 0), min(layer + 2, num_layers)):
            tabu[other].clear()
            candidates[other] = search(other, room)
    moved = int(moved_per_layer.sum())
    return mapping, SolverInfo(
        status="heuristic" if stop != "time limit" else "time_limit",
        objective=float(moved),
        objective_name="replicas moved from the previous placement",
        notes=[
            f"{applied} changes, {moved} replicas moved"
            + (
                f" (budget {budget})"
                if budget is not None
                else f" (penalty {MOVE_PENALTY} per replica)"
            ),
            f"stopped: {stop}",
        ],
    )
