"""Prometheus results and agents' stats -> load and pairs; bad samples are skipped and reported."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from moe_operator.metrics_source import (
    MetricsUnavailable,
    fetch_load,
    load_query,
    parse_load,
    parse_stats,
    ranks_query,
    silent_ranks,
)
from moe_placement.agent_api import StatsAnswer


def series(layer, expert, value):
    return {"metric": {"layer": str(layer), "expert": str(expert)}, "value": [0, str(value)]}


def test_load_query():
    assert load_query(60) == "sum by (layer, expert) (increase(moeplace_expert_tokens_total{}[60s]))"
    assert 'job="a\\"b"' in load_query(5, {"job": 'a"b'})
    with pytest.raises(MetricsUnavailable):
        load_query(5, {"bad-name": "x"})


def test_parse_load_skips_bad_series():
    result = [
        series(0, 0, 10), series(0, 1, 5.5), series(1, 3, 2),
        {"metric": {"layer": "x", "expert": "1"}, "value": [0, "1"]},
        {"metric": {"expert": "1"}, "value": [0, "1"]},
        series(9, 0, 1), series(0, 99, 1), series(0, 2, "NaN"), series(0, 3, "+Inf"), series(1, 2, -1),
        series(0, 0, 3), {"metric": {"layer": "1", "expert": "0"}, "value": [0, "abc"]},
    ]
    load, report = parse_load(result, 2, 4)
    assert load[0, 0] == 10 and load[0, 1] == 5.5 and load[1, 3] == 2 and load.sum() == 17.5
    assert report.used == 3 and report.series == len(result)
    assert report.skipped == {"bad_label": 2, "out_of_range": 2, "not_finite": 2, "negative": 1,
                              "duplicate": 1, "not_a_number": 1}
    assert "3/12 load series used" in report.summary()


def test_parse_stats_sums_agents_and_skips_bad():
    common = {"rank": 0, "window_seconds": 1.0, "tokens": 10, "load": [[0.0] * 4] * 2}
    good = {**common, "num_layers": 2, "num_experts": 4,
            "transitions": {"layer": [0, 0], "first": [1, 2], "second": [2, 3], "count": [4, 1]},
            "coactivation": {"layer": [1], "first": [0], "second": [1], "count": [2]}}
    other = {**common, "num_layers": 2, "num_experts": 4,
             "transitions": {"layer": [0, 1, 0], "first": [1, 0, 7], "second": [2, 0, 0], "count": [6, 1, 1]},
             "coactivation": {"layer": [1], "first": [0]}}
    wrong_shape = {**common, "num_layers": 3, "num_experts": 4}
    documents = [StatsAnswer.model_validate(document) for document in (good, other, wrong_shape)]
    transitions, coactivation, report = parse_stats(documents, 2, 4)
    assert transitions.dense(0, 4)[1, 2] == 10 and transitions.dense(0, 4)[2, 3] == 1
    assert len(transitions.layer) == 2  # the layer-1 transition (no layer 2) and expert 7 are dropped
    assert coactivation.dense(1, 4)[0, 1] == 2
    assert report.agents_with_stats == 2
    assert report.skipped["transitions_out_of_range"] == 2
    assert report.skipped["bad_coactivation"] == 1 and report.skipped["stats_shape_mismatch"] == 1


def test_fetch_load_reports_a_dead_prometheus():
    with pytest.raises(MetricsUnavailable) as error:
        fetch_load("http://127.0.0.1:9", 60, {}, 2, 4, 2, timeout_s=2)
    assert error.value.reason == "PrometheusUnavailable"


@pytest.fixture
def prometheus_answering() -> Iterator:
    """``start(load_body, ranks_body)``: an HTTP server on loopback answering Prometheus' query API
    with canned bodies (the load query, then the ranks query); returns its URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(load_body: object, ranks_body: object = None) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = ranks_body if "count+by" in self.path or "count%20by" in self.path else load_body
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *_args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def vector(*results: object) -> dict:
    return {"status": "success", "data": {"resultType": "vector", "result": list(results)}}


