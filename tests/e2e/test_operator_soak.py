"""Soak: one operator process rebalances through alternating workload shifts, migration after
migration, on real agent processes, the real API server and a real Prometheus.

The agents replay a two-domain trace whose domains take turns every few seconds, so each shift
calls for another placement. After every completed migration the agents' live maps equal the
published ConfigMap and the plan's target, and no agent holds a staged slot; a checker samples the
agents throughout and never finds an expert without a live replica. A second soak injects faults
(an agent killed mid-transfer, copies timing out, the API server restarted): every rollback returns
to the map from before its migration, nothing leaks, and migrations complete again afterwards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from e2e_support import AGENT_TOKEN, TINY_SHAPE, Agents, Api, ReplicaChecker, manifest, poll_until, wait_for
from moeplace_dev.cluster import ManagedProcess, _http
from moe_placement.models import placement_hash

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

L, E = TINY_SHAPE["numLayers"], TINY_SHAPE["numExperts"]
SHIFT_SECONDS = 9.0
MIGRATIONS = 12


def two_domain_trace(path: Path) -> Path:
    """The tiny model's trace with two domains that like unrelated experts, strongly skewed."""
    from moe_placement.synthetic import SyntheticConfig, generate
    from moe_placement.traces import save_trace

    config = SyntheticConfig(
        name="tiny-e2e", num_layers=L, num_experts=E, top_k=TINY_SHAPE["topK"], num_sequences=64,
        tokens_per_sequence=64, popularity_skew=1.8, domains=("a", "b"), domain_weights=(0.5, 0.5),
        domain_drift=1.0, sequence_affinity=0.2,
    )
    save_trace(generate(config, 11), path)
    return path


def start_stack(api, prometheus_factory, tmp_path_factory, namespace, name, extra=None) -> tuple[Agents, object]:
    workdir = tmp_path_factory.mktemp(namespace)
    shifting = ["--shift-after-seconds", str(SHIFT_SECONDS), "--alternate", "--start-time", str(time.time())]
    agents = Agents(
        workdir, two_domain_trace(workdir / "trace.npz"), model=json.dumps(TINY_SHAPE), token=AGENT_TOKEN,
        window_seconds=4, all_ranks_extra=shifting, extra=extra or {},
    )
    agents.start()
    prometheus = prometheus_factory(agents.targets, "1s")
    api.namespace(namespace)
    api.announce(namespace, name, agents.ports, AGENT_TOKEN)
    return agents, prometheus


def soak_manifest(name: str, namespace: str, prometheus_url: str, **migration: object) -> dict:
    return manifest(
        name, namespace, prometheus_url,
        placement={"rebalanceIntervalSeconds": 1, "minPredictedGain": 0.03, "evaluationBatches": 2},
        metrics={"prometheusUrl": prometheus_url, "windowSeconds": 4, "minTokens": 50},
        migration={"maxCopiesPerStage": 6, "maxConcurrentTransfers": 4, "stepRetries": 2, "stepTimeoutSeconds": 10,
                   **migration},
    )


def live_state(agents: Agents) -> tuple[set[str], int]:
    """(hashes the agents serve, staged slots over all agents)."""
    answers = [agents.placement(rank) for rank in sorted(agents.ports)]
    assert all(answer is not None for answer in answers), "every agent answers"
    staged = sum(slot["state"] == "staged" for answer in answers for slot in answer["slots"])
    return {answer["hash"] for answer in answers}, staged


class MigrationWatch:
    """Follows status.migration and checks every migration that ends."""

    def __init__(self, api: Api, agents: Agents, namespace: str, name: str) -> None:
        self.api, self.agents, self.namespace, self.name = api, agents, namespace, name
        self.completed: list[str] = []
        self.rolled_back: list[str] = []
        self.seen: set[tuple[str, str]] = set()
        self.sources: dict[str, str] = {}  # plan -> hash of the map published when it started

    def poll(self) -> None:
        status = self.api.status(self.namespace, self.name)
        migration = status.get("migration") or {}
        plan = migration.get("planId", "")
        if migration.get("state") == "Running" and not migration.get("rollbackOf") and plan not in self.sources:
            self.sources[plan] = status["placement"]["hash"]
        key = (plan, migration.get("state", ""))
        if migration.get("state") not in ("Completed", "RolledBack") or key in self.seen:
            return
        self.seen.add(key)
        published, _ = self.api.published(self.namespace, self.name)
        assert status["placement"]["hash"] == placement_hash(published)
        if migration["state"] == "Completed":
            assert migration["targetHash"] == placement_hash(published), "published = the plan's target"
            self.completed.append(plan)
        else:
            forward = migration.get("rollbackOf") or plan
            if forward in self.sources:
                assert self.sources[forward] == placement_hash(published), "back on the map from before"
            self.rolled_back.append(forward)
        # Right after a migration ends (before the next one can start) every agent serves the
        # published map and nothing is left staged.
        hashes, staged = live_state(self.agents)
        assert hashes == {placement_hash(published)}, (migration, hashes)
        assert staged == 0, f"{staged} staged slots left after plan {migration['planId']}"

    def until(self, done, timeout: float, what: str) -> None:
        poll_until(self.poll, done, timeout, what, lambda: f"completed {len(self.completed)}")


