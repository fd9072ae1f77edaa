"""The agent's state machine: the live placement generation, staging, retiring and activation.

Transport-agnostic: the HTTP server (``moe_agent.server``) calls these methods and turns
``AgentError`` into its status code. Every method runs on the server's event loop thread; the replay
engine, in its own thread, only reads ``AgentCore.live``, an immutable view swapped in one assignment
on activation, so a replay step never sees half a placement.

Shapes: L layers, E experts, N = G*S slots, S slots of this rank.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch

from moe_placement.agent_api import PlacementAnswer, RetireAnswer, SlotEntry, StageAnswer
from moe_placement.models import ModelShape, Placement, PlacementError, Topology, placement_hash
from moe_agent.metrics import AgentMetrics
from moe_agent.recorder import RoutingRecorder
from moe_agent.router import TorchLayout
from moe_agent.store import ExpertStore, ExpertWeights, Slot, SlotBusy, WeightsError


@dataclass(frozen=True)
class Fetched:
    """An expert's bytes as received, the sha256 its source vouches for, and the sha256 of what
    arrived (computed while receiving, so verifying costs no second pass over the bytes)."""

    data: bytes
    expected_sha256: str
    sha256: str


Fetch = Callable[[], Awaitable[Fetched]]


class AgentError(Exception):
    """A refused call: HTTP status and ``<field or thing>: <problem>``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class LiveView:
    """The live placement as the replay engine reads it.

    slot_weights[l][i]: weights of this rank's i-th slot of layer l when live, else None;
    hosted [L, E]: experts with a live slot on this rank.
    """

    generation: int
    placement: Placement
    hash: str
    layout: TorchLayout
    slot_weights: tuple[tuple[ExpertWeights | None, ...], ...]
    hosted: np.ndarray


