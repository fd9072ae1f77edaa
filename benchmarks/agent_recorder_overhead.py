"""Recorder overhead: the forward time of one MoE layer at DeepSeek-V2-Lite width, with and without
the recorder's hooks, side by side in one run.

Layers (Hugging Face classes, random weights, bf16 on CPU, a batch of 256 tokens):
  deepseek-v2-lite   DeepseekV2Moe: 64 routed experts (FFN 1408) top-6 + 2 shared experts, hidden 2048
  routed-only        MixtralSparseMoeBlock at the same width (64 experts, FFN 1408, top-6, no shared
                     experts): the smallest denominator, so the harshest ratio

Each repetition times the plain layer and the recorded layer back to back (the order alternates).
Two ratios come out: the median of the per-pair ratios (cancels slow drift) and the ratio of the
fastest runs (least disturbed by other work on a shared machine). The direct cost of one ``record``
call (counts, transitions, co-activation of 256 x 6 ids) is timed on its own too, as a share of the
plain forward time: the cleanest figure, as it does not subtract two noisy times.

    python benchmarks/agent_recorder_overhead.py [--tokens 256] [--repeats 9] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "agent")]

from moe_agent.recorder import RoutingRecorder, attach  # noqa: E402

HIDDEN, EXPERTS, TOP_K, EXPERT_FFN = 2048, 64, 6, 1408


def deepseek_v2_lite_layer() -> torch.nn.Module:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    config = DeepseekV2Config(
        hidden_size=HIDDEN, moe_intermediate_size=EXPERT_FFN, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
        n_shared_experts=2, topk_method="greedy", n_group=1, topk_group=1, num_hidden_layers=1,
    )
    return DeepseekV2Moe(config)


def routed_only_layer() -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        num_hidden_layers=1,
    )
    return MixtralSparseMoeBlock(config)


def init_(layer: torch.nn.Module) -> torch.nn.Module:
    """Random weights (the classes leave expert tensors uninitialised), bf16, eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
    return layer.to(torch.bfloat16).eval()


def timed(layer: torch.nn.Module, hidden: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        layer(hidden)
    return time.perf_counter() - start


def measure(name: str, layer: torch.nn.Module, tokens: int, repeats: int) -> dict:
    hidden = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    recorder = RoutingRecorder(1, EXPERTS)
    timed(layer, hidden)  # warm-up: allocator, oneDNN kernels
    plain, recorded, ratios = [], [], []
    for repeat in range(repeats):
        order = ("plain", "recorded") if repeat % 2 == 0 else ("recorded", "plain")
        pair = {}
        for kind in order:
            if kind == "recorded":
                attach(layer, recorder)
            pair[kind] = timed(layer, hidden)
            recorder.detach()
        plain.append(pair["plain"])
        recorded.append(pair["recorded"])
        ratios.append(pair["recorded"] / pair["plain"])
    assert recorder.snapshot().tokens == tokens * repeats  # the hooks really recorded every pass

    # The recorder's own cost on this layer's ids, without the forward pass around it.
    ids = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(tokens)])
    direct = RoutingRecorder(2, EXPERTS)
    calls = 400
    start = time.perf_counter()
    for _ in range(calls // 2):
        direct.record(0, ids)
        direct.record(1, ids)  # with a layer-to-layer transition, as in a model
    record_seconds = (time.perf_counter() - start) / calls
    plain_median = statistics.median(plain)
    return {
        "layer": name,
        "tokens": tokens,
        "plain_ms": plain_median * 1e3,
        "recorded_ms": statistics.median(recorded) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_of_minimums": min(recorded) / min(plain),
        "record_us": record_seconds * 1e6,
        "record_share": record_seconds / plain_median,
        "repeats": repeats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    # One thread: on a busy 2-core machine, OpenMP threads waiting on each other swamp the figures.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=REPO / "out" / "agent_recorder_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, build in (("deepseek-v2-lite", deepseek_v2_lite_layer), ("routed-only", routed_only_layer)):
        layer = init_(build())
        rows.append(measure(name, layer, args.tokens, args.repeats))
        del layer
        gc.collect()

    print(f"Recorder overhead, one MoE layer at DeepSeek-V2-Lite width, bf16 CPU, {args.threads} threads")
    print(
        f"{'layer':<18} {'tokens':>6} {'plain ms':>9} {'recorded ms':>12} {'median ratio':>13} "
        f"{'min ratio':>10} {'record() us':>12} {'record share':>13}"
    )
    for row in rows:
        print(
            f"{row['layer']:<18} {row['tokens']:>6} {row['plain_ms']:>9.1f} {row['recorded_ms']:>12.1f} "
            f"{row['ratio']:>13.4f} {row['ratio_of_minimums']:>10.4f} {row['record_us']:>12.1f} "
            f"{row['record_share']:>12.3%}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
