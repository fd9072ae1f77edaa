"""Faults during migrations, end to end: the operator killed mid-migration resumes and finishes; an
agent killed mid-transfer makes the step retry or roll back; throughout, a checker samples the agents
and no expert ever has zero live replicas."""

from __future__ import annotations

import json

import numpy as np
import pytest

from e2e_support import (
    AGENT_TOKEN,
    TINY_SHAPE,
    Agents,
    ReplicaChecker,
    manifest,
    skewed_trace,
    wait_for,
)
from moe_placement.models import placement_hash

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

L, E = TINY_SHAPE["numLayers"], TINY_SHAPE["numExperts"]


def start_stack(api, prometheus_factory, tmp_path_factory, namespace, name, extra=None):
    workdir = tmp_path_factory.mktemp(namespace)
    agents = Agents(workdir, skewed_trace(workdir / "trace.npz"), extra=extra or {})
    agents.start()
    prometheus = prometheus_factory(agents.targets, "1s")
    api.namespace(namespace)
    api.announce(namespace, name, agents.ports, AGENT_TOKEN)
    return agents, prometheus


def all_serve_published(api, agents, namespace, name):
    published = api.published(namespace, name)
    answers = [agents.placement(rank) for rank in sorted(agents.ports)]
    if published is None or any(a is None for a in answers):
        return False
    mapping, generation = published
    return all(a["hash"] == placement_hash(mapping) and a["generation"] == generation for a in answers)


def test_operator_killed_mid_migration_resumes(api, operator, prometheus_factory, tmp_path_factory):
    namespace, name = "e2e-operator-kill", "moe"
    agents, prometheus = start_stack(api, prometheus_factory, tmp_path_factory, namespace, name)
    try:
        with ReplicaChecker(agents, L, E) as checker:
            # One copy per stage and a pause after each: a migration of many short stages.
            api.create(namespace, manifest(
                name, namespace, prometheus.url,
                migration={"maxCopiesPerStage": 1, "maxConcurrentTransfers": 1, "stagePauseSeconds": 0.4},
            ))
            running = wait_for(
                lambda: (m := api.status(namespace, name).get("migration") or {}).get("state") == "Running"
                and m.get("stage", 0) >= 2 and m,
                120, "a migration past its second stage",
            )
            assert running["stages"] > running["stage"] + 2, running
            operator.kill()  # SIGKILL: no chance to record anything more
            killed_at = api.status(namespace, name)["migration"]
            assert killed_at["state"] == "Running"
            operator.start()
            done = wait_for(
                lambda: (m := api.status(namespace, name).get("migration") or {}).get("state") == "Completed"
                and m.get("planId") == killed_at["planId"] and m,
                120, "the same plan completed after the restart",
            )
            assert done["stage"] == done["stages"] == killed_at["stages"]
            reasons = [event["reason"] for event in api.events(namespace)]
            assert "MigrationResumed" in reasons, reasons
            wait_for(lambda: all_serve_published(api, agents, namespace, name), 60, "agents on the published map")
        assert checker.samples > 10
        assert checker.violations == [], checker.violations[:5]
    finally:
        agents.stop()


