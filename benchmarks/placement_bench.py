"""Placement benchmark: the seed algorithms side by side with the baselines, on a real routing trace.

    PYTHONPATH=operator python3 benchmarks/placement_bench.py [--quick] [--table-only]
        [--flows home,follow] [--json out/placement-bench.json]

Sections (all figures are the cost model's predictions, cost.evaluate):
1. Side by side: policies x routers on the ESFT trace (fit on the first half of each task, score on
   the second; and fit on ``intent``, score on ``law``), per topology, with ratios vs eplb + random.
2. Targets: decode time <= 0.80, prefill time <= 0.90, cross-node bytes <= 0.70 of eplb + random.
3. Domain shift: from a placement fit on intent, re-solve for law with ``migration_aware`` and
   compare moves and time with from-scratch solutions; the migration plan of the re-solve.
4. METRO greedy vs exact router (busiest GPU's activated experts).
5. Prefill -> decode predictor accuracy and micro-batch grouping.
6. Solve times at Mixtral-8x7B and DeepSeek-V3 scale (synthetic traces).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from moe_placement.cost import evaluate
from moe_placement.grouping import (
    cross_node_share,
    decode_step_activated,
    domain_signatures,
    group_requests,
    home_nodes,
    predict_decode,
    predictor_accuracy,
    prefill_decode_split,
)
from moe_placement.migration_plan import check_migration, plan_migration
from moe_placement.models import ModelShape, Placement, Topology
from moe_placement.policies import PolicyOptions, plan
from moe_placement.presets import model_preset, parse_topology
from moe_placement.routing import greedy_vs_exact
from moe_placement.scoring import phase_batches
from moe_placement.synthetic import SYNTHETIC_PRESETS, generate
from moe_placement.traces import Trace, load_trace

PHASES = ("prefill", "decode")
TOKENS_PER_GPU = {"prefill": 512, "decode": 16}
POLICIES = ("linear", "eplb", "ilp", "metro_aware", "locality", "auto")
ROUTERS = ("random", "local_first", "metro")
TARGETS = {"decode_ms": 0.80, "prefill_ms": 0.90, "cross_node": 0.70}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def score_batches(trace: Trace, topology: Topology, num_batches: int, seed: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    return {
        phase: phase_batches(
            trace, topology.num_gpus, TOKENS_PER_GPU[phase], num_batches, phase, rng
        )
        for phase in PHASES
    }


def side_by_side(
    name: str,
    fit: Trace,
    score: Trace,
    model: ModelShape,
    topology: Topology,
    args: argparse.Namespace,
) -> tuple[list[dict], dict[str, dict[str, Placement]]]:
    """Rows (policy x router, both phases) and the placements, per phase and policy."""
    batches = score_batches(score, topology, args.batches, args.seed)
    rows, placements = [], {phase: {} for phase in PHASES}
    for policy in POLICIES:
        solved = {}
        for phase in PHASES:
            profile = fit.profile(batch_size=topology.num_gpus * TOKENS_PER_GPU[phase], phase=phase)
            solved[phase] = plan(
                policy,
                profile,
                model,
                topology,
                PolicyOptions(time_limit_s=args.time_limit, seed=args.seed),
            )
            placements[phase][policy] = solved[phase].placement
        log(
            f"{name} {topology_name(topology)}: {policy} solved in {sum(r.solve_seconds for r in solved.values()):.1f} s"
        )
        for router, flow in ((r, f) for r in ROUTERS for f in args.flows):
            row = {
                "workload": name,
                "topology": topology_name(topology),
                "flow": flow,
                "policy": policy,
                "router": router,
                "solve_s": sum(r.solve_seconds for r in solved.values()),
                "status": {phase: solved[phase].solver.status for phase in PHASES},
                "notes": {phase: solved[phase].solver.notes for phase in PHASES},
            }
            for phase in PHASES:
                report = evaluate(
                    solved[phase].placement, model, topology, batches[phase], router, args.seed, flow
                )
                row[phase] = report.summary()
            rows.append(row)
    for row in rows:
        base = next(
            r for r in rows if (r["policy"], r["router"], r["flow"]) == ("eplb", "random", row["flow"])
        )
        row["ratio"] = {
            "prefill_ms": row["prefill"]["moe_ms"] / base["prefill"]["moe_ms"],
            "decode_ms": row["decode"]["moe_ms"] / base["decode"]["moe_ms"],
            "cross_node": row["prefill"]["cross_node_mb"] / base["prefill"]["cross_node_mb"],
            "cross_node_decode": row["decode"]["cross_node_mb"] / base["decode"]["cross_node_mb"],
        }
    return rows, placements


def topology_name(topology: Topology) -> str:
    return f"{topology.num_nodes}x{topology.gpus_per_node}"


def format_rows(rows: list[dict]) -> str:
    header = (
        "workload",
        "topo",
        "flow",
        "policy",
        "router",
        "prefill ms",
        "x eplb",
        "decode ms",
        "x eplb",
        "x-node MB",
        "x eplb",
        "dec x-node",
        "tok max/mean",
        "max act dec",
        "solve s",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["workload"],
                r["topology"],
                r["flow"],
                r["policy"],
                r["router"],
                f"{r['prefill']['moe_ms']:.3f}",
                f"{r['ratio']['prefill_ms']:.3f}",
                f"{r['decode']['moe_ms']:.3f}",
                f"{r['ratio']['decode_ms']:.3f}",
                f"{r['prefill']['cross_node_mb']:.0f}",
                f"{r['ratio']['cross_node']:.3f}",
                f"{r['ratio']['cross_node_decode']:.3f}",
                f"{r['prefill']['token_imbalance']:.3f}",
                f"{r['decode']['max_activated_experts']:.2f}",
                f"{r['solve_s']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[dict]:
    """Per workload and topology, the best (policy, router) for each target metric."""
    summary = []
    for key in sorted({(r["workload"], r["topology"], r["flow"]) for r in rows}):
        mine = [
            r
            for r in rows
            if (r["workload"], r["topology"], r["flow"]) == key
            and r["policy"] not in ("linear", "eplb")
        ]
        for metric, goal in TARGETS.items():
            best = min(mine, key=lambda r: r["ratio"][metric])
            auto = min((r for r in mine if r["policy"] == "auto"), key=lambda r: r["ratio"][metric])
            summary.append(
                {
                    "workload": key[0],
                    "topology": key[1],
                    "flow": key[2],
                    "metric": metric,
                    "target": goal,
                    "best": best["ratio"][metric],
                    "best_by": f"{best['policy']}+{best['router']}",
                    "auto": auto["ratio"][metric],
                    "auto_router": auto["router"],
                    "met": best["ratio"][metric] <= goal,
                }
            )
    return summary


def best_time(
    placement: Placement, model: ModelShape, topology: Topology, batches: list, seed: int
) -> tuple[float, str]:
    """The lowest predicted MoE seconds over the routers, and that router."""
    times = {r: evaluate(placement, model, topology, batches, r, seed).moe_time_s for r in ROUTERS}
    router = min(times, key=times.get)
    return times[router], router


def domain_shift(
    trace: Trace, model: ModelShape, topology: Topology, args: argparse.Namespace
) -> dict:
    """Placements fit on intent, traffic turns to law: re-solve near them vs from scratch."""
    intent = trace.select_domain("intent")
    law_fit, law_score = trace.select_domain("law").split(0.5)
    batches = score_batches(law_score, topology, args.batches, args.seed)
    options = PolicyOptions(time_limit_s=args.time_limit, seed=args.seed)
    result = {"topology": topology_name(topology), "phases": {}}
    for phase in PHASES:
        size = topology.num_gpus * TOKENS_PER_GPU[phase]
        old_profile = intent.profile(batch_size=size, phase=phase)
        new_profile = law_fit.profile(batch_size=size, phase=phase)

        scratch = {
            p: plan(p, new_profile, model, topology, options).placement
            for p in ("eplb", "ilp", "metro_aware", "locality")
        }
        scratch_times = {
            p: best_time(pl, model, topology, batches[phase], args.seed)
            for p, pl in scratch.items()
        }
        best_scratch = min(scratch_times, key=lambda p: scratch_times[p][0])
        eplb_random = evaluate(
            scratch["eplb"], model, topology, batches[phase], "random", args.seed
        ).moe_time_s
        entries = []
        for previous_policy in ("eplb", "locality"):
            previous = plan(previous_policy, old_profile, model, topology, options).placement
            eplb_moves = previous.moved_experts(scratch["eplb"])
            stale, stale_router = best_time(previous, model, topology, batches[phase], args.seed)
            for label, budget in (("penalty", None), ("budget 1/5 of eplb", eplb_moves // 5)):
                started = time.perf_counter()
                result_plan = plan(
                    "migration_aware",
                    new_profile,
                    model,
                    topology,
                    PolicyOptions(
                        time_limit_s=args.time_limit,
                        previous=previous,
                        move_budget=budget,
                        seed=args.seed,
                    ),
                )
                new = result_plan.placement
                seconds, router = best_time(new, model, topology, batches[phase], args.seed)
                migration = plan_migration(previous, new, model, topology)
                check_migration(previous, migration)
                same_family = scratch_times[previous_policy][0]
                entries.append(
                    {
                        "previous": previous_policy,
                        "mode": label,
                        "move_budget": budget,
                        "eplb_from_scratch_moves": eplb_moves,
                        "same_policy_from_scratch_moves": previous.moved_experts(
                            scratch[previous_policy]
                        ),
                        "moves": previous.moved_experts(new),
                        "moves_vs_eplb": previous.moved_experts(new) / max(eplb_moves, 1),
                        "ms": seconds * 1e3,
                        "router": router,
                        "stale_ms": stale * 1e3,
                        "stale_router": stale_router,
                        "vs_best_from_scratch": seconds / scratch_times[best_scratch][0],
                        "best_from_scratch": f"{best_scratch}+{scratch_times[best_scratch][1]}",
                        "vs_same_policy_from_scratch": seconds / same_family,
                        "vs_eplb_random_from_scratch": seconds / eplb_random,
                        "solve_s": time.perf_counter() - started,
                        "plan": {
                            "stages": len(migration.stages),
                            "copies": sum(len(s.copies) for s in migration.stages),
                            "gb_moved": migration.bytes_moved / 1e9,
                            "gb_per_link": {
                                k: v / 1e9 for k, v in sorted(migration.bytes_per_link.items())
                            },
                        },
                    }
                )
                log(
                    f"shift {topology_name(topology)} {phase}: from {previous_policy} ({label}) moved {entries[-1]['moves']}"
                )
        result["phases"][phase] = {
            "from_scratch_ms": {p: (t * 1e3, r) for p, (t, r) in scratch_times.items()},
            "eplb_random_ms": eplb_random * 1e3,
            "re_solves": entries,
        }
    return result


def metro_exact(
    placements: dict[str, dict[str, Placement]],
    score: Trace,
    topology: Topology,
    args: argparse.Namespace,
) -> dict:
    """Busiest GPU's activated experts, METRO greedy / exact, on decode batches."""
    batches = score_batches(score, topology, args.batches, args.seed)["decode"]
    out = {}
    for policy in ("eplb", "ilp", "locality", "metro_aware"):
        ratios = np.concatenate(
            [greedy_vs_exact(placements["decode"][policy], topology, b.expert_ids) for b in batches]
        )
        out[policy] = {"mean": float(ratios.mean()), "max": float(ratios.max())}
    return out


