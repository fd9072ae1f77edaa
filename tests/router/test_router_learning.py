"""The router learns online from replay agents: real processes (``moeplace router`` and two replay
agents that report finished sequences' signatures to it), and the operator's reader of its groups."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent_helpers import TINY, TOKEN, agent_env
from router_helpers import REPO, Process, free_port, http, start_router, start_standin

TOPOLOGY = "2x1"  # two nodes of one GPU: 8 experts, 4 slots per rank


def start_replay_agent(rank: int, files: Path, router_url: str) -> Process:
    port = free_port()
    command = [
        sys.executable, "-m", "moe_agent", "--replay", "synthetic", "--model", str(files / "tiny.json"),
        "--topology", TOPOLOGY, "--rank", str(rank), "--port", str(port),
        "--token-file", str(files / "token"), "--tokens-per-second", "4000", "--batch-tokens", "128",
        "--report-signatures-to", router_url,
    ]
    log = (files / f"agent-{rank}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=agent_env(), cwd=REPO, text=True)
    return Process(port, process)


@pytest.fixture(scope="module")
def learning(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Path]]:
    """The router (tiny model) and two replay agents reporting to it, until the module ends."""
    files = tmp_path_factory.mktemp("learning")
    (files / "tiny.json").write_text(TINY.model_dump_json())
    (files / "token").write_text(TOKEN + "\n")
    engine = start_standin(rank=-1).wait_ready("/v1/models")
    router = start_router(
        ["--backend", engine.url], TOPOLOGY, "--model", str(files / "tiny.json")
    ).wait_ready("/healthz")
    agents = [start_replay_agent(rank, files, router.url) for rank in range(2)]
    yield router, files
    for process in (*agents, router, engine):
        process.stop()


def wait_for_requests(router: Process, requests: float, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        status, _, body = http("GET", router.url + "/router/v1/state")
        assert status == 200, body
        state = json.loads(body)
        if sum(domain["requests"] for domain in state["domains"]) >= requests:
            return state
        time.sleep(0.5)
    raise AssertionError(f"router learned from too few requests in {timeout}s: {state.get('domains')}")


def test_replay_agents_teach_the_router_online(learning: tuple[Process, Path]) -> None:
    router, _ = learning
    state = wait_for_requests(router, 20)
    assert state["num_layers"] == TINY.num_layers and state["num_nodes"] == 2
    for domain in state["domains"]:
        signature = np.array(domain["signature"])
        assert signature.shape == (TINY.num_layers, TINY.num_experts)
        assert np.allclose(signature.sum(1), TINY.top_k)
    # The prompts the agents reported now vote for a learned domain.
    status, _, body = http("POST", router.url + "/router/v1/score", {"prompt": [0, 1, 2, 3]})
    assert status == 200 and json.loads(body)["domain"] >= 0
    # It keeps learning while the agents replay.
    later = wait_for_requests(router, sum(d["requests"] for d in state["domains"]) + 10)
    assert sum(d["requests"] for d in later["domains"]) > sum(d["requests"] for d in state["domains"])


def test_the_operator_reads_the_learned_groups(learning: tuple[Process, Path]) -> None:
    from moe_operator.router_source import RouterUnavailable, fetch_router_groups

    router, _ = learning
    wait_for_requests(router, 20)
    groups = fetch_router_groups(router.url, TINY.num_layers, TINY.num_experts, 2)
    assert groups is not None and groups.count >= 1
    assert groups.demand.shape == (2, TINY.num_experts) and np.isclose(groups.demand.sum(), 1.0)
    for load in groups.domain_loads.values():
        assert load.shape == (TINY.num_layers, TINY.num_experts)
    with pytest.raises(RouterUnavailable, match="deployment has"):
        fetch_router_groups(router.url, TINY.num_layers, TINY.num_experts, 4)
