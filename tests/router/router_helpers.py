"""Real processes for the router tests: stand-in engine ranks and ``moeplace router``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
MODEL = "deepseek-v2-lite"  # 26 layers x 64 experts, top-6
LAYERS, EXPERTS, TOP_K = 26, 64, 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    environment = dict(os.environ)
    paths = [str(REPO / "operator"), str(REPO / "agent")]
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def http(method: str, url: str, body: Any = None, raw: bytes | None = None, timeout: float = 30):
    """One HTTP call -> (status, headers, body bytes), for every status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@dataclass
class Process:
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def wait_ready(self, path: str, timeout: float = 60.0) -> Process:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {self.process.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise TimeoutError(f"{self.url}{path} not ready in {timeout}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_standin(rank: int, delay_ms: float = 0.0) -> Process:
    port = free_port()
    command = [sys.executable, "-m", "moe_router.standin", "--port", str(port), "--rank", str(rank)]
    command += ["--delay-ms", str(delay_ms)]
    process = subprocess.Popen(command, env=env(), stderr=subprocess.PIPE, text=True)
    return Process(port, process)


def start_router(backend_args: list[str], topology: str = "2x2", *extra: str) -> Process:
    port = free_port()
    command = [sys.executable, "-m", "moeplace.cli", "router", "--model", MODEL, "--topology", topology]
    command += ["--port", str(port), *backend_args, *extra]
    process = subprocess.Popen(command, env=env(), stderr=subprocess.PIPE, text=True)
    return Process(port, process)


def signature_of(experts: list[int]) -> list[list[float]]:
    """A signature [L][E] whose every token chooses ``experts`` (k of them) at every layer."""
    row = [1.0 if expert in experts else 0.0 for expert in range(EXPERTS)]
    return [row] * LAYERS
