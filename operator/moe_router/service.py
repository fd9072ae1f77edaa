"""The router's HTTP service (aiohttp): OpenAI-compatible pass-through to an engine's DP ranks.

Each completion is routed by ``RequestRouter.route`` (the decision ``moeplace route`` makes
offline) and forwarded unchanged, to one engine URL with the rank in the ``X-Data-Parallel-Rank``
header (SGLang, vLLM) or to the rank's own URL. A backend that refuses the connection or drops it
before answering is left out for ``retry_after`` seconds and the request goes to the next best rank,
so no request is lost while one rank is up; once a response has started it is relayed as it comes
(streaming included) and a failure then ends it. Endpoints: docs/router.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from aiohttp import web
from pydantic import BaseModel, ValidationError

from moe_placement.models import PlacementError, format_validation_error
from moe_placement.request_routing import RequestRouter
from moe_router.api import (
    BackendState,
    ChatBody,
    ChatMessage,
    CompletionBody,
    DomainState,
    ErrorBody,
    Prompt,
    RankScore,
    RouterState,
    ScoreRequest,
    ScoreResponse,
    SignatureAccepted,
    SignatureReport,
)

RANK_HEADER = "X-Data-Parallel-Rank"
REMEMBERED_REQUESTS = 65536  # prompts kept for signature reports by request id
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
WORD = re.compile(r"\w+")


class BadRequest(Exception):
    """A request body the router cannot route; the message names the field."""


@dataclass
class BackendSet:
    """Where each rank's requests go, and which ranks are up.

    urls: [G] base URL per rank; rank_header: send the rank in ``X-Data-Parallel-Rank``;
    down_until: [G] monotonic time until which a rank is left out."""

    urls: list[str]
    rank_header: bool
    retry_after: float
    down_until: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.urls = [url.rstrip("/") for url in self.urls]
        self.down_until = [0.0] * len(self.urls)

    @staticmethod
    def by_header(url: str, num_ranks: int, retry_after: float = 5.0) -> BackendSet:
        return BackendSet([url] * num_ranks, True, retry_after)

    @staticmethod
    def by_url(urls: Sequence[str], num_ranks: int, retry_after: float = 5.0) -> BackendSet:
        urls = [url.strip() for url in urls if url.strip()]
        if len(urls) != num_ranks:
            raise PlacementError(f"backends: {len(urls)} URLs for {num_ranks} ranks (one per rank)")
        return BackendSet(list(urls), False, retry_after)

    def available(self) -> np.ndarray:
        """Ranks not left out now, [G] bool."""
        now = time.monotonic()
        return np.array([now >= until for until in self.down_until])

    def mark_down(self, rank: int) -> None:
        self.down_until[rank] = time.monotonic() + self.retry_after


def prompt_features(prompt: Prompt | None, messages: Sequence[ChatMessage] | None) -> list:
    """What the router reads of a prompt: its token ids, or its lower-cased words."""
    if messages is not None:
        texts = []
        for message in messages:
            if isinstance(message.content, str):
                texts.append(message.content)
            elif message.content:
                texts += [str(part.get("text", "")) for part in message.content]
        return WORD.findall(" ".join(texts).lower())
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return WORD.findall(prompt.lower())
    if prompt and isinstance(prompt[0], list):
        return [token for row in prompt for token in row]
    if prompt and isinstance(prompt[0], str):
        return WORD.findall(" ".join(prompt).lower())
    return list(prompt)


def _parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"body: not JSON ({error})") from None
    if not isinstance(document, dict):
        raise BadRequest("body: not a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise BadRequest(format_validation_error(error)) from None


def _error(status: int, message: str) -> web.Response:
    return web.json_response(ErrorBody(error=message).model_dump(), status=status)


class RouterService:
    """The aiohttp application around one ``RequestRouter`` and its backends."""

    def __init__(self, router: RequestRouter, backends: BackendSet, timeout_s: float = 600.0):
        if len(backends.urls) != router.topology.num_gpus:
            raise PlacementError(
                f"backends: {len(backends.urls)} for {router.topology.num_gpus} ranks"
            )
        self.router = router
        self.backends = backends
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0)
        self.routed_requests = 0
        self.prompts: OrderedDict[str, list] = OrderedDict()
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application()
        self.app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.models),
                web.post("/router/v1/signatures", self.report_signature),
                web.post("/router/v1/score", self.score),
                web.get("/router/v1/state", self.state),
                web.get("/healthz", self.healthz),
            ]
        )
        self.app.on_startup.append(self._open)
        self.app.on_cleanup.append(self._close)

    async def _open(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            timeout=self.timeout, connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )

    async def _close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    # -- OpenAI-compatible pass-through -----------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, CompletionBody)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, ChatBody)

    async def _proxy(self, request: web.Request, model: type[BaseModel]) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = _parse(model, raw)
        except BadRequest as error:
            return _error(400, str(error))
        features = prompt_features(getattr(body, "prompt", None), getattr(body, "messages", None))
        tokens = max(len(features), 1)
        domain = self.router.domain_of_prompt(features)
        request_id = uuid.uuid4().hex
        self._remember(request_id, features)
        tried = np.zeros(self.router.topology.num_gpus, dtype=bool)
        while True:
            available = self.backends.available() & ~tried
            if not available.any():
                return _error(503, "backends: no rank is up")
            rank = self.router.route(tokens, domain, available=available).rank
            tried[rank] = True
            try:
                response = await self._forward(request, raw, rank, domain, request_id)
                self.routed_requests += 1
                return response
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                self.backends.mark_down(rank)
            finally:
                self.router.finish(rank, tokens)

    async def _forward(
        self, request: web.Request, raw: bytes, rank: int, domain: int, request_id: str
    ) -> web.StreamResponse:
        """Send the body to ``rank``; connection failures before the response starts raise."""
        headers = {
            key: value
            for key, value in request.headers.items()
            if key.lower() not in HOP_BY_HOP and key.lower() != "host"
        }
        if self.backends.rank_header:
            headers[RANK_HEADER] = str(rank)
        url = self.backends.urls[rank] + request.path_qs
        assert self.session is not None
        async with self.session.post(url, data=raw, headers=headers) as upstream:
            routing_headers = {
                "X-Moeplace-Rank": str(rank),
                "X-Moeplace-Domain": str(domain),
                "X-Moeplace-Request-Id": request_id,
            }
            passed = {
                key: value for key, value in upstream.headers.items() if key.lower() not in HOP_BY_HOP
            }
            if "text/event-stream" not in upstream.headers.get("Content-Type", ""):
                payload = await upstream.read()
                return web.Response(
                    body=payload, status=upstream.status, headers={**passed, **routing_headers}
                )
            response = web.StreamResponse(status=upstream.status, headers={**passed, **routing_headers})
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                # The response has started: nothing to retry, the client sees it end early.
                self.backends.mark_down(rank)
            await response.write_eof()
            return response

    async def models(self, request: web.Request) -> web.Response:
        for rank in np.nonzero(self.backends.available())[0]:
            headers = {RANK_HEADER: str(rank)} if self.backends.rank_header else {}
            try:
                assert self.session is not None
                async with self.session.get(
                    self.backends.urls[rank] + "/v1/models", headers=headers
                ) as upstream:
                    return web.Response(
                        body=await upstream.read(),
                        status=upstream.status,
                        content_type=upstream.content_type,
                    )
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                self.backends.mark_down(int(rank))
        return _error(503, "backends: no rank is up")

    # -- learning and publishing ----------------------------------------------------------------

    def _remember(self, request_id: str, features: list) -> None:
        self.prompts[request_id] = features
        while len(self.prompts) > REMEMBERED_REQUESTS:
            self.prompts.popitem(last=False)

    async def report_signature(self, request: web.Request) -> web.Response:
        try:
            report = _parse(SignatureReport, await request.read())
        except BadRequest as error:
            return _error(400, str(error))
        if report.request_id is not None:
            if report.request_id not in self.prompts:
                return _error(404, f"request_id: {report.request_id!r} is not a request this router routed (or it was forgotten)")
            features = self.prompts[report.request_id]
        else:
            features = prompt_features(report.prompt, report.messages)
        shape = (self.router.num_layers, self.router.num_experts)
        signature = report.signature
        if len(signature) != shape[0] or any(len(row) != shape[1] for row in signature):
            return _error(400, f"signature: expected {shape[0]} layers x {shape[1]} experts")
        try:
            domain = self.router.learn(np.array(signature, dtype=np.float64), features)
        except PlacementError as error:
            return _error(400, str(error))
        accepted = SignatureAccepted(domain=domain, domains=len(self.router.signatures))
        return web.json_response(accepted.model_dump())

    async def score(self, request: web.Request) -> web.Response:
        try:
            body = _parse(ScoreRequest, await request.read())
        except BadRequest as error:
            return _error(400, str(error))
        num_ranks = self.router.topology.num_gpus
        candidates = body.candidates if body.candidates is not None else list(range(num_ranks))
        bad = [rank for rank in candidates if not 0 <= rank < num_ranks]
        if bad:
            return _error(400, f"candidates: ranks {bad} not in 0..{num_ranks - 1}")
        features = prompt_features(body.prompt, body.messages)
        domain = self.router.domain_of_prompt(features)
        scores = self.router.scores(max(len(features), 1), domain)
        scores = np.where(self.backends.available(), scores, 0.0)
        response = ScoreResponse(
            domain=domain,
            best_rank=int(max(candidates, key=lambda rank: scores[rank])),
            scores=[RankScore(rank=rank, score=float(scores[rank])) for rank in candidates],
        )
        return web.json_response(response.model_dump())

    def snapshot(self) -> RouterState:
        """What the router learned and where its requests went."""
        router = self.router
        share = router.node_share()
        top = router.topology
        k = int(round(router.signatures[0][0].sum())) if len(router.signatures) else 0
        available = self.backends.available()
        return RouterState(
            num_layers=router.num_layers,
            num_experts=router.num_experts,
            num_nodes=top.num_nodes,
            gpus_per_node=top.gpus_per_node,
            load_cap=router.load_cap,
            has_placement=router.on_node is not None,
            routed_requests=self.routed_requests,
            node_request_share=(
                router.routed_tokens.sum(0) / max(float(router.routed_tokens.sum()), 1e-12)
            ).tolist(),
            domains=[
                DomainState(
                    domain=domain,
                    requests=float(router.signature_weight[domain]),
                    node_share=share[domain].tolist(),
                    top_experts=np.argsort(-signature, axis=1, kind="stable")[:, :k].tolist(),
                    signature=signature.tolist(),
                )
                for domain, signature in enumerate(router.signatures)
            ],
            backends=[
                BackendState(
                    rank=rank,
                    url=url,
                    healthy=bool(available[rank]),
                    outstanding_tokens=float(router.outstanding[rank]),
                )
                for rank, url in enumerate(self.backends.urls)
            ],
        )

    async def state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.snapshot().model_dump())

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


def serve(
    router: RequestRouter, backends: BackendSet, host: str, port: int, timeout_s: float = 600.0
) -> None:
    """Run the service until interrupted."""
    service = RouterService(router, backends, timeout_s)
    web.run_app(
        service.app, host=host, port=port, print=None, access_log=None, shutdown_timeout=5.0
    )
