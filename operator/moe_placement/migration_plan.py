"""The plan that takes a live placement to a new one step by step.

``plan_migration`` turns old -> new into stages of copies and retirements that never leave an
expert without a replica; ``check_migration`` verifies a plan.

Shapes: L layers, E experts, N slots (G GPUs x S slots per GPU), M nodes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
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
    """One step as a delta: the copies (into slots empty before the stage), then the slots retired
    (set to -1) after them. retired: [R, 2] (layer, slot) pairs, in row-major order."""

    copies: tuple[ExpertCopy, ...]
    retired: np.ndarray

    def apply(self, live: np.ndarray) -> np.ndarray:
        """The live map [L, N] after this stage, from the one before it (a new array)."""
        after = np.array(live, dtype=np.int64)
        _apply_in_place(self, after)
        return after


def _apply_in_place(stage: MigrationStage, mapping: np.ndarray) -> None:
    for copy in stage.copies:
        mapping[copy.layer, copy.target_slot] = copy.expert
    mapping[stage.retired[:, 0], stage.retired[:, 1]] = -1


@dataclass(frozen=True)
class MigrationPlan:
    """Ordered stages from the old placement (``initial_map`` [L, N]) to the new; at least one
    stage (a plan between equal placements is one stage without copies). Stages are deltas, so a
    plan's size grows with the copies, not with stages x map. bytes_per_link: "intra-gpu",
    "intra-node" and "nodeA->nodeB" keys."""

    initial_map: np.ndarray
    stages: tuple[MigrationStage, ...]
    bytes_moved: float
    bytes_per_link: dict[str, float]

    def stage_maps(self) -> Iterator[np.ndarray]:
        """The live map [L, N] after each stage, in order (a new array each)."""
        live = np.array(self.initial_map, dtype=np.int64)
        for stage in self.stages:
            _apply_in_place(stage, live)
            yield live.copy()

    def map_after(self, index: int) -> np.ndarray:
        """The live map [L, N] after stage ``index`` (0-based)."""
        if not 0 <= index < len(self.stages):
            raise PlacementError(
                f"index: {index} is not a stage of a {len(self.stages)}-stage plan"
            )
        live = np.array(self.initial_map, dtype=np.int64)
        for stage in self.stages[: index + 1]:
            _apply_in_place(stage, live)
        return live

    def final_map(self) -> np.ndarray:
        """The map [L, N] once every stage is applied."""
        return self.map_after(len(self.stages) - 1)


def transfer_seconds(
    bytes_moved: float, topology: Topology, max_concurrent_transfers: int
) -> float:
    """How long moving ``bytes_moved`` takes over the inter-node links, ``max_concurrent_transfers``
    copies at once (the gate's estimate: copies are pulled across nodes in the worst case)."""
    if max_concurrent_transfers <= 0:
        raise PlacementError(f"max_concurrent_transfers: {max_concurrent_transfers} must be > 0")
    return bytes_moved / (topology.inter_node_gb_s * 1e9 * max_concurrent_transfers)


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
    state = _PlannerState(
        live=live,
        final=final,
        reserved=np.full(live.shape, -1, dtype=np.int64),
        temporary=np.zeros(live.shape, dtype=bool),
        mismatched=np.count_nonzero(live != final, axis=1),
        fillable=np.count_nonzero((live < 0) & (final >= 0), axis=1),
        gpu_of_slot=gpu_of_slot,
        node_of_slot=node_of_slot,
        expert_bytes=model.expert_bytes,
        num_experts=model.num_experts,
        max_copies=max_copies_per_stage,
    )
    stages: list[MigrationStage] = []
    bytes_per_link: dict[str, float] = defaultdict(float)
    # Every slot needs at most a retirement, a temporary copy and a fill: a bound no plan reaches.
    max_stages = 4 * int(state.mismatched.sum()) + num_layers + 8
    while state.mismatched.any():
        if len(stages) > max_stages:
            raise PlacementError("migration: the planner did not converge (internal error)")
        # Before the first stage any layer may hold a replica to retire; after it, a layer can
        # only retire once it receives a copy (a retirement pass leaves nothing retirable, and
        # breaking a cycle keeps the stuck expert's single replica).
        stage = _plan_stage(state, range(num_layers) if not stages else None)
        for copy in stage.copies:
            bytes_per_link[link_name(copy.source_slot, copy.target_slot, topology)] += copy.bytes
        stages.append(stage)
    if not stages:
        stages.append(MigrationStage((), np.zeros((0, 2), dtype=np.int64)))
    initial = old.physical_to_logical_map.copy()
    initial.setflags(write=False)
    return MigrationPlan(
        initial_map=initial,
        stages=tuple(stages),
        bytes_moved=float(sum(c.bytes for stage in stages for c in stage.copies)),
        bytes_per_link=dict(bytes_per_link),
    )


@dataclass
class _PlannerState:
    """The planner's running state. live, final, reserved (expert a temporary copy waits to go
    into the slot, -1: none), temporary (slot holds a temporary copy): [L, N]; mismatched (slots
    not yet final), fillable (empty slots with a known expert to fill): [L]; gpu_of_slot,
    node_of_slot: [N]."""

    live: np.ndarray
    final: np.ndarray
    reserved: np.ndarray
    temporary: np.ndarray
    mismatched: np.ndarray
    fillable: np.ndarray
    gpu_of_slot: np.ndarray
    node_of_slot: np.ndarray
    expert_bytes: float
    num_experts: int
    max_copies: int


def _plan_stage(state: _PlannerState, retire_layers: Iterable[int] | None) -> MigrationStage:
    """One stage: fills, then retirements in the layers that got copies (or ``retire_layers``),
    then cycle breaks in layers that made no progress while copies are left; ``state`` advances."""
    copies, rows = _fill(state)
    progress = set(rows)
    for layer in rows if retire_layers is None else retire_layers:
        staged_row = rows.setdefault(layer, (state.live[layer].copy(), None))[0]
        after_row = staged_row.copy()
        rows[layer] = (staged_row, after_row)
        if _retire(after_row, staged_row, state.final[layer], state.temporary[layer]):
            progress.add(layer)
    for layer in np.flatnonzero(state.mismatched > 0).tolist():
        if len(copies) >= state.max_copies:
            break
        if layer in progress:
            continue
        if layer not in rows:
            rows[layer] = (state.live[layer].copy(), state.live[layer].copy())
        staged_row, after_row = rows[layer]
        _break_cycle(
            layer,
            state.live[layer],
            after_row,
            staged_row,
            state.final[layer],
            state.reserved[layer],
            state.temporary[layer],
            copies,
            state.expert_bytes,
            state.num_experts,
            state.gpu_of_slot,
            state.node_of_slot,
        )
    retired: list[tuple[int, int]] = []
    for layer in sorted(rows):
        staged_row, after_row = rows[layer]
        gone = ((staged_row >= 0) & (after_row < 0)).nonzero()[0]
        retired += [(layer, slot) for slot in gone.tolist()]
        state.live[layer] = after_row
        state.mismatched[layer] = np.count_nonzero(after_row != state.final[layer])
        state.fillable[layer] = len(
            _fillable(after_row, state.reserved[layer], state.final[layer])
        )
    retired_slots = np.array(retired, dtype=np.int64).reshape(-1, 2)
    retired_slots.setflags(write=False)
    return MigrationStage(tuple(copies), retired_slots)


def _fillable(row: np.ndarray, reserved: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Empty slots of one layer whose final expert (or reserved temporary copy) is known, [f];
    rows [N]."""
    return ((row < 0) & ((reserved >= 0) | (target >= 0))).nonzero()[0]


def _fill(state: _PlannerState) -> tuple[list[ExpertCopy], dict[int, tuple[np.ndarray, None]]]:
    """This stage's copies, layer by layer and slot by slot, at most ``state.max_copies``, each
    from a replica live before the stage, and {layer: (staged row [N] = live plus copies, None)}
    of the layers that got some. ``state.reserved`` and ``state.temporary`` are updated."""
    copies: list[ExpertCopy] = []
    rows: dict[int, tuple[np.ndarray, None]] = {}
    reserved, temporary = state.reserved, state.temporary
    for layer in state.fillable.nonzero()[0].tolist():
        if len(copies) >= state.max_copies:
            break
        row = state.live[layer]
        staged_row = row.copy()
        use: dict[int, int] = {}
        targets = _fillable(row, reserved[layer], state.final[layer])
        for slot in targets[: state.max_copies - len(copies)].tolist():
            is_temporary = bool(reserved[layer, slot] >= 0)
            expert = int(reserved[layer, slot] if is_temporary else state.final[layer, slot])
            source = _best_source(row, expert, slot, state.gpu_of_slot, state.node_of_slot, use)
            copies.append(ExpertCopy(layer, expert, source, slot, state.expert_bytes))
            staged_row[slot] = expert
            use[source] = use.get(source, 0) + 1
            temporary[layer, slot] = is_temporary
            reserved[layer, slot] = -1
        rows[layer] = (staged_row, None)
    return copies, rows


def _best_source(
    row: np.ndarray,
    expert: int,
    target: int,
    gpu_of_slot: np.ndarray,
    node_of_slot: np.ndarray,
    use: dict[int, int],
) -> int:
    """Live slot of ``expert`` closest to ``target`` (same GPU, then node), then least used as a
    source in this stage (``use``: copies taken from each slot), then lowest. row, gpu_of_slot,
    node_of_slot: [N]."""
    slots = (row == expert).nonzero()[0].tolist()
    if len(slots) == 1:
        return slots[0]
    gpu, node = gpu_of_slot[target], node_of_slot[target]

    def closeness(slot: int) -> tuple[int, int, int]:
        distance = 0 if gpu_of_slot[slot] == gpu else 1 if node_of_slot[slot] == node else 2
        return distance, use.get(slot, 0), slot

    return min(slots, key=closeness)


def _retire(
    after: np.ndarray, staged: np.ndarray, target: np.ndarray, temporary: np.ndarray
) -> bool:
    """Retire (set to -1 in ``after``) slots whose content is not final, while their expert keeps
    another replica in ``after``: first slots a final expert must go into, then slots that end
    empty, and temporary copies last (so that they outlive the slot they stand in for). Only slots
    whose expert has several replicas are candidates. Rows [N] (``temporary`` updated); True if any
    slot was retired."""
    replicas = np.bincount(staged[staged >= 0])
    wrong = np.flatnonzero((staged >= 0) & (staged != target))
    candidates = wrong[replicas[staged[wrong]] > 1].tolist()
    if not candidates:
        return False
    count = {expert: int(replicas[expert]) for expert in staged[candidates].tolist()}
    candidates.sort(key=lambda slot: (bool(temporary[slot]), bool(target[slot] < 0), slot))
    retired = False
    for slot in candidates:
        expert = int(after[slot])
        if count[expert] > 1:
            count[expert] -= 1
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
    expert_bytes: float,
    num_experts: int,
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
        copies.append(ExpertCopy(layer, int(expert), int(slot), spare_slot, expert_bytes))
        staged[spare_slot] = after[spare_slot] = expert
        temporary[spare_slot] = True
        after[slot] = -1  # the stuck expert lives on in the temporary slot
        return
    counts = np.bincount(after[after >= 0], minlength=num_experts)
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
    """Raise PlacementError unless ``plan`` starts from ``old`` and every stage keeps the
    invariants: copies only into slots empty before the stage, from slots live with that expert;
    retirements only of live slots; every intermediate map is a valid placement (each expert keeps
    a replica, slots as before); bytes add up."""
    if not plan.stages:
        raise PlacementError("plan: no stages")
    live = old.physical_to_logical_map.copy()
    initial = np.asarray(plan.initial_map)
    if initial.shape != live.shape or not np.array_equal(initial, live):
        raise PlacementError("plan: initial_map is not the old placement's map")
    total = 0.0
    for index, stage in enumerate(plan.stages):
        copied = _checked_copies(live, index, stage.copies)
        union = _checked_retirements(copied, index, stage.retired)
        try:
            Placement(union, old.num_experts, old.slots_per_gpu)
        except PlacementError as error:
            raise PlacementError(f"stage {index}: {error}") from None
        live = union
        # Summed copy by copy, in plan order, so the float total matches the plan builder's.
        for copy in stage.copies:
            total += copy.bytes
    if not np.isclose(total, plan.bytes_moved):
        raise PlacementError(f"plan: bytes_moved {plan.bytes_moved} != copies' {total}")


def _checked_copies(live: np.ndarray, index: int, copies: tuple[ExpertCopy, ...]) -> np.ndarray:
    """The map [L, N] with stage ``index``'s copies applied to ``live`` [L, N] (a new array);
    PlacementError if a copy is out of range, targets a slot not empty before the stage (or one
    already targeted in it) or reads a slot that does not hold its expert."""
    union = live.copy()
    targets: set[tuple[int, int]] = set()
    for copy in copies:
        where = f"stage {index}: copy of expert {copy.expert} (layer {copy.layer})"
        if not (
            0 <= copy.layer < live.shape[0]
            and 0 <= copy.source_slot < live.shape[1]
            and 0 <= copy.target_slot < live.shape[1]
        ):
            raise PlacementError(f"{where}: layer or slot out of range")
        if live[copy.layer, copy.target_slot] != -1 or (copy.layer, copy.target_slot) in targets:
            raise PlacementError(f"{where}: target slot {copy.target_slot} is not empty")
        if live[copy.layer, copy.source_slot] != copy.expert:
            raise PlacementError(f"{where}: source slot {copy.source_slot} does not hold it")
        targets.add((copy.layer, copy.target_slot))
        union[copy.layer, copy.target_slot] = copy.expert
    return union


def _checked_retirements(union: np.ndarray, index: int, retired: np.ndarray) -> np.ndarray:
    """``union`` [L, N] with stage ``index``'s ``retired`` [R, 2] (layer, slot) pairs set to -1 (a
    new array); PlacementError if retired is not [R, 2] or names a slot out of range or empty."""
    retired = np.asarray(retired)
    if retired.ndim != 2 or retired.shape[1] != 2:
        raise PlacementError(f"stage {index}: retired has shape {retired.shape}, not [R, 2]")
    if len(retired) and not (
        np.all((retired >= 0) & (retired < union.shape)) and np.all(union[tuple(retired.T)] >= 0)
    ):
        raise PlacementError(f"stage {index}: retires a slot that is out of range or empty")
    after = union.copy()
    after[tuple(retired.T)] = -1
    return after
