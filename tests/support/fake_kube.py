"""An in-memory stand-in for the operator's Kubernetes client (``moe_operator.kube.Kube``)."""

from __future__ import annotations

import base64
import copy

from fake_agents import TOKEN
from moe_operator import builders


def merge(target, patch):
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKube:
    """The calls of ``moe_operator.kube.Kube`` the controller makes, on one MoEDeployment in memory;
    status patches merge as the API server merges them. ``token``: the agents' token Secret's."""

    def __init__(self, body, token: str = TOKEN):
        self.body = body
        self.token = token
        self.configmaps: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.endpoints: dict[str, dict] = {}
        self.status_patches: list[dict] = []

    async def get_deployment(self, namespace, name):
        return copy.deepcopy(self.body)

    async def patch_status(self, namespace, name, status):
        self.status_patches.append(copy.deepcopy(dict(status)))
        self.body.setdefault("status", {})
        merge(self.body["status"], dict(status))

    async def get_configmap(self, namespace, name):
        return copy.deepcopy(self.configmaps.get(name))

    async def put_configmap(self, body):
        self.configmaps[body["metadata"]["name"]] = copy.deepcopy(body)
        return body

    async def delete_configmap(self, namespace, name):
        self.configmaps.pop(name, None)

    async def ensure_service(self, body):
        self.services[body["metadata"]["name"]] = copy.deepcopy(body)

    async def get_endpoints(self, namespace, name):
        return copy.deepcopy(self.endpoints.get(name))

    async def served_versions(self, group):
        return []  # as kube-apiserver 1.20: no discovery.k8s.io/v1, agents come from Endpoints

    async def get_secret(self, namespace, name):
        # The operator-managed token Secret, as an earlier reconcile left it.
        labels = {builders.LABEL_AGENT_TOKEN_FOR: "demo"}
        return {"metadata": {"name": name, "labels": labels, "ownerReferences": [{"uid": self.body["metadata"]["uid"]}]},
                "data": {"token": base64.b64encode(self.token.encode()).decode()}}

    async def ensure_statefulset(self, body):
        raise AssertionError("no engine in these tests")

    async def get_workload(self, namespace, kind, name):
        return None

    async def ensure_custom(self, body, plural):
        return False
