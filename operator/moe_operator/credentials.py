"""The bearer token of one MoEDeployment's agents: which Secret holds it, and its rotation.

Every MoEDeployment has its own token, and the operator sends it only to that deployment's agents:

* without ``spec.metrics.tokenSecretRef`` the operator keeps ``<name>-agent-token`` in the
  deployment's namespace (owned by the MoEDeployment, so it goes with it), creating it with a random
  token, and mounts it into the agents it deploys (``serving.engine``); agents of a ``workloadRef``
  mount the same Secret. A Secret of that name made beforehand (the local stack seeds one with its
  agents' token) is adopted when it carries the label below; any other is left alone and reported.
* ``spec.metrics.tokenSecretRef`` names a Secret of the namespace, which is used only when it is
  labelled ``moeplace.io/agent-token-for: <deployment name>``. The label says that whoever may write
  Secrets there meant this Secret for these agents: without it, anyone allowed to create a
  MoEDeployment could have the operator read any Secret of the namespace and send it to an agent
  address they announce.

Rotation: set (or change) the annotation ``moeplace.io/rotate-agent-token`` on the MoEDeployment to
any new value; the next reconcile or cycle writes a new random token into the operator-managed Secret
(a ``tokenSecretRef`` Secret is the user's to rotate). Agents re-read the mounted file when kubelet
refreshes it (about a minute); calls in between fail with 401 and are retried by the next cycle.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from typing import Any

from moe_operator import builders
from moe_operator.crd import ResolvedSpec
from moe_operator.kube import Kube, KubeError

TOKEN_BYTES = 32


class AgentTokenError(RuntimeError):
    """No usable token for a deployment's agents; the message names the Secret or field and the fix."""


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """A Secret's value at ``key`` (``data`` base64-decoded, else ``stringData``), stripped; None if absent or empty."""
    data = (secret.get("data") or {}).get(key)
    value = base64.b64decode(data).decode() if data is not None else (secret.get("stringData") or {}).get(key)
    value = (value or "").strip()
    return value or None


def labelled_for(secret: Mapping[str, Any], deployment: str) -> bool:
    labels = (secret.get("metadata") or {}).get("labels") or {}
    return labels.get(builders.LABEL_AGENT_TOKEN_FOR) == deployment


async def deployment_token(kube: Kube, body: Mapping[str, Any], resolved: ResolvedSpec) -> str:
    """The bearer token of this MoEDeployment's agents, creating or rotating the operator-managed
    Secret as needed (see the module docstring). Raises AgentTokenError (the deployment stays
    Degraded until it is fixed) and KubeError."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    ref = resolved.spec.metrics.token_secret_ref
    if ref is not None:
        secret = await kube.get_secret(namespace, ref.name)
        if secret is None:
            raise AgentTokenError(f"spec.metrics.tokenSecretRef: secret {namespace}/{ref.name} not found")
        if not labelled_for(secret, name):
            raise AgentTokenError(
                f"spec.metrics.tokenSecretRef: secret {namespace}/{ref.name} is not labelled "
                f"{builders.LABEL_AGENT_TOKEN_FOR}={name}; the operator sends agents only a Secret labelled "
                "for their MoEDeployment"
            )
        token = secret_value(secret, ref.key)
        if token is None:
            raise AgentTokenError(f"spec.metrics.tokenSecretRef: secret {namespace}/{ref.name} has no key {ref.key}")
        return token
    return await _managed_token(kube, body)


async def _managed_token(kube: Kube, body: Mapping[str, Any]) -> str:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    secret_name = builders.agent_token_secret_name(name)
    rotation = (meta.get("annotations") or {}).get(builders.ANNOTATION_ROTATE_TOKEN, "")
    secret = await kube.get_secret(namespace, secret_name)
    if secret is None:
        token = new_token()
        try:
            await kube.create_secret(builders.build_agent_token_secret(body, token, rotation))
            return token
        except KubeError as error:
            if error.status != 409:
                raise
        secret = await kube.get_secret(namespace, secret_name)
        if secret is None:
            raise AgentTokenError(f"secret {namespace}/{secret_name}: created and deleted concurrently; retrying")
    if not labelled_for(secret, name):
        raise AgentTokenError(
            f"secret {namespace}/{secret_name} exists but is not labelled {builders.LABEL_AGENT_TOKEN_FOR}={name}: "
            "the operator does not take over a Secret it was not given; delete or label it, or set "
            "spec.metrics.tokenSecretRef"
        )
    secret_meta = secret.get("metadata") or {}
    token = secret_value(secret, builders.AGENT_TOKEN_KEY)
    patch: dict[str, Any] = {"metadata": {"resourceVersion": secret_meta.get("resourceVersion")}}
    stored_rotation = (secret_meta.get("annotations") or {}).get(builders.ANNOTATION_TOKEN_ROTATION, "")
    if token is None or stored_rotation != rotation:
        token = new_token()
        patch["stringData"] = {builders.AGENT_TOKEN_KEY: token}
        patch["metadata"]["annotations"] = {builders.ANNOTATION_TOKEN_ROTATION: rotation}
    owners = secret_meta.get("ownerReferences") or []
    if not any(owner.get("uid") == meta.get("uid") for owner in owners):
        # Adopted: it goes when the MoEDeployment goes. Not controller (the seeding party may be one).
        reference = {**builders.build_owner_reference(body), "controller": False}
        patch["metadata"]["ownerReferences"] = [*owners, reference]
    if len(patch) > 1 or len(patch["metadata"]) > 1:
        # Conditional on the resourceVersion read: two rotations racing cannot leave agents and
        # operator with different tokens.
        await kube.patch_secret(namespace, secret_name, patch)
    return token
