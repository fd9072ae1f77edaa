"""Conditions and the status subresource: pure condition arithmetic and one writer of merge patches.

Status is written through the typed models of ``moe_operator.crd`` (``MigrationStatus``,
``PlacementStatus``, ``Condition``), so that nothing the API server would prune is ever written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from moe_operator.crd import Condition, ConditionType, MigrationStatus, MoEDeploymentStatus
from moe_operator.kube import Kube

CONDITION_TYPES: tuple[ConditionType, ...] = ("Ready", "Balanced", "Migrating", "MetricsAvailable", "Degraded")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition], kind: ConditionType, status: str, reason: str, message: str = ""
) -> list[Condition]:
    """The conditions with ``kind`` set; lastTransitionTime changes only when the status does."""
    result = [condition for condition in conditions if condition.type != kind]
    previous = next((condition for condition in conditions if condition.type == kind), None)
    changed = previous is None or previous.status != status
    result.append(
        Condition(
            type=kind,
            status=status,
            reason=reason,
            message=message[:1000],
            last_transition_time=now_iso() if changed else previous.last_transition_time,
        )
    )
    order = {name: index for index, name in enumerate(CONDITION_TYPES)}
    return sorted(result, key=lambda condition: order[condition.type])


def condition_status(conditions: list[Condition], kind: ConditionType) -> str | None:
    return next((condition.status for condition in conditions if condition.type == kind), None)


def condition_reason(conditions: list[Condition], kind: ConditionType) -> str | None:
    return next((condition.reason for condition in conditions if condition.type == kind), None)


def phase_of(conditions: list[Condition], migration: MigrationStatus | None) -> str:
    if migration is not None and migration.state == "Running":
        return "Migrating"
    if condition_status(conditions, "Degraded") == "True":
        return "Degraded"
    if condition_status(conditions, "Ready") == "True":
        return "Ready"
    return "Pending"


def dump(model: BaseModel) -> dict[str, Any]:
    """A status model as the API server stores it (camelCase, no nulls)."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def _no_empty_strings(value: Any, in_list: bool = False) -> Any:
    """kube-apiserver 1.20 (as built here) reads an empty string back as null and then refuses it as
    "must be of type string": drop empty strings (a null in a merge patch deletes the key)."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if item == "":
                if not in_list:
                    result[key] = None
                continue
            result[key] = _no_empty_strings(item)
        return result
    if isinstance(value, list):
        return [_no_empty_strings(item, in_list=True) for item in value]
    return value


class StatusWriter:
    """Accumulates conditions and writes merge patches of the status subresource."""

    def __init__(self, kube: Kube, body: Mapping[str, Any]) -> None:
        self.kube = kube
        self.namespace = body["metadata"]["namespace"]
        self.name = body["metadata"]["name"]
        self.observed = MoEDeploymentStatus.model_validate(body.get("status") or {})
        self.conditions: list[Condition] = list(self.observed.conditions)
        self.migration: MigrationStatus | None = self.observed.migration

    def condition(self, kind: ConditionType, status: bool | None, reason: str, message: str = "") -> None:
        text = "Unknown" if status is None else ("True" if status else "False")
        self.conditions = set_condition(self.conditions, kind, text, reason, message)

    def status_of(self, kind: ConditionType) -> str | None:
        return condition_status(self.conditions, kind)

    async def patch(self, message: str | None = None, **fields: Any) -> None:
        """Merge-patch the status: ``fields`` by their camelCase names, models dumped."""
        if "migration" in fields:
            self.migration = fields["migration"]
        patch: dict[str, Any] = {key: dump(value) if isinstance(value, BaseModel) else value for key, value in fields.items()}
        patch["conditions"] = [dump(condition) for condition in self.conditions]
        patch.setdefault("phase", phase_of(self.conditions, self.migration))
        if message is not None:
            patch["message"] = message[:1000]
        MoEDeploymentStatus.model_validate(patch)
        await self.kube.patch_status(self.namespace, self.name, _no_empty_strings(patch))
