"""``moeplace demo``: the whole system on this machine, live, then a report.

A real kube-apiserver + etcd and a real Prometheus on loopback, one replay agent process per EP rank
(a skewed workload whose task domain shifts midway), the operator as a process whose user is bound
only to the chart's ClusterRole, and ``examples/moedeployment.yaml`` applied. A table shows what
Prometheus and the resource's status say while the operator rebalances; at the end a report (Markdown,
JSON, PNG heatmaps of per-GPU load before and after, a timeline) lands in ``--out``. Everything is
torn down on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moe_placement.models import ModelShape
from moe_placement.presets import MODEL_PRESETS
from moeplace_dev.localstack import Agents

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_MANIFEST = REPO / "examples" / "moedeployment.yaml"
NAMESPACE = "default"
OPERATOR_USER = "operator"
# Experts of real models are scaled down (narrower FFNs) to this size so that a few agents fit in memory.
MAX_EXPERT_BYTES = 2e6
# Short windows so that a rebalance shows within a minute (the example's are production-scale). The
# gate predicts on batches of prefill size (the example's 128 tokens per GPU put a sampling floor of
# ~1.15 under every placement's max/mean, diluting a few percent of real gain), and a placement
# decided on a window that straddled the domain shift is replaced once the remaining gain exceeds 2%
# (at 5% such a mixed placement stays, a few percent above what the new domain allows).
DEMO_PLACEMENT = {
    "rebalanceIntervalSeconds": 15, "solverTimeLimitSeconds": 10, "minPredictedGain": 0.02,
    "evaluationBatches": 4, "prefillTokensPerGpu": 1024,
}
DEMO_METRICS = {"windowSeconds": 20, "minTokens": 100}
# The replay agents route one token stream with one router. Random replica choice (what engines do
# without moeplace's routers) for both the agents and the gate's prediction, and the gate scores that
# one stream on the token imbalance the demo measures, so that the imbalance Prometheus shows is the
# one the placement and the gate act on (METRO, for one, concentrates tokens to stream fewer experts,
# and a gain averaged with another phase's objective can hide a token imbalance the demo shows).
DEMO_OBJECTIVE = {"prefillRouter": "random", "decodeRouter": "random", "phases": "prefill", "prefill": "tokenImbalance"}
LOAD_QUERY = "sum by (rank, layer) (increase(moeplace_expert_tokens_total[15s]))"
# Tokens over a whole period: the report measures each placement over the time it served (one 15 s
# window of random replica choice is noisy by about 0.02 at this rate). increase() and not a difference
# of sums: an agent exports only the experts it hosts, so series end and start with migrations.
PERIOD_LOAD_QUERY = "sum by (rank, layer) (increase(moeplace_expert_tokens_total[{seconds}s]))"
CROSS_NODE_QUERY = "sum(rate(moeplace_cross_node_bytes_total[15s]))"
ACTIVATED_QUERY = "max(avg by (rank) (moeplace_activated_experts))"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
    parser = subparsers.add_parser(
        "demo", help="run the local demo: control plane, Prometheus, agents, operator, live table, report"
    )
    parser.add_argument(
        "--trace", type=Path, help="replay this routing trace (default: the synthetic generator)"
    )
    parser.add_argument("--duration", type=float, default=200.0, help="seconds of traffic (default 200)")
    parser.add_argument(
        "--shift-after", type=float, default=None,
        help="seconds until the domain shift (default: 45%% of --duration)",
    )
    parser.add_argument("--tokens-per-second", type=float, default=400.0)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="report directory")
    parser.add_argument("--manifest", type=Path, default=EXAMPLE_MANIFEST)
    parser.set_defaults(func=run_demo)


def build_demo_manifest(
    manifest: dict[str, Any], prometheus_url: str, model: ModelShape | None
) -> dict[str, Any]:
    """The manifest the demo applies: the example with local Prometheus, short windows and, when a
    trace is replayed, the trace's model."""
    spec = json.loads(json.dumps(manifest["spec"]))
    spec.setdefault("placement", {}).update(DEMO_PLACEMENT)
    spec["placement"].setdefault("objective", {}).update(DEMO_OBJECTIVE)
    spec.setdefault("metrics", {}).update(DEMO_METRICS, prometheusUrl=prometheus_url)
    if model is not None:
        preset = next((name for name, shape in MODEL_PRESETS.items() if shape == model), None)
        spec["model"] = {"preset": preset} if preset else {"shape": model.model_dump(by_alias=True)}
    metadata = {"name": manifest["metadata"]["name"], "namespace": NAMESPACE}
    return {"apiVersion": manifest["apiVersion"], "kind": manifest["kind"], "metadata": metadata, "spec": spec}