@pytest.mark.parametrize(
    "answer",
    [
        {"status": "error", "errorType": "bad_data", "error": "parse error"},
        vector("not a series", 3),
        {"status": "success", "data": {"resultType": "vector", "result": {"not": "a list"}}},
        b"<html>a proxy's error page</html>",
    ],
    ids=["status-error", "series-not-dicts", "result-not-a-list", "not-json"],
)
def test_malformed_prometheus_answers_are_metrics_unavailable(prometheus_answering, answer):
    url = prometheus_answering(answer, vector())
    with pytest.raises(MetricsUnavailable) as error:
        fetch_load(url, 60, {}, 2, 4, 2, timeout_s=2)
    assert error.value.reason in ("BadData", "NoData", "PrometheusUnavailable")
    assert url in str(error.value)


def test_a_rank_without_series_is_reported(prometheus_answering):
    ranks = vector({"metric": {"rank": "0"}, "value": [0, "4"]})
    url = prometheus_answering(vector(series(0, 0, 5), series(1, 1, 5)), ranks)
    with pytest.raises(MetricsUnavailable) as error:
        fetch_load(url, 60, {}, 2, 4, 2, timeout_s=2)
    assert error.value.reason == "RanksMissing" and str(error.value).endswith("series from rank 1")


def test_a_layer_without_series_is_reported(prometheus_answering):
    ranks = vector({"metric": {"rank": "0"}, "value": [0, "4"]}, {"metric": {"rank": "1"}, "value": [0, "4"]})
    url = prometheus_answering(vector(series(0, 0, 5), series(0, 1, 5)), ranks)
    load, report, _ = fetch_load(url, 60, {}, 2, 4, 2, timeout_s=2)
    assert report.missing_layers == [1] and "layers [1]" in report.summary()


def test_parse_load_empty():
    load, report = parse_load([], 2, 4)
    assert report.series == 0 and not np.any(load)


def test_prometheus_bearer_token_is_read_from_its_file_on_every_query(tmp_path):
    from moe_operator.settings import PrometheusAuth

    token = tmp_path / "token"
    token.write_text("first\n")
    auth = PrometheusAuth(bearer_token_file=str(token))
    assert auth.headers() == {"Authorization": "Bearer first"} and auth.verify() is True
    token.write_text("second")
    assert auth.headers() == {"Authorization": "Bearer second"}
    assert PrometheusAuth(ca_file="/ca.pem").verify() == "/ca.pem"
    assert PrometheusAuth(ca_file="/ca.pem", insecure_skip_verify=True).verify() is False


def test_the_bearer_token_goes_only_to_the_operators_own_prometheus(tmp_path):
    """A MoEDeployment's spec.metrics.prometheusUrl is its author's choice: it gets no credentials."""
    from moe_operator import settings

    token = tmp_path / "token"
    token.write_text("operator-sa-token")
    operator = settings.build_settings(
        prometheus_url="https://thanos-querier.monitoring.svc:9091",
        prometheus={"bearer_token_file": str(token), "ca_file": "/ca.pem"},
    )
    own = operator.prometheus_auth("https://thanos-querier.monitoring.svc:9091/")
    assert own.headers() == {"Authorization": "Bearer operator-sa-token"}
    for elsewhere in ("https://evil.example.com:9091", "http://thanos-querier.monitoring.svc:9091",
                      "https://thanos-querier.monitoring.svc:9092"):
        auth = operator.prometheus_auth(elsewhere)
        assert auth.headers() == {} and auth.verify() == "/ca.pem", elsewhere


def test_ranks_are_counted_per_group_when_the_series_carry_one():
    assert ranks_query({}, by_group=True) == "count by (group, rank) (moeplace_expert_tokens_total{})"
    rows = [{"metric": {"group": str(g), "rank": str(r)}, "value": [0, "4"]} for g in (0, 1) for r in (0, 1, 2)]
    rows.append({"metric": {"group": "0", "rank": "3"}, "value": [0, "4"]})
    # Rank 3 of group 1 is silent, though rank 3 of group 0 exports.
    assert silent_ranks(rows, 4, 2) == ["group 1 rank 3"]
    # Series nobody labelled by group: checked by rank over all groups.
    unlabelled = [{"metric": {"rank": str(r)}, "value": [0, "4"]} for r in (0, 1, 3)]
    assert silent_ranks(unlabelled, 4, 2) == ["rank 2"]
