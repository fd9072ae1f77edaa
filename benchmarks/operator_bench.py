"""Operator benchmark: prints a table and writes JSON.

1. **Scale-out**: N MoEDeployments (default 100) created at once on a local kube-apiserver; the
   operator (a process, least-privilege token) reconciles them: time until all are Ready, and the
   operator's memory (RSS now and peak, solver worker included).
2. **DeepSeek-V3 cycle**: one rebalance cycle at 58 layers x 256 experts: a fake exporter process
   serves 64 agents' ``moeplace_expert_tokens_total`` series (one per rank, layer and hosted
   expert), a real Prometheus scrapes it, and the operator's own functions run the cycle: PromQL
   query -> profile -> solve (in a worker process, as the operator does) -> predicted gain ->
   migration plan. Time from query to plan, per step.

    PYTHONPATH=operator:agent:dev python3 benchmarks/operator_bench.py [--deployments 100] [--json out/operator-bench.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import urllib3

from moeplace_dev.cluster import free_port, start_control_plane, start_prometheus

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

# --------------------------------------------------------------------------------------------------
# 1. Many deployments


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(value) for value in text.split()]


def bench_many(count: int, workdir: Path) -> dict:
    from moeplace_dev.localstack import Api, OperatorProcess
    from moeplace_dev.manifests import manifest

    with start_control_plane(workdir / "control-plane") as cluster:
        api = Api(cluster.kubeconfig)
        api.install_crd()
        api.bind_operator_role("operator")
        namespace = api.namespace("bench")
        operator = OperatorProcess(workdir, cluster.kubeconfig_for("operator"), solver_workers=1)
        operator.start()
        try:
            time.sleep(3)  # the operator's start-up (imports, login) is not what is measured
            idle_rss, _ = rss_kib(operator.proc.pid)
            bodies = [
                manifest(f"moe-{index:03d}", namespace, "http://127.0.0.1:9",
                         placement={"rebalanceIntervalSeconds": 300})
                for index in range(count)
            ]
            for body in bodies:  # a deepseek-v2-lite preset group of 2 x 4 GPUs, like a real one
                body["spec"]["model"] = {"preset": "deepseek-v2-lite"}
                body["spec"]["topology"] = {"nodes": 2, "gpusPerNode": 4}
                body["spec"]["placement"]["redundantSlots"] = 16
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda body: api.create(namespace, body), bodies))
            created = time.monotonic() - started
            ready_at: dict[str, float] = {}
            peak = 0
            while len(ready_at) < count and time.monotonic() - started < 600:
                items = api.custom.list_namespaced_custom_object("moeplace.io", "v1alpha1", namespace, "moedeployments")["items"]
                now = time.monotonic() - started
                for item in items:
                    status = item.get("status") or {}
                    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
                    if ready and status.get("phase") == "Ready":
                        ready_at.setdefault(item["metadata"]["name"], now)
                pids = [operator.proc.pid] + children(operator.proc.pid)
                peak = max(peak, sum(rss_kib(pid)[0] for pid in pids))
                time.sleep(0.25)
            rss, hwm = rss_kib(operator.proc.pid)
            pids = [operator.proc.pid] + children(operator.proc.pid)
            total = sum(rss_kib(pid)[0] for pid in pids)
            times = sorted(ready_at.values())
            return {
                "deployments": count,
                "ready": len(ready_at),
                "create_seconds": round(created, 2),
                "all_ready_seconds": round(times[-1], 2) if len(times) == count else None,
                "median_ready_seconds": round(float(np.median(times)), 2) if times else None,
                "operator_rss_mib_idle": round(idle_rss / 1024, 1),
                "operator_rss_mib": round(rss / 1024, 1),
                "operator_rss_peak_mib": round(hwm / 1024, 1),
                "operator_tree_rss_mib": round(total / 1024, 1),
                "operator_tree_rss_peak_mib_sampled": round(peak / 1024, 1),
            }
        finally:
            operator.stop()


# --------------------------------------------------------------------------------------------------
# 2. One cycle at DeepSeek-V3 scale


class Exporter:
    """A fake exporter process: 64 ranks' expert-token counters on one endpoint. Rank r hosts the
    experts of its slots in the linear placement; the counters grow with a Zipf-skewed rate so that
    the linear placement is imbalanced."""

    def __init__(self, num_layers: int, num_experts: int, num_gpus: int, slots: int, seed: int = 0) -> None:
        from moe_placement.baselines import linear_placement

        self.mapping = linear_placement(num_layers, num_experts, num_gpus * slots)
        rng = np.random.default_rng(seed)
        rates = np.stack([rng.permutation(1.0 / np.arange(1, num_experts + 1) ** 1.1) for _ in range(num_layers)])
        self.rates = rates / rates.sum(axis=1, keepdims=True) * 50_000  # tokens x k per second per layer
        self.replicas = np.stack([np.bincount(row, minlength=num_experts) for row in self.mapping])
        self.slots, self.num_gpus = slots, num_gpus
        self.started = time.time()
        self.port = free_port()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.handler = Handler
        self.process = multiprocessing.get_context("fork").Process(target=self._serve, daemon=True)
        self.process.start()

    def _serve(self) -> None:
        ThreadingHTTPServer(("127.0.0.1", self.port), self.handler).serve_forever()

    @property
    def series(self) -> int:
        return int((self.mapping >= 0).sum())

    def render(self) -> str:
        elapsed = time.time() - self.started
        lines = ["# TYPE moeplace_expert_tokens_total counter"]
        for layer in range(self.mapping.shape[0]):
            row = self.mapping[layer]
            values = self.rates[layer, row] / self.replicas[layer, row] * elapsed
            for slot, (expert, value) in enumerate(zip(row, values)):
                lines.append(
                    f'moeplace_expert_tokens_total{{rank="{slot // self.slots}",layer="{layer}",expert="{expert}",'
                    f'slot="{slot}"}} {value:.1f}'
                )
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def bench_cycle(workdir: Path, policy: str, redundant: int, scrapes: int = 5) -> dict:
    from moe_operator.crd import resolve_spec
    from moe_operator.metrics_source import build_profile, fetch_load
    from moe_operator.solver import SolveRequest, solve_and_gate, token_imbalance
    from moe_placement.models import Placement

    resolved = resolve_spec({
        "model": {"preset": "deepseek-v3"}, "topology": {"nodes": 8, "gpusPerNode": 8},
        "placement": {"policy": policy, "redundantSlots": redundant},
    })
    model, topology = resolved.model, resolved.topology
    exporter = Exporter(model.num_layers, model.num_experts, topology.num_gpus, topology.slots_per_gpu)
    prometheus = start_prometheus(workdir / "prometheus", [f"127.0.0.1:{exporter.port}"], "1s")
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        from moe_operator.solver import warm_up

        pool.submit(warm_up).result()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until every series has a few samples in the window
            rows = prometheus.query("count(count_over_time(moeplace_expert_tokens_total[30s]) >= %d)" % scrapes)
            if rows and int(float(rows[0]["value"][1])) >= exporter.series:
                break
            time.sleep(1)
        started = time.perf_counter()
        load, report, _ = fetch_load(prometheus.url, 30, {}, model.num_layers, model.num_experts, topology.num_gpus)
        queried = time.perf_counter()
        profile = build_profile(load, model.top_k, phase="decode")
        previous = Placement(exporter.mapping, model.num_experts, topology.slots_per_gpu)
        request = SolveRequest(
            policy=policy, profile=profile, model=model, topology=topology,
            options=resolved.spec.placement.policy_options(previous, seed=0), min_predicted_gain=0.0,
            interval_s=300, max_copies_per_stage=resolved.spec.migration.max_copies_per_stage,
        )
        result = pool.submit(solve_and_gate, request).result()
        finished = time.perf_counter()
        before = token_imbalance(load, previous)
        after = token_imbalance(load, Placement(result.mapping, model.num_experts, topology.slots_per_gpu)) if result.mapping is not None else before
        return {
            "model": "deepseek-v3 (58 x 256)",
            "topology": f"{topology.num_nodes}x{topology.gpus_per_node} ({topology.num_gpus} agents)",
            "policy": policy,
            "redundant_slots": redundant,
            "series_in_prometheus": exporter.series,
            "series_used": report.used,
            "query_seconds": round(queried - started, 3),
            "solve_seconds": round(result.timings.get("solve", 0.0), 3),
            "evaluate_seconds": round(result.timings.get("evaluate", 0.0), 3),
            "plan_migration_seconds": round(result.timings.get("plan_migration", 0.0), 3),
            "query_to_plan_seconds": round(finished - started, 3),
            "imbalance_before": round(before, 3),
            "imbalance_after": round(after, 3),
            "predicted_gain": round(result.gain, 4),
            "bytes_to_move_gb": round(result.bytes_to_move / 1e9, 2),
            "stages": result.stages,
            "applied": result.apply,
        }
    finally:
        pool.shutdown()
        prometheus.stop()
        exporter.stop()


def table(rows: list[tuple[str, object]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--policy", default="eplb")
    parser.add_argument("--redundant-slots", type=int, default=64)
    parser.add_argument("--skip-many", action="store_true")
    parser.add_argument("--skip-cycle", action="store_true")
    parser.add_argument("--json", default="out/operator-bench.json")
    args = parser.parse_args(argv)
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="moeplace-bench-") as tmp:
        workdir = Path(tmp)
        if not args.skip_many:
            results["many"] = bench_many(args.deployments, workdir / "many")
            print(f"\n== {args.deployments} MoEDeployments reconciled at once ==")
            print(table(list(results["many"].items())))
        if not args.skip_cycle:
            results["cycle"] = bench_cycle(workdir / "cycle", args.policy, args.redundant_slots)
            print("\n== one rebalance cycle at DeepSeek-V3 scale ==")
            print(table(list(results["cycle"].items())))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