def model_of_manifest(spec: dict[str, Any]) -> ModelShape:
    """The ModelShape a manifest's ``spec.model`` names."""
    if spec["model"].get("preset"):
        return MODEL_PRESETS[spec["model"]["preset"]]
    return ModelShape.model_validate(spec["model"]["shape"])


def model_of_trace(path: Path) -> ModelShape:
    """The preset matching a trace's layers, experts and top-k, else a small custom shape."""
    from moe_placement.traces import load_trace

    trace = load_trace(path)
    for shape in MODEL_PRESETS.values():
        if (shape.num_layers, shape.num_experts, shape.top_k) == (
            trace.num_layers, trace.num_experts, trace.top_k
        ):
            return shape
    return ModelShape(
        name=path.stem, num_layers=trace.num_layers, num_experts=trace.num_experts,
        top_k=trace.top_k, hidden_size=256, expert_intermediate_size=512,
    )


def load_matrix(samples: list[dict[str, Any]], num_gpus: int, num_layers: int) -> np.ndarray:
    """Prometheus vector of ``LOAD_QUERY`` -> tokens per GPU per layer, [L, G]."""
    matrix = np.zeros((num_layers, num_gpus))
    for sample in samples:
        rank, layer = int(sample["metric"]["rank"]), int(sample["metric"]["layer"])
        if rank < num_gpus and layer < num_layers:
            matrix[layer, rank] = float(sample["value"][1])
    return matrix


def imbalance_of(matrix: np.ndarray) -> float | None:
    """Mean over layers of max / mean GPU load, None without load. matrix: [L, G]."""
    mean = matrix.mean(axis=1)
    if not np.all(mean > 0):
        return None
    return float(np.mean(matrix.max(axis=1) / mean))


@dataclass
class Sample:
    """One row of the live table."""

    seconds: float
    phase: str
    generation: int
    imbalance: float | None
    status_imbalance: float | None
    max_activated: float | None
    cross_node_mb_s: float | None
    migration: str  # the migration's state (Running, Completed, RolledBack...), "-" before any
    cycle: str
    load: np.ndarray = field(repr=False)
    progress: str = ""  # what the table shows of a running migration

    def row(self) -> str:
        def number(value: float | None, digits: int = 2) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        return (
            f"{self.seconds:6.0f}s  {self.phase:<10} gen {self.generation:<3} "
            f"imbalance {number(self.imbalance):>5} (status {number(self.status_imbalance):>5})  "
            f"max act {number(self.max_activated, 1):>4}  x-node {number(self.cross_node_mb_s, 1):>6} MB/s  "
            f"{self.progress or self.migration:<22} {self.cycle}"
        )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def demo_agents(
    workdir: Path, args: argparse.Namespace, spec: dict[str, Any], model: ModelShape, shift_after: float,
    stream_start: float,
) -> Agents:
    """One replay agent per GPU of the manifest's ``spec``, replaying in lockstep from ``stream_start``
    (epoch seconds) with the domain shift after ``shift_after`` seconds; not started yet."""
    topology = spec["topology"]
    return Agents(
        workdir,
        replay=str(args.trace) if args.trace else "synthetic",
        model=model.model_dump_json(),
        num_gpus=topology["nodes"] * topology["gpusPerNode"],
        topology=f"{topology['nodes']}x{topology['gpusPerNode']}",
        redundant_slots=spec["placement"].get("redundantSlots", 0),
        tokens_per_second=args.tokens_per_second,
        window_seconds=DEMO_METRICS["windowSeconds"],
        router=DEMO_OBJECTIVE["prefillRouter"],
        same_seed=True,
        all_ranks_extra=[
            "--shift-after-seconds", str(shift_after), "--start-time", str(stream_start),
            "--expert-scale", str(max(1, math.ceil(model.expert_bytes / MAX_EXPERT_BYTES))),
        ],
    )


