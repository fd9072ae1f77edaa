"""A trivial migration planner for the operator's unit tests ONLY (the real one is
``moe_placement.migration``). Same API: ``plan_migration(old, new, model, topology,
max_copies_per_stage) -> plan`` with ``.stages`` (``.copies``, ``.physical_to_logical_map``),
``.bytes_moved`` and ``.final_map()``.

Sequential per layer: fill an empty slot with its target expert (copied from a replica), else retire
a wrong slot whose expert has another replica, else break a cycle of single replicas by parking one
in a free slot (retiring a redundant replica first when none is free). The action list is cut into
stages of the form ``copies (<= max) then retirements``, which keeps every intermediate map valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ExpertCopy:
    layer: int
    expert: int
    source_slot: int
    target_slot: int
    bytes: float


@dataclass(frozen=True)
class MigrationStage:
    copies: tuple
    physical_to_logical_map: np.ndarray


@dataclass(frozen=True)
class MigrationPlan:
    stages: tuple
    bytes_moved: float

    def final_map(self) -> np.ndarray:
        return self.stages[-1].physical_to_logical_map


def _layer_actions(layer: int, cur: np.ndarray, tgt: np.ndarray) -> list[tuple]:
    cur = cur.copy()
    actions: list[tuple] = []
    parked: int | None = None
    for _ in range(50 * len(cur) + 10):
        if np.array_equal(cur, tgt):
            return actions
        count = lambda e: int((cur == e).sum())  # noqa: E731
        fill = [s for s in range(len(cur)) if cur[s] == -1 and tgt[s] != -1 and count(tgt[s]) > 0 and s != parked]
        if fill:
            s = fill[0]
            source = int(np.nonzero(cur == tgt[s])[0][0])
            actions.append(("copy", layer, int(tgt[s]), source, s))
            cur[s] = tgt[s]
            continue
        retire = [s for s in range(len(cur)) if cur[s] != -1 and cur[s] != tgt[s] and count(cur[s]) > 1]
        retire.sort(key=lambda s: s == parked)  # the parked copy goes last
        if retire:
            s = retire[0]
            actions.append(("retire", layer, s))
            cur[s] = -1
            if s == parked:
                parked = None
            continue
        wrong = [s for s in range(len(cur)) if cur[s] != -1 and cur[s] != tgt[s]]
        free = [s for s in range(len(cur)) if cur[s] == -1]
        if not free:
            victim = next(s for s in range(len(cur)) if count(cur[s]) > 1)
            actions.append(("retire", layer, victim))
            cur[victim] = -1
            free = [victim]
        parked = free[0]
        actions.append(("copy", layer, int(cur[wrong[0]]), wrong[0], parked))
        cur[parked] = cur[wrong[0]]
    raise ValueError("stub planner: did not converge")


def plan_migration(old, new, model, topology, max_copies_per_stage=8):
    current = np.array(old.physical_to_logical_map, dtype=np.int64)
    target = np.asarray(new.physical_to_logical_map, dtype=np.int64)
    actions = [a for layer in range(current.shape[0]) for a in _layer_actions(layer, current[layer], target[layer])]
    size = float(model.expert_bytes)
    stages = []
    copies: list[ExpertCopy] = []
    retired = False
    for action in actions + [("end",)]:
        boundary = action[0] == "end" or (action[0] == "copy" and (retired or len(copies) >= max_copies_per_stage))
        if boundary and (copies or retired):
            stages.append(MigrationStage(tuple(copies), current.copy()))
            copies, retired = [], False
        if action[0] == "copy":
            _, layer, expert, source, slot = action
            copies.append(ExpertCopy(layer, expert, source, slot, size))
            current[layer, slot] = expert
        elif action[0] == "retire":
            _, layer, slot = action
            current[layer, slot] = -1
            retired = True
    return MigrationPlan(tuple(stages), size * sum(1 for a in actions if a[0] == "copy"))
