"""The migration planner as it was before plans became stage deltas and retirement incremental:
a full map per stage and a Python loop over every layer's misplaced slots. Kept only to show,
side by side, that today's planner gives the same plans stage by stage, and how much faster it is
(tests/unit/test_migration.py, benchmarks/cycle_bench.py).

Shapes: L layers, E experts, N slots.
"""

from __future__ import annotations

import numpy as np
from moe_placement.migration_plan import ExpertCopy
from moe_placement.models import ModelShape, Placement, PlacementError, Topology


def reference_stages(
    old: Placement,
    new: Placement,
    model: ModelShape,
    topology: Topology,
    max_copies_per_stage: int = 8,
) -> list[tuple[tuple[ExpertCopy, ...], np.ndarray]]:
    """(copies, map [L, N] after the stage) per stage, as ``plan_migration`` planned them."""
    live = old.physical_to_logical_map.copy()
    final = new.physical_to_logical_map
    num_layers, num_slots = live.shape
    gpu_of_slot = np.arange(num_slots) // topology.slots_per_gpu
    node_of_slot = gpu_of_slot // topology.gpus_per_node
    # reserved[l, s] = expert a temporary copy is waiting to go into slot s (-1: none)
    reserved = np.full(live.shape, -1, dtype=np.int64)
    temporary = np.zeros(live.shape, dtype=bool)  # slots holding a temporary copy
    stages: list[tuple[tuple[ExpertCopy, ...], np.ndarray]] = []
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
        stages.append((tuple(copies), after))
        live = after.copy()
    if not stages:
        stages.append(((), final.copy()))
    return stages


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
