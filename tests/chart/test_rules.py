"""promtool (Prometheus 2.42 from Debian, installed by scripts/system-deps.sh) checks the chart's rules
file and runs its unit tests: every alert fires when it should and stays silent when it should not."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RULES_FILE = HERE.parents[1] / "charts" / "moeplace" / "files" / "rules.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool not found (apt-get install prometheus, or make system-deps)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_check_rules(promtool: str) -> None:
    assert "SUCCESS" in run(promtool, "check", "rules", str(RULES_FILE))


def test_promtool_test_rules(promtool: str) -> None:
    assert "SUCCESS" in run(promtool, "test", "rules", str(HERE / "rules_test.yaml"))
