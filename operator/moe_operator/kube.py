"""The few Kubernetes API calls the operator makes, async (the sync client runs in worker threads).

Every call maps API failures to ``KubeError`` (with the HTTP status) so the control loop can tell
"not found" from "forbidden" from "the API server is down".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from moe_operator.crd import GROUP, PLURAL, VERSION

MERGE = "application/merge-patch+json"


class KubeError(RuntimeError):
    def __init__(self, what: str, status: int, reason: str) -> None:
        super().__init__(f"{what}: HTTP {status} {reason}".strip())
        self.status = status


def load_config(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster config when running in a pod, else the kubeconfig (``$KUBECONFIG`` or ~/.kube)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.retries = 2
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


def _plain(obj: Any, api: client.ApiClient) -> Any:
    return obj if isinstance(obj, dict) else api.sanitize_for_serialization(obj)


class Kube:
    """Async facade over the sync kubernetes client."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.slices = client.DiscoveryV1Api(api)
        self._served: dict[str, list[str]] = {}

    async def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as error:
            detail = str(error.reason or "")
            try:
                detail = json.loads(error.body).get("message", detail)
            except (TypeError, ValueError, AttributeError):
                pass
            raise KubeError(what, int(error.status or 0), detail[:600]) from None
        except Exception as error:  # noqa: BLE001 - urllib3 connection errors and the like
            raise KubeError(what, 0, f"{type(error).__name__}: {error}") from None

    async def _get(self, what: str, fn: Any, *args: Any) -> dict[str, Any] | None:
        try:
            return _plain(await self._run(what, fn, *args), self.api)
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    # -- MoEDeployment ----------------------------------------------------------------------------

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(
            f"moedeployment {namespace}/{name}",
            self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
        )

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """JSON merge patch of ``status`` (None values delete keys; lists are replaced whole)."""
        await self._run(
            f"patch status of {namespace}/{name}",
            self.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
        )

    # -- core objects -----------------------------------------------------------------------------

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(f"configmap {namespace}/{name}", self.core.read_namespaced_config_map, name, namespace)

    async def create_configmap(self, body: Mapping[str, Any]) -> dict[str, Any]:
        namespace = body["metadata"]["namespace"]
        return _plain(
            await self._run(
                f"create configmap {namespace}/{body['metadata']['name']}",
                self.core.create_namespaced_config_map, namespace, dict(body),
            ),
            self.api,
        )

    async def put_configmap(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create, or merge-patch data/labels/annotations of an existing one."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            return await self.create_configmap(body)
        except KubeError as error:
            if error.status != 409:
                raise
        patch = {
            "metadata": {
                "labels": body["metadata"].get("labels", {}),
                "annotations": body["metadata"].get("annotations", {}),
            },
            "data": body.get("data", {}),
        }
        return _plain(
            await self._run(
                f"patch configmap {namespace}/{name}",
                self.core.patch_namespaced_config_map, name, namespace, patch, _content_type=MERGE,
            ),
            self.api,
        )

    async def delete_configmap(self, namespace: str, name: str) -> None:
        try:
            await self._run(f"delete configmap {namespace}/{name}", self.core.delete_namespaced_config_map, name, namespace)
        except KubeError as error:
            if error.status != 404:
                raise

    async def ensure_service(self, body: Mapping[str, Any]) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self._run(f"create service {namespace}/{name}", self.core.create_namespaced_service, namespace, dict(body))
            return
        except KubeError as error:
            if error.status != 409:
                raise
        spec = {"ports": body["spec"]["ports"], "selector": body["spec"].get("selector")}
        await self._run(
            f"patch service {namespace}/{name}",
            self.core.patch_namespaced_service, name, namespace,
            {"metadata": {"labels": body["metadata"]["labels"]}, "spec": spec}, _content_type=MERGE,
        )

    async def get_endpoints(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(f"endpoints {namespace}/{name}", self.core.read_namespaced_endpoints, name, namespace)

    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        """The ``discovery.k8s.io/v1`` EndpointSlices of a Service (by ``kubernetes.io/service-name``)."""
        answer = await self._run(
            f"endpointslices of {namespace}/{service}",
            self.slices.list_namespaced_endpoint_slice, namespace, label_selector=f"kubernetes.io/service-name={service}",
        )
        return _plain(answer, self.api).get("items") or []

    async def served_versions(self, group: str) -> list[str]:
        """Versions of an API group the server serves (``[]``: none), from one discovery call per client."""
        if not self._served:
            answer = _plain(await self._run("API discovery", client.ApisApi(self.api).get_api_versions), self.api)
            self._served = {
                entry["name"]: [version["version"] for version in entry.get("versions") or []]
                for entry in answer.get("groups") or []
            }
        return self._served.get(group, [])

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(f"secret {namespace}/{name}", self.core.read_namespaced_secret, name, namespace)

    async def create_secret(self, body: Mapping[str, Any]) -> dict[str, Any]:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        return _plain(
            await self._run(f"create secret {namespace}/{name}", self.core.create_namespaced_secret, namespace, dict(body)),
            self.api,
        )

    async def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge patch of a Secret (``metadata.resourceVersion`` in the patch makes it conditional)."""
        return _plain(
            await self._run(
                f"patch secret {namespace}/{name}",
                self.core.patch_namespaced_secret, name, namespace, dict(patch), _content_type=MERGE,
            ),
            self.api,
        )

    async def ensure_statefulset(self, body: Mapping[str, Any]) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self._run(f"create statefulset {namespace}/{name}", self.apps.create_namespaced_stateful_set, namespace, dict(body))
            return
        except KubeError as error:
            if error.status != 409:
                raise
        patch = {
            "metadata": {"labels": body["metadata"]["labels"]},
            "spec": {"replicas": body["spec"]["replicas"], "template": body["spec"]["template"]},
        }
        await self._run(
            f"patch statefulset {namespace}/{name}",
            self.apps.patch_namespaced_stateful_set, name, namespace, patch, _content_type=MERGE,
        )

    async def get_workload(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        if kind == "StatefulSet":
            return await self._get(f"statefulset {namespace}/{name}", self.apps.read_namespaced_stateful_set, name, namespace)
        return await self._get(
            f"leaderworkerset {namespace}/{name}",
            self.custom.get_namespaced_custom_object, "leaderworkerset.x-k8s.io", "v1", namespace, "leaderworkersets", name,
        )

    async def ensure_custom(self, body: Mapping[str, Any], plural: str) -> bool:
        """Create or merge-patch a custom object; False when its CRD is not installed."""
        group, version = body["apiVersion"].split("/")
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self._run(
                f"create {plural} {namespace}/{name}",
                self.custom.create_namespaced_custom_object, group, version, namespace, plural, dict(body),
            )
            return True
        except KubeError as error:
            if error.status == 404:
                return False
            if error.status != 409:
                raise
        await self._run(
            f"patch {plural} {namespace}/{name}",
            self.custom.patch_namespaced_custom_object, group, version, namespace, plural, name,
            {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]},
        )
        return True
