"""Live statistics -> ``WorkloadProfile``: per-expert load from Prometheus, transitions and
co-activation from the agents' ``/v1/stats``.

Bad samples (labels that are not integers, ids out of range, NaN or negative values, malformed
stats) are skipped and counted by reason in a ``MetricsReport``; the cycle reports them in status and
events. Nothing here blocks the event loop: ``fetch_load`` is synchronous and runs in a worker thread.

LeaderWorkerSet groups: every group serves the one published placement, so the load it is balanced
for is the sum over groups. The load query sums by (layer, expert) over every series, hence over
every group: an agent's series carry its rank inside its group, and rank r of each group serves the
same slots. The operator's PodMonitor labels a LeaderWorkerSet's series with ``group`` (the pod's
group-index); when the series carry it, the check that every rank exports load is made per group
(a rank silent in one group is not hidden by the same rank of another). Series without a ``group``
label (a Prometheus scraping the agents some other way) are checked by rank over all groups.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_operator import settings
from moe_placement.agent_api import StatsAnswer
from moe_placement.models import Phase, SparsePairs, WorkloadProfile

LOAD_METRIC = "moeplace_expert_tokens_total"
ACTIVATED_METRIC = "moeplace_activated_experts"
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class MetricsUnavailable(RuntimeError):
    """No usable load: ``reason`` is a condition reason (PrometheusUnavailable, PrometheusTLS, NoData, BadData)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class MetricsReport:
    """What a fetch used and what it skipped."""

    series: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    tokens: float = 0.0
    agents_with_stats: int = 0
    notes: list[str] = field(default_factory=list)
    missing_layers: list[int] = field(default_factory=list)

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] += count

    def summary(self) -> str:
        parts = [f"{self.used}/{self.series} load series used"]
        if self.skipped:
            parts.append(
                "skipped " + ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            )
        if self.agents_with_stats:
            parts.append(f"stats from {self.agents_with_stats} agents")
        if self.missing_layers:
            parts.append(f"no series for layers {self.missing_layers} (their placement is kept)")
        return "; ".join(parts + self.notes)


def _matchers(match_labels: Mapping[str, str]) -> str:
    parts = []
    for name, value in sorted(match_labels.items()):
        if not _LABEL_NAME.match(name):
            raise MetricsUnavailable("BadData", f"spec.metrics.matchLabels: {name!r} is not a label name")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'{name}="{escaped}"')
    return ",".join(parts)


def load_query(window_seconds: int, match_labels: Mapping[str, str] | None = None) -> str:
    """PromQL of the global per-(layer, expert) load over the window."""
    matchers = _matchers(match_labels or {})
    return f"sum by (layer, expert) (increase({LOAD_METRIC}{{{matchers}}}[{int(window_seconds)}s]))"


def ranks_query(match_labels: Mapping[str, str] | None = None, by_group: bool = False) -> str:
    """PromQL of the ranks (with ``by_group``: the (group, rank) pairs) that export load series."""
    matchers = _matchers(match_labels or {})
    return f"count by ({'group, ' if by_group else ''}rank) ({LOAD_METRIC}{{{matchers}}})"


def activated_query(match_labels: Mapping[str, str] | None = None) -> str:
    """PromQL of the busiest GPU's activated experts per layer."""
    matchers = _matchers(match_labels or {})
    return f"max by (layer) ({ACTIVATED_METRIC}{{{matchers}}})"


def _int_label(metric: Mapping[str, Any], name: str) -> int | None:
    value = metric.get(name)
    if value is None or not str(value).lstrip("-").isdigit():
        return None
    return int(value)


def _series_sample(series: Any, num_layers: int, num_experts: int) -> tuple[int, int, float] | str:
    """(layer, expert, value) of one instant-vector series, or why it is skipped."""
    if not isinstance(series, Mapping) or not isinstance(series.get("metric") or {}, Mapping):
        return "not_a_series"
    metric = series.get("metric") or {}
    layer, expert = _int_label(metric, "layer"), _int_label(metric, "expert")
    if layer is None or expert is None:
        return "bad_label"
    if not (0 <= layer < num_layers and 0 <= expert < num_experts):
        return "out_of_range"
    try:
        value = float((series.get("value") or [None, None])[1])
    except (TypeError, ValueError, IndexError):
        return "not_a_number"
    if not math.isfinite(value):
        return "not_finite"
    if value < 0:
        return "negative"
    return layer, expert, value


