"""Rebalance-cycle benchmark at DeepSeek-V3 scale: prints tables and writes JSON.

1. **Cycle**: one operator cycle's CPU-heavy part (``moe_operator.solver.solve_and_gate`` in a
   spawned worker process, as the operator runs it: solve -> predicted gain -> migration plan),
   DeepSeek-V3 shape (58 layers x 256 experts, top-8, 8x8 GPUs, +64 slots), eplb from the linear
   placement; the plan's size in memory and pickled across the worker boundary. Side by side, in
   the same run, the code path it replaced where it still exists: the previous migration planner
   (``tests/unit/reference_migration.py``) and the previous cost model (``tests/unit/reference_cost.py``).
2. **Scaling**: migration planning time for 16/58 layers x 64/256/512 experts x 8/64/256 GPUs, and
   the exponent of time ~ (layers x slots)^b fitted over the table.
3. **Time limits**: every policy at every scale of the table with a time limit: wall time / limit.
4. **Policies at V3 scale**: ilp, locality, metro_aware, auto at the operator's default 10 s: time,
   status and predicted MoE time (recommended routers, the gate's batches) against eplb; ilp and
   metro_aware on every usable core (layer chunks in forked workers) and in one process.
5. **CLI**: ``moeplace plan`` (with and without ``--previous``) and ``moeplace bench`` at V3 scale.

    PYTHONPATH=operator:agent python3 benchmarks/cycle_bench.py [--quick] [--json out/cycle-bench.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO / "operator", REPO / "agent", REPO / "tests" / "unit"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402

from moe_operator.solver import SolveRequest, solve_and_gate  # noqa: E402
from moe_placement import cost, routing  # noqa: E402
from moe_placement.baselines import linear_placement  # noqa: E402
from moe_placement.migration_plan import MigrationPlan, plan_migration  # noqa: E402
from moe_placement.models import ModelShape, Placement, Topology, WorkloadProfile  # noqa: E402
from moe_placement.parallel import usable_cpus  # noqa: E402
from moe_placement.policies import POLICIES, PolicyOptions, plan  # noqa: E402
from moe_placement.presets import model_preset, parse_topology  # noqa: E402
from moe_placement.scoring import (  # noqa: E402
    SCORED_BATCHES,
    TOKENS_PER_GPU,
    phase_batches,
    routers_for,
    score_placements,
)
from reference_cost import reference_layer_cost, reference_route_local_first  # noqa: E402
from reference_migration import reference_stages  # noqa: E402

TARGETS = {  # *_cpu_s: the same target in CPU seconds, what an idle 2-core machine would take
    "cycle_s": 5.0,
    "cycle_cpu_s": 5.0,
    "plan_migration_s": 0.5,
    "plan_migration_cpu_s": 0.5,
    "plan_mb": 10.0,
    "exponent": 1.0,
    "limit_ratio": 1.1,
    "cli_plan_overhead_s": 3.0,
    "cli_plan_overhead_cpu_s": 3.0,
    "cli_bench_s": 60.0,
    "cli_bench_cpu_s": 60.0,
}
SCALE_LAYERS = (16, 58)
SCALE_EXPERTS = (64, 256, 512)
SCALE_GPUS = ((1, 8), (8, 8), (32, 8))
SCALING_REPEATS = 5
SLOW_POLICIES = ("ilp", "locality", "metro_aware", "migration_aware", "auto")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def setup(
    num_layers: int = 58, num_experts: int = 256, nodes: int = 8, gpus_per_node: int = 8, seed: int = 0
) -> tuple[ModelShape, Topology, WorkloadProfile, Placement]:
    """DeepSeek-V3's expert shape with these counts, ~1.25 slots per expert, a Zipf-skewed load in
    random expert order per layer (the operator benchmark's exporter), and the linear placement."""
    model = model_preset("deepseek-v3").model_copy(
        update={"num_layers": num_layers, "num_experts": num_experts}
    )
    num_gpus = nodes * gpus_per_node
    slots_per_gpu = -(-5 * num_experts // (4 * num_gpus))
    topology = parse_topology(
        f"{nodes}x{gpus_per_node}", num_experts, num_gpus * slots_per_gpu - num_experts
    )
    rng = np.random.default_rng(seed)
    rates = np.stack(
        [rng.permutation(1.0 / np.arange(1, num_experts + 1) ** 1.1) for _ in range(num_layers)]
    )
    load = rates / rates.sum(1, keepdims=True) * 50_000
    profile = WorkloadProfile(load=load, top_k=model.top_k, phase="decode")
    mapping = linear_placement(num_layers, num_experts, topology.num_slots)
    return model, topology, profile, Placement(mapping, num_experts, topology.slots_per_gpu)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_cycle(request: SolveRequest) -> tuple[object, float, float, float]:
    """solve_and_gate in the worker: (result, seconds, CPU seconds, the worker's peak RSS MB)."""
    started, cpu = time.perf_counter(), time.process_time()
    result = solve_and_gate(request)
    return result, time.perf_counter() - started, time.process_time() - cpu, peak_rss_mb()


@contextmanager
def clocks(row: dict, name: str):
    """Record the block's wall and CPU seconds as ``name``_s and ``name``_cpu_s."""
    started, cpu = time.perf_counter(), time.process_time()
    yield
    row[f"{name}_s"] = round(time.perf_counter() - started, 4)
    row[f"{name}_cpu_s"] = round(time.process_time() - cpu, 4)


@contextmanager
def previous_cost_model():
    """The cost model as it was: np.unique per layer, local_first's distances per token."""
    saved = cost.layer_cost, routing.ROUTERS["local_first"]
    cost.layer_cost, routing.ROUTERS["local_first"] = reference_layer_cost, reference_route_local_first
    try:
        yield
    finally:
        cost.layer_cost, routing.ROUTERS["local_first"] = saved


def bench_cycle(reference: bool) -> dict:
    model, topology, profile, previous = setup()
    request = SolveRequest(
        policy="eplb", profile=profile, model=model, topology=topology,
        options=PolicyOptions(previous=previous, time_limit_s=10.0), min_predicted_gain=0.0, max_copies_per_stage=8,
    )
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        pool.submit(peak_rss_mb).result()  # the worker is up and has imported everything
        started = time.perf_counter()
        result, worker_seconds, worker_cpu, worker_rss = pool.submit(timed_cycle, request).result()
        round_trip = time.perf_counter() - started
    finally:
        pool.shutdown()
    migration = result.plan
    row = {
        "shape": f"{model.num_layers} x {model.num_experts}, {topology.num_nodes}x{topology.gpus_per_node} GPUs, "
        f"{topology.num_slots - model.num_experts} redundant slots",
        "cycle_s": round(round_trip, 3),
        "cycle_in_worker_s": round(worker_seconds, 3),
        "cycle_cpu_s": round(worker_cpu, 3),
        **{f"{step}_s": round(seconds, 3) for step, seconds in result.timings.items()},
        "stages": result.stages,
        "copies": sum(len(stage.copies) for stage in migration.stages),
        "plan_mb": round(len(pickle.dumps(migration)) / 1e6, 2),
        "result_pickled_mb": round(len(pickle.dumps(result)) / 1e6, 2),
        "worker_peak_rss_mb": round(worker_rss, 1),
        "predicted_gain": round(result.gain, 4),
    }
    new = Placement(result.mapping, model.num_experts, topology.slots_per_gpu)
    with clocks(row, "plan_migration_again"):
        plan_migration(previous, new, model, topology, max_copies_per_stage=8)
    rng = np.random.default_rng(request.options.seed)
    batches = {  # sized as the gate's (the gate draws them from its smoothed profile)
        phase: phase_batches(
            profile, topology.num_gpus, request.tokens_per_gpu[phase], request.num_batches, phase, rng
        )
        for phase in request.phases
    }
    with clocks(row, "evaluate_same_batches"):
        reports = score_placements([previous, new], model, topology, batches, request.routers)
    if reference:
        log("the previous migration planner on the same placements (slow)")
        with clocks(row, "previous_plan_migration"):
            old_stages = reference_stages(previous, new, model, topology, 8)
        row["previous_plan_mb"] = round(sum(m.nbytes for _, m in old_stages) / 1e6, 1)
        row["plans_identical"] = len(old_stages) == len(migration.stages) and all(
            copies == stage.copies and np.array_equal(mapping, after)
            for (copies, mapping), stage, after in zip(old_stages, migration.stages, migration.stage_maps())
        )
        del old_stages
        log("the previous cost model on the gate's batches")
        with clocks(row, "previous_evaluate_same_batches"), previous_cost_model():
            old_reports = score_placements([previous, new], model, topology, batches, request.routers)
        row["costs_identical"] = all(
            a[phase].summary() == b[phase].summary()
            for a, b in zip(reports, old_reports)
            for phase in a
        )
    return row


def fitted_exponent(sizes: list[float], seconds: list[float]) -> float:
    """b of seconds ~ a * size^b, least squares in log-log."""
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(seconds, 1e-6)), 1)[0])


