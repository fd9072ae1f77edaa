"""Request bodies of the agent's HTTP API (docs/agent-api.md), as pydantic models.

Strict: JSON types must match (``"3"`` is not a layer), unknown keys are refused, so a malformed body
is a 400 that names its field. Range checks against the model (layer < L, ...) are 404s and belong to
``moe_agent.agent``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

RequestId = Field(min_length=1, max_length=256, description="Idempotency key chosen by the caller.")


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StageSource(Body):
    """Exactly one of a peer agent's base URL or a checkpoint directory."""

    peer: str | None = Field(None, pattern=r"^https?://[^/\s]+/?$", description="http://host:port")
    checkpoint: str | None = Field(None, min_length=1, description="Checkpoint directory.")

    @model_validator(mode="after")
    def _exactly_one(self) -> StageSource:
        if (self.peer is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of peer or checkpoint")
        return self


class StageRequest(Body):
    request_id: str = RequestId
    layer: int = Field(ge=0)
    slot: int = Field(ge=0)
    expert: int = Field(ge=0)
    source: StageSource


class RetireRequest(Body):
    request_id: str = RequestId
    layer: int = Field(ge=0)
    slot: int = Field(ge=0)


class ActivateRequest(Body):
    request_id: str = RequestId
    generation: int = Field(ge=0)
    physical_to_logical_map: list[list[int]]
