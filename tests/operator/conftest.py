"""Fixtures of the operator's unit tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def real_planner():
    try:
        from moe_placement.migration import plan_migration
    except ImportError:
        return None
    return plan_migration


@pytest.fixture
def planner(monkeypatch):
    """The real migration planner when it is installed, else the test-only stub (planner_stub)."""
    import planner_stub

    from moe_operator import control, solver

    fn = real_planner()
    if fn is None:
        def fn(old, new, model, topology, max_copies_per_stage=8):
            return planner_stub.plan_migration(old, new, model, topology, max_copies_per_stage)

        def wrapped(old, new, model, topology, max_copies_per_stage):
            return fn(old, new, model, topology, max_copies_per_stage=max_copies_per_stage)

        monkeypatch.setattr(solver, "plan_migration", wrapped)
        monkeypatch.setattr(control, "plan_migration", wrapped)
    return fn
