"""A stand-in engine process: speaks the engine contract exactly, moves nothing.

It does what ``vllm_plugin`` and ``sglang_plugin`` do inside a real engine, with a delay instead of
a weight move: it reads the published placement (``contract.read_published``), and ``--move-delay``
seconds after a new map appears it writes every rank's ``status-rank<r>.json`` with that map live;
one real engine sidecar per rank (``sidecar.EngineSidecar``) serves ``GET /v1/placement`` from
those files. The first map it finds goes live at once (an engine started with it). Ranks in
``--lagging-ranks`` never take a new map (a rank whose move hangs).

It prints one JSON line on stdout when serving: ``{"ports": {rank: port}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from moe_agent.engines import contract
from moe_agent.engines.sidecar import EngineSidecar, start
from moe_agent.tokens import TokenSource
from moe_placement.models import PlacementError


class StandinEngine:
    """The move loop: published map -> (after the delay) every rank's status."""

    def __init__(self, placement_dir: Path, engine_dir: Path, num_ranks: int, move_delay_s: float,
                 lagging_ranks: frozenset[int] = frozenset()):
        self.placement_dir = placement_dir
        self.engine_dir = engine_dir
        self.num_ranks = num_ranks
        self.move_delay_s = move_delay_s
        self.lagging_ranks = lagging_ranks
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


def run(args: argparse.Namespace) -> int:
    ports = [int(port) for port in args.ports.split(",") if port.strip()]
    lagging = frozenset(int(rank) for rank in args.lagging_ranks.split(",") if rank.strip())
    tokens = TokenSource.from_env_or_file(args.token_file)
    engine = StandinEngine(args.placement_dir, args.engine_dir, len(ports), args.move_delay, lagging)

    async def serve() -> None:
        runners = []
        for rank, port in enumerate(ports):
            sidecar = EngineSidecar(rank, tokens, args.placement_dir, args.engine_dir)
            runners.append(await start(sidecar, args.host, port))
        bound = {rank: runner.addresses[0][1] for rank, runner in enumerate(runners)}
        print(json.dumps({"ports": bound}), flush=True)
        finished = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, finished.set)
        mover = asyncio.create_task(engine.run())
        try:
            await finished.wait()
        finally:
            mover.cancel()
            for runner in runners:
                await runner.cleanup()

    asyncio.run(serve())
    print("standin: stopped", file=sys.stderr)
    return 0
