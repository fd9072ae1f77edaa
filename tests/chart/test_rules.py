"""promtool (Prometheus 2.42 from Debian, installed by scripts/system-deps.sh) checks the chart's rules
file and runs its unit tests: every alert fires when it should and stays silent when it should not.
The operator's per-deployment PrometheusRules (moe_operator.builders.build_prometheusrule) are checked
and tested together with the chart's rules: each alert fires once per deployment, at its thresholds."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
RULES_FILE = HERE.parents[1] / "charts" / "moeplace" / "files" / "rules.yaml"
SHAPE = {"numLayers": 2, "numExperts": 8, "topK": 2, "hiddenSize": 64, "expertIntermediateSize": 32}
# The MoEDeployments of deployment_rules_test.yaml with a PrometheusRule of their own.
DEPLOYMENT_ALERTS = {
    "custom": {"imbalanceThreshold": 2.5, "migrationStalledSeconds": 300, "metricsMissingSeconds": 120},
    "strict": {"imbalanceThreshold": 1.2, "migrationStalledSeconds": 1200, "metricsMissingSeconds": 900},
}


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


def operator_rules_files(directory: Path) -> list[Path]:
    """The operator's PrometheusRules for DEPLOYMENT_ALERTS' MoEDeployments, one rules file each (as
    prometheus-operator loads them)."""
    builders = pytest.importorskip("moe_operator.builders", reason="moe_operator not importable")
    from moe_operator.crd import resolve_spec

    files = []
    for name, alerts in DEPLOYMENT_ALERTS.items():
        owner = {"metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}"}}
        spec = {"model": {"shape": SHAPE}, "topology": {"nodes": 1, "gpusPerNode": 2}, "alerts": alerts}
        rule = builders.build_prometheusrule(owner, resolve_spec(spec))
        path = directory / f"ml-{rule['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
        files.append(path)
    return files


def test_promtool_check_operator_rules(promtool: str, tmp_path: Path) -> None:
    for path in operator_rules_files(tmp_path):
        assert "SUCCESS" in run(promtool, "check", "rules", str(path))


def test_promtool_test_chart_and_operator_rules_together(promtool: str, tmp_path: Path) -> None:
    tests = yaml.safe_load((HERE / "deployment_rules_test.yaml").read_text())
    tests["rule_files"] = [str(RULES_FILE)] + [str(path) for path in operator_rules_files(tmp_path)]
    test_file = tmp_path / "deployment_rules_test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    assert "SUCCESS" in run(promtool, "test", "rules", str(test_file))
