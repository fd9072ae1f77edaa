"""Prometheus results and agents' stats -> load and pairs; bad samples are skipped and reported."""

from __future__ import annotations

import numpy as np
import pytest

from moe_operator.metrics_source import MetricsUnavailable, fetch_load, load_query, parse_load, parse_stats


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
    good = {"num_layers": 2, "num_experts": 4,
            "transitions": {"layer": [0, 0], "first": [1, 2], "second": [2, 3], "count": [4, 1]},
            "coactivation": {"layer": [1], "first": [0], "second": [1], "count": [2]}}
    other = {"num_layers": 2, "num_experts": 4,
             "transitions": {"layer": [0, 1, 0], "first": [1, 0, 7], "second": [2, 0, 0], "count": [6, 1, 1]},
             "coactivation": {"layer": [1], "first": [0]}}
    wrong_shape = {"num_layers": 3, "num_experts": 4}
    transitions, coactivation, report = parse_stats([good, other, wrong_shape, "junk"], 2, 4)
    assert transitions.dense(0, 4)[1, 2] == 10 and transitions.dense(0, 4)[2, 3] == 1
    assert len(transitions.layer) == 2  # the layer-1 transition (no layer 2) and expert 7 are dropped
    assert coactivation.dense(1, 4)[0, 1] == 2
    assert report.agents_with_stats == 2
    assert report.skipped["transitions_out_of_range"] == 2
    assert report.skipped["bad_coactivation"] == 1 and report.skipped["stats_shape_mismatch"] == 1


def test_fetch_load_reports_a_dead_prometheus():
    with pytest.raises(MetricsUnavailable) as error:
        fetch_load("http://127.0.0.1:9", 60, {}, 2, 4, timeout_s=2)
    assert error.value.reason == "PrometheusUnavailable"


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
