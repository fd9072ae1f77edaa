"""The demo's report from recorded table rows: snapshots before and after a rebalance and after the
shift, every completed rebalance listed, rolled-back migrations counted, report.md/json and both
figures written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_placement.models import ModelShape
from moeplace_dev.demo import Sample, snapshots_of, write_report

MODEL = ModelShape(name="tiny", num_layers=2, num_experts=8, top_k=2, hidden_size=64, expert_intermediate_size=128)


def row(seconds: float, generation: int, imbalance: float | None, migration: str = "Completed") -> Sample:
    return Sample(seconds, "Ready", generation, imbalance, imbalance, 3.0, 1.0, migration, "applied",
                  np.full((MODEL.num_layers, 4), float(generation)))


# Generation 2 goes live, 3 is a rollback (the migration says RolledBack), 4 goes live after the shift.
SAMPLES = [row(5, 1, None, "-"), row(10, 1, 1.4, "-"), row(15, 2, 1.1), row(20, 3, 1.2, "RolledBack"),
           row(50, 3, 1.3), row(55, 4, 1.05)]
EVENTS = [{"type": "Normal", "reason": "PlacementPublished", "message": "generation 2"},
          {"type": "Warning", "reason": "MigrationRolledBack", "message": "generation 3"}]


def test_snapshots_pick_the_last_measured_row_of_each_period() -> None:
    snapshots = snapshots_of(SAMPLES, shift_after=40, first_rebalanced=2)
    assert [s.seconds if s else None for s in snapshots.values()] == [10, 20, 55]
    assert list(snapshots_of(SAMPLES[:2], shift_after=40, first_rebalanced=None).values())[1:] == [None, None]


def test_report_lists_figures_and_rebalances(tmp_path: Path) -> None:
    text = write_report(tmp_path, SAMPLES, EVENTS, 40, MODEL, 4)
    assert "2 rebalance(s) completed, 1 migration(s) rolled back" in text
    assert "- 15 s: generation 2 live (imbalance before 1.40)" in text
    assert (tmp_path / "report.md").read_text() == text
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["generation"] for r in report["rebalances"]] == [2, 4] and report["rolled_back"] == 1
    assert {"heatmaps.png", "timeline.png"} <= {path.name for path in tmp_path.iterdir()}