def bench_scaling(quick: bool) -> tuple[list[dict], float]:
    layers = (16,) if quick else SCALE_LAYERS
    experts = (64, 256) if quick else SCALE_EXPERTS
    cases = []
    for num_layers in layers:
        for num_experts in experts:
            for nodes, per_node in SCALE_GPUS:
                model, topology, profile, previous = setup(num_layers, num_experts, nodes, per_node)
                cases.append((model, topology, previous, plan("eplb", profile, model, topology).placement))
    # Rounds over every case, not repeats of one case in a row: this machine's speed drifts over
    # minutes, and each case's least disturbed run should come from any part of the run.
    timings: list[list[tuple[float, float]]] = [[] for _ in cases]
    migrations: dict[int, MigrationPlan] = {}  # each case's plan (every round plans the same)
    for _ in range(SCALING_REPEATS):
        for case, (model, topology, previous, new) in enumerate(cases):
            started, cpu = time.perf_counter(), time.process_time()
            migrations[case] = plan_migration(previous, new, model, topology, max_copies_per_stage=8)
            timings[case].append((time.process_time() - cpu, time.perf_counter() - started))
    rows = []
    for case, (model, topology, _, _) in enumerate(cases):
        migration = migrations[case]
        cpu, seconds = min(timings[case])  # the least disturbed by the machine's other work
        rows.append({
            "layers": model.num_layers,
            "experts": model.num_experts,
            "gpus": topology.num_gpus,
            "slots": topology.num_slots,
            "layers_x_slots": model.num_layers * topology.num_slots,
            "stages": len(migration.stages),
            "plan_migration_s": round(seconds, 4),
            "plan_migration_cpu_s": round(cpu, 4),
            "cpu_us_per_stage": round(cpu / max(len(migration.stages), 1) * 1e6, 1),
            "plan_mb": round(len(pickle.dumps(migration)) / 1e6, 2),
        })
        log(f"scaling {rows[-1]}")
    sizes = [r["layers_x_slots"] for r in rows]
    exponents = {
        "exponent": fitted_exponent(sizes, [r["plan_migration_cpu_s"] for r in rows]),
        # where time goes as the size grows: more stages, or more per stage
        "stages_exponent": fitted_exponent(sizes, [r["stages"] for r in rows]),
        "per_stage_exponent": fitted_exponent(sizes, [r["cpu_us_per_stage"] for r in rows]),
    }
    return rows, exponents


