"""``moeplace agent``: one agent (one EP rank) with its HTTP API and metrics, replaying a token stream.

    moeplace agent --replay TRACE|synthetic --model PRESET|SHAPE.json --topology 2x4 \\
        --redundant-slots N --rank R --port P --token-file F --tokens-per-second N \\
        --expert-scale K [--placement FILE]

``python -m moe_agent [agent] ...`` takes the same flags (the operator's pods run
``python -m moe_agent agent``). The model defaults to ``$MOEPLACE_MODEL`` (a ModelShape JSON, as the
operator sets it). Without ``--replay`` the agent serves its API and store with no traffic. See
docs/agent.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from moe_placement.baselines import linear_placement
from moe_placement.models import ModelShape, Placement, PlacementError, Topology
from moe_placement.presets import MODEL_PRESETS, model_shape, parse_topology
from moe_placement.routing import ROUTERS as REFERENCE_ROUTERS
from moe_placement.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, generate
from moe_placement.traces import load_trace

if TYPE_CHECKING:
    from moe_agent.replay import ReplayEngine, TokenStream
    from moe_agent.server import AgentServer

# torch and the modules built on it are imported by `run` only: every `moeplace` command builds this
# parser, and importing torch costs seconds.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
ROUTER_NAMES = tuple(name for name in REFERENCE_ROUTERS if name != "exact")
MODEL_ENV = "MOEPLACE_MODEL"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``agent`` subcommand."""
    parser = subparsers.add_parser(
        "agent",
        help="run one replay-mode agent (EP rank): recorder, router, expert store, HTTP API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("token stream")
    source.add_argument("--replay", metavar="TRACE|synthetic",
                        help="routing trace file (any format moe_placement.traces reads) or 'synthetic'; "
                        "without it no tokens flow")
    source.add_argument("--task", help="replay only this domain of the trace")
    source.add_argument("--tokens-per-second", type=float, default=1000.0, help="token rate (default 1000)")
    source.add_argument("--batch-tokens", type=int, default=256, help="tokens per replayed step (default 256)")
    source.add_argument("--shift-after-seconds", type=float,
                        help="domain shift: replay --task (default: the first domain, the synthetic "
                        "config's order or the trace's) until then, --shift-to after")
    source.add_argument("--shift-to", help="domain after the shift (default: the next domain)")
    source.add_argument("--alternate", action="store_true",
                        help="keep shifting: the two domains take turns every --shift-after-seconds")
    source.add_argument("--start-time", type=float,
                        help="epoch seconds the stream starts at (default: now); agents given the same value step in lockstep")
    source.add_argument("--homes", type=Path,
                        help='JSON {"home_gpu": [S]}: attention rank of each sequence of --replay TRACE '
                        "(as moeplace route or a request router chose; default: sequence mod GPUs)")
    source.add_argument("--report-signatures-to", metavar="ROUTER_URL",
                        help="request router (moeplace router) to report finished sequences' "
                        "expert signatures to, so it learns online")
    source.add_argument("--seed", type=int, default=0, help="seed of the synthetic trace, weights and draws")

    shape = parser.add_argument_group("model and placement")
    shape.add_argument("--model", default=os.environ.get(MODEL_ENV),
                       help=f"model preset ({', '.join(MODEL_PRESETS)}), a ModelShape JSON file or inline "
                       f"JSON (default: ${MODEL_ENV})")
    shape.add_argument("--topology", required=True, help="NODESxGPUS[:gpu], e.g. 2x4")
    shape.add_argument("--redundant-slots", type=int, default=0, help="slots beyond one per expert, in all")
    shape.add_argument("--rank", type=int, required=True, help="this agent's EP rank (GPU index)")
    shape.add_argument("--placement", type=Path,
                       help="initial placement (moeplace or SGLang JSON; default: linear)")
    shape.add_argument("--expert-scale", type=int, default=1,
                       help="divide each expert's FFN width by this, to fit memory (default 1)")
    shape.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="expert weight dtype")
    shape.add_argument("--router", choices=ROUTER_NAMES, default="metro", help="token -> replica router")
    shape.add_argument("--forward-budget", type=int, default=8,
                       help="(token, choice) pairs per layer per step the expert FFNs run on (CPU budget)")
    shape.add_argument("--window-seconds", type=float, default=60.0, help="recorder window (default 60)")
    shape.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    shape.add_argument("--device", default="cpu", help="torch device of routing and recording")

    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    server.add_argument("--port", type=int, required=True, help="listen port (0: any free port)")
    server.add_argument("--token-file", type=Path,
                        help="file holding the bearer token (default: $MOEPLACE_AGENT_TOKEN)")
    server.add_argument("--transfer-timeout", type=float, default=30.0,
                        help="seconds a peer may stay silent during a transfer (default 30)")
    server.add_argument("--staged-ttl-seconds", type=float, default=600.0,
                        help="drop a staged slot that no activation claimed within this time (default 600)")
    server.add_argument("--retired-grace-seconds", type=float, default=120.0,
                        help="keep a retired slot's weights this long for an undo (default 120)")
    server.add_argument("--test-throttle-bytes-per-second", type=float, help=argparse.SUPPRESS)
    server.add_argument("--test-corrupt-transfers", action="store_true", help=argparse.SUPPRESS)


