"""``moeplace demo-router``: replay agents take their requests through the request router, side by
side with round-robin, on one two-domain workload.

1. The workload: a trace with two domains (default: synthetic, a small model; or ``--trace`` such
   as ../shared/traces' ESFT file, intent and law), split in a fit window and a replay window, the
   replay window's requests interleaved across domains (a two-domain mix).
2. Placements fitted on the fit window: ``eplb`` (the baseline) and ``grouped`` (each request
   group's experts on the node the router sends it to).
3. ``moeplace router`` starts with the grouped placement and the fit window's domains, in front of
   a stand-in engine; it learns prompts from the fit window's finished requests (the same report a
   replay agent sends, ``moe_agent.signatures``). Each replayed request is then sent through it
   (``/v1/completions``, its prompt's stand-in token ids, several in flight at once) and runs on the
   rank it picks (``X-Moeplace-Rank``).
4. Two runs of real replay agents (one per rank) on the replay window, ``--seconds`` each:
   round-robin (request r on rank r mod G) with eplb and random replica choice, and the router's
   homes with the grouped placement and local_first. Cross-node bytes per token are the agents'
   own counters (``moeplace_cross_node_bytes_total`` / ``moeplace_tokens_total``); MoE time per
   step is the cost model's on the same tokens with the same homes (labelled modelled).

Prints a table and writes JSON. Shapes: L layers, E experts, G GPUs (ranks), S sequences.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moe_agent.signatures import request_report
from moe_placement.cost import evaluate
from moe_placement.files import build_placement_file, read_placement, write_placement
from moe_placement.models import ModelShape, PlacementError, RoutingBatch, Topology
from moe_placement.policies import PolicyOptions, plan
from moe_placement.presets import parse_topology
from moe_placement.request_routing import tokens_per_gpu_imbalance
from moe_placement.synthetic import SyntheticConfig, generate
from moe_placement.traces import Trace, load_trace, save_trace

DEMO_MODEL = ModelShape(
    name="router-demo", num_layers=6, num_experts=32, top_k=4, hidden_size=256,
    expert_intermediate_size=256,
)
DEMO_WORKLOAD = SyntheticConfig(
    name="router-demo", num_layers=6, num_experts=32, top_k=4, num_sequences=256,
    tokens_per_sequence=64, domain_drift=0.9,
)
IN_FLIGHT = 8  # requests sent through the router at once
ENGINE_DELAY_MS = 20.0  # the stand-in engine's time per request: requests overlap on the ranks
BATCH_TOKENS = 256
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RunResult:
    """One side of the table."""

    run: str
    placement: str
    request_router: str
    replica_router: str
    replayed_tokens: float
    cross_node_bytes_per_token: float
    modelled_moe_ms: float
    modelled_cross_node_mb: float
    tokens_per_gpu_max_over_mean: float


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-router",
        help="replay agents through the request router vs round-robin: cross-node traffic, MoE time",
    )
    parser.add_argument("--trace", type=Path, help="two-domain trace (default: synthetic)")
    parser.add_argument("--model", help="ModelShape JSON or preset of --trace (default: the demo's)")
    parser.add_argument("--topology", default="2x2", help="NODESxGPUS")
    parser.add_argument("--seconds", type=float, default=20.0, help="replay time of each run")
    parser.add_argument("--tokens-per-second", type=float, default=4000.0)
    parser.add_argument("--expert-scale", type=int, default=1, help="agents' expert width divisor")
    parser.add_argument("--json", type=Path, default=Path("router-demo.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo)


def interleaved(trace: Trace) -> Trace:
    """The trace's sequences in turn across its domains (a mix, as requests arrive)."""
    names = np.array(trace.domains)
    queues = [list(np.nonzero(names == name)[0]) for name in dict.fromkeys(trace.domains)]
    order = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return trace.select_sequences(np.array(order))


def _workload(args: argparse.Namespace) -> tuple[ModelShape, Trace, Trace]:
    from moe_placement.presets import model_shape

    if args.trace is None:
        trace, model = generate(DEMO_WORKLOAD, seed=args.seed), DEMO_MODEL
    else:
        trace, model = load_trace(args.trace), model_shape(args.model or "deepseek-v2-lite")
    if len(set(trace.domains)) < 2:
        raise PlacementError(f"trace: {len(set(trace.domains))} domain(s); the demo needs two")
    fit, replay = trace.split(0.5)
    return model, fit, interleaved(replay)


