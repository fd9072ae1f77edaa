"""Expert transfer rate between two local agents (``python -m moe_agent`` processes on 127.0.0.1).

Rank 1 holds every expert; rank 0 starts with empty slots and stages each expert from rank 1 through
the HTTP API: the source serialises the expert to safetensors and streams it, the destination checks
the sha256 and the tensor shapes and keeps the weights staged. Experts have the preset's real size
(DeepSeek-V2-Lite: 3 x 2048 x 1408 bf16 = 17.3 MB) unless ``--expert-scale`` divides it; the model is
cut to ``--experts`` experts and ``--layers`` layers to bound memory. One pass copies the experts one
at a time, the next ``--concurrency`` at a time; staged slots are retired between passes.

    python benchmarks/agent_transfer.py [--model deepseek-v2-lite] [--layers 4] [--experts 8]
        [--concurrency 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "agent")]

from moe_placement.presets import model_preset  # noqa: E402

TOKEN = "transfer-benchmark"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method="POST" if body else "GET")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{url}: {error.code} {error.read().decode()}") from None


def start_agent(rank: int, files: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "operator"), str(REPO / "agent")]))
    process = subprocess.Popen(
        [
            sys.executable, "-m", "moe_agent", "--model", str(files / "model.json"), "--topology", "1x2",
            "--redundant-slots", str(args.experts), "--rank", str(rank), "--port", str(port),
            "--token-file", str(files / "token"), "--placement", str(files / "placement.json"),
            "--expert-scale", str(args.expert_scale),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(files / f"agent{rank}.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"agent {rank} exited: {(files / f'agent{rank}.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2)
            return process, url
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"agent {rank} did not start")


def transfer_pass(destination: str, source: str, copies: list[tuple[int, int]], concurrency: int, tag: str) -> dict:
    def stage(copy: tuple[int, int]) -> dict:
        layer, expert = copy
        body = {
            "request_id": f"{tag}-{layer}-{expert}", "layer": layer, "slot": expert, "expert": expert,
            "source": {"peer": source},
        }
        return call(destination + "/v1/experts/stage", body)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(stage, copies))
    wall = time.perf_counter() - start
    for layer, expert in copies:  # roll back, so the next pass has empty slots again
        call(destination + "/v1/experts/retire", {"request_id": f"{tag}-r-{layer}-{expert}", "layer": layer, "slot": expert})
    total_bytes = sum(answer["bytes"] for answer in answers)
    per_copy = [answer["bytes"] / answer["seconds"] / 1e6 for answer in answers]
    return {
        "concurrency": concurrency,
        "copies": len(answers),
        "expert_mb": answers[0]["bytes"] / 1e6,
        "median_copy_mb_s": statistics.median(per_copy),
        "aggregate_mb_s": total_bytes / wall / 1e6,
        "wall_seconds": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek-v2-lite")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-scale", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", type=Path, default=REPO / "out" / "agent_transfer.json")
    args = parser.parse_args()
    preset = model_preset(args.model)
    shape = preset.model_copy(update={"num_layers": args.layers, "num_experts": args.experts, "top_k": min(preset.top_k, args.experts)})
    # Rank 0: every slot empty; rank 1: every expert (slots_per_gpu = experts).
    placement = [[-1] * args.experts + list(range(args.experts)) for _ in range(args.layers)]
    copies = [(layer, expert) for layer in range(args.layers) for expert in range(args.experts)]
    with tempfile.TemporaryDirectory() as temporary:
        files = Path(temporary)
        (files / "token").write_text(TOKEN)
        (files / "model.json").write_text(shape.model_dump_json())
        (files / "placement.json").write_text(json.dumps({"physical_to_logical_map": placement}))
        source_process, source = start_agent(1, files, args)
        destination_process, destination = start_agent(0, files, args)
        try:
            rows = [
                transfer_pass(destination, source, copies, 1, "sequential"),
                transfer_pass(destination, source, copies, args.concurrency, "concurrent"),
            ]
        finally:
            for process in (source_process, destination_process):
                process.terminate()
                process.wait()

    print(f"Expert transfer between two local agents ({args.model} experts, stage = stream + sha256 + shape check)")
    print(f"{'concurrency':>11} {'copies':>6} {'expert MB':>9} {'median MB/s per copy':>21} {'aggregate MB/s':>15}")
    for row in rows:
        print(
            f"{row['concurrency']:>11} {row['copies']:>6} {row['expert_mb']:>9.1f} "
            f"{row['median_copy_mb_s']:>21.0f} {row['aggregate_mb_s']:>15.0f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
