"""The agent's HTTP API between real agent processes on loopback (docs/agent-api.md).

Agent ``a`` (rank 0) owns slots 0..4, with slot 4 empty in every layer; the peers are rank 1. Tests
that change ``a`` use their own layer (stage/activate: 0, request ids: 1, faults: 2) and leave a
valid placement behind, which every test checks.
"""

from __future__ import annotations

import copy
import hashlib
import re
import threading
import time

import pytest

from moe_placement.models import Placement
from moe_agent.store import ExpertStore, write_checkpoint

from agent_helpers import HOLES_MAP, TINY, http

FREE_SLOT = 4
SLOTS_PER_GPU = 5


def stage_body(request_id: str, layer: int, expert: int, peer: str, slot: int = FREE_SLOT) -> dict:
    return {"request_id": request_id, "layer": layer, "slot": slot, "expert": expert, "source": {"peer": peer}}


def assert_valid_placement(agent) -> dict:
    """The agent's live map is a valid placement and agrees with its slots' states."""
    answer = agent.placement()
    mapping = answer["physical_to_logical_map"]
    Placement(mapping, answer["num_experts"], answer["slots_per_gpu"])
    live = {(s["layer"], s["slot"]): s["expert"] for s in answer["slots"] if s["state"] == "live"}
    first = answer["rank"] * answer["slots_per_gpu"]
    for layer, row in enumerate(mapping):
        for slot in range(first, first + answer["slots_per_gpu"]):
            if row[slot] >= 0:
                assert live.get((layer, slot)) == row[slot], (layer, slot)
            else:
                assert (layer, slot) not in live
    return answer


def slot_state(agent, layer: int, slot: int) -> str:
    for entry in agent.placement()["slots"]:
        if (entry["layer"], entry["slot"]) == (layer, slot):
            return entry["state"]
    return "empty"


def metric_value(agent, name: str, **labels: str) -> float:
    selector = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in agent.metrics().splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match[1] for key, value in labels.items()):
            return float(match[2])
    raise AssertionError(f"{name}{{{selector}}} not in /metrics")


def activate(agent, request_id: str, mapping: list[list[int]]) -> tuple[int, dict]:
    generation = agent.placement()["generation"] + 1
    return agent.call(
        "POST",
        "/v1/placement/activate",
        {"request_id": request_id, "generation": generation, "physical_to_logical_map": mapping},
    )


def test_open_endpoints_and_token(agents):
    a = agents["a"]
    assert http("GET", a.url + "/healthz", token=None)[0] == 200
    assert "moeplace_slots" in a.metrics()
    for token in (None, "wrong-token"):
        for method, path, body in (
            ("GET", "/v1/placement", None),
            ("GET", "/v1/stats", None),
            ("GET", "/v1/experts/0/0/weights", None),
            ("POST", "/v1/experts/stage", stage_body("t", 0, 5, agents["b"].url)),
            ("POST", "/v1/placement/activate", {}),
        ):
            status, answer = a.call(method, path, body, token=token)
            assert status == 401, (method, path, answer)
            assert answer["error"].startswith("authorization:")


