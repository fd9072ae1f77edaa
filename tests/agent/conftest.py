"""Fixtures of the agent tests: real agent processes on 127.0.0.1 (helpers in agent_helpers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_helpers import (
    HOLES_MAP,
    REDUNDANT_SLOTS,
    REPO,
    TINY,
    TOKEN,
    TOPOLOGY,
    AgentProcess,
    agent_env,
    free_port,
)


@pytest.fixture(scope="session")
def agent_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Token file, tiny model JSON and the placement with holes, shared by every agent."""
    directory = tmp_path_factory.mktemp("agent-files")
    token = directory / "token"
    token.write_text(TOKEN + "\n")
    model = directory / "tiny.json"
    model.write_text(TINY.model_dump_json())
    placement = directory / "placement.json"
    placement.write_text(json.dumps({"physical_to_logical_map": HOLES_MAP}))
    return {"token": token, "model": model, "placement": placement, "dir": directory}


@pytest.fixture(scope="session")
def launch_agent(agent_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``launch_agent(rank, *extra_flags)`` starts an agent (not waiting for it); all stop at the end."""
    started: list[AgentProcess] = []
    logs = tmp_path_factory.mktemp("agent-logs")

    def launch(rank: int, *extra: str, tokens_per_second: float = 400.0) -> AgentProcess:
        port = free_port()
        args = [
            sys.executable, "-m", "moe_agent",
            "--replay", "synthetic",
            "--model", str(agent_files["model"]),
            "--topology", TOPOLOGY,
            "--redundant-slots", str(REDUNDANT_SLOTS),
            "--rank", str(rank),
            "--port", str(port),
            "--token-file", str(agent_files["token"]),
            "--tokens-per-second", str(tokens_per_second),
            "--batch-tokens", "64",
            "--placement", str(agent_files["placement"]),
            "--transfer-timeout", "10",
            *extra,
        ]
        log_path = logs / f"agent-{len(started)}-rank{rank}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=agent_env(), cwd=REPO)
        agent = AgentProcess(rank, port, process, log_path, args)
        started.append(agent)
        return agent

    yield launch
    for agent in started:  # all at once: each takes about a second to wind down
        if agent.process.poll() is None:
            agent.process.terminate()
    for agent in started:
        agent.stop()


@pytest.fixture(scope="session")
def agents(launch_agent) -> dict[str, AgentProcess]:
    """Four agents of the tiny model, started together:
    ``a`` rank 0 (the one that stages), ``b`` rank 1 (a healthy peer), ``slow`` rank 1 streaming
    weights at 8 kB/s (killed mid-transfer by a test), ``corrupt`` rank 1 flipping a byte of every
    weight stream."""
    started = {
        "a": launch_agent(0),
        "b": launch_agent(1),
        "slow": launch_agent(1, "--test-throttle-bytes-per-second", "8000", tokens_per_second=50),
        "corrupt": launch_agent(1, "--test-corrupt-transfers", tokens_per_second=50),
    }
    for agent in started.values():
        agent.wait_ready()
    return started
