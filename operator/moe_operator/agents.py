"""Async HTTP client of the agents' API (docs/agent-api.md). Where the agents are (the rank mapping of
the agents Service's EndpointSlices or Endpoints) is ``moe_operator.discovery``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from moe_placement.agent_api import (
    ActivateRequest,
    ErrorAnswer,
    PlacementAnswer,
    RetireAnswer,
    RetireRequest,
    StageAnswer,
    StageRequest,
    StatsAnswer,
)
from moe_placement.models import format_validation_error

AnswerModel = TypeVar("AnswerModel", bound=BaseModel)

class AgentError(RuntimeError):
    """An agent call failed: ``status`` is the HTTP status (0: no answer), ``message`` the agent's error."""

    def __init__(self, url: str, call: str, status: int, message: str) -> None:
        super().__init__(f"{url} {call}: HTTP {status}: {message}" if status else f"{url} {call}: {message}")
        self.url = url
        self.call = call
        self.status = status
        self.message = message


@dataclass
class AgentClient:
    """Calls to agents; one aiohttp session, bearer token on ``/v1`` calls. Bodies and answers are
    the models of ``moe_placement.agent_api``."""

    token: str | None
    timeout_s: float = 30.0
    _session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=64, force_close=False),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def _call(
        self,
        url: str,
        call: str,
        answer: type[AnswerModel],
        method: str,
        path: str,
        body: BaseModel | None = None,
        params: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AnswerModel:
        session = await self.session()
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        try:
            async with session.request(
                method, url + path, json=payload, params=params, headers=self._headers(), timeout=timeout
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise AgentError(url, call, response.status, _error_message(text))
        except AgentError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as error:
            raise AgentError(url, call, 0, f"{type(error).__name__}: {error}") from None
        try:
            return answer.model_validate_json(text)
        except ValidationError as error:
            raise AgentError(url, call, 0, f"answer: {format_validation_error(error)}") from None

    async def placement(self, url: str) -> PlacementAnswer:
        return await self._call(url, "placement", PlacementAnswer, "GET", "/v1/placement")

    async def stats(self, url: str, top: int = 256) -> StatsAnswer:
        return await self._call(url, "stats", StatsAnswer, "GET", "/v1/stats", params={"top": str(top)})

    async def stage(self, url: str, body: StageRequest, timeout_s: float | None = None) -> StageAnswer:
        return await self._call(url, "stage", StageAnswer, "POST", "/v1/experts/stage", body, timeout_s=timeout_s)

    async def retire(self, url: str, body: RetireRequest) -> RetireAnswer:
        return await self._call(url, "retire", RetireAnswer, "POST", "/v1/experts/retire", body)

    async def activate(self, url: str, body: ActivateRequest) -> PlacementAnswer:
        return await self._call(url, "activate", PlacementAnswer, "POST", "/v1/placement/activate", body)


def _error_message(text: str) -> str:
    """The agent's ``error`` field, or the body as it is when it is not the agent's error JSON."""
    try:
        return ErrorAnswer.model_validate_json(text).error[:500]
    except ValidationError:
        return text[:500]