def test_placement_and_stats_answers(agents):
    answer = assert_valid_placement(agents["a"])
    assert answer["rank"] == 0 and answer["num_gpus"] == 2 and answer["num_layers"] == TINY.num_layers
    assert re.fullmatch(r"[0-9a-f]{16}", answer["hash"])
    deadline = time.monotonic() + 30
    while True:  # the replay's first batches may still be on their way
        status, stats = agents["a"].call("GET", "/v1/stats?top=4")
        assert status == 200
        if stats["tokens"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(stats["load"]) == TINY.num_layers and len(stats["load"][0]) == TINY.num_experts
    assert stats["tokens"] > 0 and stats["window_seconds"] > 0
    for kind in ("transitions", "coactivation"):
        pairs = stats[kind]
        assert len(pairs["layer"]) == len(pairs["first"]) == len(pairs["second"]) == len(pairs["count"])
        per_layer = [pairs["layer"].count(layer) for layer in range(TINY.num_layers)]
        assert max(per_layer) <= 4
    assert all(f < s for f, s in zip(stats["coactivation"]["first"], stats["coactivation"]["second"]))
    assert agents["a"].call("GET", "/v1/stats?top=x")[0] == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        ({"layer": 0, "slot": 4, "expert": 5, "source": {"peer": "http://127.0.0.1:1"}}, "request_id"),
        ({"request_id": "x", "layer": "0", "slot": 4, "expert": 5, "source": {"peer": "http://127.0.0.1:1"}}, "layer"),
        ({"request_id": "x", "layer": 0, "slot": 4, "expert": -1, "source": {"peer": "http://127.0.0.1:1"}}, "expert"),
        ({"request_id": "x", "layer": 0, "slot": 4, "expert": 5, "source": {}}, "source"),
        ({"request_id": "x", "layer": 0, "slot": 4, "expert": 5, "source": {"peer": "ftp://x"}}, "source.peer"),
        ({"request_id": "x", "layer": 0, "slot": 4, "expert": 5, "source": {"peer": "http://a:1", "checkpoint": "/d"}}, "source"),
        ({"request_id": "x", "layer": 0, "slot": 4, "expert": 5, "source": {"peer": "http://a:1"}, "extra": 1}, "extra"),
    ],
)
def test_malformed_stage_is_400_naming_the_field(agents, body, field):
    a = agents["a"]
    raw = body if isinstance(body, bytes) else None
    status, _, data = http("POST", a.url + "/v1/experts/stage", None if raw else body, raw=raw)
    assert status == 400, data
    assert data.decode().startswith('{"error": "' + field), data


def test_malformed_activate_and_retire_are_400(agents):
    a = agents["a"]
    before = a.placement()
    bad_maps = [
        ([[0, 1]], "physical_to_logical_map"),  # wrong shape
        ([[0] * 10] * TINY.num_layers, "physical_to_logical_map"),  # experts without a replica
        ([[9] * 10] * TINY.num_layers, "physical_to_logical_map"),  # unknown expert id
    ]
    for mapping, field in bad_maps:
        status, answer = activate(a, "bad-map", mapping)
        assert status == 400 and answer["error"].startswith(field), answer
    status, answer = a.call("POST", "/v1/placement/activate", {"request_id": "g", "physical_to_logical_map": HOLES_MAP})
    assert status == 400 and answer["error"].startswith("generation"), answer
    status, answer = a.call("POST", "/v1/experts/retire", {"request_id": "r", "layer": 0})
    assert status == 400 and answer["error"].startswith("slot"), answer
    assert a.placement() == before


def test_unknown_things_are_404(agents):
    a, b = agents["a"], agents["b"]
    cases = [
        (stage_body("n1", TINY.num_layers, 5, b.url), "layer"),
        (stage_body("n2", 0, TINY.num_experts, b.url), "expert"),
        (stage_body("n3", 0, 5, b.url, slot=SLOTS_PER_GPU), "slot"),  # rank 1's slot
        (stage_body("n4", 0, 5, b.url, slot=99), "slot"),
    ]
    for body, field in cases:
        status, answer = a.call("POST", "/v1/experts/stage", body)
        assert status == 404 and answer["error"].startswith(field), answer
    assert a.call("GET", "/v1/experts/0/5/weights")[0] == 404  # held by rank 1, not a
    assert a.call("GET", "/v1/experts/7/0/weights")[0] == 404
    assert a.call("GET", "/v1/experts/0/x/weights")[0] == 404
    assert a.call("GET", "/v1/nothing")[0] == 404
    status, answer = a.call("POST", "/v1/experts/retire", {"request_id": "n5", "layer": 0, "slot": 7})
    assert status == 404 and answer["error"].startswith("slot")