def parse_load(
    result: Sequence[Mapping[str, Any]], num_layers: int, num_experts: int, report: MetricsReport | None = None
) -> tuple[np.ndarray, MetricsReport]:
    """The [L, E] load from an instant-vector result; bad series are skipped into the report, and
    layers without any series are listed in ``report.missing_layers``."""
    report = report or MetricsReport()
    load = np.zeros((num_layers, num_experts), dtype=np.float64)
    seen: set[tuple[int, int]] = set()
    for series in result:
        report.series += 1
        sample = _series_sample(series, num_layers, num_experts)
        if isinstance(sample, str):
            report.skip(sample)
            continue
        layer, expert, value = sample
        if (layer, expert) in seen:
            report.skip("duplicate")
            continue
        seen.add((layer, expert))
        load[layer, expert] = value
        report.used += 1
    report.missing_layers = sorted(set(range(num_layers)) - {layer for layer, _ in seen})
    return load, report


def _query(client: Any, url: str, query: str) -> list[Any]:
    """An instant query's result list; MetricsUnavailable when Prometheus fails or answers nonsense."""
    from prometheus_api_client import PrometheusApiClientException
    from requests import RequestException
    from requests.exceptions import SSLError

    try:
        result = client.custom_query(query)
    except SSLError:
        raise  # the caller names the CA it verified against
    except (PrometheusApiClientException, RequestException) as error:
        raise MetricsUnavailable("PrometheusUnavailable", f"{url}: {type(error).__name__}: {error}"[:400]) from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        # HTTP 200 with {"status": "error"}, a body that is not JSON, or data without a result.
        raise MetricsUnavailable("BadData", f"{url}: malformed answer ({type(error).__name__}: {error})"[:400]) from None
    if not isinstance(result, list):
        raise MetricsUnavailable("BadData", f"{url}: malformed answer (result is a {type(result).__name__}, not a list)")
    return result


def missing_ranks(rows: Sequence[Any], num_ranks: int) -> list[int]:
    """Ranks in 0..num_ranks-1 that no row of a ``count by (rank)`` result names."""
    present = {
        _int_label(row.get("metric") or {}, "rank") for row in rows
        if isinstance(row, Mapping) and isinstance(row.get("metric") or {}, Mapping)
    }
    return [rank for rank in range(num_ranks) if rank not in present]


def silent_ranks(rows: Sequence[Any], num_ranks: int, num_groups: int) -> list[str]:
    """The ranks, named ``group g rank r``, that no row of a ``count by (group, rank)`` result names.
    Rows without a ``group`` label (series nobody labelled by group) are checked by rank alone
    (``rank r``), over all groups."""
    labelled = [
        row.get("metric") or {}
        for row in rows if isinstance(row, Mapping) and isinstance(row.get("metric") or {}, Mapping)
    ]
    if not any("group" in metric for metric in labelled):
        return [f"rank {rank}" for rank in missing_ranks(rows, num_ranks)]
    present = {(_int_label(metric, "group"), _int_label(metric, "rank")) for metric in labelled}
    return [
        f"group {group} rank {rank}"
        for group in range(num_groups) for rank in range(num_ranks) if (group, rank) not in present
    ]


def _check_ranks(client: Any, url: str, match_labels: Mapping[str, str], num_ranks: int, num_groups: int) -> None:
    """MetricsUnavailable (RanksMissing) naming each rank (of some group) that exports no load series."""
    rows = _query(client, url, ranks_query(match_labels, by_group=num_groups > 1))
    silent = silent_ranks(rows, num_ranks, num_groups)
    if silent:
        raise MetricsUnavailable("RanksMissing", f"{url}: no {LOAD_METRIC} series from {', '.join(silent)}")


def fetch_load(
    url: str,
    window_seconds: int,
    match_labels: Mapping[str, str],
    num_layers: int,
    num_experts: int,
    num_ranks: int,
    timeout_s: float = 10.0,
    auth: settings.PrometheusAuth | None = None,
    num_groups: int = 1,
) -> tuple[np.ndarray, MetricsReport, float | None]:
    """Query Prometheus (blocking; run in a thread): (load [L, E], report, live max activated experts).

    ``auth`` (default: the operator's ``--prometheus-*`` flags for this URL, see
    ``OperatorSettings.prometheus_auth``) verifies an https server's certificate and sends a bearer
    token. Raises MetricsUnavailable when Prometheus does not answer or answers nonsense, returns no
    usable series, or some rank exports none (its tokens would be missing from the load; with
    ``num_groups`` > 1, some rank of some group, see ``silent_ranks``); reason ``PrometheusTLS`` when
    its certificate does not verify.
    """
    from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
    from requests import RequestException, Session
    from requests.exceptions import SSLError
    from urllib3.util.retry import Retry

    auth = auth if auth is not None else settings.current().prometheus_auth(url)
    try:
        headers = auth.headers()
    except (OSError, ValueError) as error:
        raise MetricsUnavailable("PrometheusUnavailable", f"bearer token: {error}"[:400]) from None
    session = Session()
    session.verify = auth.verify()
    client = PrometheusConnect(url=url, headers=headers, session=session, retry=Retry(total=0), timeout=timeout_s)
    try:
        try:
            result = _query(client, url, load_query(window_seconds, match_labels))
        except SSLError as error:
            ca = f"CA file {auth.ca_file}" if auth.ca_file else "the system's CAs (set --prometheus-ca-file)"
            raise MetricsUnavailable(
                "PrometheusTLS", f"{url}: TLS verification against {ca} failed: {error}"[:400]
            ) from None
        load, report = parse_load(result, num_layers, num_experts)
        if report.series == 0:
            raise MetricsUnavailable("NoData", f"{url}: no {LOAD_METRIC} series in the last {window_seconds}s")
        if report.used == 0:
            raise MetricsUnavailable("BadData", f"{url}: no usable series ({report.summary()})")
        _check_ranks(client, url, match_labels, num_ranks, num_groups)
        activated = None
        try:
            rows = client.custom_query(activated_query(match_labels))
            values = [float(row["value"][1]) for row in rows if _int_label(row.get("metric") or {}, "layer") is not None]
            values = [value for value in values if math.isfinite(value)]
            if values:
                activated = float(np.mean(values))
        except (PrometheusApiClientException, RequestException, ValueError, KeyError, IndexError, TypeError, AttributeError):
            report.notes.append("activated experts unavailable")
    finally:
        session.close()
    return load, report, activated


