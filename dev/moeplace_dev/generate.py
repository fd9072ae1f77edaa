"""``make generate``: rewrites the checked-in files derived from the operator's models.

The CRD in ``crds/`` and its copy in the chart (``charts/moeplace/crds/``), both ``moeplace crd``'s
output, and the manifest reference table in README.md between its markers (``moeplace crd
--reference``). Tests compare each with the models and name ``make generate`` when one is stale
(tests/operator/test_crd_in_sync.py, tests/operator/test_manifest_reference.py, tests/chart/test_chart.py).

    python -m moeplace_dev.generate [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_operator.crd import CRD_FILE, crd_yaml, manifest_reference

REPO = Path(__file__).resolve().parents[2]
CRD_DIRS = ("crds", "charts/moeplace/crds")
README = "README.md"
REFERENCE_START = "<!-- manifest-reference:start -->\n"
REFERENCE_END = "<!-- manifest-reference:end -->"


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced by ``body``."""
    if start not in text or end not in text:
        raise ValueError(f"markers {start.strip()!r} and {end!r} not both found")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return head + start + body + end + tail


def generated_files(repo: Path = REPO) -> dict[Path, str]:
    """Each generated file under ``repo`` and the text it must hold."""
    crd = crd_yaml()
    files = {repo / directory / CRD_FILE: crd for directory in CRD_DIRS}
    readme = repo / README
    files[readme] = replace_between(readme.read_text(), REFERENCE_START, REFERENCE_END, manifest_reference())
    return files


def regenerate(repo: Path = REPO, check: bool = False) -> list[Path]:
    """Rewrite the generated files under ``repo`` that are missing or stale (with ``check``, only find
    them); return their paths."""
    files = generated_files(repo)
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if not check:
        for path in stale:
            path.write_text(files[path])
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeplace_dev.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list stale files; exit 1 if any")
    args = parser.parse_args(argv)
    stale = regenerate(check=args.check)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path.relative_to(REPO)}")
    if not stale:
        print("generated files are up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