def load_model_shape(spec: str | None) -> ModelShape:
    """A preset by name, a ModelShape JSON file, or inline ModelShape JSON."""
    if not spec:
        raise PlacementError(f"model: give --model or set {MODEL_ENV}")
    return model_shape(spec)


def load_initial_placement(path: Path | None, shape: ModelShape, topology: Topology) -> Placement:
    """The placement of a moeplace or SGLang JSON file, or the linear one."""
    if path is None:
        mapping = linear_placement(shape.num_layers, shape.num_experts, topology.num_slots)
    else:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or "physical_to_logical_map" not in document:
            raise PlacementError(f"placement: {path} has no physical_to_logical_map")
        mapping = document["physical_to_logical_map"]
    placement = Placement(mapping, shape.num_experts, topology.slots_per_gpu)
    placement.check_topology(shape, topology)
    return placement


def build_stream(args: argparse.Namespace, shape: ModelShape) -> TokenStream:
    """The token stream the flags describe, checked against the model's shape."""
    from moe_agent.replay import TokenStream

    if args.replay == "synthetic":
        base = SYNTHETIC_PRESETS.get(shape.name, SyntheticConfig())
        config = replace(
            base, name=shape.name, num_layers=shape.num_layers, num_experts=shape.num_experts, top_k=shape.top_k
        )
        if isinstance(config.popularity_skew, tuple) and len(config.popularity_skew) != shape.num_layers:
            config = replace(config, popularity_skew=base.layer_skew.mean())
        trace = generate(config, args.seed)
        domains = config.domains
    else:
        trace = load_trace(args.replay)
        domains = trace.domain_names
    expected = (shape.num_layers, shape.num_experts, shape.top_k)
    if (trace.num_layers, trace.num_experts, trace.top_k) != expected:
        raise PlacementError(
            f"replay: trace is {trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k}; "
            f"model {shape.name} is {expected[0]} x {expected[1]}, top-{expected[2]}"
        )
    if args.shift_after_seconds is None:
        return TokenStream(trace.select_domain(args.task) if args.task else trace, homes=_homes(args.homes))
    if args.homes is not None:
        raise PlacementError("homes: a stream with a shift has no fixed home per sequence")
    before = args.task or domains[0]
    after = args.shift_to or next((name for name in domains if name != before), None)
    if after is None or after == before:
        raise PlacementError(f"shift_to: trace has no domain to shift to from {before!r} (domains: {domains})")
    return TokenStream(
        trace.select_domain(before),
        trace.select_domain(after),
        shift_at=int(args.shift_after_seconds * args.tokens_per_second),
        alternate=args.alternate,
    )


def _homes(path: Path | None):
    """The ``home_gpu`` list of a ``--homes`` file, as an array (None without one)."""
    if path is None:
        return None
    import numpy as np

    document = json.loads(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("home_gpu"), list):
        raise PlacementError(f"homes: {path} has no home_gpu list")
    return np.asarray(document["home_gpu"], dtype=np.int64)