def test_a_dozen_migrations_in_a_row_through_alternating_shifts(api, operator, prometheus_factory, tmp_path_factory):
    namespace, name = "e2e-soak", "moe"
    agents, prometheus = start_stack(api, prometheus_factory, tmp_path_factory, namespace, name)
    try:
        with ReplicaChecker(agents, L, E) as checker:
            api.create(namespace, soak_manifest(name, namespace, prometheus.url))
            watch = MigrationWatch(api, agents, namespace, name)
            watch.until(lambda: len(watch.completed) >= MIGRATIONS, MIGRATIONS * SHIFT_SECONDS * 3 + 60,
                        f"{MIGRATIONS} completed migrations")
        reasons = [event["reason"] for event in api.events(namespace)]
        assert watch.rolled_back == [] and "MigrationRolledBack" not in reasons, watch.rolled_back
        assert "MigrationRollingBack" not in reasons
        assert len(set(watch.completed)) >= MIGRATIONS // 2, "the shifts alternate between plans"
        assert checker.samples > 100
        assert checker.violations == [], checker.violations[:5]
    finally:
        agents.stop()


def restart_apiserver(cluster) -> None:
    """Stop kube-apiserver and start it again with the same flags (etcd keeps the objects)."""
    old = cluster.processes[-1]
    assert old.name == "kube-apiserver"
    argv = list(old.popen.args)
    if "--pdeathsig" in argv:
        argv = argv[argv.index("--") + 1:]
    old.stop()
    time.sleep(2)
    cluster.processes[-1] = ManagedProcess.spawn("kube-apiserver", argv, old.log_path, detached=False)
    wait_for(lambda: _http(f"{cluster.server}/readyz", token=cluster.admin_token) == (200, b"ok"), 60,
             "kube-apiserver ready again")


def restart_agent(agents: Agents, api: Api, namespace: str, name: str, rank: int, checker: ReplicaChecker,
                  extra: list[str] | None = None) -> None:
    """Kill an agent and start it again with the published map (as a restarted pod reads it)."""
    checker.dead.add(rank)
    agents.kill(rank)
    mapping, _ = api.published(namespace, name)
    placement_file = agents.workdir / f"published-{rank}.json"
    placement_file.write_text(json.dumps({"physical_to_logical_map": np.asarray(mapping).tolist()}))
    agents.extra[rank] = extra or []
    agents.start(rank, placement=placement_file)
    checker.dead.discard(rank)


def test_faults_roll_back_exactly_and_leak_nothing(api, operator, control_plane, prometheus_factory, tmp_path_factory):
    namespace, name = "e2e-soak-faults", "moe"
    # Rank 3 serves weights slowly: a copy from it outlasts the 1 s step timeout.
    slow = ["--test-throttle-bytes-per-second", "20000"]
    agents, prometheus = start_stack(api, prometheus_factory, tmp_path_factory, namespace, name, extra={3: slow})
    victim = 1

    def migration() -> dict:
        return api.status(namespace, name).get("migration") or {}

    try:
        with ReplicaChecker(agents, L, E) as checker:
            api.create(namespace, soak_manifest(name, namespace, prometheus.url, stepTimeoutSeconds=1, stepRetries=1))
            watch = MigrationWatch(api, agents, namespace, name)
            # Copies time out: the migrations that need rank 3's experts are rolled back.
            watch.until(lambda: bool(watch.rolled_back) or migration().get("rollbackOf"), 180, "a timeout rollback")
            # Rank 3 comes back healthy, with the published map (a rollback may be under way: the other
            # agents are brought back onto that map from the weights they retired, then it goes on).
            restart_agent(agents, api, namespace, name, 3, checker)
            watch.until(lambda: len(watch.completed) >= 1 and migration().get("state") != "Running", 180,
                        "a completed migration")

            # The API server restarts mid-migration: the operator carries on or resumes.
            watch.until(lambda: migration().get("state") == "Running", 120, "a running migration")
            restart_apiserver(control_plane)
            ended = len(watch.completed) + len(watch.rolled_back)
            watch.until(lambda: len(watch.completed) + len(watch.rolled_back) > ended, 180,
                        "a migration ending after the API server restart")

            # An agent is killed mid-transfer and comes back with the published map.
            def victim_staging() -> bool:
                answer = agents.placement(victim, timeout=1)
                return bool(answer) and any(slot["state"] == "staged" for slot in answer["slots"])

            wait_for(victim_staging, 180, f"rank {victim} receiving an expert", interval=0.05)
            checker.dead.add(victim)
            agents.kill(victim)
            watch.until(lambda: migration().get("rollbackOf") or migration().get("state") == "RolledBack", 90,
                        "a rollback")
            restart_agent(agents, api, namespace, name, victim, checker)
            completed = len(watch.completed)
            watch.until(lambda: len(watch.completed) >= completed + 2, 240, "migrations completing after the faults")
        assert watch.rolled_back, "the faults rolled something back"
        assert checker.violations == [], checker.violations[:5]
    finally:
        agents.stop()