def test_conflicts_are_409(agents):
    a, b = agents["a"], agents["b"]
    status, answer = a.call("POST", "/v1/experts/stage", stage_body("c1", 0, 5, b.url, slot=0))
    assert status == 409 and "live" in answer["error"], answer
    status, answer = a.call("POST", "/v1/experts/retire", {"request_id": "c2", "layer": 0, "slot": 0})
    assert status == 409 and "live" in answer["error"], answer
    status, answer = a.call("POST", "/v1/experts/retire", {"request_id": "c3", "layer": 0, "slot": FREE_SLOT})
    assert status == 409 and "empty" in answer["error"], answer
    needs_weights = copy.deepcopy(HOLES_MAP)
    needs_weights[0][FREE_SLOT] = 5
    status, answer = activate(a, "c4", needs_weights)
    assert status == 409 and answer["error"].startswith("physical_to_logical_map"), answer
    live = a.placement()
    stale = {"request_id": "c5", "generation": live["generation"], "physical_to_logical_map": needs_weights}
    status, answer = a.call("POST", "/v1/placement/activate", stale)
    assert status == 409 and answer["error"].startswith("generation"), answer
    same = {"request_id": "c6", "generation": live["generation"], "physical_to_logical_map": live["physical_to_logical_map"]}
    assert a.call("POST", "/v1/placement/activate", same) == (200, live)
    assert_valid_placement(a)


def test_stage_from_peer_activate_and_retire(agents):
    a, b = agents["a"], agents["b"]
    layer, expert = 0, 5
    status, headers, weights = http("GET", f"{b.url}/v1/experts/{layer}/{expert}/weights")
    assert status == 200 and headers["X-Moeplace-Sha256"] == hashlib.sha256(weights).hexdigest()
    received_before = metric_value(a, "moeplace_migration_bytes_total", rank="0")

    status, staged = a.call("POST", "/v1/experts/stage", stage_body("s1", layer, expert, b.url))
    assert status == 200, staged
    assert staged["state"] == "staged" and staged["sha256"] == headers["X-Moeplace-Sha256"]
    assert staged["bytes"] == len(weights) and staged["seconds"] >= 0
    assert slot_state(a, layer, FREE_SLOT) == "staged"
    assert a.placement()["physical_to_logical_map"][layer][FREE_SLOT] == -1  # not serving yet
    assert http("GET", f"{a.url}/v1/experts/{layer}/{expert}/weights")[2] == weights  # same bytes moved
    assert metric_value(a, "moeplace_migration_bytes_total", rank="0") == received_before + len(weights)
    assert metric_value(a, "moeplace_slots", rank="0", state="staged") == 1

    # Retiring a staged slot rolls the copy back; a second stage then works again.
    status, answer = a.call("POST", "/v1/experts/retire", {"request_id": "s2", "layer": layer, "slot": FREE_SLOT})
    assert status == 200 and answer["state"] == "empty", answer
    assert slot_state(a, layer, FREE_SLOT) == "empty"
    assert a.call("POST", "/v1/experts/stage", stage_body("s3", layer, expert, b.url))[0] == 200

    mapping = copy.deepcopy(a.placement()["physical_to_logical_map"])
    mapping[layer][FREE_SLOT] = expert
    generation = a.placement()["generation"] + 1
    status, answer = activate(a, "s4", mapping)
    assert status == 200, answer
    assert answer["generation"] == generation and answer["physical_to_logical_map"] == mapping
    assert slot_state(a, layer, FREE_SLOT) == "live"
    assert metric_value(a, "moeplace_placement_generation", rank="0") == generation
    assert_valid_placement(a)
    # The peer activates the same map: nothing of its own changes, so nothing is needed.
    status, answer = b.call(
        "POST", "/v1/placement/activate", {"request_id": "s5", "generation": generation, "physical_to_logical_map": mapping}
    )
    assert status == 200 and answer["hash"] == a.placement()["hash"]

    # a hosts expert 5 of layer 0 now: its token counter is exported (METRO may still send the
    # expert's tokens to the other replica, so its value can stay 0).
    assert metric_value(a, "moeplace_expert_tokens_total", rank="0", layer="0", expert="5") >= 0

    # Taking the slot out of the map drops it (retired at activation).
    mapping[layer][FREE_SLOT] = -1
    status, answer = activate(a, "s6", mapping)
    assert status == 200, answer
    assert slot_state(a, layer, FREE_SLOT) == "empty"
    assert a.call("GET", f"/v1/experts/{layer}/{expert}/weights")[0] == 404
    assert 'layer="0",rank="0",expert="5"' not in a.metrics().replace('expert="5",layer="0",rank="0"', 'layer="0",rank="0",expert="5"')
    assert_valid_placement(a)


