"""Fixtures for the Helm chart's tests: the chart rendered with helm-python-sdk, and the local control
plane of tests/support (re-exported, so server-side dry runs hit a real kube-apiserver)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Fixtures are per conftest: a session running tests/e2e and tests/chart together starts one control
# plane for each.
from control_plane_fixtures import binaries, control_plane, pytest_configure  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "moeplace"
VALUES_DIR = Path(__file__).resolve().parent / "values"
RELEASE = "moeplace"
RELEASE_NAMESPACE = "moeplace-system"


Manifest = dict[str, Any]
Renderer = Callable[..., list[Manifest]]


# "default" is the chart's own values; every other case is a file tests/chart/values/<case>.yaml.
CASES = ["default"] + sorted(path.stem for path in VALUES_DIR.glob("*.yaml"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``case`` (or the ``values`` fixture) runs once per values case."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES)


@pytest.fixture
def values(case: str) -> dict[str, Any]:
    return values_for(case)


def values_for(case: str) -> dict[str, Any]:
    """Values of a case: "default" (the chart's own values) or a file tests/chart/values/<case>.yaml."""
    if case == "default":
        return {}
    return yaml.safe_load((VALUES_DIR / f"{case}.yaml").read_text()) or {}


@pytest.fixture(scope="session")
def helm() -> Any:
    """The ``helm_python`` module; a missing or broken install fails under CI and skips elsewhere."""
    try:
        import helm_python
    # ImportError, or the package's HelmLibraryError when its bundled libhelm_c.so cannot be loaded.
    except Exception as error:
        reason = f"helm-python-sdk unavailable (pip install -r requirements/chart-test.txt): {error}"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return helm_python


@pytest.fixture(scope="session")
def render(helm: Any) -> Iterator[Renderer]:
    """``render(case or values) -> [objects]``: the chart rendered offline as release ``moeplace`` in
    ``moeplace-system``, for a case (see values_for) or a values dict; NOTES.txt left out."""
    chart = helm.Chart.load(str(CHART))

    def _render(values: str | dict[str, Any] = "default") -> list[Manifest]:
        if isinstance(values, str):
            values = values_for(values)
        rendered = chart.render(values, name=RELEASE, namespace=RELEASE_NAMESPACE)
        objects: list[Manifest] = []
        for template, text in sorted(rendered.items()):
            if template.endswith("NOTES.txt"):
                continue
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
        return objects

    yield _render
    chart.close()
