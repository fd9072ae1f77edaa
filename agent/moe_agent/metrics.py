"""The agent's Prometheus metrics (names and labels: docs/agent-api.md), one registry per agent.

Cardinality is bounded: ``moeplace_expert_tokens_total`` has one series per (layer, expert) this rank
hosts live (at most L x S), ``moeplace_activated_experts`` one per layer, the rest a handful.
Per-expert counts are kept in an array [L, E] for all experts, so an expert that leaves this rank and
comes back resumes its counter instead of restarting at zero; only the hosted ones are exported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from moe_agent.store import SlotState

MIGRATION_KINDS = ("stage", "retire", "activate")


class _ExpertTokens(Collector):
    """``moeplace_expert_tokens_total{rank, layer, expert}`` for the hosted (layer, expert) pairs."""

    def __init__(self, rank: str, counts: np.ndarray, hosted: Callable[[], np.ndarray], lock: threading.Lock):
        self._rank = rank
        self._counts = counts
        self._hosted = hosted
        self._lock = lock

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "moeplace_expert_tokens",
            "(token, choice) pairs this rank's slots served, per expert",
            labels=["rank", "layer", "expert"],
        )
        with self._lock:
            counts = self._counts.copy()
        for layer, expert in zip(*np.nonzero(self._hosted())):
            family.add_metric([self._rank, str(layer), str(expert)], float(counts[layer, expert]))
        yield family


class _HookErrors(Collector):
    """``moeplace_recorder_hook_errors_total{rank}``: recorder hooks that failed (the forward went on)."""

    def __init__(self, rank: str, count: Callable[[], int]):
        self._rank = rank
        self._count = count

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "moeplace_recorder_hook_errors", "recorder hooks that failed; the forward pass went on", labels=["rank"]
        )
        family.add_metric([self._rank], float(self._count()))
        yield family


class AgentMetrics:
    """Every metric of one agent, in its own registry."""

    def __init__(
        self,
        rank: int,
        num_layers: int,
        num_experts: int,
        hosted: Callable[[], np.ndarray],
        window_age: Callable[[], float],
        hook_errors: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        label = str(rank)
        self._lock = threading.Lock()
        self.expert_tokens = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.registry.register(_ExpertTokens(label, self.expert_tokens, hosted, self._lock))

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, documentation, ["rank", *labels], registry=self.registry)

        def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, documentation, ["rank", *labels], registry=self.registry)

        self._tokens = counter("moeplace_tokens", "tokens this rank's attention produced").labels(label)
        self._cross_gpu = counter(
            "moeplace_cross_gpu_bytes", "all-to-all bytes this rank's tokens sent across GPUs"
        ).labels(label)
        self._cross_node = counter(
            "moeplace_cross_node_bytes", "all-to-all bytes this rank's tokens sent across nodes"
        ).labels(label)
        activated = gauge("moeplace_activated_experts", "distinct slots this rank activated in the last step", ("layer",))
        self._activated = [activated.labels(label, str(layer)) for layer in range(num_layers)]
        slots = gauge("moeplace_slots", "slot occupancy over all layers", ("state",))
        self._slots = {state: slots.labels(label, state) for state in ("live", "staged", "empty")}
        self._generation = gauge("moeplace_placement_generation", "live placement generation").labels(label)
        self._steps = counter(
            "moeplace_migration_steps", "stage / retire / activate calls by result", ("kind", "result")
        )
        self._rank_label = label
        for kind in MIGRATION_KINDS:
            for result in ("ok", "error"):
                self._steps.labels(label, kind, result)  # present at 0 from the start, for rate()
        self._migration_bytes = counter("moeplace_migration_bytes", "expert bytes received").labels(label)
        self._staged_collected = counter(
            "moeplace_staged_slots_collected", "staged slots dropped because no activation claimed them in time"
        ).labels(label)
        window = gauge("moeplace_recorder_window_age_seconds", "age of the recorder's current window")
        window.labels(label).set_function(window_age)
        self.registry.register(_HookErrors(label, hook_errors))

    def add_step(
        self,
        served: np.ndarray,
        activated: np.ndarray,
        tokens: int,
        cross_gpu_bytes: float,
        cross_node_bytes: float,
    ) -> None:
        """One replayed step: served [L, E] pairs served by this rank, activated [L] slots used."""
        with self._lock:
            self.expert_tokens += served
        for gauge, value in zip(self._activated, activated.tolist()):
            gauge.set(value)
        self._tokens.inc(tokens)
        self._cross_gpu.inc(cross_gpu_bytes)
        self._cross_node.inc(cross_node_bytes)

    def set_placement(self, generation: int, occupancy: dict[SlotState, int]) -> None:
        self._generation.set(generation)
        for state, gauge in self._slots.items():
            gauge.set(occupancy[state])

    def staged_collected(self, count: int) -> None:
        self._staged_collected.inc(count)

    def migration(self, kind: str, ok: bool, received_bytes: int = 0) -> None:
        self._steps.labels(self._rank_label, kind, "ok" if ok else "error").inc()
        if received_bytes:
            self._migration_bytes.inc(received_bytes)
