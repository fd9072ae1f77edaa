"""The operator process with an engine backend (``spec.serving.engineKind: sglang``) on the real API
server, with a real Prometheus, against the stand-in engine process (``python -m moe_agent.engines
standin``: real engine sidecars, SGLang's recorder endpoints and dump files).

What the kubelet would do is done here: ``PlacementMount`` watches the ``<name>-placement`` ConfigMap
on the API server and writes its data where the stand-in reads the published map, as the mounted
ConfigMap appears in an engine pod. The load reaches the operator only the way an SGLang pod's does:
rank 0's sidecar asks the stand-in's ``/dump_expert_distribution_record``, reads the stat-mode dump
file and exports every rank's share as ``moeplace_expert_tokens_total``, which Prometheus scrapes.
The stand-in's traffic switches between two expert popularities every few seconds, so each switch
calls for another placement.

Checked: migration after migration completes with the engine applying the map (``status.migration``
Completed, its ``targetHash`` what every rank's sidecar reports, the generation published, a
``MigrationCompleted`` event each); the operator never asks a sidecar for anything but its placement
(a sidecar logs every request it has no route for: a stage or activate call would show); and a rank
that never moves is named while the operator waits, then the migration fails on
``engineApplyTimeoutSeconds`` and the map from before it is published again.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from kubernetes import watch

from e2e_support import AGENT_TOKEN, TINY_SHAPE, Api, BackgroundLoop, manifest, poll_until, wait_for
from engine_standin import Standin
from moe_agent.engines import contract
from moeplace_dev.cluster import PrometheusServer
from moe_operator import builders
from moe_placement.files import fill_empty_slots
from moe_placement.models import Placement, placement_hash

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "moe"
MIGRATIONS = 5
SHIFT_SECONDS = 8.0
MOVE_DELAY_S = 0.5
UNROUTED = "no route for"
SLOTS_PER_GPU = 5  # manifest(): (16 experts + 4 redundant slots) over 2 x 2 GPUs


class PlacementMount(BackgroundLoop):
    """The kubelet's part: watches the placement ConfigMap and writes its data into ``directory``
    (``contract.write_published``, one file per key) on every change."""

    def __init__(self, api: Api, namespace: str, name: str, directory: Path) -> None:
        super().__init__("placement-mount")
        self.api, self.namespace, self.directory = api, namespace, directory
        self.selector = f"metadata.name={builders.placement_configmap_name(name)}"
        self.writes = 0

    def _run(self) -> None:
        written = None
        while not self._stop.is_set():
            stream = watch.Watch().stream(
                self.api.core.list_namespaced_config_map, self.namespace, field_selector=self.selector,
                timeout_seconds=2,
            )
            for event in stream:
                data = event["object"].data or {}
                if event["type"] in ("ADDED", "MODIFIED") and data != written:
                    contract.write_published(self.directory, data)
                    written = data
                    self.writes += 1


def sidecar_answer(standin: Standin, rank: int) -> dict:
    """Rank ``rank``'s ``GET /v1/placement`` (retried over a 503 while a ConfigMap update is half written)."""
    request = urllib.request.Request(f"{standin.announced[rank]}/v1/placement",
                                     headers={"Authorization": f"Bearer {AGENT_TOKEN}"})

    def answer() -> dict | None:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code != 503:
                raise
            return None

    return wait_for(answer, 5, f"rank {rank}'s placement", interval=0.05)


@dataclass
class Engine:
    standin: Standin
    prometheus: PrometheusServer
    namespace: str


@pytest.fixture
def engine(api, operator, prometheus_factory, tmp_path_factory, request) -> Iterator[Engine]:
    """A stand-in engine with its sidecars announced in the Endpoints, its placement mounted,
    Prometheus scraping the sidecars; ranks in the (indirect) parameter never move."""
    lagging = getattr(request, "param", "")
    namespace = f"e2e-engine{'-lagging' if lagging else ''}"
    workdir = tmp_path_factory.mktemp(namespace)
    standin = Standin(workdir, AGENT_TOKEN, MOVE_DELAY_S, lagging, extra=[
        "--sglang-port", "0", "--tokens-per-second", "2000", "--load-shift-seconds", str(SHIFT_SECONDS),
        "--load-interval", "1",
    ]).start()
    try:
        prometheus = prometheus_factory(standin.targets, "1s")
        api.namespace(namespace)
        api.announce(namespace, NAME, standin.ports, AGENT_TOKEN)
        with PlacementMount(api, namespace, NAME, standin.placement_dir):
            yield Engine(standin, prometheus, namespace)
    finally:
        standin.stop()
        print(standin.log()[-3000:])


def engine_manifest(engine: Engine, apply_timeout_s: float) -> dict:
    return manifest(
        NAME, engine.namespace, engine.prometheus.url,
        serving={"engineKind": "sglang"},
        placement={"rebalanceIntervalSeconds": 1, "minPredictedGain": 0.03, "evaluationBatches": 2},
        metrics={"prometheusUrl": engine.prometheus.url, "windowSeconds": 4, "minTokens": 50},
        migration={"engineApplyTimeoutSeconds": apply_timeout_s},
    )


def filled_hash(mapping: np.ndarray) -> str:
    """The hash of the map an engine serves for ``mapping`` (every empty slot filled)."""
    placement = Placement(np.asarray(mapping), TINY_SHAPE["numExperts"], SLOTS_PER_GPU)
    return placement_hash(fill_empty_slots(placement).physical_to_logical_map)


