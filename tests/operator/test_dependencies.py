"""matplotlib is an extra (``moeplace[plot]``): nothing but the demo's and the benchmark's figures
needs it, and the image (requirements/image.txt) does not carry it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_matplotlib_is_only_the_plot_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("matplotlib")]
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plot"])
    pins = {line.split("==")[0] for line in (REPO / "requirements" / "image.txt").read_text().splitlines() if "==" in line}
    assert "matplotlib" not in pins


def test_every_entry_point_imports_without_matplotlib():
    """The operator, the agent and the CLIs (demo and bench included) import with matplotlib blocked:
    it is imported only when a figure is drawn."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import moe_operator.handlers, moe_operator.run, moe_agent.cli, moeplace.cli, moeplace_dev.cli\n"
        "import moe_placement.bench\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
