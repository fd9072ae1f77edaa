"""The agent's HTTP contract (docs/agent-api.md): request and answer bodies, shared by the agent's
server (``moe_agent.server``) and the operator's client (``moe_operator.agents``).

Requests are strict: JSON types must match (``"3"`` is not a layer), unknown keys are refused, and
every integer is bounded, so a malformed body is a 400 that names its field, never a 500. Range
checks against the model (layer < L, ...) are 404s and belong to ``moe_agent.agent``. Answers are
read leniently (unknown keys ignored) so that an older operator can read a newer agent.

Shapes: L layers, N = G*S slots.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_INDEX = 2**31 - 1
MAX_GENERATION = 2**62
RequestId = Field(min_length=1, max_length=256, description="Idempotency key chosen by the caller.")
SlotState = Literal["empty", "staged", "live"]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


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
    """Copy an expert into an empty slot. ``timeout_seconds``: the agent gives up (and leaves the
    slot empty) after this long, so a caller that stopped waiting never leaves a staged orphan."""

    request_id: str = RequestId
    layer: int = Field(ge=0, le=MAX_INDEX)
    slot: int = Field(ge=0, le=MAX_INDEX)
    expert: int = Field(ge=0, le=MAX_INDEX)
    source: StageSource
    timeout_seconds: float | None = Field(None, gt=0, le=86400)


class RetireRequest(Body):
    request_id: str = RequestId
    layer: int = Field(ge=0, le=MAX_INDEX)
    slot: int = Field(ge=0, le=MAX_INDEX)


class ActivateRequest(Body):
    """physical_to_logical_map: [L, N], expert id per slot, -1 for an empty slot."""

    request_id: str = RequestId
    generation: int = Field(ge=0, le=MAX_GENERATION)
    physical_to_logical_map: list[list[int]] = Field(min_length=1)

    @field_validator("physical_to_logical_map")
    @classmethod
    def _rectangular_and_bounded(cls, rows: list[list[int]]) -> list[list[int]]:
        width = len(rows[0])
        for index, row in enumerate(rows):
            if len(row) != width:
                raise ValueError(f"row {index} has {len(row)} slots, row 0 has {width} (not rectangular)")
            if row and (min(row) < -1 or max(row) > MAX_INDEX):
                raise ValueError(f"row {index}: expert ids must be in -1..{MAX_INDEX}")
        return rows


class SlotEntry(Answer):
    layer: int
    slot: int
    expert: int
    state: SlotState


class PlacementAnswer(Answer):
    """``GET /v1/placement`` (and the answer of an activation): the live map and this rank's slots."""

    rank: int
    generation: int
    hash: str
    num_layers: int
    num_experts: int
    slots_per_gpu: int
    num_gpus: int
    physical_to_logical_map: list[list[int]]
    slots: list[SlotEntry] = Field(default_factory=list)
    retired: list[SlotEntry] = Field(
        default_factory=list, description="Dropped slots whose weights are kept for the grace period."
    )


class StageAnswer(Answer):
    layer: int
    slot: int
    expert: int
    state: SlotState
    bytes: int
    sha256: str
    seconds: float


class RetireAnswer(Answer):
    layer: int
    slot: int
    expert: int
    state: SlotState


class SparsePairs(Answer):
    """Pair counts (layer, first, second, count), each [P]."""

    layer: list[int] = Field(default_factory=list)
    first: list[int] = Field(default_factory=list)
    second: list[int] = Field(default_factory=list)
    count: list[int] = Field(default_factory=list)


class StatsAnswer(Answer):
    """``GET /v1/stats``: load [L, E] and sparse pairs of the current window."""

    rank: int
    window_seconds: float
    tokens: int
    num_layers: int
    num_experts: int
    load: list[list[float]]
    transitions: SparsePairs = Field(default_factory=SparsePairs)
    coactivation: SparsePairs = Field(default_factory=SparsePairs)


class ErrorAnswer(Answer):
    error: str
