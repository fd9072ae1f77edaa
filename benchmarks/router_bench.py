"""Request router overhead: requests per second and the latency it adds, p50 / p99.

Setup: a stand-in OpenAI-compatible engine (``moe_router.standin``, one process, the rank in the
``X-Data-Parallel-Rank`` header) and ``moeplace router`` in front of it (2x4 ranks, DeepSeek-V2-Lite
shape), both real processes on loopback; the router first learns two domains from reported
signatures. The same completions (short prompts, ~40 words) go straight to the engine and through
the router, at each concurrency; added latency = router minus direct, per percentile. Also the
decision alone (prompt -> domain -> rank, in process). Prints a table, writes JSON.

    python benchmarks/router_bench.py [--requests 2000] [--concurrency 1,16] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "agent"), str(REPO / "tests" / "router")]

from moe_placement.presets import model_preset, parse_topology  # noqa: E402
from moe_placement.request_routing import RequestRouter  # noqa: E402
from router_helpers import http, signature_of, start_router, start_standin  # noqa: E402

WORDS = [
    "contract clause liability tenant statute court appeal plaintiff".split(),
    "rain sunny forecast cloud wind storm humid temperature".split(),
]


def prompt_text(index: int) -> str:
    words = WORDS[index % 2]
    return " ".join(words[(index + i) % len(words)] for i in range(40))


async def drive(url: str, requests: int, concurrency: int, rank_header: bool) -> tuple[float, np.ndarray]:
    """``requests`` completions, ``concurrency`` at a time -> (requests/s, latencies [requests] s)."""
    latencies = np.zeros(requests)
    queue = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in queue:
            headers = {"X-Data-Parallel-Rank": str(index % 8)} if rank_header else {}
            started = time.perf_counter()
            async with session.post(
                url + "/v1/completions", json={"model": "m", "prompt": prompt_text(index)}, headers=headers
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")
            latencies[index] = time.perf_counter() - started

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return requests / elapsed, latencies


def decision_microseconds(calls: int = 5000) -> float:
    """Mean time of one in-process decision (prompt features -> domain -> rank), microseconds."""
    model = model_preset("deepseek-v2-lite")
    router = RequestRouter(parse_topology("2x4", model.num_experts), model.num_layers, model.num_experts)
    for index in range(20):
        router.learn(np.array(signature_of([0, 1, 2, 3, 4, 5] if index % 2 else [32, 33, 34, 35, 36, 37])), prompt_text(index).split())
    prompts = [prompt_text(index).split() for index in range(64)]
    started = time.perf_counter()
    for index in range(calls):
        words = prompts[index % 64]
        decision = router.route(len(words), router.domain_of_prompt(words))
        router.finish(decision.rank, len(words))
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "router_bench.json")
    args = parser.parse_args()
    engine = start_standin(rank=-1).wait_ready("/v1/models")
    router = start_router(["--backend", engine.url], "2x4").wait_ready("/healthz")
    rows = []
    try:
        for index in range(40):
            experts = [0, 1, 2, 3, 4, 5] if index % 2 == 0 else [32, 33, 34, 35, 36, 37]
            http("POST", router.url + "/router/v1/signatures", {"prompt": prompt_text(index), "signature": signature_of(experts)})
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            asyncio.run(drive(router.url, 100, concurrency, False))  # warm both paths up
            direct_rate, direct = asyncio.run(drive(engine.url, args.requests, concurrency, True))
            routed_rate, routed = asyncio.run(drive(router.url, args.requests, concurrency, False))
            row = {"concurrency": concurrency, "requests": args.requests}
            for name, rate, latency in (("direct", direct_rate, direct), ("router", routed_rate, routed)):
                row[name] = {
                    "requests_per_s": rate,
                    "p50_ms": float(np.percentile(latency, 50) * 1e3),
                    "p99_ms": float(np.percentile(latency, 99) * 1e3),
                }
            row["added_p50_ms"] = row["router"]["p50_ms"] - row["direct"]["p50_ms"]
            row["added_p99_ms"] = row["router"]["p99_ms"] - row["direct"]["p99_ms"]
            rows.append(row)
    finally:
        router.stop()
        engine.stop()
    decision_us = decision_microseconds()
    header = "| concurrency | direct req/s | router req/s | direct p50 ms | router p50 ms | added p50 ms | added p99 ms |"
    print(header)
    print("|" + "---|" * 7)
    for row in rows:
        print(
            f"| {row['concurrency']} | {row['direct']['requests_per_s']:.0f} | {row['router']['requests_per_s']:.0f} "
            f"| {row['direct']['p50_ms']:.2f} | {row['router']['p50_ms']:.2f} | {row['added_p50_ms']:.2f} "
            f"| {row['added_p99_ms']:.2f} |"
        )
    print(f"decision alone (prompt -> domain -> rank): {decision_us:.0f} us")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "decision_us": decision_us}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