def test_request_id_replay(agents, tmp_path):
    a, b = agents["a"], agents["b"]
    layer = 1
    body = stage_body("replayed-stage", layer, 6, b.url)
    first = a.call("POST", "/v1/experts/stage", body)
    assert first[0] == 200, first
    received = metric_value(a, "moeplace_migration_bytes_total", rank="0")
    stage_ok = metric_value(a, "moeplace_migration_steps_total", rank="0", kind="stage", result="ok")
    assert a.call("POST", "/v1/experts/stage", body) == first  # same answer...
    assert metric_value(a, "moeplace_migration_bytes_total", rank="0") == received  # ...nothing moved again
    assert metric_value(a, "moeplace_migration_steps_total", rank="0", kind="stage", result="ok") == stage_ok
    status, answer = a.call("POST", "/v1/experts/stage", stage_body("replayed-stage", layer, 7, b.url))
    assert status == 409 and answer["error"].startswith("request_id"), answer

    mapping = copy.deepcopy(a.placement()["physical_to_logical_map"])
    mapping[layer][FREE_SLOT] = 6
    generation = a.placement()["generation"] + 1
    activation = {"request_id": "replayed-activate", "generation": generation, "physical_to_logical_map": mapping}
    first = a.call("POST", "/v1/placement/activate", activation)
    assert first[0] == 200 and first[1]["generation"] == generation
    cleanup = copy.deepcopy(mapping)
    cleanup[layer][FREE_SLOT] = -1
    status, answer = activate(a, "replayed-cleanup", cleanup)
    assert status == 200 and slot_state(a, layer, FREE_SLOT) == "empty"
    # The replayed activation answers as the first time and does not bring the slot back.
    assert a.call("POST", "/v1/placement/activate", activation) == first
    assert slot_state(a, layer, FREE_SLOT) == "empty"
    assert a.placement()["generation"] == generation + 1
    assert_valid_placement(a)

    # A failed call is not remembered: the same request runs again once the cause is gone.
    retry = {
        "request_id": "retried", "layer": layer, "slot": FREE_SLOT, "expert": 6,
        "source": {"checkpoint": str(tmp_path)},
    }
    assert a.call("POST", "/v1/experts/stage", retry)[0] == 404  # not in the checkpoint yet
    write_checkpoint(tmp_path, layer, 6, ExpertStore(TINY, SLOTS_PER_GPU, 1).initial_weights(layer, 6))
    assert a.call("POST", "/v1/experts/stage", retry)[0] == 200
    assert a.call("POST", "/v1/experts/retire", {"request_id": "rc", "layer": layer, "slot": FREE_SLOT})[0] == 200


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"request_id": "r", "generation": 9, "physical_to_logical_map": [[0, 1], [0]]}', "physical_to_logical_map"),
        (b'{"request_id": "r", "generation": 99999999999999999999999, "physical_to_logical_map": [[0]]}', "generation"),
        (b'{"request_id": "r", "generation": 9, "physical_to_logical_map": [[99999999999999999999999]]}',
         "physical_to_logical_map"),
        (b"[" * 100_000 + b"]" * 100_000, "body"),
        (b'{"request_id": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", "body"),
    ],
    ids=["ragged-map", "generation-beyond-int64", "expert-beyond-int64", "deeply-nested-list", "deeply-nested-object"],
)
def test_bodies_that_once_gave_500_are_400_naming_the_field(agents, raw, field):
    a = agents["a"]
    before = a.placement()
    status, _, data = http("POST", a.url + "/v1/placement/activate", raw=raw)
    assert status == 400, data[:300]
    assert data.decode().startswith('{"error": "' + field), data[:300]
    status, _, data = http("POST", a.url + "/v1/experts/stage", raw=raw.replace(b'"generation"', b'"layer"'))
    assert status == 400, data[:300]
    assert a.placement() == before


