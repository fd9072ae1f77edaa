"""The engine sidecar: one per GPU rank, serving an engine's live map and loads on the agent contract.

``GET /v1/placement`` (bearer token, docs/agent-api.md) answers from ``status-rank<r>.json``, written
by the engine (``vllm_plugin``, ``sglang_plugin`` or the ``standin``); 503 until the engine wrote one.
``/metrics`` exports ``moeplace_expert_tokens_total{rank, layer, expert}`` as the replay agents do
(summed over ranks = the global load) and ``moeplace_placement_generation{rank}``; ``/healthz``.

Loads (``--loads``), polled every ``--interval`` seconds and split over ranks by the live map
(``contract.split_by_rank``):

* ``vllm``: this rank's ``loads-rank<r>.json`` (global, cumulative); this sidecar exports its share.
* ``sglang-dumps``: SGLang writes recorder dumps on rank 0's node only, so the rank-0 sidecar asks
  for one (``POST <sglang-url>/dump_expert_distribution_record``), reads and deletes the dumps, and
  exports every rank's share; the other sidecars run with ``--loads none``.

Requests that match no route are logged (method and path), so a caller that takes the sidecar for a
replay agent (a stage or activate call) shows in its log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from moe_agent.engines import contract
from moe_agent.tokens import TokenSource
from moe_placement.agent_api import ErrorAnswer
from moe_placement.models import Placement, PlacementError

logger = logging.getLogger("moeplace.sidecar")

LOAD_SOURCES = ("none", "vllm", "sglang-dumps")


def error_response(status: int, message: str) -> web.Response:
    """The agents' error body: ``{"error": "<field or thing>: <problem>"}``."""
    return web.json_response(ErrorAnswer(error=message).model_dump(), status=status)


class _ExpertTokens(Collector):
    """``moeplace_expert_tokens_total`` for every (rank, layer, expert) with a count."""

    def __init__(self, sidecar: EngineSidecar):
        self._sidecar = sidecar

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "moeplace_expert_tokens",
            "(token, choice) pairs this rank's slots served, per expert",
            labels=["rank", "layer", "expert"],
        )
        with self._sidecar.lock:
            counts = None if self._sidecar.counts is None else self._sidecar.counts.copy()
        if counts is not None:
            for index, layer, expert in zip(*np.nonzero(counts)):
                rank = self._sidecar.exported_ranks[index]
                family.add_metric([str(rank), str(layer), str(expert)], float(counts[index, layer, expert]))
        yield family