def run_demo(args: argparse.Namespace) -> int:
    import urllib3

    from moeplace_dev.cluster import start_control_plane, start_prometheus
    from moeplace_dev.localstack import Api, OperatorProcess, wait_for

    # The local API server's kubeconfig skips TLS verification by design; say so once, not per call.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    manifest = yaml.safe_load(args.manifest.read_text())
    trace_model = model_of_trace(args.trace) if args.trace else None
    model = trace_model or model_of_manifest(manifest["spec"])
    num_gpus = manifest["spec"]["topology"]["nodes"] * manifest["spec"]["topology"]["gpusPerNode"]
    shift_after = args.shift_after if args.shift_after is not None else 0.45 * args.duration
    name = manifest["metadata"]["name"]
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="moeplace-demo-"))
    stack: list[Any] = []
    try:
        say("starting kube-apiserver + etcd on loopback (the first run builds kube-apiserver, ~5 min)")
        cluster = start_control_plane(workdir / "control-plane")
        stack.append(cluster)
        api = Api(cluster.kubeconfig)
        api.install_crd()
        api.bind_operator_role(OPERATOR_USER)
        say(f"API server {cluster.server} ready; CRD installed; user {OPERATOR_USER!r} bound to deploy/rbac.yaml")

        # The agents replay in lockstep from stream_start (epoch seconds); the table's clock is the same.
        stream_start = time.time() + 15
        agents = demo_agents(workdir / "agents", args, manifest["spec"], model, shift_after, stream_start)
        stack.append(agents)
        say(f"starting {num_gpus} replay agents ({model.name}: {model.num_layers} layers x "
            f"{model.num_experts} experts, top-{model.top_k}; domain shift after {shift_after:.0f}s)")
        agents.start(timeout=180)

        prometheus = start_prometheus(workdir / "prometheus", agents.targets, "1s")
        stack.append(prometheus)
        operator = OperatorProcess(
            workdir / "operator", cluster.kubeconfig_for(OPERATOR_USER), prometheus_url=prometheus.url,
        )
        (workdir / "operator").mkdir()
        operator.start()
        stack.append(operator)
        prometheus.set_targets([*agents.targets, f"127.0.0.1:{operator.metrics_port}"])
        say(f"Prometheus {prometheus.url} scraping the agents and the operator; operator started")

        body = build_demo_manifest(manifest, prometheus.url, trace_model)
        api.announce(NAMESPACE, name, agents.ports, agents.token)
        api.create(NAMESPACE, body)
        say(f"applied {args.manifest.name} as {NAMESPACE}/{name} (policy {body['spec']['placement']['policy']})")
        wait_for(lambda: api.status(NAMESPACE, name).get("placement"), 60, "the initial placement")

        samples = watch(api, prometheus, name, model.num_layers, num_gpus, stream_start, args.duration)
        def period_load(first: float, last: float) -> np.ndarray:
            query = PERIOD_LOAD_QUERY.format(seconds=round(last - first))
            return load_matrix(prometheus.query(query, at=stream_start + last), num_gpus, model.num_layers)

        report = write_report(
            args.out, samples, api.events(NAMESPACE), shift_after, model, num_gpus, period_load
        )
        say(f"report: {args.out / 'report.md'}")
        print(report)
        return 0
    except KeyboardInterrupt:
        say("interrupted: tearing down")
        return 130
    finally:
        for part in reversed(stack):
            part.stop()
        say("stopped everything")


def watch(
    api: Any, prometheus: Any, name: str, num_layers: int, num_gpus: int, stream_start: float, duration: float
) -> list[Sample]:
    """Print a table row every few seconds until ``duration`` seconds of traffic; return the rows.

    A row's time is seconds since the agents' stream started (the domain shift's clock)."""
    samples: list[Sample] = []
    print(f"{'time':>7}  {'phase':<10} {'gen':<7} {'imbalance (Prometheus / operator)':<33} "
          f"{'max act':<8} {'cross-node':<14} {'migration':<22} last cycle", flush=True)
    while time.time() - stream_start < duration:
        status = api.status(NAMESPACE, name)
        load = load_matrix(prometheus.query(LOAD_QUERY), num_gpus, num_layers)
        cross_node = prometheus.query(CROSS_NODE_QUERY)
        activated = prometheus.query(ACTIVATED_QUERY)
        migration = status.get("migration") or {}
        progress = (
            f"stage {migration.get('stage', 0)}/{migration.get('stages', 0)} "
            f"{migration.get('bytesMoved', 0) / 1e6:.1f} MB"
            if migration.get("state") == "Running" else ""
        )
        sample = Sample(
            seconds=time.time() - stream_start,
            phase=status.get("phase", "-"),
            generation=(status.get("placement") or {}).get("generation", 0),
            imbalance=imbalance_of(load),
            status_imbalance=status.get("imbalance"),
            max_activated=float(activated[0]["value"][1]) if activated else None,
            cross_node_mb_s=float(cross_node[0]["value"][1]) / 1e6 if cross_node else None,
            migration=migration.get("state") or "-",
            cycle=status.get("lastCycleResult") or "-",
            load=load,
            progress=progress,
        )
        samples.append(sample)
        print(sample.row(), flush=True)
        time.sleep(5)
    return samples


