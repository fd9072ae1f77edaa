"""The operator's metrics: a deleted deployment's series are all dropped, the others' kept."""

from __future__ import annotations

from moe_operator import metrics as om


def series_of(namespace: str, deployment: str) -> list[tuple[str, str]]:
    """(metric, sample) names of the deployment's series."""
    return [
        (family.name, sample.name)
        for family in om.REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("namespace") == namespace and sample.labels.get("deployment") == deployment
    ]


def test_forget_drops_every_series_of_one_deployment() -> None:
    assert len(om.REGISTRY.metrics) >= 15
    kept, dropped = om.DeploymentMetrics("ns", "kept"), om.DeploymentMetrics("ns", "dropped")
    for deployment in (kept, dropped):
        deployment.rebalance("applied")
        deployment.solve(0.5, "time_limit")
        deployment.error("agent")
        deployment.migration_step("ok", 1e6)
        deployment.migrating(True)
        for metric in om.REGISTRY.metrics:
            if isinstance(metric, om.Gauge):
                deployment.set(metric, 1.0)
    before = series_of("ns", "kept")
    assert {metric for metric, _ in before} == {family.name for family in om.REGISTRY.collect()}
    dropped.forget()
    assert series_of("ns", "dropped") == []
    assert series_of("ns", "kept") == before
    kept.forget()