def bench_time_limits(limit: float, quick: bool) -> list[dict]:
    rows = []
    layers = (16,) if quick else SCALE_LAYERS
    experts = (256,) if quick else SCALE_EXPERTS
    for num_layers in layers:
        for num_experts in experts:
            for nodes, per_node in SCALE_GPUS:
                model, topology, profile, previous = setup(num_layers, num_experts, nodes, per_node)
                for policy in POLICIES:
                    options = PolicyOptions(time_limit_s=limit, previous=previous)
                    started = time.perf_counter()
                    result = plan(policy, profile, model, topology, options)
                    seconds = time.perf_counter() - started
                    rows.append({
                        "layers": num_layers, "experts": num_experts, "gpus": topology.num_gpus,
                        "policy": policy, "seconds": round(seconds, 3),
                        "ratio_to_limit": round(seconds / limit, 3), "status": result.solver.status,
                    })
                log(f"time limits at {num_layers} x {num_experts}, {topology.num_gpus} GPUs: "
                    + ", ".join(f"{r['policy']} {r['seconds']}" for r in rows[-len(POLICIES):]))
    return rows


def bench_policies(limit: float) -> list[dict]:
    model, topology, profile, previous = setup()
    rng = np.random.default_rng(0)
    batches = {
        phase: phase_batches(profile, topology.num_gpus, TOKENS_PER_GPU[phase], SCORED_BATCHES, phase, rng)
        for phase in ("prefill", "decode")
    }
    rows = []
    # every usable core (layer chunks in worker processes), and the same in one process beside it
    runs = [(policy, None) for policy in ("eplb", "ilp", "locality", "metro_aware", "auto")]
    runs += [("ilp", 1), ("metro_aware", 1)]
    for policy, workers in runs:
        options = PolicyOptions(time_limit_s=limit, workers=workers)
        result = plan(policy, profile, model, topology, options)
        routers = routers_for(result.solver, profile.phase)
        (costs,) = score_placements([result.placement], model, topology, batches, routers)
        rows.append({
            "policy": policy, "processes": workers or usable_cpus(),
            "seconds": round(result.solve_seconds, 2), "status": result.solver.status,
            "routers": f"{routers['prefill']}/{routers['decode']}",
            **{f"{phase}_moe_ms": round(c.moe_time_s * 1e3, 3) for phase, c in costs.items()},
            "prefill_token_imbalance": round(costs["prefill"].token_imbalance, 3),
        })
        log(f"policy {rows[-1]}")
    base = rows[0]
    for row in rows:
        for phase in ("prefill", "decode"):
            row[f"{phase}_vs_eplb"] = round(row[f"{phase}_moe_ms"] / base[f"{phase}_moe_ms"], 3)
    return rows