def write_report(
    out: Path, samples: list[Sample], events: list[dict[str, Any]], shift_after: float,
    model: ModelShape, num_gpus: int, period_load: Callable[[float, float], np.ndarray],
) -> str:
    """report.md, report.json, heatmaps.png and timeline.png in ``out``; returns the Markdown.

    ``period_load(first, last)``: tokens per GPU per layer counted between two rows' times, [L, G].
    A rebalance is a migration that completed (the generation changed and the migration says
    Completed); rolled-back migrations are counted apart, from the operator's events."""
    rebalances = [
        (before, after) for before, after in zip(samples, samples[1:])
        if after.generation != before.generation and after.migration == "Completed"
    ]
    rolled_back = sum(event["reason"] == "MigrationRolledBack" for event in events)
    periods = periods_of(
        samples, shift_after, rebalances[0][1].generation if rebalances else None, period_load
    )
    figures = {
        label: {
            "seconds": [round(p.start, 1), round(p.last.seconds, 1)], "generation": p.last.generation,
            "imbalance": p.imbalance, "tokens": float(p.load.sum()), "window_imbalance": p.last.imbalance,
            "max_activated_experts": p.last.max_activated, "cross_node_mb_s": p.last.cross_node_mb_s,
        }
        for label, p in periods.items() if p is not None
    }
    timeline = [
        {"seconds": round(after.seconds, 1), "generation": after.generation,
         "imbalance_before": before.imbalance, "migration": before.migration}
        for before, after in rebalances
    ]
    (out / "report.json").write_text(json.dumps(
        {"model": model.model_dump(), "gpus": num_gpus, "shift_after_seconds": shift_after,
         "figures": figures, "rebalances": timeline, "rolled_back": rolled_back, "events": events,
         "samples": [{k: v for k, v in vars(s).items() if k != "load"} for s in samples]},
        indent=1, default=float,
    ) + "\n")
    plot_report(out, periods, samples, shift_after)
    text = report_markdown(model, num_gpus, shift_after, figures, timeline, events, rolled_back)
    (out / "report.md").write_text(text)
    return text


@dataclass
class Period:
    """From ``start`` (seconds) to the row ``last`` one placement served one phase of the run; ``load``:
    the tokens per GPU per layer counted in between, [L, G]."""

    start: float
    last: Sample
    load: np.ndarray = field(repr=False)

    @property
    def imbalance(self) -> float | None:
        return imbalance_of(self.load)


# A shorter period is left out of the report rather than shown with a window's noise. Two rows
# (~5 s apart) are enough: the figure counts every token of the period, and the first migration
# often starts within 10 s of the stream.
MIN_PERIOD_SECONDS = 5.0


