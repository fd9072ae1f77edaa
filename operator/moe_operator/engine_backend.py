"""Engine backends: SGLang and vLLM move their own expert weights; the operator publishes and waits.

For a deployment whose engine is ``sglang`` or ``vllm`` the operator never copies weights: it
publishes the target map (the placement ConfigMap, mounted into the engine pod), the engine applies
it over its own collective path (``moe_agent.engines.vllm_plugin`` / ``sglang_plugin``), and one
engine sidecar per GPU rank reports what the engine serves on the agents' ``GET /v1/placement``.
``wait_until_live`` polls those answers until every rank serves the target or the deadline passes.

An engine serves every slot, so the map it goes live with is the target with its empty slots filled
(``moe_placement.files.fill_empty_slots``, the same rule the engine side applies); ``engine_map``
is that map and ``EngineWait.expected_hash`` its hash.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from moe_operator.agents import AgentClient, AgentError
from moe_placement.agent_api import PlacementAnswer
from moe_placement.files import fill_empty_slots
from moe_placement.models import Placement, placement_hash

# HTTP statuses that will not heal by waiting: a wrong token, a wrong path.
_FATAL_STATUSES = frozenset({400, 401, 403, 404, 405})


@dataclass(frozen=True)
class EngineLive:
    """Every rank serves the target. ranks: rank -> generation it reports."""

    expected_hash: str
    ranks: dict[int, int]
    seconds: float


@dataclass(frozen=True)
class EngineTimedOut:
    """The deadline passed. lagging: rank -> what it reports instead (its hash, or why no answer)."""

    expected_hash: str
    lagging: dict[int, str]
    seconds: float


@dataclass(frozen=True)
class EngineFailed:
    """A rank answered something waiting cannot fix (bad token, wrong shape of map)."""

    expected_hash: str
    rank: int
    message: str
    seconds: float


EngineOutcome = EngineLive | EngineTimedOut | EngineFailed


def engine_map(target: Placement) -> Placement:
    """The map an engine serves for ``target``: every empty slot filled, [L, G*S]."""
    return fill_empty_slots(target)


@dataclass
class EngineWait:
    """Wait for the engine behind ``agents`` (rank -> sidecar base URL; with ``groups`` > 1 keyed
    ``group * GPUs + rank``, as ``plan_runner.GroupLayout`` keys them) to serve ``target`` in every group."""

    client: AgentClient
    agents: Mapping[int, str]
    target: Placement
    deadline_s: float
    poll_s: float = 0.5
    groups: int = 1
    expected_hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.expected_hash = placement_hash(engine_map(self.target).physical_to_logical_map)

    async def _ask(self, rank: int) -> tuple[int, PlacementAnswer | str]:
        url = self.agents.get(rank)
        if url is None:
            return rank, "not announced"
        try:
            return rank, await self.client.placement(url)
        except AgentError as error:
            if error.status in _FATAL_STATUSES:
                raise _Fatal(rank, str(error)) from None
            return rank, str(error)

    def _check(self, rank: int, answer: PlacementAnswer) -> None:
        shape = (answer.num_layers, answer.num_experts, answer.slots_per_gpu, answer.num_gpus)
        expected = (self.target.num_layers, self.target.num_experts, self.target.slots_per_gpu, self.target.num_gpus)
        if shape != expected:
            raise _Fatal(
                rank,
                f"rank {rank} serves (layers, experts, slots per GPU, GPUs) = {shape}, the target is {expected}",
            )

    async def run(self) -> EngineOutcome:
        start = time.monotonic()
        ranks = range(self.target.num_gpus * self.groups)
        while True:
            try:
                answers = dict(await asyncio.gather(*(self._ask(rank) for rank in ranks)))
                for rank, answer in answers.items():
                    if isinstance(answer, PlacementAnswer):
                        self._check(rank, answer)
            except _Fatal as fatal:
                return EngineFailed(self.expected_hash, fatal.rank, fatal.message, time.monotonic() - start)
            lagging = {
                rank: answer if isinstance(answer, str) else f"serves {answer.hash} (generation {answer.generation})"
                for rank, answer in answers.items()
                if isinstance(answer, str) or answer.hash != self.expected_hash
            }
            elapsed = time.monotonic() - start
            if not lagging:
                generations = {rank: answer.generation for rank, answer in answers.items()}  # type: ignore[union-attr]
                return EngineLive(self.expected_hash, generations, elapsed)
            if elapsed + self.poll_s > self.deadline_s:
                return EngineTimedOut(self.expected_hash, lagging, elapsed)
            await asyncio.sleep(self.poll_s)


class _Fatal(Exception):
    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank
        self.message = message


async def wait_until_live(
    client: AgentClient,
    agents: Mapping[int, str],
    target: Placement,
    deadline_s: float,
    poll_s: float = 0.5,
    groups: int = 1,
) -> EngineOutcome:
    """Poll every rank's ``GET /v1/placement`` until all serve ``engine_map(target)``; see EngineWait."""
    return await EngineWait(client, agents, target, deadline_s, poll_s, groups).run()
