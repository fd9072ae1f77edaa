"""``moeplace plan`` and ``moeplace bench``: the placement library on routing traces."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moe_placement.bench import (
    BenchOptions,
    Workload,
    format_table,
    plot_heatmaps,
    run_bench,
    workloads_from_file,
    write_json,
)
from moe_placement.files import (
    MigrationRecord,
    build_placement_file,
    migration_record,
    read_placement,
    write_placement,
    write_sglang,
)
from moe_placement.migration_plan import plan_migration, transfer_seconds
from moe_placement.models import (
    PHASES,
    ModelShape,
    Placement,
    PlacementError,
    Topology,
    placement_hash,
)
from moe_placement.cost import DATA_FLOWS
from moe_placement.policies import LOAD_ONLY_POLICIES, POLICIES, PolicyOptions, plan
from moe_placement.presets import MODEL_PRESETS, model_preset, parse_topology
from moe_placement.request_routing import REQUEST_ROUTERS
from moe_placement.routing import ROUTERS
from moe_placement.scoring import (
    SCORED_BATCHES,
    TOKENS_PER_GPU,
    phase_batches,
    routers_for,
    score_placements,
)
from moe_placement.synthetic import SYNTHETIC_PRESETS, generate
from moe_placement.traces import Trace, load_profile, load_trace, sample_tokens


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plan`` and ``bench``."""
    plan_parser = subparsers.add_parser("plan", help="Compute a placement from a routing trace.")
    _add_workload_arguments(plan_parser)
    plan_parser.add_argument("--policy", default="eplb", help=f"one of: {', '.join(POLICIES)}")
    plan_parser.add_argument(
        "--phase", choices=(*PHASES, "both"), default="prefill",
        help="phase the placement serves (both: one placement for prefill and decode; auto "
        "weighs them jointly)",
    )
    plan_parser.add_argument(
        "--requests", choices=REQUEST_ROUTERS, default="round_robin",
        help="how requests reach the ranks: round_robin (an engine's default) or signature "
        "(moeplace router; the trace's domains are its groups, and auto weighs grouped too)",
    )
    plan_parser.add_argument("--out", required=True, type=Path, help="placement file to write")
    plan_parser.add_argument(
        "--format", choices=("moeplace", "sglang"), default="moeplace",
        help="moeplace JSON, or the JSON SGLang's --init-expert-location reads",
    )
    plan_parser.add_argument(
        "--previous", type=Path,
        help="placement file serving now: migration-aware policies stay near it, and the "
        "migration plan from it is written into --out (the operator's planner)",
    )
    plan_parser.add_argument(
        "--max-copies-per-stage", type=int, default=8, help="copies per migration stage"
    )
    plan_parser.add_argument(
        "--max-concurrent-transfers", type=int, default=4,
        help="copies in flight at once, for the migration's time estimate",
    )
    plan_parser.set_defaults(func=run_plan)

    bench_parser = subparsers.add_parser(
        "bench", help="Compare policies and routers side by side on a trace."
    )
    _add_workload_arguments(bench_parser)
    bench_parser.add_argument("--policies", default="linear,round_robin,eplb")
    bench_parser.add_argument("--router", "--routers", dest="routers", default="random,local_first,metro")
    bench_parser.add_argument("--shift", help="also fit on domain A and score on domain B (A:B)")
    defaults = BenchOptions()
    bench_parser.add_argument(
        "--prefill-tokens-per-gpu", type=int, default=defaults.prefill_tokens_per_gpu
    )
    bench_parser.add_argument(
        "--decode-tokens-per-gpu", type=int, default=defaults.decode_tokens_per_gpu
    )
    bench_parser.add_argument(
        "--batches", type=int, default=defaults.num_batches, help="batches scored per phase"
    )
    bench_parser.add_argument(
        "--mix", action="store_true", help="also all domains together, their sequences interleaved"
    )
    bench_parser.add_argument(
        "--requests", default="round_robin",
        help=f"request routers (home GPU of each sequence): {', '.join(REQUEST_ROUTERS)}",
    )
    bench_parser.add_argument(
        "--data-flow", choices=DATA_FLOWS, default="home",
        help="home: tokens return to their attention rank every layer (SGLang, vLLM); "
        "follow: a token starts each layer where its first choice was served (MoETuner)",
    )
    bench_parser.add_argument("--json", type=Path, default=Path("bench.json"), help="JSON to write")
    bench_parser.add_argument("--plot", type=Path, help="directory for PNG heatmaps")
    bench_parser.set_defaults(func=run_bench_command)


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace", type=Path,
        help="routing trace (native npz, counts npz, or a ../shared/traces file); "
        "default: the synthetic generator calibrated for --model",
    )
    parser.add_argument("--task", help="domain of the trace to use (e.g. intent, law)")
    parser.add_argument(
        "--model", default="deepseek-v2-lite", help=f"one of: {', '.join(MODEL_PRESETS)}"
    )
    parser.add_argument("--topology", default="2x4", help="NODESxGPUS[:gpu], e.g. 2x4 or 8x8:h200")
    parser.add_argument("--redundant-slots", type=int, default=0, help="extra slots in all")
    parser.add_argument("--time-limit", type=float, default=30.0, help="solver time limit, s")
    parser.add_argument("--seed", type=int, default=0)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _synthetic_trace(args: argparse.Namespace) -> Trace:
    if args.model not in SYNTHETIC_PRESETS:
        raise PlacementError(f"model: no synthetic workload for {args.model!r}; pass --trace")
    _progress(f"generating the synthetic {args.model} workload")
    return generate(SYNTHETIC_PRESETS[args.model], seed=args.seed)


