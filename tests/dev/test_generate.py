"""``make generate`` (moeplace_dev.generate): the checked-in generated files equal the models, and
stale ones are found and rewritten."""

from __future__ import annotations

import shutil
from pathlib import Path

from moeplace_dev.generate import CRD_DIRS, README, REPO, main, regenerate


def test_checked_in_files_are_generated() -> None:
    assert main(["--check"]) == 0


def test_stale_files_are_found_and_rewritten(tmp_path: Path) -> None:
    for directory in CRD_DIRS:
        shutil.copytree(REPO / directory, tmp_path / directory)
    readme = tmp_path / README
    readme.write_text((REPO / README).read_text().replace("`spec.model.preset`", "`spec.model.old`"))
    crd = next((tmp_path / CRD_DIRS[1]).glob("*.yaml"))
    crd.write_text("stale\n")
    assert sorted(regenerate(tmp_path, check=True)) == sorted([readme, crd])
    assert sorted(regenerate(tmp_path)) == sorted([readme, crd])
    assert regenerate(tmp_path, check=True) == []
    assert crd.read_text() == (REPO / CRD_DIRS[0] / crd.name).read_text()