def predictor_and_grouping(
    trace: Trace, model: ModelShape, topology: Topology, args: argparse.Namespace
) -> dict:
    fit, test = trace.split(0.5)
    accuracy = predictor_accuracy(fit, test)
    signatures = domain_signatures(fit)
    prefill, _ = prefill_decode_split(test)
    predicted, _ = predict_decode(prefill, np.stack(list(signatures.values())))
    rng = np.random.default_rng(args.seed)
    group_size = args.group_size
    greedy = group_requests(predicted, group_size)
    shuffled = rng.permutation(len(predicted))
    random_groups = [shuffled[i : i + group_size] for i in range(0, len(shuffled), group_size)]
    placement = plan(
        "locality", fit.profile(), model, topology, PolicyOptions(time_limit_s=args.time_limit)
    ).placement
    homes = home_nodes(predicted, placement, topology)
    by_node = group_requests(predicted, group_size, homes, topology.num_nodes)
    node_of_group = np.array(
        [np.bincount(homes[g], minlength=topology.num_nodes).argmax() for g in by_node]
    )
    random_nodes = rng.integers(topology.num_nodes, size=len(random_groups))
    return {
        "predictor": accuracy,
        "grouping": {
            "group_size": group_size,
            "activated_per_layer": {
                "random": decode_step_activated(test, random_groups),
                "greedy": decode_step_activated(test, greedy),
                "greedy_by_node": decode_step_activated(test, by_node),
            },
            "cross_node_share": {
                "random": cross_node_share(test, random_groups, random_nodes, placement, topology),
                "greedy_by_node": cross_node_share(
                    test, by_node, node_of_group, placement, topology
                ),
            },
        },
    }