def _placements(model: ModelShape, topology: Topology, fit: Trace, folder: Path) -> dict[str, Path]:
    profile = fit.profile(batch_size=topology.num_gpus * 128, phase="prefill")
    paths = {}
    for policy in ("eplb", "grouped"):
        result = plan(policy, profile, model, topology, PolicyOptions(time_limit_s=30))
        paths[policy] = folder / f"{policy}.json"
        write_placement(paths[policy], build_placement_file(result, model, topology))
    return paths


def _process(command: list[str], log: Path) -> subprocess.Popen:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "operator"), str(REPO / "agent"), env.get("PYTHONPATH", "")]
    )
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PlacementError(f"{url}: exited with {process.returncode} (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise PlacementError(f"{url}: not up in {timeout}s")


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _post(url: str, body: dict) -> dict[str, str]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        return dict(response.headers)


def routed_homes(
    args: argparse.Namespace, fit: Trace, replay: Trace, placement: Path, model_file: Path, folder: Path
) -> np.ndarray:
    """Home rank of each replayed request [S], as ``moeplace router`` picks it over HTTP."""
    engine_port, router_port = _free_port(), _free_port()
    python = sys.executable
    engine = _process(
        [python, "-m", "moe_router.standin", "--port", str(engine_port), "--delay-ms", str(ENGINE_DELAY_MS)],
        folder / "engine.log",
    )
    fit_file = folder / "fit.npz"
    save_trace(fit, fit_file)
    router = _process(
        [python, "-m", "moeplace.cli", "router", "--model", str(model_file), "--topology", args.topology,
         "--placement", str(placement), "--profile", str(fit_file), "--port", str(router_port),
         "--backend", f"http://127.0.0.1:{engine_port}"],
        folder / "router.log",
    )
    try:
        url = f"http://127.0.0.1:{router_port}"
        _wait(f"http://127.0.0.1:{engine_port}/v1/models", engine)
        _wait(url + "/healthz", router)
        for sequence in range(fit.num_sequences):  # what the replay agents report as requests finish
            _post(url + "/router/v1/signatures", request_report(fit, sequence))
        prompts = [request_report(replay, s)["prompt"] for s in range(replay.num_sequences)]
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            headers = list(pool.map(
                lambda prompt: _post(url + "/v1/completions", {"model": "demo", "prompt": prompt}), prompts
            ))
        return np.array([int(h["X-Moeplace-Rank"]) for h in headers], dtype=np.int64)
    finally:
        _stop([router, engine])


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"moeplace_cross_node_bytes_total": 0.0, "moeplace_tokens_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def replay_run(
    args: argparse.Namespace, replay_file: Path, model_file: Path, placement: Path,
    replica_router: str, homes_file: Path | None, folder: Path, tag: str,
) -> dict[str, float]:
    """G replay agents on the replay window for ``--seconds``; their summed counters."""
    topology = read_placement(placement).topology
    token = folder / "token"
    token.write_text("router-demo\n")
    start = time.time() + 3.0
    ports, agents = [], []
    redundant = _redundant(placement)
    for rank in range(topology.num_gpus):
        ports.append(_free_port())
        command = [
            sys.executable, "-m", "moe_agent", "--replay", str(replay_file), "--model", str(model_file),
            "--topology", args.topology, "--redundant-slots", str(redundant), "--rank", str(rank),
            "--port", str(ports[-1]), "--token-file", str(token), "--placement", str(placement),
            "--tokens-per-second", str(args.tokens_per_second), "--batch-tokens", str(BATCH_TOKENS),
            "--router", replica_router, "--start-time", str(start), "--expert-scale", str(args.expert_scale),
        ]
        if homes_file is not None:
            command += ["--homes", str(homes_file)]
        agents.append(_process(command, folder / f"{tag}-agent-{rank}.log"))
    try:
        for port, agent in zip(ports, agents):
            _wait(f"http://127.0.0.1:{port}/healthz", agent, timeout=120)
        time.sleep(max(start - time.time(), 0) + args.seconds)
        scraped = [_scrape(port) for port in ports]
    finally:
        _stop(agents)
    return {key: sum(s[key] for s in scraped) for key in scraped[0]}