def run(args: argparse.Namespace) -> int:
    """Build the agent from the flags and serve until SIGINT / SIGTERM."""
    import torch
    from prometheus_client import disable_created_metrics

    from moe_agent.agent import AgentCore
    from moe_agent.model import ReplayMoEModel
    from moe_agent.recorder import RoutingRecorder, attach
    from moe_agent.replay import ReplayEngine
    from moe_agent.signatures import SignatureReporter
    from moe_agent.server import AgentServer, ServerOptions, TokenSource
    from moe_agent.store import DTYPES, ExpertStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(max(args.threads, 1))
    disable_created_metrics()  # *_created series would double the agent's series for no use
    shape = load_model_shape(args.model)
    topology = parse_topology(args.topology, shape.num_experts, args.redundant_slots)
    if not 0 <= args.rank < topology.num_gpus:
        raise PlacementError(f"rank: {args.rank} not in 0..{topology.num_gpus - 1}")
    try:
        tokens = TokenSource.from_env_or_file(args.token_file)
    except ValueError as error:
        raise PlacementError(str(error)) from None
    placement = load_initial_placement(args.placement, shape, topology)
    stream = build_stream(args, shape) if args.replay else None

    store = ExpertStore(
        shape, topology.slots_per_gpu, args.rank, expert_scale=args.expert_scale, dtype=DTYPES[args.dtype], seed=args.seed
    )
    engine = None
    if stream is None:
        recorder = RoutingRecorder(
            shape.num_layers, shape.num_experts, device=args.device, window_seconds=args.window_seconds
        )
        core = AgentCore(shape, topology, args.rank, store, placement, recorder, device=args.device)
    else:
        model = ReplayMoEModel(shape.num_layers, shape.hidden_size, shape.num_experts, shape.top_k, seed=args.seed)
        model.to(args.device)
        recorder = attach(model, window_seconds=args.window_seconds, device=args.device)
        core = AgentCore(shape, topology, args.rank, store, placement, recorder, device=args.device)
        engine = ReplayEngine(
            core,
            model,
            stream,
            tokens_per_second=args.tokens_per_second,
            batch_tokens=args.batch_tokens,
            router=args.router,
            seed=args.seed,
            start_time=args.start_time,
            forward_budget=args.forward_budget,
            reporter=SignatureReporter(args.report_signatures_to) if args.report_signatures_to else None,
        )
    options = ServerOptions(
        transfer_timeout_seconds=args.transfer_timeout,
        staged_ttl_seconds=args.staged_ttl_seconds,
        retired_grace_seconds=args.retired_grace_seconds,
        throttle_bytes_per_second=args.test_throttle_bytes_per_second,
        corrupt_transfers=args.test_corrupt_transfers,
    )
    server = AgentServer(core, tokens, options)
    asyncio.run(_serve(server, engine, args.host, args.port))
    return 0


async def _serve(server: AgentServer, engine: ReplayEngine | None, host: str, port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    core = server.core
    replaying = "no replay" if engine is None else f"replaying {engine.tokens_per_second:g} tokens/s"
    print(
        f"moe_agent: rank {core.rank} of {core.topology.num_gpus} serving on http://{host}:{bound} "
        f"({core.shape.name}, {core.store.intermediate_size}-wide experts of "
        f"{core.store.expert_nbytes / 1e6:.2f} MB, {core.store.occupancy()['live']} live slots, {replaying})",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    finished = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, finished.set)
    replay = None
    if engine is not None:
        replay = threading.Thread(target=engine.run, args=(stop,), name="replay", daemon=True)
        replay.start()
    try:
        await finished.wait()
    finally:
        stop.set()
        await runner.cleanup()
        if replay is not None:
            await asyncio.to_thread(replay.join, 10.0)


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_agent [agent] FLAGS``: the ``agent`` subcommand's flags; the word ``agent`` is
    optional (the operator's pods give it)."""
    parser = argparse.ArgumentParser(prog="python -m moe_agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PlacementError as error:
        print(f"moe_agent: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"moe_agent: error: {error.filename}: no such file", file=sys.stderr)
        return 2
