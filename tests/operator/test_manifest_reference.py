from pathlib import Path

from moe_operator.crd import manifest_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_manifest_reference_equals_the_models():
    text = README.read_text()
    start = text.index("<!-- manifest-reference:start -->\n") + len("<!-- manifest-reference:start -->\n")
    end = text.index("<!-- manifest-reference:end -->")
    assert text[start:end] == manifest_reference(), "README's manifest reference is stale: run `make generate`"


def test_reference_lists_every_section_with_its_constraints():
    reference = manifest_reference()
    for path in ("spec.model.preset", "spec.topology.gpusPerNode", "spec.placement.redundantSlots",
                 "spec.migration.maxConcurrentTransfers", "spec.metrics.prometheusUrl", "spec.alerts"):
        assert f"`{path}`" in reference
    assert "`eplb`" in reference and ">= 0" in reference
