"""The plan that takes a live placement to a new one step by step.

``plan_migration`` turns old -> new into stages of copies and retirements that never leave an
expert without a replica; ``check_migration`` verifies a plan.

Shapes: L layers, E experts, N slots (G GPUs x S slots per GPU), M nodes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from moe_placement.models import ModelShape, Placement, PlacementError, Topology


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