class EngineSidecar:
    """The HTTP app and load poller of one rank's sidecar.

    counts: [R, L, E] cumulative (token, choice) pairs of the exported ranks (``exported_ranks``).
    """

    def __init__(
        self,
        rank: int,
        tokens: TokenSource,
        placement_dir: Path,
        engine_dir: Path,
        loads: str = "none",
        sglang_url: str | None = None,
    ):
        if loads not in LOAD_SOURCES:
            raise ValueError(f"loads: {loads!r} is not one of {', '.join(LOAD_SOURCES)}")
        self.rank = rank
        self.tokens = tokens
        self.placement_dir = placement_dir
        self.engine_dir = engine_dir
        self.loads = loads
        self.sglang_url = sglang_url.rstrip("/") if sglang_url else None
        self.lock = threading.Lock()
        self.counts: np.ndarray | None = None
        self.exported_ranks: list[int] = []
        self._last_total: np.ndarray | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ExpertTokens(self))
        self._generation = Gauge(
            "moeplace_placement_generation", "live placement generation", ["rank"], registry=self.registry
        ).labels(str(rank))
        self.app = web.Application(middlewares=[self._auth])
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
                web.get("/v1/placement", self.placement),
            ]
        )

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        unrouted = request.match_info.http_exception
        if unrouted is not None:
            logger.warning("moeplace sidecar: rank %d: no route for %s %s", self.rank, request.method, request.path)
            return error_response(
                unrouted.status, f"{request.path}: an engine sidecar serves GET /v1/placement, /metrics and /healthz only"
            )
        if request.path.startswith("/v1/") and not self.tokens.accepts(request.headers.get("Authorization")):
            return error_response(401, "authorization: missing or wrong bearer token")
        return await handler(request)

    def answer(self) -> contract.PlacementAnswer | None:
        """This rank's ``/v1/placement`` answer, or None before the engine reported a live map."""
        status = contract.read_status(self.engine_dir, self.rank)
        published = contract.read_published(self.placement_dir)
        if status is None or published is None:
            return None
        self._generation.set(status.generation)
        return contract.placement_answer(status, published.model, published.topology)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "rank": self.rank})

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def placement(self, _request: web.Request) -> web.Response:
        try:
            answer = await asyncio.to_thread(self.answer)
        except PlacementError as error:
            return error_response(503, str(error))
        if answer is None:
            return error_response(503, f"engine: rank {self.rank} has not reported a live map yet")
        return web.json_response(answer.model_dump())

    # -- loads -----------------------------------------------------------------------------------

    def add_load(self, load: np.ndarray, live: Placement, ranks: list[int]) -> None:
        """Add a global load [L, E] split over the live placement; keep the shares of ``ranks``."""
        shares = contract.split_by_rank(load, live)[ranks]
        with self.lock:
            if self.counts is None or self.counts.shape != shares.shape:
                self.counts = np.zeros_like(shares)
                self.exported_ranks = list(ranks)
            self.counts += shares

    def poll_loads(self) -> None:
        """Read what the engine wrote since the last poll and add it."""
        if self.loads == "none":
            return
        published = contract.read_published(self.placement_dir)
        status = contract.read_status(self.engine_dir, self.rank)
        if published is None or status is None:
            return
        live = Placement(np.asarray(status.physical_to_logical_map), published.model.num_experts,
                         published.topology.slots_per_gpu)
        if self.loads == "vllm":
            loads = contract.read_loads(self.engine_dir, self.rank)
            if loads is None:
                return
            total = np.asarray(loads.expert_tokens_total, dtype=np.float64)
            last = self._last_total
            delta = total if last is None or last.shape != total.shape else total - last
            self._last_total = total
            if (delta < 0).any():  # the engine restarted: its totals start again
                delta = total
            if delta.any():
                self.add_load(delta, live, [self.rank])
        else:
            load = contract.read_sglang_dumps(self.engine_dir, published.model)
            if load is not None:
                self.add_load(load, live, list(range(published.topology.num_gpus)))

    async def request_dump(self, session: aiohttp.ClientSession) -> None:
        """Ask SGLang to dump what its recorder counted since the last dump (the dump resets it).

        Never ``/start_expert_distribution_record``: it resets the recorder too (``start_record`` in
        ``sglang/srt/eplb/expert_distribution.py``), and with ``--enable-eplb`` the EPLB manager has
        started recording already.
        """
        async with session.post(self.sglang_url + "/dump_expert_distribution_record") as response:
            response.raise_for_status()

    async def poll_forever(self, interval_s: float) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            while True:
                try:
                    if self.loads == "sglang-dumps" and self.sglang_url:
                        await self.request_dump(session)
                    await asyncio.to_thread(self.poll_loads)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, PlacementError) as error:
                    logger.warning("moeplace sidecar: loads: %s", error)
                await asyncio.sleep(interval_s)


async def start(sidecar: EngineSidecar, host: str, port: int) -> web.AppRunner:
    """Serve ``sidecar`` on host:port; the caller cleans the runner up."""
    runner = web.AppRunner(sidecar.app, access_log=None, shutdown_timeout=1.0)  # GETs only: nothing to drain
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, required=True, help="global GPU rank this sidecar reports")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, help=f"bearer token file (else ${'MOEPLACE_AGENT_TOKEN'})")
    parser.add_argument("--placement-dir", type=Path, default=None,
                        help=f"the mounted placement ConfigMap (default ${contract.PLACEMENT_DIR_ENV} or "
                             f"{contract.DEFAULT_PLACEMENT_DIR})")
    parser.add_argument("--engine-dir", type=Path, default=None,
                        help=f"directory shared with the engine (default ${contract.ENGINE_DIR_ENV} or "
                             f"{contract.DEFAULT_ENGINE_DIR})")
    parser.add_argument("--loads", choices=LOAD_SOURCES, default="none")
    parser.add_argument("--sglang-url", help="SGLang's HTTP server, for --loads sglang-dumps")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between load polls")


def run(args: argparse.Namespace) -> int:
    sidecar = EngineSidecar(
        args.rank, TokenSource.from_env_or_file(args.token_file),
        args.placement_dir or contract.placement_dir(), args.engine_dir or contract.engine_dir(),
        args.loads, args.sglang_url,
    )

    async def serve() -> None:
        runner = await start(sidecar, args.host, args.port)
        print(f"moe_agent.engines: rank {args.rank} sidecar on http://{args.host}:{runner.addresses[0][1]} "
              f"(loads: {args.loads})", file=sys.stderr, flush=True)
        finished = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, finished.set)
        poller = asyncio.create_task(sidecar.poll_forever(args.interval))
        try:
            await finished.wait()
        finally:
            poller.cancel()
            await runner.cleanup()

    asyncio.run(serve())
    return 0
