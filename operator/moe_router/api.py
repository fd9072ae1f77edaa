"""Bodies of the router's HTTP API (docs/router.md), as pydantic models, one per boundary.

The OpenAI-compatible bodies are read only for what routing needs (the prompt, ``stream``) and
forwarded byte for byte; every other key passes through untouched. The router's own endpoints are
strict: JSON types must match and unknown keys are refused, so a malformed body is a 400 naming its
field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

Prompt = str | list[int] | list[str] | list[list[int]]


class OpenAIBody(BaseModel):
    """The keys of an OpenAI request the router reads; the rest pass through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    stream: bool = False


class CompletionBody(OpenAIBody):
    """``POST /v1/completions``."""

    prompt: Prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    role: str
    content: str | list[dict] | None = None


class ChatBody(OpenAIBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SignatureReport(Strict):
    """A finished request's expert signature, reported by the engine or its agent.

    signature: [L][E] share of the request's tokens choosing each expert per layer (each layer sums
    to k). The prompt is named by the ``request_id`` the router gave it (its
    ``X-Moeplace-Request-Id`` response header) or given again as ``prompt`` or ``messages``."""

    signature: list[list[float]] = Field(min_length=1)
    request_id: str | None = Field(None, min_length=1, max_length=256)
    prompt: Prompt | None = None
    messages: list[ChatMessage] | None = None


class SignatureAccepted(Strict):
    domain: int
    domains: int


class ScoreRequest(Strict):
    """llm-d scorer: one request (its prompt or chat messages) and the candidate ranks to score
    (default: every rank)."""

    prompt: Prompt | None = None
    messages: list[ChatMessage] | None = None
    candidates: list[int] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_prompt(self) -> ScoreRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class RankScore(Strict):
    rank: int
    score: float = Field(ge=0.0, le=1.0)


class ScoreResponse(Strict):
    """Scores in [0, 1] per candidate rank (higher: better), the domain the prompt was taken for
    (-1: none learned yet) and the rank the router itself would pick."""

    domain: int
    best_rank: int
    scores: list[RankScore]


class DomainState(Strict):
    """One learned domain: requests behind it, the share of its routed prompt tokens per node, the
    k experts it uses most per layer, and its signature [L][E]."""

    domain: int
    requests: float
    node_share: list[float]
    top_experts: list[list[int]]
    signature: list[list[float]]


class BackendState(Strict):
    rank: int
    url: str
    healthy: bool
    outstanding_tokens: float


class RouterState(Strict):
    """What the router publishes for the operator (``GET /router/v1/state``): its groups (domains)
    and the share of routed prompt tokens each node took (``node_request_share`` [N], all zero
    before the first request)."""

    num_layers: int
    num_experts: int
    num_nodes: int
    gpus_per_node: int
    load_cap: float
    has_placement: bool
    routed_requests: int
    node_request_share: list[float]
    domains: list[DomainState]
    backends: list[BackendState]


class ErrorBody(Strict):
    error: str