def scale(args: argparse.Namespace) -> list[dict]:
    """Solve times on synthetic traces at Mixtral-8x7B and DeepSeek-V3 shapes."""
    cases = [
        ("mixtral-8x7b", "1x8", 8, args.time_limit),
        ("deepseek-v3", "8x8", 64, args.v3_time_limit),
    ]
    rows = []
    for name, spec, redundant, limit in cases:
        model = model_preset(name)
        config = SYNTHETIC_PRESETS[name]
        if name == "deepseek-v3":
            config = replace(config, num_sequences=64, tokens_per_sequence=128)
        profile = generate(config, args.seed).profile()
        topology = parse_topology(spec, model.num_experts, redundant)
        for policy in (
            ("eplb", "ilp", "locality", "metro_aware") if not args.quick else ("eplb", "ilp")
        ):
            result = plan(
                policy, profile, model, topology, PolicyOptions(time_limit_s=limit, seed=args.seed)
            )
            rows.append(
                {
                    "model": name,
                    "topology": spec,
                    "redundant": redundant,
                    "policy": policy,
                    "time_limit_s": limit,
                    "solve_s": result.solve_seconds,
                    "status": result.solver.status,
                    "gap": result.solver.gap,
                    "objective": result.solver.objective,
                    "lower_bound": result.solver.lower_bound,
                    "notes": result.solver.notes,
                }
            )
            log(
                f"scale {name} {spec}: {policy} {result.solve_seconds:.1f} s {result.solver.status} gap {result.solver.gap}"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trace", type=Path, default=Path("../shared/traces/esft_lite_intent_law_top6.npz")
    )
    parser.add_argument("--json", type=Path, default=Path("out/placement-bench.json"))
    parser.add_argument(
        "--quick", action="store_true", help="2x4 only, fewer batches, shorter limits"
    )
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=20.0, help="per policy solve, s")
    parser.add_argument("--v3-time-limit", type=float, default=60.0)
    parser.add_argument("--redundant-slots", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flows", default="home,follow",
        help="data flows each placement is scored under (home: SGLang/vLLM; follow: MoETuner's)",
    )
    parser.add_argument(
        "--table-only", action="store_true",
        help="only the side-by-side table and its targets (no shift, METRO exact, predictor, scale)",
    )
    args = parser.parse_args(argv)
    args.flows = [flow.strip() for flow in args.flows.split(",") if flow.strip()]
    if args.quick:
        args.batches, args.time_limit, args.v3_time_limit = 2, 5.0, 20.0
    started = time.perf_counter()
    model = model_preset("deepseek-v2-lite")
    trace = load_trace(args.trace)
    topologies = ["2x4"] if args.quick else ["2x4", "4x4"]
    rows, shift, exact, extras = [], [], {}, {}
    for spec in topologies:
        topology = parse_topology(spec, model.num_experts, args.redundant_slots)
        workloads = [(d, *trace.select_domain(d).split(0.5)) for d in ("intent", "law")]
        workloads.append(("intent->law", trace.select_domain("intent"), trace.select_domain("law")))
        for name, fit, score in workloads if not args.quick else workloads[::2]:
            new_rows, placements = side_by_side(name, fit, score, model, topology, args)
            rows += new_rows
            if name == "intent" and not args.table_only:
                exact[spec] = metro_exact(placements, score, topology, args)
        if args.table_only:
            continue
        shift.append(domain_shift(trace, model, topology, args))
        if spec == "2x4":
            extras = predictor_and_grouping(trace, model, topology, args)
    scale_rows = [] if args.table_only else scale(args)
    summary = targets(rows)
    document = {
        "meta": {
            "trace": str(args.trace),
            "model": model.name,
            "redundant_slots": args.redundant_slots,
            "batches": args.batches,
            "time_limit_s": args.time_limit,
            "quick": args.quick,
            "wall_s": time.perf_counter() - started,
        },
        "rows": rows,
        "targets": summary,
        "domain_shift": shift,
        "metro_greedy_vs_exact": exact,
        **extras,
        "scale": scale_rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1, default=float) + "\n")
    print(format_rows(rows))
    print("\nTargets (best of ilp/metro_aware/locality/auto x routers; ratio to eplb + random):")
    for t in summary:
        print(
            f"  {t['workload']:12s} {t['topology']} {t['flow']:6s} {t['metric']:10s} target <= {t['target']:.2f}: "
            f"best {t['best']:.3f} ({t['best_by']}), auto {t['auto']:.3f} ({t['auto_router']}) "
            f"{'MET' if t['met'] else 'MISSED'}"
        )
    print("\nDomain shift intent -> law (migration_aware re-solve):")
    for entry in shift:
        for phase, data in entry["phases"].items():
            for e in data["re_solves"]:
                print(
                    f"  {entry['topology']} {phase:7s} from {e['previous']:8s} {e['mode']:18s} moves {e['moves']:4d} "
                    f"({e['moves_vs_eplb']:.2f} of eplb's {e['eplb_from_scratch_moves']}), {e['ms']:.3f} ms ({e['router']}): "
                    f"x{e['vs_best_from_scratch']:.3f} best from scratch ({e['best_from_scratch']}), "
                    f"x{e['vs_same_policy_from_scratch']:.3f} {e['previous']} from scratch, "
                    f"x{e['vs_eplb_random_from_scratch']:.3f} eplb+random; stale {e['stale_ms']:.3f} ms; "
                    f"plan {e['plan']['stages']} stages {e['plan']['gb_moved']:.2f} GB"
                )
    print("\nMETRO greedy / exact (busiest GPU's activated experts, decode):")
    for spec, data in exact.items():
        print(
            "  "
            + spec
            + ": "
            + ", ".join(f"{p} mean {v['mean']:.3f} max {v['max']:.3f}" for p, v in data.items())
        )
    if extras:
        p = extras["predictor"]
        print(
            f"\nPredictor (test half, {int(p['requests'])} requests): precision@k {p['precision_at_k']:.3f} "
            f"(global {p['global_precision_at_k']:.3f}, prefill only {p['prefill_only_precision_at_k']:.3f}), "
            f"recall {p['recall']:.3f} (global {p['global_recall']:.3f}), spearman {p['spearman']:.3f} "
            f"(global {p['global_spearman']:.3f}), domain accuracy {p['domain_accuracy']:.3f}"
        )
        g = extras["grouping"]
        print(
            f"Grouping ({g['group_size']} requests per micro-batch): activated experts per layer per decode step "
            + ", ".join(f"{k} {v:.2f}" for k, v in g["activated_per_layer"].items())
            + "; cross-node share "
            + ", ".join(f"{k} {v:.3f}" for k, v in g["cross_node_share"].items())
        )
    print("\nSolve times:")
    for r in scale_rows:
        gap = "-" if r["gap"] is None else f"{r['gap']:.4f}"
        print(
            f"  {r['model']:13s} {r['topology']} +{r['redundant']:<3d} {r['policy']:12s} {r['solve_s']:7.1f} s "
            f"(limit {r['time_limit_s']:.0f}) {r['status']:10s} gap {gap}"
        )
    print(f"\nwrote {args.json} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
