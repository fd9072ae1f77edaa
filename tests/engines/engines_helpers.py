"""Running scripts in the engines venv (see conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def run_script(python: Path, script: str, *args: str, env: dict[str, str] | None = None) -> object:
    """Run ``tests/engines/<script>`` in the engines venv; its stdout's last line, as JSON."""
    environment = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'agent'}", **(env or {})}
    out = subprocess.run([str(python), str(HERE / script), *args], capture_output=True, text=True,
                         env=environment, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
