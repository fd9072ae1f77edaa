"""The checked-in CRD (crds/) equals the one generated from the pydantic models."""

from pathlib import Path

from moe_operator.crd import CRD_FILE, crd_yaml

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_crd_matches_the_models():
    path = REPO / "crds" / CRD_FILE
    assert path.exists(), f"{path} is missing: run `make generate`"
    assert path.read_text() == crd_yaml(), f"crds/{CRD_FILE} differs from moe_operator/crd.py: run `make generate`"
