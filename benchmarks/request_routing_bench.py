"""Workload-aware request routing against EPLB + random replica + round-robin requests, on a
two-domain mix: ESFT's intent and law sequences interleaved in a random order, the placement fitted
on the first half of each domain and scored on the second, the router seeing only each request's
prompt (the first half of its tokens).

Per topology and seed, under the engines' data flow (``home``; ``--flows home,follow`` adds
MoETuner's): the baseline (eplb, random replica, round-robin requests), ``grouped`` with signature
routing (prefill: ``local_first`` replicas; decode: ``metro``), and the ablations (eplb with
signature routing, grouped with round-robin requests). Ratios to the baseline, the targets, and
tokens per GPU (max/mean) of each request assignment. Prints a table, writes JSON.

    python benchmarks/request_routing_bench.py [--trace PATH] [--topologies 2x4,4x4] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator")]

from moe_placement.bench import BenchOptions, Workload, interleaved_split, run_bench  # noqa: E402
from moe_placement.presets import model_preset, parse_topology  # noqa: E402
from moe_placement.traces import load_trace  # noqa: E402

DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "esft_lite_intent_law_top6.npz"
TARGETS = {"prefill_moe": 0.75, "prefill_cross_node": 0.70, "decode_moe": 0.80, "home_imbalance": 1.25}
OURS = {"prefill": ("grouped", "local_first", "signature"), "decode": ("grouped", "metro", "signature")}
ABLATIONS = {
    "eplb + signature routing": {
        "prefill": ("eplb", "local_first", "signature"),
        "decode": ("eplb", "metro", "signature"),
    },
    "grouped + round robin": {
        "prefill": ("grouped", "local_first", "round_robin"),
        "decode": ("grouped", "metro", "round_robin"),
    },
}
BASELINE = ("eplb", "random", "round_robin")


def measure(trace_path: Path, topology_spec: str, seed: int, flow: str, batches: int) -> dict:
    model = model_preset("deepseek-v2-lite")
    topology = parse_topology(topology_spec, model.num_experts, 16)
    workload = Workload("esft:intent+law", *interleaved_split(load_trace(trace_path), seed))
    options = BenchOptions(
        num_batches=batches,
        seed=seed,
        data_flow=flow,
        request_routers=("round_robin", "signature"),
    )
    rows, _ = run_bench(
        [workload], model, topology, ["eplb", "grouped"], ["random", "local_first", "metro"], options
    )
    table = {(r["policy"], r["router"], r["requests"]): r for r in rows if r["policy"] != "lower_bound"}
    base = table[BASELINE]

    def ratios(choice: dict[str, tuple[str, str, str]]) -> dict[str, float]:
        prefill, decode = table[choice["prefill"]], table[choice["decode"]]
        return {
            "prefill_moe": prefill["prefill"]["moe_ms"] / base["prefill"]["moe_ms"],
            "prefill_cross_node": prefill["prefill"]["cross_node_mb"] / base["prefill"]["cross_node_mb"],
            "decode_moe": decode["decode"]["moe_ms"] / base["decode"]["moe_ms"],
            "home_imbalance": prefill["home_imbalance"],
        }

    return {
        "topology": topology_spec,
        "seed": seed,
        "flow": flow,
        "baseline": {
            "prefill_moe_ms": base["prefill"]["moe_ms"],
            "prefill_cross_node_mb": base["prefill"]["cross_node_mb"],
            "decode_moe_ms": base["decode"]["moe_ms"],
            "home_imbalance": base["home_imbalance"],
        },
        "ours": ratios(OURS),
        "ablations": {name: ratios(choice) for name, choice in ABLATIONS.items()},
        "notes": table[("grouped", "local_first", "signature")]["notes"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--topologies", default="2x4,4x4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--flows", default="home")
    parser.add_argument("--batches", type=int, default=8, help="batches scored per phase")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "request_routing_bench.json")
    args = parser.parse_args()
    if not args.trace.exists():
        print(f"{args.trace}: not found (pass --trace)", file=sys.stderr)
        return 2
    results = []
    for flow in args.flows.split(","):
        for topology in args.topologies.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                started = time.perf_counter()
                results.append(measure(args.trace, topology, seed, flow, args.batches))
                print(f"[{flow} {topology} seed {seed}: {time.perf_counter() - started:.0f}s]", file=sys.stderr)
    print("| flow | GPUs | seed | prefill MoE | prefill x-node | decode MoE | tok/GPU max/mean (rr) |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        ours = result["ours"]
        print(
            f"| {result['flow']} | {result['topology']} | {result['seed']} | {ours['prefill_moe']:.3f} "
            f"| {ours['prefill_cross_node']:.3f} | {ours['decode_moe']:.3f} "
            f"| {ours['home_imbalance']:.2f} ({result['baseline']['home_imbalance']:.2f}) |"
        )
    print()
    print("| flow | GPUs | figure | target | mean | worst | met |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for flow in dict.fromkeys(r["flow"] for r in results):
        for topology in dict.fromkeys(r["topology"] for r in results):
            group = [r for r in results if r["flow"] == flow and r["topology"] == topology]
            for figure, target in TARGETS.items():
                values = np.array([r["ours"][figure] for r in group])
                worst = float(values.max())
                rr_worse = all(r["ours"]["home_imbalance"] <= r["baseline"]["home_imbalance"] for r in group)
                met = worst <= target and (figure != "home_imbalance" or rr_worse)
                summary.append(
                    {"flow": flow, "topology": topology, "figure": figure, "target": target,
                     "mean": float(values.mean()), "worst": worst, "met": met}
                )
                print(f"| {flow} | {topology} | {figure} | {target} | {values.mean():.3f} | {worst:.3f} | {'yes' if met else 'no'} |")
    print()
    print("| flow | GPUs | ablation | prefill MoE | prefill x-node | decode MoE | tok/GPU max/mean |")
    print("|---|---|---|---|---|---|---|")
    for flow in dict.fromkeys(r["flow"] for r in results):
        for topology in dict.fromkeys(r["topology"] for r in results):
            group = [r for r in results if r["flow"] == flow and r["topology"] == topology]
            for name in ABLATIONS:
                mean = {key: np.mean([r["ablations"][name][key] for r in group]) for key in TARGETS}
                print(
                    f"| {flow} | {topology} | {name} | {mean['prefill_moe']:.3f} | {mean['prefill_cross_node']:.3f} "
                    f"| {mean['decode_moe']:.3f} | {mean['home_imbalance']:.2f} |"
                )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results, "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
