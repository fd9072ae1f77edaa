"""The operator's own Prometheus metrics (docs/operator-metrics.md), served on ``--metrics-port``.

Every series carries ``namespace`` and ``deployment``.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase


class MetricsRegistry(CollectorRegistry):
    """A registry that keeps the metrics registered in it, so that every series of a deleted
    deployment can be dropped without a second list of them."""

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self.metrics: list[MetricWrapperBase] = []

    def register(self, collector) -> None:  # noqa: ANN001 - prometheus_client's signature
        super().register(collector)
        if isinstance(collector, MetricWrapperBase):
            self.metrics.append(collector)


REGISTRY = MetricsRegistry()
_BASE = ("namespace", "deployment")

REBALANCES = Counter(
    "moeplace_operator_rebalances_total", "Rebalance cycles by outcome.", _BASE + ("result",), registry=REGISTRY
)
SOLVE_SECONDS = Histogram(
    "moeplace_operator_solve_seconds",
    "Time to solve a placement.",
    _BASE,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
SOLVER_FAILURES = Counter(
    "moeplace_operator_solver_failures_total",
    "Solves that hit the time limit or fell back to the warm start.",
    _BASE + ("status",),
    registry=REGISTRY,
)
IMBALANCE = Gauge("moeplace_operator_imbalance", "Live token imbalance (max / mean GPU load).", _BASE, registry=REGISTRY)
MAX_ACTIVATED = Gauge(
    "moeplace_operator_max_activated_experts", "Live max activated experts per GPU.", _BASE, registry=REGISTRY
)
PREDICTED_GAIN = Gauge(
    "moeplace_operator_predicted_gain", "Predicted gain of the last solved placement.", _BASE, registry=REGISTRY
)
PLACEMENT_GENERATION = Gauge(
    "moeplace_operator_placement_generation", "Generation of the published placement.", _BASE, registry=REGISTRY
)
MIGRATION_IN_PROGRESS = Gauge(
    "moeplace_operator_migration_in_progress", "1 while a migration runs.", _BASE, registry=REGISTRY
)
MIGRATION_LAST_PROGRESS = Gauge(
    "moeplace_operator_migration_last_progress_timestamp_seconds",
    "Unix time of the last completed migration step.",
    _BASE,
    registry=REGISTRY,
)
MIGRATION_STEPS = Counter(
    "moeplace_operator_migration_steps_total", "Migration steps by result.", _BASE + ("result",), registry=REGISTRY
)
MIGRATION_BYTES = Counter(
    "moeplace_operator_migration_bytes_total", "Expert bytes moved.", _BASE, registry=REGISTRY
)
METRICS_AVAILABLE = Gauge(
    "moeplace_operator_metrics_available",
    "1 when the last Prometheus query returned usable load.",
    _BASE,
    registry=REGISTRY,
)
AGENTS_EXPECTED = Gauge(
    "moeplace_operator_agents_expected", "Agents in the Service's Endpoints.", _BASE, registry=REGISTRY
)
AGENTS_REACHABLE = Gauge(
    "moeplace_operator_agents_reachable", "Agents answering /v1/placement.", _BASE, registry=REGISTRY
)
ERRORS = Counter("moeplace_operator_errors_total", "Errors by reason.", _BASE + ("reason",), registry=REGISTRY)


class DeploymentMetrics:
    """The metrics of one MoEDeployment (label values bound)."""

    def __init__(self, namespace: str, deployment: str) -> None:
        self.labels = (namespace, deployment)

    def rebalance(self, result: str) -> None:
        REBALANCES.labels(*self.labels, result).inc()

    def solve(self, seconds: float, status: str) -> None:
        SOLVE_SECONDS.labels(*self.labels).observe(seconds)
        if status in ("time_limit", "fallback"):
            SOLVER_FAILURES.labels(*self.labels, status).inc()

    def error(self, reason: str) -> None:
        ERRORS.labels(*self.labels, reason).inc()

    def migration_step(self, result: str, bytes_moved: float = 0.0) -> None:
        MIGRATION_STEPS.labels(*self.labels, result).inc()
        if result == "ok":
            MIGRATION_LAST_PROGRESS.labels(*self.labels).set(time.time())
        if bytes_moved:
            MIGRATION_BYTES.labels(*self.labels).inc(bytes_moved)

    def migrating(self, flag: bool) -> None:
        MIGRATION_IN_PROGRESS.labels(*self.labels).set(1 if flag else 0)

    def set(self, gauge: Gauge, value: float | None) -> None:
        if value is not None:
            gauge.labels(*self.labels).set(value)

    def forget(self) -> None:
        """Drop every series of this deployment (it was deleted)."""
        for metric in REGISTRY.metrics:
            for labels in list(metric._metrics):  # noqa: SLF001 - prometheus_client has no public listing
                if labels[:2] == self.labels:
                    metric.remove(*labels)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` in a background thread."""
    start_http_server(port, addr=address, registry=REGISTRY)
