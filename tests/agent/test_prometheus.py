"""A real Prometheus (Debian's) scrapes two agents and answers the per-expert load query of the
contract (docs/agent-api.md)."""

from __future__ import annotations

import os
import time

import pytest

from agent_helpers import TINY


@pytest.fixture(scope="module")
def prometheus(agents, tmp_path_factory):
    cluster = pytest.importorskip("moeplace_dev.cluster")
    try:
        cluster.ensure_binaries()
    except cluster.ClusterError as error:
        if os.environ.get("CI"):
            pytest.fail(f"Prometheus unavailable: {error}", pytrace=False)
        pytest.skip(f"Prometheus unavailable: {error}")
    targets = [f"127.0.0.1:{agents[name].port}" for name in ("a", "b")]
    with cluster.start_prometheus(tmp_path_factory.mktemp("prometheus"), targets, "1s") as server:
        yield server


def wait_for(query, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = query()
        if check(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_promql_per_expert_load(prometheus, agents):
    promql = "sum by (layer, expert) (increase(moeplace_expert_tokens_total[5m]))"
    # increase() needs two samples of a series: a few scrapes after the first.
    result = wait_for(
        lambda: prometheus.query(promql),
        lambda r: len(r) == TINY.num_layers * TINY.num_experts and sum(float(s["value"][1]) for s in r) > 0,
    )
    keys = {(int(s["metric"]["layer"]), int(s["metric"]["expert"])) for s in result}
    assert keys == {(layer, expert) for layer in range(TINY.num_layers) for expert in range(TINY.num_experts)}
    assert sum(float(s["value"][1]) for s in result) > 0

    # Each agent exports only what it hosts: rank 0 experts 0..3, rank 1 experts 4..7 (and what
    # the HTTP tests staged and activated meanwhile, all of which they rolled back).
    per_rank = prometheus.query('count by (rank) (moeplace_expert_tokens_total{job="moeplace"})')
    counts = {s["metric"]["rank"]: int(float(s["value"][1])) for s in per_rank}
    assert counts == {"0": TINY.num_layers * 4, "1": TINY.num_layers * 4}
    tokens = prometheus.query("sum(moeplace_tokens_total)")
    assert float(tokens[0]["value"][1]) > 0