@dataclass
class MigrationWatch:
    """Follows ``status.migration``; checks each completed migration against every rank's sidecar
    while it is still the latest one (a check that a next migration overtook is not counted)."""

    api: Api
    engine: Engine
    completed: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # plan -> hash published before it started
    settled: str = ""  # the hash published while no migration ran, last seen
    waiting_messages: list[str] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)

    def status(self) -> dict:
        return self.api.status(self.engine.namespace, NAME)

    def poll(self) -> None:
        status = self.status()
        migration = status.get("migration") or {}
        plan, state = migration.get("planId", ""), migration.get("state", "")
        if state == "Running":  # an engine's target is published when it starts
            self.sources.setdefault(plan, self.settled)
            if "waiting for the engine" in status.get("message", ""):
                self.waiting_messages.append(status["message"])
        elif status.get("placement"):
            self.settled = status["placement"]["hash"]
        if state not in ("Completed", "Failed") or (plan, state) in self.seen:
            return
        self.seen.add((plan, state))
        if state == "Failed":
            self.failed.append({**migration, "published": status["placement"]["hash"]})
            return
        published, generation = self.api.published(self.engine.namespace, NAME)
        answers = [sidecar_answer(self.engine.standin, rank) for rank in range(4)]
        if (self.status().get("migration") or {}).get("planId") != plan:
            return
        assert migration["targetHash"] == filled_hash(published), "the published map is the plan's target"
        assert {answer["hash"] for answer in answers} == {migration["targetHash"]}, (plan, answers)
        assert {answer["generation"] for answer in answers} == {generation}
        assert status["placement"]["hash"] == placement_hash(published)
        self.completed.append(plan)

    def until(self, done, timeout: float, what: str) -> None:
        poll_until(self.poll, done, timeout, what,
                   lambda: f"completed {self.completed}, failed {self.failed}, status {self.status()}")


def prove_unrouted_requests_are_logged(standin: Standin) -> None:
    """A stage call to a sidecar is refused and shows in the stand-in's log (what the final check reads)."""
    request = urllib.request.Request(f"{standin.announced[1]}/v1/experts/stage", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {AGENT_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=2)
    assert refused.value.code == 404
    wait_for(lambda: f"{UNROUTED} POST /v1/experts/stage" in standin.log(), 5, "the refused call in the log")


def test_the_engine_applies_migration_after_migration_and_nothing_else_is_asked(api, engine):
    standin = engine.standin
    prove_unrouted_requests_are_logged(standin)
    api.create(engine.namespace, engine_manifest(engine, apply_timeout_s=60))
    watch_ = MigrationWatch(api, engine)
    watch_.until(lambda: len(watch_.completed) >= MIGRATIONS, MIGRATIONS * SHIFT_SECONDS * 3 + 60,
                 f"{MIGRATIONS} completed migrations")
    assert watch_.failed == [], watch_.failed
    # The load came from the stand-in's SGLang dumps through rank 0's sidecar and Prometheus: every
    # rank's share is exported (by rank 0's sidecar alone, as in an SGLang pod).
    ranks = {sample["metric"]["rank"] for sample in engine.prometheus.query("moeplace_expert_tokens_total")}
    assert ranks == {"0", "1", "2", "3"}
    assert api.condition(engine.namespace, NAME, "MetricsAvailable")["status"] == "True"
    # kopf posts a handler's events after the status patch the watch saw
    wait_for(lambda: [event["reason"] for event in api.events(engine.namespace)].count("MigrationCompleted")
             >= len(watch_.completed), 10, "a MigrationCompleted event per completed migration")
    assert "EngineApplyFailed" not in [event["reason"] for event in api.events(engine.namespace)]
    # The operator asked the sidecars for nothing but their placement: only the test's own stage call
    # was refused.
    refused = [line for line in standin.log().splitlines() if UNROUTED in line]
    assert refused == [line for line in refused if "POST /v1/experts/stage" in line] and len(refused) == 1, refused


@pytest.mark.parametrize("engine", ["2"], indirect=True)
def test_a_rank_that_never_moves_is_named_then_the_map_from_before_is_published_again(api, engine):
    # Longer than one wait slice (rollout.ENGINE_POLL_S, 20 s): a cycle waits, names the rank, and
    # the next gives up.
    api.create(engine.namespace, engine_manifest(engine, apply_timeout_s=25))
    watch_ = MigrationWatch(api, engine)
    watch_.until(lambda: bool(watch_.failed), 240, "a migration failing on the engine apply timeout")
    failed = watch_.failed[0]
    assert "not served within 25s" in failed["message"] and "published again" in failed["message"], failed
    assert any("rank 2: serves" in message for message in watch_.waiting_messages), watch_.waiting_messages
    assert not any(f"rank {rank}:" in message for message in watch_.waiting_messages for rank in (0, 1, 3))
    # The map from before the migration is published again; rank 2 never served the target.
    assert failed["published"] == watch_.sources[failed["planId"]] != ""
    assert sidecar_answer(engine.standin, 2)["hash"] != failed["targetHash"]
    # kopf posts a handler's events after the status patch the watch saw
    wait_for(lambda: any(event["reason"] == "EngineApplyFailed" and event["type"] == "Warning"
                         for event in api.events(engine.namespace)), 10, "the EngineApplyFailed event")
    assert api.configmap(engine.namespace, builders.migration_configmap_name(NAME)) is None
