"""Router throughput: the torch routers (all layers in one call) against the numpy reference (layer by
layer, as ``moe_placement.cost`` calls it), tokens routed through every MoE layer per second.

Setup: DeepSeek-V2-Lite (26 layers, 64 experts, top-6) on 2x4 GPUs with 16 redundant slots, placed by
EPLB on the load of a synthetic trace; batches drawn from that trace. Every torch result is checked
equal to the reference before it is timed.

    python benchmarks/agent_router_throughput.py [--batches 256,4096] [--device cpu|cuda] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "agent")]

from moe_placement.baselines import eplb_rebalance  # noqa: E402
from moe_placement.models import Placement  # noqa: E402
from moe_placement.presets import model_preset, parse_topology  # noqa: E402
from moe_placement.routing import ROUTERS as NUMPY_ROUTERS  # noqa: E402
from moe_placement.routing import replica_layouts  # noqa: E402
from moe_placement.synthetic import SYNTHETIC_PRESETS, generate  # noqa: E402
from moe_placement.traces import expert_load  # noqa: E402
from moe_agent.router import ROUTERS, TorchLayout  # noqa: E402


def best_time(function, minimum_seconds: float = 1.0, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of a call, each timing at least ``minimum_seconds``."""
    times = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            function()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= minimum_seconds / repeats:
                break
        times.append(elapsed / calls)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="256,4096", help="tokens per batch, comma separated")
    parser.add_argument("--device", default="cpu")
    # One thread: on a busy 2-core machine, OpenMP threads waiting on each other swamp the figures.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=REPO / "out" / "agent_router_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    model = model_preset("deepseek-v2-lite")
    topology = parse_topology("2x4", model.num_experts, 16)
    trace = generate(SYNTHETIC_PRESETS["deepseek-v2-lite"], seed=0)
    mapping, _, _ = eplb_rebalance(
        expert_load(trace.expert_ids, model.num_experts), topology.num_slots, 1, 1, topology.num_gpus
    )
    placement = Placement(mapping, model.num_experts, topology.slots_per_gpu)
    layouts = replica_layouts(placement, topology)
    layout = TorchLayout.from_placement(placement, topology, device)
    rng = np.random.default_rng(0)

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        tokens = rng.choice(trace.num_tokens, batch, replace=False)
        ids = trace.expert_ids[:, tokens]
        source = np.broadcast_to(rng.integers(0, topology.num_gpus, batch), (model.num_layers, batch)).copy()
        uniform = rng.random(ids.shape)
        ids_t, source_t, uniform_t = (torch.as_tensor(a, device=device) for a in (ids, source, uniform))
        for name in ("random", "local_first", "metro"):
            reference = NUMPY_ROUTERS[name]

            def run_numpy() -> np.ndarray:
                return np.stack(
                    [reference(layouts[l], ids[l], source[l], uniform[l]) for l in range(model.num_layers)]
                )

            def run_torch() -> torch.Tensor:
                slots = ROUTERS[name](layout, ids_t, source_t, uniform_t)
                synchronize()
                return slots

            np.testing.assert_array_equal(run_torch().cpu().numpy(), run_numpy())
            numpy_seconds, torch_seconds = best_time(run_numpy), best_time(run_torch)
            rows.append(
                {
                    "router": name,
                    "batch": batch,
                    "layers": model.num_layers,
                    "numpy_tokens_per_s": batch / numpy_seconds,
                    "torch_tokens_per_s": batch / torch_seconds,
                    "speedup": numpy_seconds / torch_seconds,
                    "torch_ms_per_batch": torch_seconds * 1e3,
                }
            )

    print(
        f"Router throughput, {model.name} ({model.num_layers} layers, top-{model.top_k}), 2x4 GPUs + 16 redundant "
        f"slots (EPLB), torch on {device} ({args.threads} threads); tokens through all layers per second"
    )
    print(f"{'router':<12} {'batch':>6} {'numpy tok/s':>12} {'torch tok/s':>12} {'speedup':>8} {'torch ms':>9}")
    for row in rows:
        print(
            f"{row['router']:<12} {row['batch']:>6} {row['numpy_tokens_per_s']:>12,.0f} "
            f"{row['torch_tokens_per_s']:>12,.0f} {row['speedup']:>8.1f} {row['torch_ms_per_batch']:>9.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"device": str(device), "threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1)
        + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
