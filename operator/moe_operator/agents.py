"""Async HTTP client of the agents' API (docs/agent-api.md). Where the agents are (the rank mapping of
the agents Service's EndpointSlices or Endpoints) is ``moe_operator.discovery``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np


class AgentError(RuntimeError):
    """An agent call failed: ``status`` is the HTTP status (0: no answer), ``message`` the agent's error."""

    def __init__(self, url: str, call: str, status: int, message: str) -> None:
        super().__init__(f"{url} {call}: HTTP {status}: {message}" if status else f"{url} {call}: {message}")
        self.url = url
        self.call = call
        self.status = status
        self.message = message

    @property
    def unreachable(self) -> bool:
        return self.status == 0


@dataclass
class AgentClient:
    """Calls to agents; one aiohttp session, bearer token on ``/v1`` calls."""

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
        self, url: str, call: str, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        session = await self.session()
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            async with session.request(
                method, url + path, json=body, params=params, headers=self._headers(), timeout=timeout
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    message = text
                    try:
                        message = _json(text).get("error", text)
                    except Exception:  # noqa: BLE001 - a non-JSON error body is shown as is
                        pass
                    raise AgentError(url, call, response.status, str(message)[:500])
                return _json(text)
        except AgentError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as error:
            raise AgentError(url, call, 0, f"{type(error).__name__}: {error}") from None

    async def placement(self, url: str) -> dict[str, Any]:
        return await self._call(url, "placement", "GET", "/v1/placement")

    async def stats(self, url: str, top: int = 256) -> dict[str, Any]:
        return await self._call(url, "stats", "GET", "/v1/stats", params={"top": str(top)})

    async def stage(
        self, url: str, request_id: str, layer: int, slot: int, expert: int, peer: str,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        body = {
            "request_id": request_id,
            "layer": int(layer),
            "slot": int(slot),
            "expert": int(expert),
            "source": {"peer": peer},
        }
        return await self._call(url, "stage", "POST", "/v1/experts/stage", body, timeout_s=timeout_s)

    async def retire(self, url: str, request_id: str, layer: int, slot: int) -> dict[str, Any]:
        body = {"request_id": request_id, "layer": int(layer), "slot": int(slot)}
        return await self._call(url, "retire", "POST", "/v1/experts/retire", body)

    async def activate(
        self, url: str, request_id: str, generation: int, mapping: np.ndarray | Sequence[Sequence[int]]
    ) -> dict[str, Any]:
        body = {
            "request_id": request_id,
            "generation": int(generation),
            "physical_to_logical_map": np.asarray(mapping).tolist(),
        }
        return await self._call(url, "activate", "POST", "/v1/placement/activate", body)


def _json(text: str) -> Any:
    return json.loads(text) if text else {}
