"""Fixtures of the operator's unit tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moe_placement.migration_plan import plan_migration

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture
def planner():
    """The migration planner the operator runs."""
    return plan_migration