class AgentCore:
    """One rank's placement state, expert store and metrics."""

    def __init__(
        self,
        shape: ModelShape,
        topology: Topology,
        rank: int,
        store: ExpertStore,
        placement: Placement,
        recorder: RoutingRecorder,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 <= rank < topology.num_gpus:
            raise PlacementError(f"rank: {rank} not in 0..{topology.num_gpus - 1}")
        placement.check_topology(shape, topology)
        self.shape = shape
        self.topology = topology
        self.rank = rank
        self.store = store
        self.recorder = recorder
        self.device = torch.device(device)
        for layer, slot, _ in store.items():
            expert = int(placement.physical_to_logical_map[layer, slot])
            if expert >= 0:
                store.load_live(layer, slot, expert)
        self.live = self._view(0, placement)
        self.metrics = AgentMetrics(
            rank, shape.num_layers, shape.num_experts, lambda: self.live.hosted, recorder.window_age_seconds,
            lambda: recorder.hook_errors,
        )
        self._publish()

    # -- views -----------------------------------------------------------------------------------

    def _view(self, generation: int, placement: Placement) -> LiveView:
        slot_weights = []
        hosted = np.zeros((self.shape.num_layers, self.shape.num_experts), dtype=bool)
        for layer in range(self.shape.num_layers):
            row = []
            for index in range(self.store.slots_per_gpu):
                entry = self.store.slot(layer, self.store.first_slot + index)
                live = entry.state == "live"
                row.append(entry.weights if live else None)
                if live:
                    hosted[layer, entry.expert] = True
            slot_weights.append(tuple(row))
        return LiveView(
            generation=generation,
            placement=placement,
            hash=placement_hash(placement.physical_to_logical_map),
            layout=TorchLayout.from_placement(placement, self.topology, self.device),
            slot_weights=tuple(slot_weights),
            hosted=hosted,
        )

    def _publish(self) -> None:
        self.metrics.set_placement(self.live.generation, self.store.occupancy())

    def placement_answer(self) -> PlacementAnswer:
        """The body of ``GET /v1/placement``."""
        live = self.live
        return PlacementAnswer(
            rank=self.rank,
            generation=live.generation,
            hash=live.hash,
            num_layers=self.shape.num_layers,
            num_experts=self.shape.num_experts,
            slots_per_gpu=self.topology.slots_per_gpu,
            num_gpus=self.topology.num_gpus,
            physical_to_logical_map=live.placement.physical_to_logical_map.tolist(),
            slots=[
                SlotEntry(layer=layer, slot=slot, expert=entry.expert, state=entry.state)
                for layer, slot, entry in self.store.items()
                if entry.state != "empty"
            ],
            retired=[
                SlotEntry(layer=layer, slot=slot, expert=entry.expert, state="empty")
                for layer, slot, entry in self.store.retired()
            ],
        )

    def collect(self, retired_grace_seconds: float, staged_ttl_seconds: float) -> int:
        """Expire retired weights and orphan staged slots (see ``ExpertStore.collect``)."""
        dropped = self.store.collect(retired_grace_seconds, staged_ttl_seconds)
        if dropped:
            self.metrics.staged_collected(dropped)
            self._publish()
        return dropped

    # -- checks ----------------------------------------------------------------------------------

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.shape.num_layers:
            raise AgentError(404, f"layer: {layer} not in 0..{self.shape.num_layers - 1}")

    def check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.shape.num_experts:
            raise AgentError(404, f"expert: {expert} not in 0..{self.shape.num_experts - 1}")

    def check_slot(self, slot: int) -> None:
        if not self.store.owns(slot):
            first = self.store.first_slot
            raise AgentError(
                404, f"slot: {slot} is not a slot of rank {self.rank} ({first}..{first + self.store.slots_per_gpu - 1})"
            )

    def slot_holding(self, layer: int, expert: int) -> Slot:
        """A live (else staged) slot of this rank holding the expert; 404 when there is none."""
        self.check_layer(layer)
        self.check_expert(expert)
        entry = self.store.holding(layer, expert)
        if entry is None:
            raise AgentError(404, f"expert: {expert} of layer {layer} is not held by rank {self.rank}")
        return entry

    # -- migration steps -------------------------------------------------------------------------

    async def stage(
        self, layer: int, slot: int, expert: int, fetch: Fetch, timeout_seconds: float | None = None
    ) -> StageAnswer:
        """Pull an expert into an empty slot of this rank and keep it staged once verified.

        Whatever goes wrong (the source fails or vanishes, the bytes do not match their sha256 or
        are not this model's expert, ``timeout_seconds`` passes) the slot ends empty: nothing
        half-staged, nothing live.
        """
        self.check_layer(layer)
        self.check_expert(expert)
        self.check_slot(slot)
        try:
            self.store.reserve(layer, slot)
        except SlotBusy as error:
            raise AgentError(409, str(error)) from None
        started = time.monotonic()
        try:
            try:
                fetched = await asyncio.wait_for(fetch(), timeout_seconds)
            except TimeoutError:
                raise AgentError(
                    504, f"timeout_seconds: the copy took longer than {timeout_seconds}s; slot {slot} stays empty"
                ) from None
            if fetched.sha256 != fetched.expected_sha256:
                raise AgentError(
                    502,
                    f"sha256: mismatch (received {fetched.sha256}, source says {fetched.expected_sha256}); "
                    f"slot {slot} stays empty",
                )
            try:
                weights = self.store.parse_weights(fetched.data)
            except WeightsError as error:
                raise AgentError(502, f"weights: {error}; slot {slot} stays empty") from None
            self.store.stage(layer, slot, expert, weights, fetched.sha256)
        finally:
            self.store.release(layer, slot)
        self._publish()
        return StageAnswer(
            layer=layer,
            slot=slot,
            expert=expert,
            state="staged",
            bytes=len(fetched.data),
            sha256=fetched.sha256,
            seconds=round(time.monotonic() - started, 6),
        )

    def retire(self, layer: int, slot: int) -> RetireAnswer:
        """Drop a staged slot's weights (rollback of an abandoned copy)."""
        self.check_layer(layer)
        self.check_slot(slot)
        entry = self.store.slot(layer, slot)
        if entry.state != "staged":
            hint = " (a live slot is retired by activating a map without it)" if entry.state == "live" else ""
            raise AgentError(409, f"slot: {slot} of layer {layer} is {entry.state}, not staged{hint}")
        expert = entry.expert
        self.store.drop(layer, slot)
        self._publish()
        return RetireAnswer(layer=layer, slot=slot, expert=expert, state="empty")

    def activate(self, generation: int, physical_to_logical_map: list[list[int]]) -> PlacementAnswer:
        """Make a new map live (two-phase: its slots on this rank must hold live or staged weights
        of the expert the map gives them, or retired weights of it still in their grace period).
        Slots whose expert changes or becomes -1 are retired: dropped, their weights kept for the
        grace period, so activating the previous map again undoes this one."""
        live = self.live
        placement = self._parse_map(physical_to_logical_map)
        mapping = placement.physical_to_logical_map
        same_map = np.array_equal(mapping, live.placement.physical_to_logical_map)
        if generation < live.generation or (generation == live.generation and not same_map):
            raise AgentError(
                409, f"generation: {generation} is stale (live generation {live.generation}, hash {live.hash})"
            )
        if generation == live.generation:
            return self.placement_answer()
        keep, drop = self._slots_for(mapping)
        for layer, slot, entry in keep:
            if entry.state == "staged":
                self.store.set_live(layer, slot)
        for layer, slot, entry in drop:
            if entry.state != "empty":
                self.store.drop(layer, slot, keep=True)
        self.live = self._view(generation, placement)
        self._publish()
        return self.placement_answer()

    def _parse_map(self, physical_to_logical_map: list[list[int]]) -> Placement:
        """The map [L, N] as a placement of this model and topology; 400 naming the problem."""
        mapping = np.asarray(physical_to_logical_map, dtype=np.int64)
        expected = (self.shape.num_layers, self.topology.num_slots)
        if mapping.shape != expected:
            raise AgentError(400, f"physical_to_logical_map: shape {list(mapping.shape)}, expected {list(expected)}")
        try:
            return Placement(mapping, self.shape.num_experts, self.topology.slots_per_gpu)
        except PlacementError as error:
            raise AgentError(400, str(error)) from None

    def _slots_for(self, mapping: np.ndarray) -> tuple[list[tuple[int, int, Slot]], list[tuple[int, int, Slot]]]:
        """This rank's slots the map keeps and those it drops; 409 when a kept slot lacks its
        expert's weights (retired weights of it are restored first)."""
        keep, drop = [], []
        for layer, slot, entry in self.store.items():
            wanted = int(mapping[layer, slot])
            if wanted < 0:
                drop.append((layer, slot, entry))
                continue
            if entry.state == "empty" and self.store.restore(layer, slot, wanted):
                entry = self.store.slot(layer, slot)
            if entry.expert != wanted or entry.state == "empty":
                held = f"expert {entry.expert} ({entry.state})" if entry.state != "empty" else "nothing"
                raise AgentError(
                    409,
                    f"physical_to_logical_map: layer {layer} slot {slot} needs expert {wanted}, "
                    f"rank {self.rank} holds {held} there",
                )
            keep.append((layer, slot, entry))
        return keep, drop
