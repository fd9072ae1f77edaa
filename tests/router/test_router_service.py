"""``moeplace router`` as a real HTTP service: real sockets, stand-in engine ranks as processes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from router_helpers import Process, http, signature_of, start_router, start_standin

LEGAL = "contract clause liability tenant statute court appeal plaintiff"
WEATHER = "rain sunny forecast cloud wind storm humid temperature"
NODE_OF_RANK = {0: 0, 1: 0, 2: 1, 3: 1}  # topology 2x2


def prompt(words: str, index: int) -> str:
    parts = words.split()
    return " ".join(parts[(index + i) % len(parts)] for i in range(5))


def taught(router: Process) -> None:
    """Two domains, reported as finished requests: legal prompts use experts 0-5, weather 32-37."""
    for index in range(6):
        for words, experts in ((LEGAL, [0, 1, 2, 3, 4, 5]), (WEATHER, [32, 33, 34, 35, 36, 37])):
            status, _, body = http(
                "POST",
                router.url + "/router/v1/signatures",
                {"prompt": prompt(words, index), "signature": signature_of(experts)},
            )
            assert status == 200, body


def complete(router: Process, text: str, **extra: object) -> tuple[int, dict, dict]:
    status, headers, body = http(
        "POST", router.url + "/v1/completions", {"model": "m", "prompt": text, **extra}
    )
    return status, headers, json.loads(body)


@pytest.fixture(scope="module")
def by_header() -> Iterator[tuple[Process, Process]]:
    """One stand-in engine URL for every rank (the rank in X-Data-Parallel-Rank) and the router."""
    engine = start_standin(rank=-1).wait_ready("/v1/models")
    router = start_router(["--backend", engine.url]).wait_ready("/healthz")
    taught(router)
    yield router, engine
    router.stop()
    engine.stop()


def test_requests_go_to_their_domains_node(by_header: tuple[Process, Process]) -> None:
    router, _ = by_header
    nodes = {LEGAL: set(), WEATHER: set()}
    for index in range(8):
        for words in nodes:
            status, headers, body = complete(router, prompt(words, index) + " please")
            assert status == 200
            assert body["served_rank"] == int(headers["X-Moeplace-Rank"])
            nodes[words].add(NODE_OF_RANK[body["served_rank"]])
    assert len(nodes[LEGAL]) == len(nodes[WEATHER]) == 1
    assert nodes[LEGAL] != nodes[WEATHER]

    status, _, body = http("GET", router.url + "/router/v1/state")
    state = json.loads(body)
    assert status == 200 and len(state["domains"]) == 2 and state["routed_requests"] == 16
    for domain in state["domains"]:
        assert sorted(domain["node_share"]) == [0.0, 1.0]
        assert len(domain["top_experts"]) == 26 and len(domain["top_experts"][0]) == 6


def test_streaming_and_chat_pass_through(by_header: tuple[Process, Process]) -> None:
    router, _ = by_header
    status, headers, body = http(
        "POST", router.url + "/v1/completions", {"prompt": prompt(LEGAL, 1), "stream": True}
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [line for line in body.decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and len(events) == 4
    assert json.loads(events[0].removeprefix("data: "))["served_rank"] == int(headers["X-Moeplace-Rank"])

    status, headers, body = http(
        "POST",
        router.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": prompt(WEATHER, 2)}], "temperature": 0},
    )
    reply = json.loads(body)
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["served_rank"] == int(headers["X-Moeplace-Rank"])
    status, _, body = http("GET", router.url + "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "standin"


def test_llm_d_scores(by_header: tuple[Process, Process]) -> None:
    router, _ = by_header
    status, _, body = http(
        "POST", router.url + "/router/v1/score", {"prompt": prompt(WEATHER, 3), "candidates": [0, 1, 2, 3]}
    )
    scores = json.loads(body)
    assert status == 200 and scores["domain"] >= 0
    by_rank = {entry["rank"]: entry["score"] for entry in scores["scores"]}
    assert all(0.0 <= score <= 1.0 for score in by_rank.values())
    best_node = NODE_OF_RANK[scores["best_rank"]]
    assert min(by_rank[r] for r in by_rank if NODE_OF_RANK[r] == best_node) > max(
        by_rank[r] for r in by_rank if NODE_OF_RANK[r] != best_node
    )


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/v1/completions", b"{not json", "body"),
        ("/v1/completions", b"[1, 2]", "body"),
        ("/v1/completions", b'{"model": "m"}', "prompt"),
        ("/v1/completions", b'{"prompt": {"a": 1}}', "prompt"),
        ("/v1/chat/completions", b'{"messages": []}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', "messages.0.role"),
        ("/router/v1/signatures", b'{"prompt": "x", "signature": [[1.0]]}', "signature"),
        ("/router/v1/signatures", b'{"prompt": "x"}', "signature"),
        ("/router/v1/score", b'{"prompt": "x", "candidates": [9]}', "candidates"),
        ("/router/v1/score", b'{"candidates": [0]}', "prompt or messages"),
        ("/router/v1/score", b'{"prompt": "x", "extra": 1}', "extra"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field(
    by_header: tuple[Process, Process], path: str, raw: bytes, field: str
) -> None:
    router, _ = by_header
    status, _, body = http("POST", router.url + path, raw=raw)
    assert status == 400, body
    assert field in json.loads(body)["error"]


def test_unknown_request_id_is_a_404(by_header: tuple[Process, Process]) -> None:
    router, _ = by_header
    status, _, body = http(
        "POST", router.url + "/router/v1/signatures",
        {"request_id": "nope", "signature": signature_of([0, 1, 2, 3, 4, 5])},
    )
    assert status == 404 and "request_id" in json.loads(body)["error"]


def test_soak_many_requests_in_a_row(by_header: tuple[Process, Process]) -> None:
    """Route, serve and report back, 300 times; every answer comes from the rank the router chose
    and the outstanding tokens return to zero."""
    router, _ = by_header
    for index in range(300):
        words, experts = (LEGAL, [0, 1, 2, 3, 4, 5]) if index % 2 else (WEATHER, [32, 33, 34, 35, 36, 37])
        status, headers, body = complete(router, prompt(words, index), stream=False)
        assert status == 200 and body["served_rank"] == int(headers["X-Moeplace-Rank"])
        status, _, _ = http(
            "POST", router.url + "/router/v1/signatures",
            {"request_id": headers["X-Moeplace-Request-Id"], "signature": signature_of(experts)},
        )
        assert status == 200
    state = json.loads(http("GET", router.url + "/router/v1/state")[2])
    assert len(state["domains"]) == 2
    assert all(backend["outstanding_tokens"] == 0 for backend in state["backends"])


def test_backend_down_requests_go_elsewhere() -> None:
    """One URL per rank; the legal node's two ranks die: every request is still answered, by the
    other node, and the state shows them down."""
    engines = [start_standin(rank=rank) for rank in range(4)]
    for engine in engines:
        engine.wait_ready("/v1/models")
    router = start_router(
        ["--backends", ",".join(engine.url for engine in engines), "--retry-after", "60"]
    ).wait_ready("/healthz")
    try:
        taught(router)
        _, headers, _ = complete(router, prompt(LEGAL, 0))
        legal_node = NODE_OF_RANK[int(headers["X-Moeplace-Rank"])]
        for rank, node in NODE_OF_RANK.items():
            if node == legal_node:
                engines[rank].stop()
        served = set()
        for index in range(20):
            status, headers, body = http(
                "POST", router.url + "/v1/completions",
                {"prompt": prompt(LEGAL, index), "stream": index % 2 == 0},
            )
            assert status == 200 and f'"served_rank": {headers["X-Moeplace-Rank"]}' in body.decode()
            served.add(int(headers["X-Moeplace-Rank"]))
        assert {NODE_OF_RANK[rank] for rank in served} == {1 - legal_node}
        state = json.loads(http("GET", router.url + "/router/v1/state")[2])
        down = {backend["rank"] for backend in state["backends"] if not backend["healthy"]}
        assert down == {rank for rank, node in NODE_OF_RANK.items() if node == legal_node}
        for engine in engines:
            engine.stop()
        status, _, body = http("POST", router.url + "/v1/completions", {"prompt": "anything"})
        assert status == 503 and "backends" in json.loads(body)["error"]
    finally:
        router.stop()
        for engine in engines:
            engine.stop()
