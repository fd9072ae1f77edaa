"""Fixtures of the operator's unit tests."""

from __future__ import annotations

import pytest

from moe_placement.migration_plan import plan_migration


@pytest.fixture
def planner():
    """The migration planner the operator runs."""
    return plan_migration


@pytest.fixture
def anyio_backend():
    """Async tests (``pytest.mark.anyio``) run on asyncio, as the operator does."""
    return "asyncio"
