"""Execute a ``MigrationPlan`` through the agents, stage by stage, resumable from recorded progress.

Per stage (``prev`` = the map live before the stage, ``stage`` = the map after it):

1. **stage copies**: each copy is pulled by the agent owning ``target_slot`` from the agent owning
   ``source_slot`` (another live replica of the expert when that one fails), at most
   ``max_concurrent_transfers`` at once; the slot becomes ``staged``, nothing serves from it yet.
2. **activate the union** ``prev + copied slots`` on every agent (only adds replicas).
3. **activate the stage's map** on every agent, the owners of retired slots LAST, so that no agent
   still routes to a slot that its owner already dropped.

Progress (stage index, last completed step, bytes) is recorded after each step through ``record``;
the operator writes it to the resource's status so a restarted operator resumes there. Every step
is also level-triggered: before acting it reads the agents' ``/v1/placement`` and skips what is
already done, so replaying a step is harmless. Request ids are ``<run>-<plan>-s<stage>-...-a<attempt>``
(``run`` is unique per operator process, so a retry never gets an agent's cached error back).

A failed copy is retried (next attempt from another replica when there is one); when the retries
run out the stage is rolled back (staged slots retired, union de-activated), the agents keep serving
the last complete map, and the outcome says which map that is. Every map activated gives every
expert at least one slot and copies only ever go into empty slots, so no expert loses its last live
replica at any moment.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from moe_operator.agents import AgentClient, AgentError
from moe_placement.models import placement_hash

logger = logging.getLogger("moe_operator.migrate")

RUN_ID = secrets.token_hex(3)


class StageLike(Protocol):
    copies: Sequence[Any]
    physical_to_logical_map: np.ndarray


class PlanLike(Protocol):
    stages: Sequence[StageLike]
    bytes_moved: float


def plan_id_of(source_hash: str, target_hash: str, max_copies_per_stage: int) -> str:
    """Deterministic identity of a plan (the planner is deterministic in these inputs)."""
    digest = hashlib.sha256(f"{source_hash}:{target_hash}:{max_copies_per_stage}".encode())
    return digest.hexdigest()[:12]


@dataclass
class Progress:
    """What status.migration records: ``stage`` = stages completed, ``step`` = last completed step of
    the current stage (``""``, ``staged``, ``union``)."""

    plan_id: str
    stages: int
    stage: int = 0
    step: str = ""
    bytes_moved: float = 0.0
    bytes_total: float = 0.0


@dataclass
class Outcome:
    """How an execution ended and which map the agents serve now (``generation`` their live one)."""

    state: str  # Completed | RolledBack | Interrupted | Stalled
    live_map: np.ndarray
    generation: int
    progress: Progress
    message: str = ""


@dataclass
class ExecOptions:
    max_concurrent_transfers: int = 4
    step_timeout_s: float = 60.0
    retries: int = 2
    stage_pause_s: float = 0.0
    backoff_s: float = 0.2


class StepFailed(RuntimeError):
    """A step could not be completed after its retries."""


@dataclass
class Snapshot:
    """The agents' /v1/placement answers at one moment."""

    answers: dict[int, dict[str, Any]]
    errors: dict[int, AgentError] = field(default_factory=dict)
    _slots: dict[int, dict[tuple[int, int], tuple[int, str]]] = field(default_factory=dict, repr=False)

    def _index(self, rank: int) -> dict[tuple[int, int], tuple[int, str]]:
        if rank not in self._slots:
            self._slots[rank] = {
                (int(entry["layer"]), int(entry["slot"])): (int(entry["expert"]), str(entry["state"]))
                for entry in self.answers.get(rank, {}).get("slots") or []
            }
        return self._slots[rank]

    def slot_state(self, rank: int, layer: int, slot: int) -> tuple[int, str] | None:
        return self._index(rank).get((layer, slot))

    def set_slot(self, rank: int, layer: int, slot: int, expert: int, state: str) -> None:
        """Record what a successful stage or retire call did (``state`` ``empty`` removes)."""
        index = self._index(rank)
        if state == "empty":
            index.pop((layer, slot), None)
        else:
            index[(layer, slot)] = (expert, state)

    def update(self, rank: int, answer: Mapping[str, Any]) -> None:
        """An agent's fresh /v1/placement answer (activation answers are one)."""
        self.answers[rank] = dict(answer)
        self._slots.pop(rank, None)

    @property
    def max_generation(self) -> int:
        return max((int(answer.get("generation", 0)) for answer in self.answers.values()), default=0)