def period_rows(
    samples: list[Sample], shift_after: float, first_rebalanced: int | None,
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """The rows of ``periods_of``'s three periods (a running migration's rows belong to none)."""
    if not samples:
        return [], [], []
    served = [s for s in samples if s.migration != "Running"]
    before_shift = [s for s in served if s.seconds < shift_after]
    initial = [s for s in before_shift if s.generation == samples[0].generation and s.imbalance is not None]
    settled = [s for s in before_shift if s.generation == first_rebalanced and s.migration == "Completed"]
    final = [s for s in served if s.seconds >= shift_after and s.generation == samples[-1].generation]
    return initial, settled, final


def periods_of(
    samples: list[Sample], shift_after: float, first_rebalanced: int | None,
    period_load: Callable[[float, float], np.ndarray],
) -> dict[str, Period | None]:
    """Before the first rebalance (the initial generation from the stream's start until a migration
    runs), after it (generation ``first_rebalanced`` once its migration completed, until the shift or
    the next generation) and at the end (the last generation after the shift, from when it went live);
    None where there is no such period of ``MIN_PERIOD_SECONDS``. ``period_load`` as for
    ``write_report``."""
    initial, settled, final = period_rows(samples, shift_after, first_rebalanced)

    def period(start: float | None, rows: list[Sample]) -> Period | None:
        if not rows:
            return None
        start = rows[0].seconds if start is None else start
        if rows[-1].seconds - start < MIN_PERIOD_SECONDS:
            return None
        return Period(start, rows[-1], period_load(start, rows[-1].seconds))

    return {
        # the agents serve the initial placement from the stream's start, before the first row
        "before the first rebalance": period(0.0, initial),
        "after it (before the shift)": period(None, settled),
        "at the end (after the shift)": period(None, final),
    }


def report_markdown(
    model: ModelShape, num_gpus: int, shift_after: float, figures: dict[str, dict[str, Any]],
    timeline: list[dict[str, Any]], events: list[dict[str, Any]], rolled_back: int,
) -> str:
    """report.md's text: the snapshots' figures, the completed rebalances (``timeline``), how many
    migrations rolled back, and the operator's last events."""
    lines = [
        f"# moeplace demo: {model.name} on {num_gpus} GPUs", "",
        f"Domain shift after {shift_after:.0f} s; {len(timeline)} rebalance(s) completed, "
        f"{rolled_back} migration(s) rolled back.", "",
        "Imbalance: max/mean GPU load, mean over layers, of the tokens counted over the whole period "
        "(the last 15 s window beside it).", "",
        "| when | t (s) | generation | imbalance over the period | last 15 s window | tokens | "
        "max activated experts | cross-node MB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, figure in figures.items():
        first, last = figure["seconds"]
        lines.append(
            f"| {label} | {first:.0f}-{last:.0f} | {figure['generation']} | {_fmt(figure['imbalance'], 3)} | "
            f"{_fmt(figure['window_imbalance'])} | {figure['tokens']:.0f} | "
            f"{_fmt(figure['max_activated_experts'], 1)} | {_fmt(figure['cross_node_mb_s'], 1)} |"
        )
    lines += ["", "Rebalances:", ""]
    lines += [f"- {r['seconds']} s: generation {r['generation']} live (imbalance before "
              f"{_fmt(r['imbalance_before'])})" for r in timeline] or ["- none"]
    lines += ["", "Operator events:", ""]
    lines += [f"- {e['type']} {e['reason']}: {e['message']}" for e in events[-15:]] or ["- none"]
    lines += ["", "![per-GPU load](heatmaps.png)", "", "![timeline](timeline.png)", ""]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_report(out: Path, periods: dict[str, Period | None], samples: list[Sample], shift_after: float) -> None:
    """heatmaps.png (per-GPU load per layer over each period) and timeline.png (imbalance over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {label: p for label, p in periods.items() if p is not None and p.imbalance is not None}
    if present:
        figure, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 4), squeeze=False)
        for axis, (label, period) in zip(axes[0], present.items()):
            relative = period.load / period.load.mean(axis=1, keepdims=True)
            image = axis.imshow(relative, aspect="auto", cmap="magma", vmin=0, vmax=2)
            axis.set_title(f"{label}\ngen {period.last.generation}, max/mean {period.imbalance:.3f}", fontsize=9)
            axis.set_xticks(range(relative.shape[1]))
            axis.set_yticks(range(relative.shape[0]))
            axis.set_xlabel("GPU (rank)")
            axis.set_ylabel("layer")
        figure.colorbar(image, ax=axes[0].tolist(), label="tokens / mean")
        figure.savefig(out / "heatmaps.png", dpi=90)
        plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 3.5))
    times = [s.seconds for s in samples]
    axis.plot(times, [np.nan if s.imbalance is None else s.imbalance for s in samples], label="imbalance")
    for before, after in zip(samples, samples[1:]):
        if after.generation != before.generation:
            axis.axvline(after.seconds, color="green", linestyle="--", linewidth=1)
    axis.axvline(shift_after, color="red", linewidth=1, label="domain shift")
    axis.set_xlabel("seconds")
    axis.set_ylabel("max / mean GPU load")
    axis.set_title("imbalance; dashed: a new placement generation went live")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "timeline.png", dpi=90)
    plt.close(figure)