def _redundant(placement: Path) -> int:
    document = json.loads(placement.read_text())
    return len(document["physical_to_logical_map"][0]) - document["model"]["num_experts"]


def modelled(
    model: ModelShape, topology: Topology, placement: Path, replay: Trace, homes: np.ndarray, router: str
) -> tuple[float, float]:
    """Cost model's MoE ms and cross-node MB per step of ``BATCH_TOKENS``-token batches of the
    replay window, each token on its request's home."""
    mapping = read_placement(placement).placement()
    source = homes[replay.sequence_of_token()]
    count = replay.num_tokens // BATCH_TOKENS
    batches = [
        RoutingBatch(replay.expert_ids[:, i * BATCH_TOKENS : (i + 1) * BATCH_TOKENS],
                     source[i * BATCH_TOKENS : (i + 1) * BATCH_TOKENS])
        for i in range(count)
    ]
    report = evaluate(mapping, model, topology, batches, router)
    return report.moe_time_s * 1e3, report.cross_node_bytes / 1e6


def run_demo(args: argparse.Namespace) -> int:
    model, fit, replay = _workload(args)
    redundant = model.num_experts // 2
    topology = parse_topology(args.topology, model.num_experts, redundant)
    folder = Path(tempfile.mkdtemp(prefix="moeplace-router-demo-"))
    model_file = folder / "model.json"
    model_file.write_text(model.model_dump_json())
    replay_file = folder / "replay.npz"
    save_trace(replay, replay_file)
    placements = _placements(model, topology, fit, folder)
    print(f"router demo: {replay.num_sequences} requests of {model.name} on {args.topology}; files in {folder}")
    homes = {
        "round_robin": np.arange(replay.num_sequences) % topology.num_gpus,
        "router": routed_homes(args, fit, replay, placements["grouped"], model_file, folder),
    }
    homes_file = folder / "homes.json"
    homes_file.write_text(json.dumps({"home_gpu": homes["router"].tolist()}))
    runs = [
        ("round-robin", "eplb", "round_robin", "random", None),
        ("router", "grouped", "router", "local_first", homes_file),
    ]
    results = []
    lengths = np.diff(replay.seq_offsets)
    for name, policy, request_router, replica_router, homes_path in runs:
        counters = replay_run(
            args, replay_file, model_file, placements[policy], replica_router, homes_path, folder, name
        )
        moe_ms, cross_mb = modelled(
            model, topology, placements[policy], replay, homes[request_router], replica_router
        )
        results.append(RunResult(
            run=name, placement=policy, request_router=request_router, replica_router=replica_router,
            replayed_tokens=counters["moeplace_tokens_total"],
            cross_node_bytes_per_token=counters["moeplace_cross_node_bytes_total"]
            / max(counters["moeplace_tokens_total"], 1.0),
            modelled_moe_ms=moe_ms, modelled_cross_node_mb=cross_mb,
            tokens_per_gpu_max_over_mean=tokens_per_gpu_imbalance(
                homes[request_router], lengths, topology.num_gpus
            ),
        ))
    print(format_table(results))
    args.json.write_text(json.dumps({"model": model.model_dump(), "topology": args.topology,
                                     "runs": [asdict(r) for r in results]}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


def format_table(results: list[RunResult]) -> str:
    """The runs side by side, and the router's ratios to round-robin."""
    header = (
        f"{'run':<12} {'placement':<9} {'replica':<11} {'tokens':>8} {'xnode B/token (agents)':>23} "
        f"{'MoE ms/step (model)':>20} {'xnode MB/step (model)':>22} {'tokens/GPU max/mean':>20}"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"{r.run:<12} {r.placement:<9} {r.replica_router:<11} {r.replayed_tokens:>8.0f} "
            f"{r.cross_node_bytes_per_token:>23.0f} {r.modelled_moe_ms:>20.4f} "
            f"{r.modelled_cross_node_mb:>22.3f} {r.tokens_per_gpu_max_over_mean:>20.3f}"
        )
    base, routed = results[0], results[-1]
    lines.append(
        f"router / round-robin: cross-node bytes per token {routed.cross_node_bytes_per_token / max(base.cross_node_bytes_per_token, 1e-12):.2f}x "
        f"(agents), MoE time {routed.modelled_moe_ms / max(base.modelled_moe_ms, 1e-12):.2f}x (model)"
    )
    return "\n".join(lines)
