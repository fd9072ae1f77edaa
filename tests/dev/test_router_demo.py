"""``moeplace demo-router`` end to end, briefly: the router, a stand-in engine and two runs of four
replay agents (real processes); the router's run sends fewer bytes across nodes per token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_router_prints_both_runs_side_by_side(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / part) for part in ("operator", "agent", "dev"))
    out = tmp_path / "router-demo.json"
    result = subprocess.run(
        [sys.executable, "-m", "moeplace.cli", "demo-router", "--seconds", "3", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "router / round-robin:" in result.stdout
    runs = {run["run"]: run for run in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"round-robin", "router"}
    for run in runs.values():
        assert run["replayed_tokens"] > 0 and run["modelled_moe_ms"] > 0
    assert runs["router"]["cross_node_bytes_per_token"] < runs["round-robin"]["cross_node_bytes_per_token"]
    assert runs["router"]["modelled_cross_node_mb"] < runs["round-robin"]["modelled_cross_node_mb"]
    assert runs["round-robin"]["tokens_per_gpu_max_over_mean"] < 1.01