def test_a_copy_past_its_timeout_leaves_the_slot_empty(agents):
    a, slow, b = agents["a"], agents["slow"], agents["b"]
    layer = 2
    before = assert_valid_placement(a)
    body = {**stage_body("too-slow", layer, 5, slow.url), "timeout_seconds": 0.5}
    started = time.monotonic()
    status, answer = a.call("POST", "/v1/experts/stage", body)
    assert status == 504 and answer["error"].startswith("timeout_seconds"), answer
    assert time.monotonic() - started < 5, "the agent gave up at the deadline, not at the end of the copy"
    assert slot_state(a, layer, FREE_SLOT) == "empty" and a.placement() == before
    # Nothing is left running into the slot: a copy from a healthy peer goes through at once.
    assert a.call("POST", "/v1/experts/stage", {**stage_body("in-time", layer, 5, b.url), "timeout_seconds": 30})[0] == 200
    assert a.call("POST", "/v1/experts/retire", {"request_id": "in-time-r", "layer": layer, "slot": FREE_SLOT})[0] == 200
    assert_valid_placement(a)


def test_an_activation_is_undone_from_the_retired_weights(agents):
    """A slot that an activation dropped keeps its weights for the grace period: activating the map
    before it again needs no copy (an activation that went wrong, e.g. one whose map claimed another
    rank held the expert, can be undone)."""
    a = agents["a"]
    layer = 2
    original = copy.deepcopy(assert_valid_placement(a)["physical_to_logical_map"])
    assert a.call("POST", "/v1/experts/stage", stage_body("undo-copy", layer, 0, a.url))[0] == 200
    with_replica = copy.deepcopy(original)
    with_replica[layer][FREE_SLOT] = 0
    assert activate(a, "undo-1", with_replica)[0] == 200
    moved = copy.deepcopy(with_replica)
    moved[layer][0] = -1  # expert 0 now only in the free slot
    status, answer = activate(a, "undo-2", moved)
    assert status == 200 and {"layer": layer, "slot": 0, "expert": 0, "state": "empty"} in answer["retired"], answer
    status, answer = activate(a, "undo-3", with_replica)  # back, with no stage call
    assert status == 200, answer
    assert slot_state(a, layer, 0) == "live" and answer["physical_to_logical_map"] == with_replica
    assert activate(a, "undo-4", original)[0] == 200
    assert_valid_placement(a)


def test_orphan_staged_slots_expire(launch_agent, agents):
    short = launch_agent(0, "--staged-ttl-seconds", "1").wait_ready()
    try:
        status, answer = short.call("POST", "/v1/experts/stage", stage_body("orphan", 0, 5, agents["b"].url))
        assert status == 200, answer
        deadline = time.monotonic() + 15
        while slot_state(short, 0, FREE_SLOT) != "empty" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert slot_state(short, 0, FREE_SLOT) == "empty"
        assert metric_value(short, "moeplace_staged_slots_collected_total", rank="0") == 1
        assert_valid_placement(short)
    finally:
        short.stop()


