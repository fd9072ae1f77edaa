"""Run a ``MigrationPlan`` through the agents, stage by stage, resumable from recorded progress.

Per stage (``prev`` = the map live before the stage, ``after`` = the map after it):

1. **stage copies**: each copy is pulled by the agent owning ``target_slot`` from the agent owning
   ``source_slot`` (another live replica of the expert when that one fails), at most
   ``max_concurrent_transfers`` at once; the slot becomes ``staged``, nothing serves from it yet.
   The request carries the step timeout, so an agent gives up a copy its caller gave up on.
2. **activate the union** ``prev + copied slots`` on every agent (only adds replicas).
3. **activate the stage's map** on every agent, the owners of retired slots LAST, so that no agent
   still routes to a slot that its owner already dropped.

Progress (stage index, last completed step, bytes) is recorded after each step through ``record``;
the operator writes it to the resource's status so a restarted operator resumes there. Every step is
level-triggered: before acting it reads the agents' ``/v1/placement`` and skips what is already done,
so replaying a step is harmless. Before the first step, staged slots that no step of this execution
claims (leftovers of an execution that died) are retired.

Request ids are ``<plan id>.<nonce>.<step>``, the nonce drawn per execution: no two executions, of
the same plan or another, in one operator process or several, ever share an id, so an agent never
answers a step with another execution's remembered answer.

A failed copy is retried (next attempt from another replica when there is one); when the retries
run out the stage is undone (staged slots retired, the union de-activated) and the run ends
``Failed`` with the agents on the last complete map; the caller then returns them to the source map
with a plan of its own. Every map activated gives every expert at least one slot and copies only go
into empty slots, so no expert loses its last live replica at any moment.

With several expert-parallel groups (LeaderWorkerSet replicas) one plan runs on all of them in
lockstep (``GroupLayout``): every group serves the same map, so each copy runs once per group, from
and to that group's agents, and every activation goes to every group's agents. A stage that fails in
any group is undone in all of them, so at every stage boundary all groups serve one map.

Shapes: L layers, N slots.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from moe_operator.agents import AgentClient, AgentError
from moe_placement.agent_api import ActivateRequest, PlacementAnswer, RetireRequest, StageRequest, StageSource
from moe_placement.migration_plan import ExpertCopy, MigrationPlan, MigrationStage
from moe_placement.models import placement_hash

logger = logging.getLogger("moe_operator.plan_runner")

# The agent gives up a copy this long before the caller stops waiting, so its answer (a 504) arrives.
CALLER_MARGIN_S = 5.0


def plan_id_of(source_hash: str, target_hash: str, max_copies_per_stage: int) -> str:
    """Deterministic identity of a plan (the planner is deterministic in these inputs)."""
    digest = hashlib.sha256(f"{source_hash}:{target_hash}:{max_copies_per_stage}".encode())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class RequestIds:
    """Request ids of one execution of a plan: ``<plan id>.<nonce>.<step parts>``."""

    plan_id: str
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))

    def __call__(self, *parts: object) -> str:
        return ".".join([self.plan_id, self.nonce, *(str(part) for part in parts)])


@dataclass(frozen=True)
class GroupLayout:
    """Which agent a key of an agents mapping names: ``group * ranks + rank`` for ``groups`` groups of
    ``ranks`` ranks each. One group (the default) keys agents by rank. A slot's owner is the same
    rank in every group, since every group serves the same map."""

    ranks: int = 0
    groups: int = 1

    def key(self, group: int, rank: int) -> int:
        return group * self.ranks + rank

    def keys_of(self, rank: int) -> list[int]:
        """The keys of ``rank`` in every group."""
        return [self.key(group, rank) for group in range(self.groups)]

    @property
    def keys(self) -> range:
        """Every agent the layout expects."""
        return range(self.ranks * self.groups)

    def total_bytes(self, plan_bytes: float) -> float:
        """Bytes a plan copies in all: every group runs it on its own agents."""
        return plan_bytes * self.groups

    def name(self, key: int) -> str:
        return f"rank {key}" if self.groups == 1 else f"group {key // self.ranks} rank {key % self.ranks}"

    def names(self, keys: Sequence[int]) -> str:
        """``ranks [..]`` for one group, ``group g rank r, ...`` for several."""
        return f"ranks {list(keys)}" if self.groups == 1 else ", ".join(self.name(key) for key in keys)


ONE_GROUP = GroupLayout()


@dataclass(frozen=True)
class Progress:
    """What status.migration records: ``stage`` = stages completed, ``step`` = last completed step of
    the current stage (``""``, ``staged``, ``union``)."""

    plan_id: str
    stages: int
    stage: int = 0
    step: str = ""
    bytes_moved: float = 0.0
    bytes_total: float = 0.0


class RunState(enum.StrEnum):
    COMPLETED = "Completed"
    FAILED = "Failed"  # a stage failed and was undone: the agents serve ``live_map``
    INTERRUPTED = "Interrupted"  # stopped at a stage boundary on request
    STALLED = "Stalled"  # a final activation failed: resume from ``progress``


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended and which map [L, N] the agents serve (``generation`` their live one)."""

    state: RunState
    live_map: np.ndarray
    generation: int
    progress: Progress
    message: str = ""