async def snapshot(client: AgentClient, agents: Mapping[int, str]) -> Snapshot:
    """All agents' placements, concurrently; failures are kept per rank."""

    async def one(rank: int, url: str) -> tuple[int, Any]:
        try:
            return rank, await client.placement(url)
        except AgentError as error:
            return rank, error

    results = await asyncio.gather(*(one(rank, url) for rank, url in agents.items()))
    answers = {rank: value for rank, value in results if not isinstance(value, AgentError)}
    errors = {rank: value for rank, value in results if isinstance(value, AgentError)}
    return Snapshot(answers, errors)


def union_map(prev: np.ndarray, copies: Sequence[Any]) -> np.ndarray:
    """``prev`` plus every copy's target slot (which must be empty in ``prev``)."""
    union = np.array(prev, dtype=np.int64, copy=True)
    for copy in copies:
        current = union[copy.layer, copy.target_slot]
        if current not in (-1, copy.expert):
            raise ValueError(
                f"plan: copy of expert {copy.expert} into layer {copy.layer} slot {copy.target_slot}, "
                f"which holds expert {current}"
            )
        union[copy.layer, copy.target_slot] = copy.expert
    return union


def retired_owners(union: np.ndarray, stage: np.ndarray, slots_per_gpu: int) -> set[int]:
    """Ranks that drop a slot when ``stage`` replaces ``union``."""
    changed = (union >= 0) & (union != stage)
    return {int(slot) // slots_per_gpu for slot in np.nonzero(changed)[1]}


def _hash(mapping: np.ndarray) -> str:
    return placement_hash(mapping)


@dataclass
class Executor:
    """Runs one plan. ``record`` persists progress; ``should_stop`` is polled between stages."""

    client: AgentClient
    agents: Mapping[int, str]
    slots_per_gpu: int
    num_experts: int
    options: ExecOptions
    record: Callable[[Progress], Awaitable[None]]
    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[str, float], None] = lambda result, bytes_moved: None
    prefix: str = RUN_ID

    view: Snapshot | None = None

    def _owner(self, slot: int) -> int:
        return int(slot) // self.slots_per_gpu

    async def _snapshot(self, need_all: bool = True) -> Snapshot:
        """A fresh view of every agent (at the start and after a failure; steps that succeed keep the
        view current from their answers, so a run reads full placements only then)."""
        last: Snapshot | None = None
        for attempt in range(self.options.retries + 1):
            last = await snapshot(self.client, self.agents)
            if not last.errors or not need_all:
                self.view = last
                return last
            await asyncio.sleep(self.options.backoff_s * 2**attempt)
        assert last is not None
        ranks = ", ".join(f"{rank} ({error.message})" for rank, error in sorted(last.errors.items()))
        raise StepFailed(f"agents unreachable: {ranks}")

    async def _current(self) -> Snapshot:
        return self.view if self.view is not None else await self._snapshot()

    async def run(self, source_map: np.ndarray, plan: PlanLike, progress: Progress) -> Outcome:
        stages = list(plan.stages)
        maps = [np.asarray(source_map, dtype=np.int64)] + [
            np.asarray(stage.physical_to_logical_map, dtype=np.int64) for stage in stages
        ]
        progress = replace(progress, stages=len(stages))
        generation = 0
        while progress.stage < len(stages):
            index = progress.stage
            stage, prev, after = stages[index], maps[index], maps[index + 1]
            try:
                progress, generation = await self._run_stage(index, stage, prev, after, progress)
            except StepFailed as error:
                return await self._roll_back(index, stage, prev, after, progress, str(error))
            if progress.stage < len(stages):
                if self.options.stage_pause_s:
                    await asyncio.sleep(self.options.stage_pause_s)
                if self.should_stop():
                    return Outcome(
                        "Interrupted", after, generation, progress,
                        f"stopped after stage {progress.stage}/{len(stages)}",
                    )
        final = maps[-1]
        if generation == 0:
            generation = (await self._current()).max_generation
        return Outcome("Completed", final, generation, progress, f"{len(stages)} stages")

    async def _run_stage(
        self, index: int, stage: StageLike, prev: np.ndarray, after: np.ndarray, progress: Progress
    ) -> tuple[Progress, int]:
        copies = list(stage.copies)
        union = union_map(prev, copies)
        union_hash, after_hash = _hash(union), _hash(after)
        if progress.step == "":
            moved = await self._stage_copies(index, copies, prev)
            progress = replace(progress, step="staged", bytes_moved=progress.bytes_moved + moved)
            await self.record(progress)
        if progress.step == "staged":
            if copies:
                await self._activate(
                    f"s{index}-union", union, skip_hashes={union_hash, after_hash}, last=set()
                )
            progress = replace(progress, step="union")
            await self.record(progress)
        generation = await self._activate(
            f"s{index}-final",
            after,
            skip_hashes={after_hash},
            last=retired_owners(union, after, self.slots_per_gpu),
            fatal=False,
        )
        progress = replace(progress, stage=index + 1, step="")
        await self.record(progress)
        return progress, generation

    async def _stage_copies(self, index: int, copies: Sequence[Any], prev: np.ndarray) -> float:
        if not copies:
            return 0.0
        view = await self._current()
        semaphore = asyncio.Semaphore(self.options.max_concurrent_transfers)
        moved = 0.0

        async def one(number: int, copy: Any) -> None:
            nonlocal moved
            async with semaphore:
                copied = await self._copy(index, number, copy, prev, view)
            moved += copied

        results = await asyncio.gather(*(one(n, c) for n, c in enumerate(copies)), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            self.view = None  # something went wrong: read the agents again before the next step
        for failure in failures:
            if not isinstance(failure, StepFailed):
                raise failure
        if failures:
            raise StepFailed("; ".join(str(failure) for failure in failures[:3]))
        return moved

    def _sources(self, copy: Any, prev: np.ndarray, view: Snapshot) -> list[int]:
        """Slots to copy from: the plan's source first, then other live replicas of the expert."""
        slots = [int(copy.source_slot)] + [
            int(slot) for slot in np.nonzero(prev[copy.layer] == copy.expert)[0] if slot != copy.source_slot
        ]
        usable = []
        for slot in slots:
            owner = self._owner(slot)
            if owner not in self.agents:
                continue
            state = view.slot_state(owner, copy.layer, slot)
            if owner in view.answers and (state is None or state[0] != copy.expert or state[1] != "live"):
                continue  # the owner does not serve it (any more)
            usable.append(slot)
        return usable or slots[:1]

    async def _copy(self, index: int, number: int, copy: Any, prev: np.ndarray, view: Snapshot) -> float:
        target = self._owner(copy.target_slot)
        url = self.agents[target]
        held = view.slot_state(target, copy.layer, copy.target_slot)
        if held is not None and held[0] == copy.expert and held[1] in ("staged", "live"):
            return 0.0  # done before (a resumed stage)
        if held is not None and held[1] == "staged":
            await self.client.retire(url, f"{self.prefix}-clean-s{index}-c{number}", copy.layer, copy.target_slot)
            view.set_slot(target, copy.layer, copy.target_slot, -1, "empty")
        sources = self._sources(copy, prev, view)
        errors = []
        for attempt in range(self.options.retries + 1):
            source_slot = sources[attempt % len(sources)]
            peer = self.agents[self._owner(source_slot)]
            request_id = f"{self.prefix}-s{index}-c{number}-a{attempt}"
            try:
                answer = await self.client.stage(
                    url, request_id, copy.layer, copy.target_slot, copy.expert, peer,
                    timeout_s=self.options.step_timeout_s,
                )
                bytes_moved = float(answer.get("bytes", getattr(copy, "bytes", 0.0)) or 0.0)
                view.set_slot(target, copy.layer, copy.target_slot, copy.expert, "staged")
                self.on_step("ok", bytes_moved)
                return bytes_moved
            except AgentError as error:
                if error.status == 409:
                    # Maybe our own earlier attempt got through: check what the slot holds.
                    try:
                        state = await self.client.placement(url)
                        for entry in state.get("slots") or []:
                            if (int(entry["layer"]), int(entry["slot"]), int(entry["expert"])) == (
                                copy.layer, copy.target_slot, copy.expert,
                            ):
                                return 0.0
                    except AgentError:
                        pass
                errors.append(str(error))
                self.on_step("retried", 0.0)
                logger.warning("copy %s of stage %s failed (attempt %s): %s", number, index, attempt, error)
                await asyncio.sleep(self.options.backoff_s * 2**attempt)
        raise StepFailed(
            f"copy of layer {copy.layer} expert {copy.expert} to slot {copy.target_slot} "
            f"(rank {target}) failed: {errors[-1] if errors else 'no source'}"
        )

    async def _activate(
        self, name: str, mapping: np.ndarray, skip_hashes: set[str], last: set[int], fatal: bool = True
    ) -> int:
        """Activate ``mapping`` on every agent not already serving one of ``skip_hashes``; ranks in
        ``last`` after all others. Returns the generation used (or the live one when nothing ran)."""
        for attempt in range(self.options.retries + 1):
            view = await self._current() if attempt == 0 else await self._snapshot()
            pending = [
                rank for rank in sorted(self.agents)
                if view.answers[rank].get("hash") not in skip_hashes
            ]
            if not pending:
                return view.max_generation
            generation = view.max_generation + 1
            first = [rank for rank in pending if rank not in last]
            second = [rank for rank in pending if rank in last]
            failed: list[str] = []
            for group in (first, second):
                results = await asyncio.gather(
                    *(
                        self.client.activate(
                            self.agents[rank], f"{self.prefix}-{name}-g{generation}-a{attempt}", generation, mapping
                        )
                        for rank in group
                    ),
                    return_exceptions=True,
                )
                for rank, result in zip(group, results):
                    if isinstance(result, BaseException):
                        failed.append(str(result))
                    elif isinstance(result, Mapping) and "hash" in result:
                        view.update(rank, result)
                    else:
                        self.view = None
                if failed:
                    break  # never retire on owners while a router elsewhere may still use the slot
            if not failed:
                self.on_step("ok", 0.0)
                return generation
            self.view = None
            self.on_step("retried", 0.0)
            logger.warning("activation %s failed (attempt %s): %s", name, attempt, failed[:2])
            await asyncio.sleep(self.options.backoff_s * 2**attempt)
        message = f"activation {name} failed: {'; '.join(failed[:2])}"
        if fatal:
            raise StepFailed(message)
        raise Stalled(message)

    async def _roll_back(
        self, index: int, stage: StageLike, prev: np.ndarray, after: np.ndarray, progress: Progress, why: str
    ) -> Outcome:
        """Undo a stage whose copies or union activation failed: agents back on ``prev``, staged
        slots retired. Agents that cannot be reached are left as they are (their maps stay valid)."""
        copies = list(stage.copies)
        view = await snapshot(self.client, self.agents)
        generation = view.max_generation
        union_hash = _hash(union_map(prev, copies))
        on_union = [rank for rank, answer in view.answers.items() if answer.get("hash") == union_hash]
        if on_union:
            generation += 1
            await asyncio.gather(
                *(
                    self.client.activate(self.agents[rank], f"{self.prefix}-s{index}-rollback-g{generation}", generation, prev)
                    for rank in on_union
                ),
                return_exceptions=True,
            )
        view = await snapshot(self.client, self.agents)
        retire_calls = []
        for number, copy in enumerate(copies):
            target = self._owner(copy.target_slot)
            held = view.slot_state(target, copy.layer, copy.target_slot)
            if held is not None and held[1] == "staged":
                retire_calls.append(
                    self.client.retire(self.agents[target], f"{self.prefix}-s{index}-retire-c{number}", copy.layer, copy.target_slot)
                )
        results = await asyncio.gather(*retire_calls, return_exceptions=True)
        self.on_step("rolled_back", 0.0)
        leftovers = [str(result) for result in results if isinstance(result, BaseException)]
        message = f"stage {index + 1} rolled back: {why}"
        if leftovers:
            message += f" (retire failed: {leftovers[0]})"
        progress = replace(progress, step="")
        return Outcome("RolledBack", prev, max(generation, view.max_generation), progress, message)


class Stalled(RuntimeError):
    """A final activation could not complete: agents serve valid maps, the stage must be resumed."""


async def execute(
    executor: Executor, source_map: np.ndarray, plan: PlanLike, progress: Progress
) -> Outcome:
    """Run the plan; a stalled final activation yields ``Stalled`` with progress kept for a resume."""
    try:
        return await executor.run(source_map, plan, progress)
    except Stalled as error:
        return Outcome("Stalled", np.asarray(source_map), 0, progress, str(error))


async def converge(
    client: AgentClient,
    agents: Mapping[int, str],
    mapping: np.ndarray,
    generation: int,
    view: Snapshot,
) -> list[str]:
    """Bring agents that lag behind the published placement (a restarted agent serving the right map
    at an older generation, or one that missed an activation it holds the weights for) onto it.
    Returns the problems left (agents that refuse: they lack weights and need a migration)."""
    digest = _hash(mapping)
    problems = []
    for rank, answer in sorted(view.answers.items()):
        if answer.get("hash") == digest and int(answer.get("generation", -1)) == generation:
            continue
        if int(answer.get("generation", 0)) > generation:
            problems.append(f"rank {rank} serves generation {answer.get('generation')} > published {generation}")
            continue
        try:
            await client.activate(agents[rank], f"{RUN_ID}-converge-g{generation}-{secrets.token_hex(2)}", generation, mapping)
        except AgentError as error:
            problems.append(f"rank {rank}: {error.message or error}")
    return problems


def live_replicas(answers: Mapping[int, Mapping[str, Any]], num_layers: int, num_experts: int) -> np.ndarray:
    """Live replicas of each (layer, expert) over the answering agents' own slots, shape [L, E]."""
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    for answer in answers.values():
        for entry in answer.get("slots") or []:
            if entry.get("state") == "live" and int(entry["expert"]) >= 0:
                counts[int(entry["layer"]), int(entry["expert"])] += 1
    return counts

