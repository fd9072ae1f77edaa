"""A stand-in engine process: speaks the engine contract exactly, moves nothing.

It does what ``vllm_plugin`` and ``sglang_plugin`` do inside a real engine, with a delay instead of
a weight move: it reads the published placement (``contract.read_published``), and ``--move-delay``
seconds after a new map appears it writes every rank's ``status-rank<r>.json`` with that map live;
one real engine sidecar per rank (``sidecar.EngineSidecar``) serves ``GET /v1/placement`` from
those files. The first map it finds goes live at once (an engine started with it). Ranks in
``--lagging-ranks`` never take a new map (a rank whose move hangs).

With ``--sglang-port`` it also plays SGLang's load reporting: its traffic (``--tokens-per-second``,
each token to topK experts of every MoE layer, by a skewed popularity that switches to another
every ``--load-shift-seconds``) is counted per logical expert, ``POST /dump_expert_distribution_record``
on that port writes the counts since the last dump as a stat-mode recorder dump into the engine
directory (``SglangRecorder``), and rank 0's sidecar runs ``--loads sglang-dumps`` against it, as in
an SGLang pod.

It prints one JSON line on stdout when serving: ``{"ports": {rank: port}, "sglang_port": port or null}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
from aiohttp import web

from moe_agent.engines import contract
from moe_agent.engines.sidecar import EngineSidecar, start
from moe_agent.tokens import TokenSource
from moe_placement.models import ModelShape, PlacementError

POPULARITY_SKEW = 1.5


class SglangRecorder:
    """SGLang's stat-mode expert distribution recorder, for the stand-in's traffic.

    counts: [num_hidden_layers, E] (token, choice) pairs per logical expert since the last dump (dense
    layers' rows stay 0). Popularity phase p of layer l: a Zipf law (exponent POPULARITY_SKEW) over a
    permutation of the experts drawn from seed + p; the phase is ``(elapsed // shift_seconds) % 2``.
    """

    def __init__(self, engine_dir: Path, tokens_per_second: float, shift_seconds: float, started: float,
                 seed: int = 0):
        self.engine_dir = engine_dir
        self.tokens_per_second = tokens_per_second
        self.shift_seconds = shift_seconds
        self.seed = seed
        self.started = started
        self.last = started
        self.counts: np.ndarray | None = None
        self.dumps = 0

    def popularity(self, model: ModelShape, phase: int) -> np.ndarray:
        """[L, E] share of each expert in a layer's choices (rows sum to 1)."""
        rng = np.random.default_rng(self.seed + phase)
        weights = 1.0 / np.arange(1, model.num_experts + 1) ** POPULARITY_SKEW
        rows = np.stack([rng.permutation(weights) for _ in range(model.num_layers)])
        return rows / rows.sum(axis=1, keepdims=True)

    def advance(self, model: ModelShape, now: float) -> None:
        """Count the traffic from the last call to ``now`` (``time.monotonic()``), all of it at the
        popularity of ``now``'s phase (the engine loop calls this every few hundredths of a second)."""
        elapsed, self.last = now - self.last, now
        phase = int((now - self.started) // self.shift_seconds) % 2 if self.shift_seconds > 0 else 0
        if self.counts is None or self.counts.shape != (model.num_hidden_layers, model.num_experts):
            self.counts = np.zeros((model.num_hidden_layers, model.num_experts))
        choices = self.tokens_per_second * elapsed * model.top_k
        self.counts[model.moe_layer_ids()] += choices * self.popularity(model, phase)

    def dump(self) -> None:
        """Write the counts since the last dump as ``_StatAccumulator.dump`` does (rank 0, file mode):
        ``torch.save(dict(rank, logical_count [buffered steps = 1, num_hidden_layers, E] int32,
        average_utilization_rate_over_window))`` to ``expert_distribution_recorder_<time>.pt``."""
        import torch  # only when SGLang's recorder is played: the stand-in runs in the agent's environment

        if self.counts is None:
            return
        whole = np.floor(self.counts)
        self.counts -= whole  # the fractions carry over to the next dump
        dump = {"rank": 0, "logical_count": torch.from_numpy(whole[None].astype(np.int32)),
                "average_utilization_rate_over_window": None}
        self.engine_dir.mkdir(parents=True, exist_ok=True)
        torch.save(dump, self.engine_dir / f"expert_distribution_recorder_{time.time()}.pt")
        self.dumps += 1

    def app(self) -> web.Application:
        """SGLang's two recorder endpoints (``sglang/srt/entrypoints/http_server.py``)."""

        async def dump(_request: web.Request) -> web.Response:
            self.dump()
            return web.Response(text="Dump expert distribution record.\n")

        async def start_record(_request: web.Request) -> web.Response:
            self.counts = None  # SGLang's start_record resets the recorder
            return web.Response(text="Start recording the expert distribution.\n")

        app = web.Application()
        for path, handler in (("/dump_expert_distribution_record", dump),
                              ("/start_expert_distribution_record", start_record)):
            app.add_routes([web.get(path, handler), web.post(path, handler)])
        return app


class StandinEngine:
    """The move loop: published map -> (after the delay) every rank's status."""

    def __init__(self, placement_dir: Path, engine_dir: Path, num_ranks: int, move_delay_s: float,
                 lagging_ranks: frozenset[int] = frozenset(), recorder: SglangRecorder | None = None):
        self.placement_dir = placement_dir
        self.engine_dir = engine_dir
        self.num_ranks = num_ranks
        self.move_delay_s = move_delay_s
        self.lagging_ranks = lagging_ranks
        self.recorder = recorder
        self.live_hash: str | None = None
        self.moves = 0

    def go_live(self, published: contract.PublishedMap, ranks: range | list[int]) -> None:
        for rank in ranks:
            contract.write_status(self.engine_dir, contract.EngineStatus.of(
                "standin", rank, published.generation, "published", published.target.physical_to_logical_map))

    async def run(self, poll_s: float = 0.05) -> None:
        while True:
            try:
                published = contract.read_published(self.placement_dir)
            except PlacementError:
                published = None  # a half-written update: read again
            if published is not None and self.recorder is not None:
                self.recorder.advance(published.model, time.monotonic())
            if published is not None and published.hash != self.live_hash:
                if self.live_hash is None:
                    self.go_live(published, range(self.num_ranks))
                else:
                    await asyncio.sleep(self.move_delay_s)
                    self.go_live(published, [r for r in range(self.num_ranks) if r not in self.lagging_ranks])
                    self.moves += 1
                self.live_hash = published.hash
            await asyncio.sleep(poll_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--placement-dir", type=Path, required=True)
    parser.add_argument("--engine-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports", required=True, help="one port per rank, comma-separated (0: any free port)")
    parser.add_argument("--token-file", type=Path, help="bearer token file (else $MOEPLACE_AGENT_TOKEN)")
    parser.add_argument("--move-delay", type=float, default=1.0, help="seconds a move takes")
    parser.add_argument("--lagging-ranks", default="", help="ranks that never take a new map, comma-separated")
    parser.add_argument("--sglang-port", type=int, default=None,
                        help="play SGLang's recorder endpoints on this port (0: any free port); rank 0's "
                             "sidecar reads its dumps")
    parser.add_argument("--tokens-per-second", type=float, default=1000.0, help="the traffic SGLang's recorder counts")
    parser.add_argument("--load-shift-seconds", type=float, default=0.0,
                        help="switch between two expert popularities this often (0: never)")
    parser.add_argument("--load-interval", type=float, default=1.0, help="seconds between rank 0's sidecar's dumps")


def run(args: argparse.Namespace) -> int:
    ports = [int(port) for port in args.ports.split(",") if port.strip()]
    lagging = frozenset(int(rank) for rank in args.lagging_ranks.split(",") if rank.strip())
    tokens = TokenSource.from_env_or_file(args.token_file)
    recorder = None
    if args.sglang_port is not None:
        recorder = SglangRecorder(args.engine_dir, args.tokens_per_second, args.load_shift_seconds, time.monotonic())
    engine = StandinEngine(args.placement_dir, args.engine_dir, len(ports), args.move_delay, lagging, recorder)

    async def serve() -> None:
        runners, tasks = [], []
        sglang_port = None
        if recorder is not None:
            sglang = web.AppRunner(recorder.app(), access_log=None)
            await sglang.setup()
            await web.TCPSite(sglang, args.host, args.sglang_port).start()
            runners.append(sglang)
            sglang_port = sglang.addresses[0][1]
        bound = {}
        for rank, port in enumerate(ports):
            if rank == 0 and sglang_port is not None:
                sidecar = EngineSidecar(rank, tokens, args.placement_dir, args.engine_dir, "sglang-dumps",
                                        f"http://{args.host}:{sglang_port}")
                tasks.append(asyncio.create_task(sidecar.poll_forever(args.load_interval)))
            else:
                sidecar = EngineSidecar(rank, tokens, args.placement_dir, args.engine_dir)
            runner = await start(sidecar, args.host, port)
            runners.append(runner)
            bound[rank] = runner.addresses[0][1]
        print(json.dumps({"ports": bound, "sglang_port": sglang_port}), flush=True)
        finished = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, finished.set)
        tasks.append(asyncio.create_task(engine.run()))
        try:
            await finished.wait()
        finally:
            for task in tasks:
                task.cancel()
            for runner in runners:
                await runner.cleanup()

    asyncio.run(serve())
    print("standin: stopped", file=sys.stderr)
    return 0