def test_agent_killed_mid_transfer_rolls_back_then_recovers(api, operator, prometheus_factory, tmp_path_factory):
    namespace, name = "e2e-agent-kill", "moe"
    # Slow transfers (every agent serves weights at 100 kB/s: ~0.5 s per expert) so that a kill lands
    # while copies are in flight.
    throttle = ["--test-throttle-bytes-per-second", "100000"]
    agents, prometheus = start_stack(
        api, prometheus_factory, tmp_path_factory, namespace, name, extra={r: throttle for r in range(4)}
    )
    victim = 1
    try:
        with ReplicaChecker(agents, L, E) as checker:
            api.create(namespace, manifest(
                name, namespace, prometheus.url,
                migration={"maxCopiesPerStage": 4, "maxConcurrentTransfers": 2, "stepRetries": 1,
                           "stepTimeoutSeconds": 5},
            ))

            def victim_staging():
                answer = agents.placement(victim, timeout=1)
                return answer and any(slot["state"] == "staged" for slot in answer["slots"])

            original = wait_for(
                lambda: (api.status(namespace, name).get("placement") or {}).get("hash"), 60, "the initial placement"
            )
            wait_for(victim_staging, 120, f"rank {victim} receiving an expert", interval=0.05)
            checker.dead.add(victim)
            agents.kill(victim)

            # The failed stage is undone; the deployment goes back to the map from before the
            # migration (at once when nothing had changed yet, else by a rollback migration that
            # waits for the dead agent) and reports it.
            wait_for(
                lambda: (m := api.status(namespace, name).get("migration") or {}).get("state") == "RolledBack"
                or (m.get("state") == "Running" and m.get("rollbackOf")),
                90, "the migration being rolled back",
            )
            degraded = api.condition(namespace, name, "Degraded")
            assert degraded.get("status") == "True", degraded
            assert degraded["reason"] in ("MigrationRolledBack", "MigrationRollingBack", "AgentsUnavailable"), degraded
            for rank in sorted(agents.ports):
                if rank != victim:
                    answer = agents.placement(rank)
                    assert not any(slot["state"] == "staged" for slot in answer["slots"]), "staged slots retired"
            # The published map is what the surviving agents serve.
            mapping, _ = api.published(namespace, name)
            for rank in sorted(agents.ports):
                if rank != victim:
                    assert agents.placement(rank)["hash"] == placement_hash(mapping)

            # The agent comes back with the published placement; the rollback completes: every
            # agent serves exactly the map from before the migration.
            placement_file = agents.workdir / "published.json"
            placement_file.write_text(json.dumps({"physical_to_logical_map": np.asarray(mapping).tolist()}))
            agents.extra[victim] = []
            agents.start(victim, placement=placement_file)
            checker.dead.discard(victim)
            rolled_back = wait_for(
                lambda: (s := api.status(namespace, name)).get("migration", {}).get("state") == "RolledBack" and s,
                90, "the rollback completed", interval=0.1,
            )
            assert rolled_back["placement"]["hash"] == original, "exactly the map from before the migration"
            wait_for(lambda: "MigrationRolledBack" in [event["reason"] for event in api.events(namespace)], 30,
                     "the MigrationRolledBack event")
            wait_for(lambda: api.condition(namespace, name, "Degraded").get("status") == "False", 90, "Degraded=False")
            wait_for(lambda: all_serve_published(api, agents, namespace, name), 90, "all four agents on the published map")
        assert checker.samples > 10
        assert checker.violations == [], checker.violations[:5]
    finally:
        agents.stop()


def test_spec_change_and_pause_mid_migration(api, operator, prometheus_factory, tmp_path_factory):
    """Pausing (a spec change) mid-migration stops it at a stage boundary with the intermediate map
    published; nothing moves while paused; unpausing re-plans and finishes."""
    namespace, name = "e2e-pause", "moe"
    agents, prometheus = start_stack(api, prometheus_factory, tmp_path_factory, namespace, name)
    try:
        with ReplicaChecker(agents, L, E) as checker:
            api.create(namespace, manifest(
                name, namespace, prometheus.url,
                migration={"maxCopiesPerStage": 1, "maxConcurrentTransfers": 1, "stagePauseSeconds": 0.4},
            ))
            wait_for(
                lambda: (m := api.status(namespace, name).get("migration") or {}).get("state") == "Running"
                and m.get("stage", 0) >= 1, 120, "a running migration",
            )
            api.patch_spec(namespace, name, {"placement": {"paused": True}})
            stopped = wait_for(
                lambda: (m := api.status(namespace, name).get("migration") or {}).get("state") == "Interrupted" and m,
                60, "the migration interrupted at a stage boundary",
            )
            assert 1 <= stopped["stage"] < stopped["stages"]
            wait_for(lambda: all_serve_published(api, agents, namespace, name), 30, "agents on the intermediate map")
            published = api.published(namespace, name)
            wait_for(lambda: api.status(namespace, name).get("lastCycleResult") == "paused", 30, "a paused cycle")
            first = api.status(namespace, name)["lastCycleTime"]
            wait_for(lambda: api.status(namespace, name)["lastCycleTime"] > first, 30, "another paused cycle")
            assert api.published(namespace, name)[1] == published[1], "nothing moves while paused"
            api.patch_spec(namespace, name, {"placement": {"paused": False}, "migration": {"stagePauseSeconds": 0}})
            wait_for(
                lambda: (m := api.status(namespace, name).get("migration") or {}).get("state") == "Completed"
                and m.get("planId") != stopped["planId"], 120, "a new plan completed after unpausing",
            )
            wait_for(lambda: all_serve_published(api, agents, namespace, name), 60, "agents on the published map")
        assert checker.violations == [], checker.violations[:5]
    finally:
        agents.stop()