def _workloads(args: argparse.Namespace) -> list[Workload]:
    if args.trace is not None:
        return workloads_from_file(
            args.trace, args.task, args.shift, args.seed, args.model, getattr(args, "mix", False)
        )
    return [Workload(f"synthetic:{args.model}", *_synthetic_trace(args).split(0.5))]


def _whole_trace(args: argparse.Namespace) -> Trace:
    if args.trace is None:
        return _synthetic_trace(args)
    try:
        trace = load_trace(args.trace)
    except PlacementError as error:
        if "counts only" not in str(error):
            raise
        profile = load_profile(args.trace, task=args.task, model=args.model)
        return sample_tokens(profile, 16384, np.random.default_rng(args.seed))
    return trace.select_domain(args.task) if args.task else trace


def _csv(text: str, known: dict, field: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise PlacementError(f"{field}: unknown {unknown or text!r}; known: {', '.join(known)}")
    return names


def run_plan(args: argparse.Namespace) -> int:
    model = model_preset(args.model)
    topology = parse_topology(args.topology, model.num_experts, args.redundant_slots)
    previous = read_placement(args.previous).placement() if args.previous else None
    trace = _whole_trace(args)
    phase = "decode" if args.phase == "decode" else "prefill"
    batch_tokens = 512 if phase == "prefill" else 16
    profile = trace.profile(
        batch_size=topology.num_gpus * batch_tokens, phase=phase,
        pairs=args.policy not in LOAD_ONLY_POLICIES,
    )
    options = PolicyOptions(
        time_limit_s=args.time_limit, seed=args.seed, previous=previous,
        phases=PHASES if args.phase == "both" else (), request_router=args.requests,
    )
    result = plan(args.policy, profile, model, topology, options)
    rng = np.random.default_rng(args.seed)
    batches = {
        phase: phase_batches(trace, topology.num_gpus, tokens, SCORED_BATCHES, phase, rng)
        for phase, tokens in TOKENS_PER_GPU.items()
    }
    routers = routers_for(result.solver, phase)
    (costs,) = score_placements([result.placement], model, topology, batches, routers, args.seed)
    predicted = {phase: cost.summary() for phase, cost in costs.items()}
    migration = _migration(args, previous, result.placement, model, topology)
    if args.format == "sglang":
        write_sglang(args.out, result.placement, model, profile.load)
    else:
        write_placement(
            args.out,
            build_placement_file(result, model, topology, predicted, migration, routers),
        )
    print(
        f"{args.out}: policy {args.policy} ({result.solver.status}, {result.solve_seconds:.2f}s), "
        f"prefill token max/mean {predicted['prefill']['token_imbalance']:.3f}, "
        f"decode max activated experts {predicted['decode']['max_activated_experts']:.2f}, "
        f"predicted MoE ms prefill {predicted['prefill']['moe_ms']:.3f} ({routers['prefill']}) "
        f"decode {predicted['decode']['moe_ms']:.3f} ({routers['decode']})"
    )
    if migration is not None:
        print(
            f"migration from {args.previous}: {len(migration.stages)} stages, "
            f"{migration.copies} copies, {migration.bytes_moved / 1e9:.2f} GB, "
            f"~{migration.estimated_seconds:.1f} s at {args.max_concurrent_transfers} transfers "
            f"at once (planned in {migration.planning_seconds:.2f} s)"
        )
    return 0


def _migration(
    args: argparse.Namespace,
    previous: Placement | None,
    new: Placement,
    model: ModelShape,
    topology: Topology,
) -> MigrationRecord | None:
    """The plan from ``--previous`` to ``new`` (the operator's planner and estimate), if asked."""
    if previous is None:
        return None
    started = time.perf_counter()
    migration = plan_migration(
        previous, new, model, topology, max_copies_per_stage=args.max_copies_per_stage
    )
    planning = time.perf_counter() - started
    seconds = transfer_seconds(migration.bytes_moved, topology, args.max_concurrent_transfers)
    return migration_record(
        migration,
        placement_hash(previous.physical_to_logical_map),
        args.max_copies_per_stage,
        seconds,
        planning,
    )


def run_bench_command(args: argparse.Namespace) -> int:
    model = model_preset(args.model)
    topology = parse_topology(args.topology, model.num_experts, args.redundant_slots)
    policies = _csv(args.policies, POLICIES, "policies")
    routers = _csv(args.routers, ROUTERS, "router")
    request_routers = _csv(args.requests, dict.fromkeys(REQUEST_ROUTERS), "requests")
    options = BenchOptions(
        prefill_tokens_per_gpu=args.prefill_tokens_per_gpu,
        decode_tokens_per_gpu=args.decode_tokens_per_gpu,
        num_batches=args.batches,
        time_limit_s=args.time_limit,
        seed=args.seed,
        data_flow=args.data_flow,
        request_routers=tuple(request_routers),
    )
    workloads = _workloads(args)
    rows, heat = run_bench(workloads, model, topology, policies, routers, options, _progress)
    print(format_table(rows))
    meta = {
        "model": model.model_dump(),
        "topology": topology.model_dump(),
        "policies": policies,
        "routers": routers,
        "options": asdict(options),
        "trace": str(args.trace) if args.trace else f"synthetic:{args.model}",
    }
    write_json(args.json, rows, meta)
    print(f"wrote {args.json}")
    if args.plot:
        for path in plot_heatmaps(args.plot, heat):
            print(f"wrote {path}")
    return 0