def run_cli(*args: str, cwd: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MB so far of any child) of one ``moeplace`` command."""
    env = {"PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'agent'}", "PATH": "/usr/bin:/bin"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moeplace.cli", *args], cwd=cwd, env=env, check=True,
                   capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, after.ru_maxrss / 1024


def bench_cli() -> dict:
    shape = ["--model", "deepseek-v3", "--topology", "8x8", "--redundant-slots", "64"]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        run_cli("plan", *shape, "--policy", "linear", "--out", "linear.json", cwd=work)
        seconds, cpu, rss = run_cli("plan", *shape, "--policy", "eplb", "--out", "eplb.json", cwd=work)
        solve = json.loads((work / "eplb.json").read_text())["solver"]["solve_seconds"]
        with_previous, previous_cpu, _ = run_cli(
            "plan", *shape, "--policy", "eplb", "--previous", "linear.json", "--out", "migrated.json", cwd=work
        )
        migration = json.loads((work / "migrated.json").read_text())["migration"]
        bench_seconds, bench_cpu, bench_rss = run_cli("bench", *shape, "--json", "bench.json", cwd=work)
    return {
        "plan_s": round(seconds, 2),
        "plan_cpu_s": round(cpu, 2),
        "plan_solve_s": round(solve, 3),
        "cli_plan_overhead_s": round(seconds - solve, 2),
        "cli_plan_overhead_cpu_s": round(cpu - solve, 2),
        "plan_peak_rss_mb": round(rss, 1),
        "plan_with_previous_s": round(with_previous, 2),
        "plan_with_previous_cpu_s": round(previous_cpu, 2),
        "migration_stages": len(migration["stages"]),
        "migration_planning_s": round(migration["planning_seconds"], 3),
        "cli_bench_s": round(bench_seconds, 2),
        "cli_bench_cpu_s": round(bench_cpu, 2),
        "bench_peak_rss_mb": round(bench_rss, 1),
    }


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("out/cycle-bench.json"))
    parser.add_argument("--quick", action="store_true", help="a smaller scaling and time-limit table")
    parser.add_argument("--no-reference", action="store_true", help="skip the previous code paths")
    parser.add_argument("--time-limit", type=float, default=5.0, help="limit for the time-limit table")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: "
                        "cycle,scaling,limits,policies,cli")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    report: dict = {"targets": TARGETS}
    checks = []
    if "cycle" not in skip:
        log("one V3-scale cycle in a solver worker")
        cycle = report["cycle"] = bench_cycle(not args.no_reference)
        print("\n== one rebalance cycle at DeepSeek-V3 scale (solver worker) ==")
        print(table([{"figure": k, "value": v} for k, v in cycle.items()]))
        checks += [("cycle_s", cycle["cycle_s"]), ("cycle_cpu_s", cycle["cycle_cpu_s"]),
                   ("plan_migration_s", cycle["plan_migration_s"]),
                   ("plan_migration_cpu_s", cycle["plan_migration_again_cpu_s"]),
                   ("plan_mb", cycle["plan_mb"])]
    if "scaling" not in skip:
        rows, exponents = bench_scaling(args.quick)
        report["scaling"] = {"rows": rows, **{name: round(value, 3) for name, value in exponents.items()}}
        print(f"\n== migration planning, linear -> eplb (least CPU of {SCALING_REPEATS} rounds over the table) ==")
        print(table(rows))
        print(f"fitted: CPU seconds ~ (layers x slots)^{exponents['exponent']:.2f}; "
              f"stages ~ ^{exponents['stages_exponent']:.2f}, CPU per stage ~ ^{exponents['per_stage_exponent']:.2f}")
        checks.append(("exponent", round(exponents["exponent"], 3)))
    if "limits" not in skip:
        rows = bench_time_limits(args.time_limit, args.quick)
        report["time_limits"] = {"limit_s": args.time_limit, "rows": rows}
        print(f"\n== every policy with a {args.time_limit:g} s limit (from the linear placement) ==")
        worst = {}
        for row in rows:
            worst[row["policy"]] = max(worst.get(row["policy"], 0.0), row["ratio_to_limit"])
        print(table([r for r in rows if r["policy"] in SLOW_POLICIES]))
        print("worst wall / limit: " + ", ".join(f"{p} {r:.2f}" for p, r in worst.items()))
        checks.append(("limit_ratio", max(worst.values())))
    if "policies" not in skip:
        rows = bench_policies(10.0)
        report["policies"] = rows
        print("\n== policies at DeepSeek-V3 scale, 10 s limit, predicted MoE time on the gate's batches ==")
        print(table(rows))
    if "cli" not in skip:
        cli = report["cli"] = bench_cli()
        print("\n== moeplace at DeepSeek-V3 scale ==")
        print(table([{"figure": k, "value": v} for k, v in cli.items()]))
        checks += [
            (name, cli[name])
            for name in ("cli_plan_overhead_s", "cli_plan_overhead_cpu_s", "cli_bench_s", "cli_bench_cpu_s")
        ]
    report["checks"] = [
        {"target": name, "measured": value, "limit": TARGETS[name], "met": value <= TARGETS[name]}
        for name, value in checks
    ]
    print("\n== targets ==")
    print(table(report["checks"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
