"""MoEDeployment manifests of a tiny model for the local stack: the e2e tests and the operator benchmark
start from these."""

from __future__ import annotations

from typing import Any

from moe_operator.crd import GROUP, VERSION

# 4 layers x 16 experts, top-2: small enough for a few replay agents on one machine.
TINY_SHAPE = {
    "name": "tiny-e2e", "numLayers": 4, "numExperts": 16, "topK": 2,
    "hiddenSize": 64, "expertIntermediateSize": 128,
}


def manifest(name: str, namespace: str, prometheus_url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A MoEDeployment of TINY_SHAPE on 2 x 2 GPUs with short windows; each keyword argument updates
    that spec section (``placement={"policy": "metro"}``)."""
    spec: dict[str, Any] = {
        "model": {"shape": dict(TINY_SHAPE)},
        "topology": {"nodes": 2, "gpusPerNode": 2},
        "placement": {
            "policy": "eplb_global", "redundantSlots": 4, "rebalanceIntervalSeconds": 2,
            "minPredictedGain": 0.05, "evaluationBatches": 2,
            "objective": {"prefill": "tokenImbalance", "decode": "tokenImbalance",
                          "prefillRouter": "random", "decodeRouter": "random"},
        },
        "migration": {"maxCopiesPerStage": 4, "maxConcurrentTransfers": 4, "stepRetries": 2,
                      "stepTimeoutSeconds": 10},
        "metrics": {"prometheusUrl": prometheus_url, "windowSeconds": 10, "minTokens": 50},
    }
    for key, value in sections.items():
        spec.setdefault(key, {}).update(value)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MoEDeployment",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