def test_source_killed_mid_transfer(agents):
    a, slow, b = agents["a"], agents["slow"], agents["b"]
    layer = 2
    before = assert_valid_placement(a)
    outcome: dict = {}

    def stage() -> None:
        outcome["answer"] = a.call("POST", "/v1/experts/stage", stage_body("killed", layer, 5, slow.url))

    worker = threading.Thread(target=stage)
    worker.start()
    time.sleep(1.5)  # the 49 kB stream takes ~6 s at 8 kB/s
    assert worker.is_alive(), f"transfer ended before the kill: {outcome}"
    assert slot_state(a, layer, FREE_SLOT) == "empty"  # reserved, not staged
    slow.process.kill()
    worker.join(30)
    status, answer = outcome["answer"]
    assert status == 502 and answer["error"].startswith("peer"), answer
    assert slot_state(a, layer, FREE_SLOT) == "empty"
    assert a.placement() == before
    # The slot's reservation was released: the copy succeeds from a live peer.
    assert a.call("POST", "/v1/experts/stage", stage_body("after-kill", layer, 5, b.url))[0] == 200
    assert a.call("POST", "/v1/experts/retire", {"request_id": "after-kill-r", "layer": layer, "slot": FREE_SLOT})[0] == 200
    assert_valid_placement(a)


def test_corrupt_bytes_and_vanished_peer_leave_the_slot_empty(agents):
    a, corrupt = agents["a"], agents["corrupt"]
    layer = 2
    before = assert_valid_placement(a)
    errors = metric_value(a, "moeplace_migration_steps_total", rank="0", kind="stage", result="error")
    status, answer = a.call("POST", "/v1/experts/stage", stage_body("corrupt", layer, 5, corrupt.url))
    assert status == 502 and answer["error"].startswith("sha256: mismatch"), answer
    status, answer = a.call("POST", "/v1/experts/stage", stage_body("nobody", layer, 5, "http://127.0.0.1:1"))
    assert status == 502 and answer["error"].startswith("peer"), answer
    status, answer = a.call("POST", "/v1/experts/stage", stage_body("not-held", layer, 0, agents["b"].url))
    assert status == 502 and "404" in answer["error"], answer  # rank 1 does not hold expert 0
    assert slot_state(a, layer, FREE_SLOT) == "empty"
    assert a.placement() == before
    assert metric_value(a, "moeplace_migration_steps_total", rank="0", kind="stage", result="error") == errors + 3


def test_stage_from_checkpoint(agents, tmp_path):
    a, b = agents["a"], agents["b"]
    layer, expert = 2, 6
    # The checkpoint holds the weights every agent of this seed starts with.
    weights = ExpertStore(TINY, SLOTS_PER_GPU, 1).initial_weights(layer, expert)
    digest = write_checkpoint(tmp_path, layer, expert, weights)
    assert http("GET", f"{b.url}/v1/experts/{layer}/{expert}/weights")[1]["X-Moeplace-Sha256"] == digest

    body = {"request_id": "ckpt", "layer": layer, "slot": FREE_SLOT, "expert": expert, "source": {"checkpoint": str(tmp_path)}}
    status, answer = a.call("POST", "/v1/experts/stage", body)
    assert status == 200 and answer["sha256"] == digest, answer
    assert a.call("POST", "/v1/experts/retire", {"request_id": "ckpt-r", "layer": layer, "slot": FREE_SLOT})[0] == 200

    missing = dict(body, request_id="ckpt-missing", expert=7)
    status, answer = a.call("POST", "/v1/experts/stage", missing)
    assert status == 404 and answer["error"].startswith("checkpoint"), answer
    (tmp_path / f"layer{layer}_expert{expert}.safetensors.sha256").write_text("0" * 64 + "\n")
    status, answer = a.call("POST", "/v1/experts/stage", dict(body, request_id="ckpt-bad"))
    assert status == 502 and answer["error"].startswith("sha256: mismatch"), answer
    assert slot_state(a, layer, FREE_SLOT) == "empty"
    assert_valid_placement(a)
