"""The stand-in engine process (``python -m moe_agent.engines standin``) for the tests that drive an
engine backend: tests/operator/test_engine_backend.py and tests/e2e/test_engine_operator.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Standin:
    """One stand-in engine with its sidecars on loopback; ``start`` after publishing a first map,
    or before, to have it wait for one (as a pod waits for its ConfigMap).

    announced: rank -> sidecar URL; agents: the ranks a test announces (a copy it may change).
    """

    def __init__(self, workdir: Path, token: str, move_delay: float = 0.3, lagging: str = "",
                 num_ranks: int = 4, extra: Sequence[str] = ()):
        self.workdir = workdir
        self.placement_dir = workdir / "placement"
        self.engine_dir = workdir / "engine"
        self.placement_dir.mkdir(parents=True, exist_ok=True)
        self.token_file = workdir / "token"
        self.token_file.write_text(token)
        self.log_path = workdir / "standin.log"
        self.argv = [
            sys.executable, "-m", "moe_agent.engines", "standin", "--placement-dir", str(self.placement_dir),
            "--engine-dir", str(self.engine_dir), "--ports", ",".join(["0"] * num_ranks),
            "--token-file", str(self.token_file), "--move-delay", str(move_delay), "--lagging-ranks", lagging,
            *extra,
        ]
        self.process: subprocess.Popen | None = None
        self.announced: dict[int, str] = {}
        self.agents: dict[int, str] = {}
        self.ports: dict[int, int] = {}
        self.sglang_port: int | None = None

    def start(self) -> Standin:
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'agent'}"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        serving = json.loads(self.process.stdout.readline())
        self.ports = {int(rank): port for rank, port in serving["ports"].items()}
        self.sglang_port = serving.get("sglang_port")
        self.announced = {rank: f"http://127.0.0.1:{port}" for rank, port in self.ports.items()}
        self.agents = dict(self.announced)
        return self

    @property
    def targets(self) -> list[str]:
        """Prometheus scrape targets (host:port) of the sidecars, in rank order."""
        return [f"127.0.0.1:{port}" for _, port in sorted(self.ports.items())]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
