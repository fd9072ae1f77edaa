"""The demo's report from recorded table rows: each placement measured over the period it served
(before and after the first rebalance, at the end after the shift), every completed rebalance listed,
rolled-back migrations counted, report.md/json and both figures written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_placement.models import ModelShape
from moeplace_dev.demo import Sample, periods_of, write_report

MODEL = ModelShape(name="tiny", num_layers=2, num_experts=8, top_k=2, hidden_size=64, expert_intermediate_size=128)


def row(seconds: float, generation: int, imbalance: float | None, migration: str = "Completed") -> Sample:
    return Sample(seconds, "Ready", generation, imbalance, imbalance, 3.0, 1.0, migration, "applied",
                  np.full((MODEL.num_layers, 4), float(generation)))


def period_load(first: float, last: float) -> np.ndarray:
    """Tokens as Prometheus would count them: 10 per second on GPUs 1-3, and on GPU 0 the time of the
    period's end, so that each period's imbalance tells which one it was. [L, G]"""
    return np.tile([10.0 * last, 10.0, 10.0, 10.0], (MODEL.num_layers, 1)) * (last - first)


# Generation 2 goes live after a running migration (its stages are not generation 1's steady state), 3 is
# a rollback (the migration says RolledBack), 4 goes live after the shift.
SAMPLES = [row(5, 1, None, "-"), row(10, 1, 1.4, "-"), row(20, 1, 1.4, "-"), row(22, 1, 1.3, "Running"),
           row(25, 2, 1.1), row(40, 2, 1.1),
           row(45, 3, 1.2, "RolledBack"), row(50, 3, 1.3), row(55, 4, 1.05), row(70, 4, 1.05)]
EVENTS = [{"type": "Normal", "reason": "PlacementPublished", "message": "generation 2"},
          {"type": "Warning", "reason": "MigrationRolledBack", "message": "generation 3"}]


def test_each_figure_is_measured_over_the_period_its_placement_served() -> None:
    periods = periods_of(SAMPLES, shift_after=42, first_rebalanced=2, period_load=period_load)
    assert [(p.start, p.last.seconds) if p else None for p in periods.values()] == [
        (0, 20), (25, 40), (55, 70)
    ]
    # GPU 0 counts 10 x the period's end per second: max/mean = 4 t / (t + 3)
    assert [round(p.imbalance, 4) for p in periods.values() if p] == [
        round(4 * t / (t + 3), 4) for t in (20, 40, 70)
    ]
    assert list(periods_of(SAMPLES[:4], 42, None, period_load).values())[1:] == [None, None]


def test_a_period_shorter_than_the_minimum_is_left_out() -> None:
    periods = periods_of(SAMPLES[:-1], shift_after=42, first_rebalanced=2, period_load=period_load)
    assert periods["at the end (after the shift)"] is None


def test_report_lists_figures_and_rebalances(tmp_path: Path) -> None:
    text = write_report(tmp_path, SAMPLES, EVENTS, 42, MODEL, 4, period_load)
    assert "2 rebalance(s) completed, 1 migration(s) rolled back" in text
    assert "- 25 s: generation 2 live (imbalance before 1.30)" in text
    assert "| after it (before the shift) | 25-40 | 2 | 3.721 | 1.10 |" in text
    assert (tmp_path / "report.md").read_text() == text
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["generation"] for r in report["rebalances"]] == [2, 4] and report["rolled_back"] == 1
    assert {"heatmaps.png", "timeline.png"} <= {path.name for path in tmp_path.iterdir()}