@dataclass(frozen=True)
class RunOptions:
    max_concurrent_transfers: int = 4
    step_timeout_s: float = 60.0
    retries: int = 2
    stage_pause_s: float = 0.0
    backoff_s: float = 0.2


class StepFailed(RuntimeError):
    """A step could not be completed after its retries."""


class Stalled(RuntimeError):
    """A final activation could not complete: agents serve valid maps, the stage must be resumed."""


@dataclass
class AgentsView:
    """The agents' /v1/placement answers at one moment, kept current by the answers of later steps."""

    answers: dict[int, PlacementAnswer]
    errors: dict[int, AgentError] = field(default_factory=dict)
    _slots: dict[int, dict[tuple[int, int], tuple[int, str]]] = field(default_factory=dict, repr=False)

    def _index(self, rank: int) -> dict[tuple[int, int], tuple[int, str]]:
        if rank not in self._slots:
            answer = self.answers.get(rank)
            entries = answer.slots if answer is not None else []
            self._slots[rank] = {(entry.layer, entry.slot): (entry.expert, entry.state) for entry in entries}
        return self._slots[rank]

    def slot_state(self, rank: int, layer: int, slot: int) -> tuple[int, str] | None:
        """(expert, state) of a non-empty slot of ``rank``, None when empty."""
        return self._index(rank).get((layer, slot))

    def set_slot(self, rank: int, layer: int, slot: int, expert: int, state: str) -> None:
        """Record what a successful stage or retire call did (``state`` ``empty`` removes)."""
        index = self._index(rank)
        if state == "empty":
            index.pop((layer, slot), None)
        else:
            index[(layer, slot)] = (expert, state)

    def staged(self, rank: int) -> list[tuple[int, int, int]]:
        """(layer, slot, expert) of the staged slots of ``rank``."""
        return [(layer, slot, expert) for (layer, slot), (expert, state) in self._index(rank).items() if state == "staged"]

    def update(self, rank: int, answer: PlacementAnswer) -> None:
        """An agent's fresh /v1/placement answer (activation answers are one)."""
        self.answers[rank] = answer
        self._slots.pop(rank, None)

    @property
    def max_generation(self) -> int:
        return max((answer.generation for answer in self.answers.values()), default=0)


async def read_agents(client: AgentClient, agents: Mapping[int, str]) -> AgentsView:
    """All agents' placements, concurrently; failures are kept per rank."""

    async def one(rank: int, url: str) -> tuple[int, PlacementAnswer | AgentError]:
        try:
            return rank, await client.placement(url)
        except AgentError as error:
            return rank, error

    results = await asyncio.gather(*(one(rank, url) for rank, url in agents.items()))
    answers = {rank: value for rank, value in results if isinstance(value, PlacementAnswer)}
    errors = {rank: value for rank, value in results if isinstance(value, AgentError)}
    return AgentsView(answers, errors)


