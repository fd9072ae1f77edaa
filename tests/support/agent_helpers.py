"""Helpers of the agent tests: the tiny model, HTTP calls, and agent processes (``python -m moe_agent``)
on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_placement.models import ModelShape

REPO = Path(__file__).resolve().parents[2]
TOKEN = "agent-test-token"
LOOPBACK = "127.0.0.1"
# 3 layers x 8 experts, top-2; one expert is 3 x 64 x 128 bf16 = 49 kB.
TINY = ModelShape(name="tiny", num_layers=3, num_experts=8, top_k=2, hidden_size=64, expert_intermediate_size=128)
TOPOLOGY = "1x2"
REDUNDANT_SLOTS = 2  # 10 slots, 5 per rank
# Every expert once, slots 4 (rank 0) and 9 (rank 1) empty in every layer.
HOLES_ROW = [0, 1, 2, 3, -1, 4, 5, 6, 7, -1]
HOLES_MAP = [HOLES_ROW] * TINY.num_layers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def http(
    method: str, url: str, body: Any = None, token: str | None = TOKEN, raw: bytes | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP call; returns (status, headers, body bytes) for every status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@dataclass
class AgentProcess:
    """A running ``python -m moe_agent`` on loopback."""

    rank: int
    port: int
    process: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        """(status, JSON body, or text when it is not JSON)."""
        status, _, data = http(method, self.url + path, body, **kwargs)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode(errors="replace")

    def placement(self) -> dict:
        status, answer = self.call("GET", "/v1/placement")
        assert status == 200, answer
        return answer

    def metrics(self) -> str:
        return http("GET", self.url + "/metrics", token=None)[2].decode()

    def wait_ready(self, timeout: float = 90.0) -> AgentProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"agent rank {self.rank} exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if http("GET", self.url + "/healthz", token=None, timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"agent rank {self.rank} not ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def agent_env() -> dict[str, str]:
    """The environment of an agent process: this checkout's packages, no token in the env."""
    env = {k: v for k, v in os.environ.items() if k not in ("MOEPLACE_AGENT_TOKEN", "MOEPLACE_MODEL")}
    paths = [str(REPO / "operator"), str(REPO / "agent")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


