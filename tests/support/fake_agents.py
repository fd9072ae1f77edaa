"""In-process fake agents speaking docs/agent-api.md, for the operator's unit tests.

Each fake keeps its rank's slots (empty / staged / live) and the live map; ``stage`` pulls from the
peer's weights endpoint (so a dead peer fails the copy with 502) within the request's
``timeout_seconds`` (504 past it, the slot left empty), ``activate`` refuses (409) a map that puts an
expert in one of its slots without that expert's weights (staged, live, or retired by an earlier
activation: those are restored). Bodies are parsed with the real request models and mutating calls go
through the real agent's ``RequestLog``: a repeated id gets the first answer, a reused id with another
body is a 409, failures are not remembered. ``FakeCluster.check`` asserts, after every state change,
that every expert keeps at least one live replica over all agents; violations are collected in
``violations``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from pydantic import BaseModel, ValidationError

from moe_agent.server import RequestLog, body_fingerprint
from moe_placement.agent_api import ActivateRequest, RetireRequest, StageRequest
from moe_placement.models import format_validation_error, placement_hash

TOKEN = "test-token"


class FakeAgent:
    def __init__(self, cluster: FakeCluster, rank: int, mapping: np.ndarray) -> None:
        self.cluster = cluster
        self.rank = rank
        self.map = np.array(mapping, dtype=np.int64)
        self.generation = 0
        S = cluster.slots_per_gpu
        self.slots: dict[tuple[int, int], tuple[int, str]] = {}
        for layer in range(self.map.shape[0]):
            for slot in range(rank * S, rank * S + S):
                if self.map[layer, slot] >= 0:
                    self.slots[(layer, slot)] = (int(self.map[layer, slot]), "live")
        self.requests = RequestLog()
        self.retired: dict[tuple[int, int], int] = {}
        self.reserved: set[tuple[int, int]] = set()
        self.fail_stage: int = 0  # fail this many stage calls with 502
        self.stage_delay: float = 0.0  # seconds each copy takes (a long one meets the request's timeout)
        self.alive = True
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.calls: list[str] = []
        self.peers: list[str] = []  # the source peer of every copy it ran

    def answer(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "generation": self.generation,
            "hash": placement_hash(self.map),
            "num_layers": int(self.map.shape[0]),
            "num_experts": self.cluster.num_experts,
            "slots_per_gpu": self.cluster.slots_per_gpu,
            "num_gpus": self.cluster.num_gpus,
            "physical_to_logical_map": self.map.tolist(),
            "slots": [
                {"layer": layer, "slot": slot, "expert": expert, "state": state}
                for (layer, slot), (expert, state) in sorted(self.slots.items())
            ],
        }

    def _auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized(text=json.dumps({"error": "token"}), content_type="application/json")

    def _error(self, status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    def _owns(self, slot: int) -> bool:
        S = self.cluster.slots_per_gpu
        return self.rank * S <= slot < self.rank * S + S

    async def placement(self, request: web.Request) -> web.Response:
        self._auth(request)
        return web.json_response(self.answer())

    async def stats(self, request: web.Request) -> web.Response:
        self._auth(request)
        L, E = self.map.shape[0], self.cluster.num_experts
        return web.json_response(
            {
                "rank": self.rank, "window_seconds": 10, "tokens": 100, "num_layers": L, "num_experts": E,
                "load": np.ones((L, E)).tolist(),
                "transitions": {"layer": [0], "first": [0], "second": [1], "count": [5]},
                "coactivation": {"layer": [0], "first": [0], "second": [1], "count": [3]},
            }
        )

    async def weights(self, request: web.Request) -> web.Response:
        self._auth(request)
        layer, expert = int(request.match_info["layer"]), int(request.match_info["expert"])
        for (l, _), (e, state) in self.slots.items():
            if l == layer and e == expert and state in ("live", "staged"):
                return web.Response(body=b"w" * 16, headers={"X-Moeplace-Sha256": "x"})
        return self._error(404, f"expert: {expert} of layer {layer} not held")

    async def _idempotent(self, request: web.Request, kind: str, model: type[BaseModel], fn: Any) -> web.Response:
        try:
            body = model.model_validate(await request.json())
        except ValidationError as error:
            return self._error(400, format_validation_error(error))
        status, answer = await self.requests.run(body.request_id, body_fingerprint(kind, body), lambda: fn(body))
        return web.json_response(answer, status=status)

    async def stage(self, request: web.Request) -> web.Response:
        self._auth(request)
        self.calls.append("stage")

        async def copy(body: StageRequest) -> tuple[int, Any]:
            layer, slot, expert = body.layer, body.slot, body.expert
            if self.fail_stage > 0:
                self.fail_stage -= 1
                return 502, {"error": "peer: injected failure"}
            self.peers.append(body.source.peer)
            await asyncio.sleep(self.stage_delay)
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.get(
                        f"{body.source.peer}/v1/experts/{layer}/{expert}/weights",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=aiohttp.ClientTimeout(total=2),
                    ) as response:
                        if response.status != 200:
                            return 502, {"error": f"peer: HTTP {response.status}"}
                        await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                return 502, {"error": f"peer: {error}"}
            return 200, None

        async def run(body: StageRequest) -> tuple[int, Any]:
            layer, slot, expert = body.layer, body.slot, body.expert
            if not self._owns(slot):
                return 404, {"error": f"slot: {slot} not this rank's"}
            if (layer, slot) in self.slots or (layer, slot) in self.reserved:
                return 409, {"error": f"slot: {slot} not free"}
            self.reserved.add((layer, slot))
            try:
                status, error = await asyncio.wait_for(copy(body), body.timeout_seconds)
            except TimeoutError:
                return 504, {"error": f"timeout_seconds: copy took longer than {body.timeout_seconds}s"}
            finally:
                self.reserved.discard((layer, slot))
            if status != 200:
                return status, error
            self.slots[(layer, slot)] = (expert, "staged")
            self.cluster.check()
            answer = {"layer": layer, "slot": slot, "expert": expert, "state": "staged", "bytes": 1000,
                      "sha256": "x", "seconds": 0.0}
            return 200, answer

        return await self._idempotent(request, "stage", StageRequest, run)

    async def retire(self, request: web.Request) -> web.Response:
        self._auth(request)
        self.calls.append("retire")

        async def run(body: RetireRequest) -> tuple[int, Any]:
            key = (body.layer, body.slot)
            held = self.slots.get(key)
            if held is None or held[1] == "live":
                return 409, {"error": f"slot: {body.slot} of layer {body.layer} is not staged"}
            del self.slots[key]
            return 200, {"layer": key[0], "slot": key[1], "expert": held[0], "state": "empty"}

        return await self._idempotent(request, "retire", RetireRequest, run)

    async def activate(self, request: web.Request) -> web.Response:
        self._auth(request)
        self.calls.append("activate")

        async def run(body: ActivateRequest) -> tuple[int, Any]:
            generation = body.generation
            mapping = np.asarray(body.physical_to_logical_map, dtype=np.int64)
            if generation == self.generation and np.array_equal(mapping, self.map):
                return 200, self.answer()
            if generation <= self.generation:
                return 409, {"error": f"generation: {generation} <= live {self.generation}"}
            S = self.cluster.slots_per_gpu
            for layer in range(mapping.shape[0]):
                for slot in range(self.rank * S, self.rank * S + S):
                    expert = int(mapping[layer, slot])
                    if expert >= 0 and (layer, slot) not in self.slots and self.retired.get((layer, slot)) == expert:
                        self.slots[(layer, slot)] = (self.retired.pop((layer, slot)), "staged")
                    if expert >= 0 and self.slots.get((layer, slot), (-2, ""))[0] != expert:
                        return 409, {"error": f"physical_to_logical_map: slot {slot} needs expert {expert}"}
            for layer in range(mapping.shape[0]):
                for slot in range(self.rank * S, self.rank * S + S):
                    expert = int(mapping[layer, slot])
                    if expert < 0:
                        held = self.slots.pop((layer, slot), None)
                        if held is not None and held[1] == "live":
                            self.retired[(layer, slot)] = held[0]
                    else:
                        self.slots[(layer, slot)] = (expert, "live")
            self.map = mapping
            self.generation = generation
            self.cluster.check()
            return 200, self.answer()

        return await self._idempotent(request, "activate", ActivateRequest, run)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/placement", self.placement)
        app.router.add_get("/v1/stats", self.stats)
        app.router.add_get("/v1/experts/{layer}/{expert}/weights", self.weights)
        app.router.add_post("/v1/experts/stage", self.stage)
        app.router.add_post("/v1/experts/retire", self.retire)
        app.router.add_post("/v1/placement/activate", self.activate)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self.alive = True

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        self.alive = False


class FakeCluster:
    def __init__(self, mapping: np.ndarray, num_experts: int, slots_per_gpu: int) -> None:
        self.num_experts = num_experts
        self.slots_per_gpu = slots_per_gpu
        self.num_gpus = mapping.shape[1] // slots_per_gpu
        self.num_layers = mapping.shape[0]
        self.agents = [FakeAgent(self, rank, mapping) for rank in range(self.num_gpus)]
        self.violations: list[str] = []

    def check(self) -> None:
        counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for agent in self.agents:
            if not agent.alive:
                return
            for (layer, _), (expert, state) in agent.slots.items():
                if state == "live":
                    counts[layer, expert] += 1
        missing = np.argwhere(counts == 0)
        if len(missing):
            self.violations.append(f"experts without a live replica: {missing[:5].tolist()}")
        for agent in self.agents:
            row_counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
            for layer in range(self.num_layers):
                experts = agent.map[layer][agent.map[layer] >= 0]
                np.add.at(row_counts[layer], experts, 1)
            if (row_counts == 0).any():
                self.violations.append(f"rank {agent.rank} serves a map without some expert")

    @property
    def urls(self) -> dict[int, str]:
        return {agent.rank: agent.url for agent in self.agents}

    async def start(self) -> None:
        for agent in self.agents:
            await agent.start()

    async def stop(self) -> None:
        for agent in self.agents:
            if agent.alive:
                await agent.stop()

    def maps(self) -> set[str]:
        return {placement_hash(agent.map) for agent in self.agents}