def union_map(prev: np.ndarray, copies: Sequence[ExpertCopy]) -> np.ndarray:
    """``prev`` [L, N] plus every copy's target slot (which must be empty in ``prev``)."""
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
    """Ranks that drop a slot when ``stage`` [L, N] replaces ``union`` [L, N]."""
    changed = (union >= 0) & (union != stage)
    return {int(slot) // slots_per_gpu for slot in np.nonzero(changed)[1]}


def activate_request(request_id: str, generation: int, mapping: np.ndarray) -> ActivateRequest:
    return ActivateRequest(
        request_id=request_id, generation=int(generation), physical_to_logical_map=np.asarray(mapping).tolist()
    )


@dataclass
class PlanRunner:
    """Runs one plan. ``record`` persists progress; ``should_stop`` is polled between stages;
    ``layout`` names the agents' groups (``agents`` is keyed by it)."""

    client: AgentClient
    agents: Mapping[int, str]
    slots_per_gpu: int
    options: RunOptions
    record: Callable[[Progress], Awaitable[None]]
    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[str, float], None] = lambda result, bytes_moved: None
    layout: GroupLayout = ONE_GROUP

    view: AgentsView | None = None
    ids: RequestIds = field(default_factory=lambda: RequestIds("none"))

    def _owner(self, slot: int, group: int = 0) -> int:
        return self.layout.key(group, int(slot) // self.slots_per_gpu)

    async def _read(self) -> AgentsView:
        """A fresh view of every agent (at the start and after a failure; steps that succeed keep the
        view current from their answers, so a run reads full placements only then)."""
        last = await read_agents(self.client, self.agents)
        for attempt in range(self.options.retries):
            if not last.errors:
                break
            await asyncio.sleep(self.options.backoff_s * 2**attempt)
            last = await read_agents(self.client, self.agents)
        if last.errors:
            ranks = ", ".join(f"{self.layout.name(rank)} ({error.message})" for rank, error in sorted(last.errors.items()))
            raise StepFailed(f"agents unreachable: {ranks}")
        self.view = last
        return last

    async def _current(self) -> AgentsView:
        return self.view if self.view is not None else await self._read()

    async def run(self, plan: MigrationPlan, progress: Progress) -> RunOutcome:
        """Run ``plan`` from ``progress`` on agents that serve its initial map (or a map of the plan)."""
        self.ids = RequestIds(progress.plan_id)
        progress = replace(progress, stages=len(plan.stages))
        prev = plan.initial_map if progress.stage == 0 else plan.map_after(progress.stage - 1)
        try:
            return await self._run(plan.stages, np.asarray(prev, dtype=np.int64), progress)
        except Stalled as error:
            return RunOutcome(RunState.STALLED, np.asarray(plan.initial_map), 0, progress, str(error))

    async def _run(self, stages: Sequence[MigrationStage], prev: np.ndarray, progress: Progress) -> RunOutcome:
        """Stages from ``progress.stage`` on; ``prev`` [L, N] is the map before that stage. Maps are
        derived one stage at a time (a plan stores deltas)."""
        generation = 0
        try:
            await self._retire_orphans(stages[progress.stage].copies if progress.stage < len(stages) else ())
        except StepFailed as error:
            return RunOutcome(RunState.FAILED, prev, 0, progress, f"stage {progress.stage + 1}: {error}")
        while progress.stage < len(stages):
            index = progress.stage
            after = stages[index].apply(prev)
            try:
                progress, generation = await self._run_stage(index, stages[index].copies, prev, after, progress)
            except StepFailed as error:
                return await self._undo_stage(index, stages[index].copies, prev, progress, str(error))
            prev = after
            if progress.stage < len(stages):
                if self.options.stage_pause_s:
                    await asyncio.sleep(self.options.stage_pause_s)
                if self.should_stop():
                    message = f"stopped after stage {progress.stage}/{len(stages)}"
                    return RunOutcome(RunState.INTERRUPTED, prev, generation, progress, message)
        if generation == 0:
            generation = (await self._current()).max_generation
        return RunOutcome(RunState.COMPLETED, prev, generation, progress, f"{len(stages)} stages")

    async def _retire_orphans(self, claimed_copies: Sequence[ExpertCopy]) -> None:
        """Retire staged slots that the copies about to run do not claim (another execution's)."""
        view = await self._read()
        claimed = {(copy.layer, copy.target_slot, copy.expert) for copy in claimed_copies}
        calls, slots = [], []
        for rank in sorted(self.agents):
            for layer, slot, expert in view.staged(rank):
                if (layer, slot, expert) not in claimed:
                    request = RetireRequest(request_id=self.ids("orphan", layer, slot), layer=layer, slot=slot)
                    calls.append(self.client.retire(self.agents[rank], request))
                    slots.append((rank, layer, slot))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for (rank, layer, slot), result in zip(slots, results):
            if isinstance(result, BaseException):
                raise StepFailed(f"retire of orphan staged slot {slot} of layer {layer} on {self.layout.name(rank)}: {result}")
            view.set_slot(rank, layer, slot, -1, "empty")

    async def _run_stage(
        self, index: int, copies: Sequence[ExpertCopy], prev: np.ndarray, after: np.ndarray, progress: Progress
    ) -> tuple[Progress, int]:
        union = union_map(prev, copies)
        union_hash, after_hash = placement_hash(union), placement_hash(after)
        if progress.step == "":
            moved = await self._stage_copies(index, copies, prev)
            progress = replace(progress, step="staged", bytes_moved=progress.bytes_moved + moved)
            await self.record(progress)
        if progress.step == "staged":
            if copies:
                await self._activate(("s", index, "union"), union, skip_hashes={union_hash, after_hash}, last=set())
            progress = replace(progress, step="union")
            await self.record(progress)
        generation = await self._activate(
            ("s", index, "final"),
            after,
            skip_hashes={after_hash},
            last={key for rank in retired_owners(union, after, self.slots_per_gpu) for key in self.layout.keys_of(rank)},
            fatal=False,
        )
        progress = replace(progress, stage=index + 1, step="")
        await self.record(progress)
        return progress, generation

    async def _stage_copies(self, index: int, copies: Sequence[ExpertCopy], prev: np.ndarray) -> float:
        if not copies:
            return 0.0
        view = await self._current()
        # Each group moves weights over its own links: the transfer limit holds per group.
        semaphores = [asyncio.Semaphore(self.options.max_concurrent_transfers) for _ in range(self.layout.groups)]

        async def one(number: int, copy: ExpertCopy, group: int) -> float:
            async with semaphores[group]:
                return await self._copy(index, number, copy, prev, view, group)

        results = await asyncio.gather(
            *(one(n, c, g) for g in range(self.layout.groups) for n, c in enumerate(copies)), return_exceptions=True
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            self.view = None  # something went wrong: read the agents again before the next step
        for failure in failures:
            if not isinstance(failure, StepFailed):
                raise failure
        if failures:
            raise StepFailed("; ".join(str(failure) for failure in failures[:3]))
        return float(sum(results))

    def _sources(self, copy: ExpertCopy, prev: np.ndarray, view: AgentsView, group: int) -> list[int]:
        """Slots to copy from, in ``group``: the plan's source first, then other live replicas of the expert."""
        slots = [int(copy.source_slot)] + [
            int(slot) for slot in np.nonzero(prev[copy.layer] == copy.expert)[0] if slot != copy.source_slot
        ]
        usable = []
        for slot in slots:
            owner = self._owner(slot, group)
            if owner not in self.agents:
                continue
            state = view.slot_state(owner, copy.layer, slot)
            if owner in view.answers and state != (copy.expert, "live"):
                continue  # the owner does not serve it (any more)
            usable.append(slot)
        return usable or slots[:1]

    async def _copy(
        self, index: int, number: int, copy: ExpertCopy, prev: np.ndarray, view: AgentsView, group: int
    ) -> float:
        target = self._owner(copy.target_slot, group)
        url = self.agents[target]
        held = view.slot_state(target, copy.layer, copy.target_slot)
        if held is not None and held[0] == copy.expert and held[1] in ("staged", "live"):
            return 0.0  # done before (a resumed stage)
        sources = self._sources(copy, prev, view, group)
        errors = []
        for attempt in range(self.options.retries + 1):
            source_slot = sources[attempt % len(sources)]
            request = StageRequest(
                request_id=self.ids("s", index, "c", number, "a", attempt),
                layer=copy.layer,
                slot=copy.target_slot,
                expert=copy.expert,
                source=StageSource(peer=self.agents[self._owner(source_slot, group)]),
                timeout_seconds=self.options.step_timeout_s,
            )
            try:
                answer = await self.client.stage(url, request, timeout_s=self.options.step_timeout_s + CALLER_MARGIN_S)
            except AgentError as error:
                if error.status == 409 and await self._holds(url, copy):
                    return 0.0  # an earlier attempt that timed out on our side got through
                errors.append(str(error))
                self.on_step("retried", 0.0)
                logger.warning("copy %s of stage %s failed (attempt %s): %s", number, index, attempt, error)
                await asyncio.sleep(self.options.backoff_s * 2**attempt)
                continue
            view.set_slot(target, copy.layer, copy.target_slot, copy.expert, "staged")
            self.on_step("ok", float(answer.bytes))
            return float(answer.bytes)
        raise StepFailed(
            f"copy of layer {copy.layer} expert {copy.expert} to slot {copy.target_slot} "
            f"({self.layout.name(target)}) failed: {errors[-1] if errors else 'no source'}"
        )

    async def _holds(self, url: str, copy: ExpertCopy) -> bool:
        try:
            answer = await self.client.placement(url)
        except AgentError:
            return False
        return any(
            (entry.layer, entry.slot, entry.expert) == (copy.layer, copy.target_slot, copy.expert)
            for entry in answer.slots
        )

    async def _activate(
        self, step: tuple[object, ...], mapping: np.ndarray, skip_hashes: set[str], last: set[int], fatal: bool = True
    ) -> int:
        """Activate ``mapping`` on every agent not already serving one of ``skip_hashes``; ranks in
        ``last`` after all others. Returns the generation used (or the live one when nothing ran)."""
        failed: list[str] = []
        for attempt in range(self.options.retries + 1):
            try:
                view = await self._current() if attempt == 0 else await self._read()
            except StepFailed as error:
                failed = [str(error)]
                await asyncio.sleep(self.options.backoff_s * 2**attempt)
                continue
            pending = [rank for rank in sorted(self.agents) if view.answers[rank].hash not in skip_hashes]
            if not pending:
                return view.max_generation
            generation = view.max_generation + 1
            failed = await self._activate_in_order(step, mapping, generation, attempt, pending, last, view)
            if not failed:
                self.on_step("ok", 0.0)
                return generation
            self.view = None
            self.on_step("retried", 0.0)
            logger.warning("activation %s failed (attempt %s): %s", step, attempt, failed[:2])
            await asyncio.sleep(self.options.backoff_s * 2**attempt)
        message = f"activation {'-'.join(str(part) for part in step)} failed: {'; '.join(failed[:2])}"
        if fatal:
            raise StepFailed(message)
        raise Stalled(message)

    async def _activate_in_order(
        self,
        step: tuple[object, ...],
        mapping: np.ndarray,
        generation: int,
        attempt: int,
        pending: list[int],
        last: set[int],
        view: AgentsView,
    ) -> list[str]:
        """Activate on ``pending`` ranks, those in ``last`` after the others succeeded; the failures."""
        request = activate_request(self.ids(*step, "g", generation, "a", attempt), generation, mapping)
        for group in ([rank for rank in pending if rank not in last], [rank for rank in pending if rank in last]):
            results = await asyncio.gather(
                *(self.client.activate(self.agents[rank], request) for rank in group), return_exceptions=True
            )
            failed = []
            for rank, result in zip(group, results):
                if isinstance(result, BaseException):
                    failed.append(str(result))
                else:
                    view.update(rank, result)
            if failed:
                return failed  # never retire on owners while a router elsewhere may still use the slot
        return []

    async def _undo_stage(
        self, index: int, copies: Sequence[ExpertCopy], prev: np.ndarray, progress: Progress, why: str
    ) -> RunOutcome:
        """Undo a stage whose copies or union activation failed: agents back on ``prev``, staged
        slots retired. Agents that cannot be reached are left as they are (their maps stay valid)."""
        view = await read_agents(self.client, self.agents)
        generation = view.max_generation
        union_hash = placement_hash(union_map(prev, copies))
        on_union = [rank for rank, answer in view.answers.items() if answer.hash == union_hash]
        if on_union:
            generation += 1
            request = activate_request(self.ids("s", index, "undo", "g", generation), generation, prev)
            await asyncio.gather(
                *(self.client.activate(self.agents[rank], request) for rank in on_union), return_exceptions=True
            )
            view = await read_agents(self.client, self.agents)
        calls = []
        for rank in sorted(view.answers):
            for layer, slot, _expert in view.staged(rank):
                request = RetireRequest(request_id=self.ids("s", index, "undo", layer, slot), layer=layer, slot=slot)
                calls.append(self.client.retire(self.agents[rank], request))
        results = await asyncio.gather(*calls, return_exceptions=True)
        self.on_step("rolled_back", 0.0)
        message = f"stage {index + 1} failed and was undone: {why}"
        leftovers = [str(result) for result in results if isinstance(result, BaseException)]
        if leftovers:
            message += f" (retire failed: {leftovers[0]})"
        progress = replace(progress, step="")
        return RunOutcome(RunState.FAILED, prev, max(generation, view.max_generation), progress, message)


async def converge(
    client: AgentClient,
    agents: Mapping[int, str],
    mapping: np.ndarray,
    generation: int,
    view: AgentsView,
    layout: GroupLayout = ONE_GROUP,
) -> list[str]:
    """Bring agents that lag behind the published placement (a restarted agent serving the right map
    at an older generation, or one that missed an activation it holds the weights for) onto it.
    Returns the problems left (agents that refuse: they lack weights and need a migration)."""
    digest = placement_hash(mapping)
    ids = RequestIds("converge")
    problems = []
    for rank, answer in sorted(view.answers.items()):
        if answer.hash == digest and answer.generation == generation:
            continue
        if answer.generation > generation:
            problems.append(f"{layout.name(rank)} serves generation {answer.generation} > published {generation}")
            continue
        try:
            view.update(rank, await client.activate(agents[rank], activate_request(ids("g", generation, "r", rank), generation, mapping)))
        except AgentError as error:
            problems.append(f"{layout.name(rank)}: {error.message or error}")
    return problems


def build_group_status(
    layout: GroupLayout, agents: Mapping[int, str], view: AgentsView, digest: str, generation: int
) -> list[dict[str, int | bool]]:
    """``status.groupStatus`` (camelCase): per group, its agents announced and answering, the lowest
    generation they serve, and whether every one of its ranks serves the map ``digest`` at
    ``generation``."""
    entries = []
    for group in range(layout.groups):
        keys = [layout.key(group, rank) for rank in range(layout.ranks)]
        answers = [view.answers[key] for key in keys if key in view.answers]
        entries.append({
            "index": group,
            "agents": sum(key in agents for key in keys),
            "reachable": len(answers),
            "generation": min((answer.generation for answer in answers), default=0),
            "serving": len(answers) == layout.ranks
            and all(answer.hash == digest and answer.generation == generation for answer in answers),
        })
    return entries
