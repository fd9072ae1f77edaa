"""The engines venv (scripts/engines-env.sh): SGLang's and vLLM's own Python code, without GPUs.

Tests here run small scripts in that venv, which import the engines' modules and moeplace's code,
and print JSON. They skip, naming why, where the venv cannot be built (no network for its wheels).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def engines_python() -> Path:
    try:
        out = subprocess.run([str(REPO / "scripts" / "engines-env.sh"), sys.prefix], capture_output=True,
                             text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/engines-env.sh: building the engines venv took over 15 minutes")
    if out.returncode != 0:
        pytest.skip(f"scripts/engines-env.sh failed (no engine wheels?): {out.stderr.strip()[-500:]}")
    return Path(out.stdout.strip().splitlines()[-1])
