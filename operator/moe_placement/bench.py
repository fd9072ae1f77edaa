"""Side-by-side benchmark: fit each policy on one window of a workload, score all on the next.

Every policy is scored on the same sampled batches with every router, per phase: prefill batches are
whole sequences (``prefill_tokens_per_gpu`` per GPU), decode batches one token of many sequences
(``decode_tokens_per_gpu`` per GPU). When request routers are compared (``round_robin``,
``signature``), each decides the home GPU of every sequence and every rank batches its own
sequences (``sample_batches`` with ``home_gpu``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_placement.baselines import token_balance_lower_bound
from moe_placement.cost import CostReport, DataFlow, evaluate
from moe_placement.models import (
    PHASES,
    ModelShape,
    Phase,
    PlacementError,
    RoutingBatch,
    Topology,
    WorkloadProfile,
)
from moe_placement.policies import PlanResult, PolicyOptions, plan
from moe_placement.request_routing import request_homes, tokens_per_gpu_imbalance
from moe_placement.traces import Trace, load_profile, load_trace, sample_batches, sample_tokens

@dataclass(frozen=True)
class Workload:
    """A named pair of windows: policies fit on ``fit`` and are scored on ``score``."""

    name: str
    fit: Trace
    score: Trace


@dataclass(frozen=True)
class BenchOptions:
    """Prefill batches are larger than the operator gate's (``scoring.TOKENS_PER_GPU``) so that
    prefill is compute-bound, where placements differ most."""

    prefill_tokens_per_gpu: int = 512
    decode_tokens_per_gpu: int = 16
    num_batches: int = 2
    time_limit_s: float = 30.0
    seed: int = 0
    data_flow: DataFlow = "home"
    request_routers: tuple[str, ...] = ("round_robin",)


def workloads_from_file(
    path: str | Path,
    task: str | None = None,
    shift: str | None = None,
    seed: int = 0,
    model: str | None = None,
    mix: bool = False,
) -> list[Workload]:
    """Workloads of a trace file: one per domain (first half fits, second half scores), or one for
    ``task``; ``shift`` ``A:B`` adds fitting on domain A and scoring on domain B; ``mix`` adds all
    domains together, sequences interleaved in a random order (first half of each domain fits).
    Counts-only files are turned into tokens that keep their per-layer loads."""
    name = Path(path).stem
    try:
        trace = load_trace(path)
    except PlacementError as error:
        if "counts only" not in str(error):
            raise
        profile = load_profile(path, task=task, model=model)
        tokens = sample_tokens(profile, 16384, np.random.default_rng(seed))
        return [Workload(name, *tokens.split(0.5))]
    domains = sorted({domain for domain in trace.domains if domain})
    if task is not None:
        trace, domains = trace.select_domain(task), [task]
    workloads = (
        [Workload(f"{name}:{domain}", *trace.select_domain(domain).split(0.5)) for domain in domains]
        if len(domains) > 1 or task is not None
        else [Workload(name, *trace.split(0.5))]
    )
    if mix and len(trace.domain_names) > 1:
        workloads.append(Workload(f"{name}:mix", *interleaved_split(trace, seed)))
    if shift is not None:
        fit_domain, _, score_domain = shift.partition(":")
        if not score_domain:
            raise PlacementError(f"shift: {shift!r} is not FIT_DOMAIN:SCORE_DOMAIN")
        full = load_trace(path)
        workloads.append(
            Workload(
                f"{name}:{fit_domain}->{score_domain}",
                full.select_domain(fit_domain),
                full.select_domain(score_domain),
            )
        )
    return workloads


def interleaved_split(trace: Trace, seed: int = 0) -> tuple[Trace, Trace]:
    """The first and second half of each domain's sequences, each half in a random order that
    interleaves the domains (a multi-domain mix arriving at one service)."""
    rng = np.random.default_rng(seed)
    fit, score = trace.split(0.5)
    return (
        fit.select_sequences(rng.permutation(fit.num_sequences)),
        score.select_sequences(rng.permutation(score.num_sequences)),
    )


def score_batches(
    workload: Workload,
    topology: Topology,
    options: BenchOptions,
    home_gpu: np.ndarray | None = None,
) -> dict[Phase, list[RoutingBatch]]:
    """The batches every policy is scored on, per phase; ``home_gpu`` [S] (each score sequence's
    GPU) changes where tokens start, not which tokens a batch holds."""
    rng = np.random.default_rng(options.seed)
    return {
        phase: sample_batches(
            workload.score,
            topology.num_gpus,
            _tokens_per_gpu(options, phase),
            options.num_batches,
            phase,
            rng,
            home_gpu,
        )
        for phase in PHASES
    }


def bench_row(
    workload: str,
    result: PlanResult,
    router: str,
    costs: dict[Phase, CostReport],
    requests: str = "round_robin",
) -> dict[str, object]:
    """One row of the benchmark's JSON."""
    return {
        "workload": workload,
        "policy": result.policy,
        "router": router,
        "requests": requests,
        "status": result.solver.status,
        "solve_seconds": result.solve_seconds,
        "gap": result.solver.gap,
        "notes": result.solver.notes,
        **{phase: cost.summary() for phase, cost in costs.items()},
    }