def _pairs(
    document: Any, num_layers: int, num_experts: int, max_layer: int, report: MetricsReport, name: str
) -> SparsePairs | None:
    if not isinstance(document, Mapping):
        return None
    try:
        columns = [np.asarray(document[key], dtype=np.float64) for key in ("layer", "first", "second", "count")]
    except (KeyError, TypeError, ValueError):
        report.skip(f"bad_{name}")
        return None
    if len({len(column) for column in columns}) != 1 or any(column.ndim != 1 for column in columns):
        report.skip(f"bad_{name}")
        return None
    layer, first, second, count = columns
    ok = np.isfinite(layer) & np.isfinite(first) & np.isfinite(second) & np.isfinite(count)
    ok &= (layer >= 0) & (layer < max_layer) & (first >= 0) & (first < num_experts)
    ok &= (second >= 0) & (second < num_experts) & (count > 0)
    ok &= (layer == np.round(layer)) & (first == np.round(first)) & (second == np.round(second))
    if (~ok).any():
        report.skip(f"{name}_out_of_range", int((~ok).sum()))
    if not ok.any():
        return None
    return SparsePairs(layer[ok].astype(np.int64), first[ok].astype(np.int64), second[ok].astype(np.int64), count[ok])


def _merge(parts: list[SparsePairs], num_experts: int) -> SparsePairs | None:
    if not parts:
        return None
    layer = np.concatenate([part.layer for part in parts])
    first = np.concatenate([part.first for part in parts])
    second = np.concatenate([part.second for part in parts])
    count = np.concatenate([part.count for part in parts])
    key = (layer * num_experts + first) * num_experts + second
    unique, inverse = np.unique(key, return_inverse=True)
    summed = np.zeros(len(unique))
    np.add.at(summed, inverse, count)
    return SparsePairs(
        unique // (num_experts * num_experts), (unique // num_experts) % num_experts, unique % num_experts, summed
    )


def parse_stats(
    documents: Sequence[StatsAnswer], num_layers: int, num_experts: int, report: MetricsReport | None = None
) -> tuple[SparsePairs | None, SparsePairs | None, MetricsReport]:
    """Summed transitions and co-activation of the agents' ``/v1/stats`` answers."""
    report = report or MetricsReport()
    transitions: list[SparsePairs] = []
    coactivation: list[SparsePairs] = []
    for document in documents:
        if not isinstance(document, StatsAnswer):
            report.skip("bad_stats")
            continue
        if (document.num_layers, document.num_experts) != (num_layers, num_experts):
            report.skip("stats_shape_mismatch")
            continue
        report.agents_with_stats += 1
        pairs = _pairs(document.transitions.model_dump(), num_layers, num_experts, num_layers - 1, report, "transitions")
        if pairs is not None:
            transitions.append(pairs)
        pairs = _pairs(document.coactivation.model_dump(), num_layers, num_experts, num_layers, report, "coactivation")
        if pairs is not None:
            coactivation.append(pairs)
    return _merge(transitions, num_experts), _merge(coactivation, num_experts), report


def build_profile(
    load: np.ndarray,
    top_k: int,
    transitions: SparsePairs | None = None,
    coactivation: SparsePairs | None = None,
    phase: Phase = "decode",
) -> WorkloadProfile:
    """The profile the solver sees."""
    return WorkloadProfile(
        load=load, top_k=top_k, transitions=transitions, coactivation=coactivation, phase=phase
    )
