"""The demo's report from recorded table rows: snapshots before and after a rebalance and after the
shift, every rebalance listed, report.md/json and both figures written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_placement.models import ModelShape
from moeplace_dev.demo import Sample, snapshots_of, write_report

MODEL = ModelShape(name="tiny", num_layers=2, num_experts=8, top_k=2, hidden_size=64, expert_intermediate_size=128)


def row(seconds: float, generation: int, imbalance: float | None) -> Sample:
    return Sample(seconds, "Ready", generation, imbalance, imbalance, 3.0, 1.0, "-", "applied",
                  np.full((MODEL.num_layers, 4), float(generation)))


SAMPLES = [row(5, 1, None), row(10, 1, 1.4), row(15, 2, 1.1), row(50, 2, 1.3), row(55, 3, 1.05)]


def test_snapshots_pick_the_last_measured_row_of_each_period() -> None:
    snapshots = snapshots_of(SAMPLES, shift_after=40)
    assert [s.seconds if s else None for s in snapshots.values()] == [10, 15, 55]
    assert list(snapshots_of(SAMPLES[:2], shift_after=40).values())[1:] == [None, None]


def test_report_lists_figures_and_rebalances(tmp_path: Path) -> None:
    events = [{"type": "Normal", "reason": "Rebalanced", "message": "generation 2"}]
    text = write_report(tmp_path, SAMPLES, events, 40, MODEL, 4)
    assert "2 rebalance(s) applied" in text and "- 15 s: generation 2 live (imbalance before 1.40)" in text
    assert (tmp_path / "report.md").read_text() == text
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["generation"] for r in report["rebalances"]] == [2, 3]
    assert {"heatmaps.png", "timeline.png"} <= {path.name for path in tmp_path.iterdir()}