def run_bench(
    workloads: Sequence[Workload],
    model: ModelShape,
    topology: Topology,
    policies: Sequence[str],
    routers: Sequence[str],
    options: BenchOptions = BenchOptions(),
    progress: Callable[[str], None] = lambda _message: None,
) -> tuple[list[dict[str, object]], dict[tuple[str, str], CostReport]]:
    """Rows (policy x request router x router per workload) and, for plots, the prefill cost of each
    (workload, policy) with the first routers."""
    rows: list[dict[str, object]] = []
    heat: dict[tuple[str, str], CostReport] = {}
    for workload in workloads:
        batches = score_batches(workload, topology, options)
        lengths = np.diff(workload.score.seq_offsets)
        fit_profiles = {
            phase: workload.fit.profile(
                batch_size=topology.num_gpus * _tokens_per_gpu(options, phase), phase=phase
            )
            for phase in PHASES
        }
        for policy in policies:
            results = {
                phase: plan(
                    policy,
                    fit_profiles[phase],
                    model,
                    topology,
                    PolicyOptions(time_limit_s=options.time_limit_s, seed=options.seed),
                )
                for phase in PHASES
            }
            progress(
                f"{workload.name}: {policy} solved in "
                f"{sum(r.solve_seconds for r in results.values()):.2f}s"
            )
            for requests in options.request_routers:
                homes = {
                    phase: request_homes(
                        requests, workload.score, topology, fit_profiles[phase], results[phase].placement
                    )
                    for phase in PHASES
                }
                phase_batches = (
                    batches
                    if len(options.request_routers) == 1 and requests == "round_robin"
                    else {
                        phase: score_batches(workload, topology, options, homes[phase])[phase]
                        for phase in PHASES
                    }
                )
                for router in routers:
                    costs = {
                        phase: evaluate(
                            results[phase].placement,
                            model,
                            topology,
                            phase_batches[phase],
                            router,
                            options.seed,
                            options.data_flow,
                        )
                        for phase in PHASES
                    }
                    heat.setdefault((workload.name, policy), costs["prefill"])
                    row = bench_row(workload.name, results["prefill"], router, costs, requests)
                    row["solve_seconds"] = sum(r.solve_seconds for r in results.values())
                    row["home_imbalance"] = tokens_per_gpu_imbalance(
                        homes["prefill"], lengths, topology.num_gpus
                    )
                    rows.append(row)
        rows.append(_lower_bound_row(workload.name, fit_profiles["prefill"], topology))
    return rows, heat


def _lower_bound_row(
    workload: str, profile: WorkloadProfile, topology: Topology
) -> dict[str, object]:
    """The row of the token-balance lower bound for ``profile`` (load [L, E]), which no
    placement can beat: it puts each policy's prefill token imbalance in context."""
    bound = token_balance_lower_bound(profile.load, topology.num_gpus, topology.num_slots)
    return {
        "workload": workload,
        "policy": "lower_bound",
        "router": "-",
        "prefill": {
            "token_imbalance": float(np.mean(bound / (profile.load.sum(-1) / topology.num_gpus)))
        },
    }


def _tokens_per_gpu(options: BenchOptions, phase: Phase) -> int:
    return options.prefill_tokens_per_gpu if phase == "prefill" else options.decode_tokens_per_gpu


TABLE_COLUMNS = (
    ("workload", "workload", "{}"),
    ("policy", "policy", "{}"),
    ("router", "router", "{}"),
    ("requests", "requests", "{}"),
    ("home max/mean", "home_imbalance", "{:.2f}"),
    ("tok max/mean", ("prefill", "token_imbalance"), "{:.3f}"),
    ("max act (dec)", ("decode", "max_activated_experts"), "{:.2f}"),
    ("x-node MB", ("prefill", "cross_node_mb"), "{:.1f}"),
    ("prefill ms", ("prefill", "moe_ms"), "{:.3f}"),
    ("decode ms", ("decode", "moe_ms"), "{:.3f}"),
    ("solve s", "solve_seconds", "{:.2f}"),
)


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """A plain-text table of the rows (markdown pipes, so it pastes into the README)."""
    header = [title for title, _, _ in TABLE_COLUMNS]
    lines = [header]
    for row in rows:
        cells = []
        for _, key, fmt in TABLE_COLUMNS:
            value = row.get(key[0], {}).get(key[1]) if isinstance(key, tuple) else row.get(key)
            cells.append("" if value is None else fmt.format(value))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    rendered.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(rendered)


def write_json(path: str | Path, rows: Sequence[dict[str, object]], meta: dict[str, object]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=1) + "\n")


def plot_heatmaps(directory: str | Path, heat: dict[tuple[str, str], CostReport]) -> list[Path]:
    """One PNG per workload: per-GPU prefill tokens per layer, one panel per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for workload in dict.fromkeys(name for name, _ in heat):
        policies = [policy for name, policy in heat if name == workload]
        figure, axes = plt.subplots(1, len(policies), figsize=(3.2 * len(policies), 4), squeeze=False)
        for axis, policy in zip(axes[0], policies):
            tokens = heat[(workload, policy)].gpu_tokens
            relative = tokens / tokens.mean(axis=1, keepdims=True)
            image = axis.imshow(relative, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, relative.max()))
            axis.set_title(f"{policy}\nmax/mean {relative.max(axis=1).mean():.2f}", fontsize=9)
            axis.set_xlabel("GPU")
            axis.set_ylabel("layer")
        figure.colorbar(image, ax=axes[0].tolist(), label="tokens / mean")
        figure.suptitle(f"{workload}: per-GPU load (prefill)")
        path = directory / f"heatmap-{_slug(workload)}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
