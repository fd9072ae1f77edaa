"""The agents' HTTP answers that the operator reads, as pydantic models (docs/agent-api.md).

Here, in the package every side imports, so that an engine sidecar (``moe_agent.engines``) and the
operator (``moe_operator.engine_backend``) share one model of the boundary.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PlacementAnswer(BaseModel):
    """The body of ``GET /v1/placement`` (docs/agent-api.md), as an engine sidecar answers it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int
    generation: int
    hash: str
    num_layers: int
    num_experts: int
    slots_per_gpu: int
    num_gpus: int
    physical_to_logical_map: list[list[int]]
    slots: list[dict[str, int | str]]
