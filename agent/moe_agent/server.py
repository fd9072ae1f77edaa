"""The agent's HTTP server (aiohttp): the API and metrics of docs/agent-api.md.

* ``/healthz`` and ``/metrics`` are open; every ``/v1/*`` call needs the bearer token, read from a
  file (re-read when it changes, as a mounted Kubernetes Secret is updated in place) or from
  ``MOEPLACE_AGENT_TOKEN``.
* Mutating calls are idempotent by ``request_id``: a repeated id gets the first answer and nothing
  runs again; a repeat that arrives while the first call still runs waits for its answer. Only
  answers of calls that succeeded are remembered: a failed call changed nothing, so repeating its id
  runs it again (the operator's retry after a peer failure). An id reused with a different body is
  a 409. Callers make ids unique per plan execution (docs/agent-api.md).
* A stage call carries ``timeout_seconds``: past it the agent abandons the copy and the slot stays
  empty. A background task drops staged slots that no activation claimed within
  ``staged_ttl_seconds`` and forgets retired weights after ``retired_grace_seconds``.
* Expert weights stream out as safetensors bytes with their sha256 in ``X-Moeplace-Sha256``, and
  stream in from a peer (checked against that header and the model's tensor shapes) or from a
  checkpoint directory.

Test-only faults of a source agent (never set in production): ``throttle_bytes_per_second`` slows
its weight streams, so a test can kill it mid-transfer; ``corrupt_transfers`` flips one byte of every
weight stream after the checksum is taken.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from moe_placement.models import format_validation_error
from moe_agent.agent import AgentCore, AgentError, Fetch, Fetched
from moe_placement.agent_api import ActivateRequest, RetireRequest, StageRequest, StageSource, StatsAnswer
from moe_agent.store import WeightsError, read_checkpoint, sha256_hex
from moe_agent.tokens import TokenSource

SHA256_HEADER = "X-Moeplace-Sha256"
CHUNK_BYTES = 1 << 20
REQUEST_LOG_SIZE = 4096

Answer = tuple[int, dict]


class RequestLog:
    """Answers of mutating calls by request id (the newest ``capacity`` ids)."""

    def __init__(self, capacity: int = REQUEST_LOG_SIZE):
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[str, asyncio.Future[Answer]]] = OrderedDict()

    async def run(self, request_id: str, fingerprint: str, action: Callable[[], Awaitable[Answer]]) -> Answer:
        entry = self._entries.get(request_id)
        if entry is not None:
            if entry[0] != fingerprint:
                return 409, {"error": f"request_id: {request_id!r} was already used for a different request"}
            # Shielded: a client that hangs up must not cancel the first caller's answer.
            return await asyncio.shield(entry[1])
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._entries[request_id] = (fingerprint, future)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        try:
            answer = await action()
        except BaseException as error:
            self._entries.pop(request_id, None)
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters get it, and asyncio does not warn
            raise
        if answer[0] >= 300:
            self._entries.pop(request_id, None)
        future.set_result(answer)
        return answer


@dataclass(frozen=True)
class ServerOptions:
    """Transfer settings; the two test-only faults are described in the module docstring."""

    transfer_timeout_seconds: float = 30.0
    staged_ttl_seconds: float = 600.0
    retired_grace_seconds: float = 120.0
    throttle_bytes_per_second: float | None = None
    corrupt_transfers: bool = False


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def body_fingerprint(kind: str, body: BaseModel) -> str:
    payload = body.model_dump(mode="json", exclude={"request_id"})
    return hashlib.sha256(json.dumps([kind, payload], sort_keys=True).encode()).hexdigest()


class AgentServer:
    """The aiohttp application of one agent."""

    def __init__(self, core: AgentCore, tokens: TokenSource, options: ServerOptions = ServerOptions()):
        self.core = core
        self.tokens = tokens
        self.options = options
        self.requests = RequestLog()
        self._session: aiohttp.ClientSession | None = None
        self.app = web.Application(middlewares=[self._errors_and_auth], client_max_size=64 << 20)
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
                web.get("/v1/placement", self.placement),
                web.get("/v1/stats", self.stats),
                web.get("/v1/experts/{layer}/{expert}/weights", self.weights),
                web.post("/v1/experts/stage", self.stage),
                web.post("/v1/experts/retire", self.retire),
                web.post("/v1/placement/activate", self.activate),
            ]
        )
        self.app.on_cleanup.append(self._close_session)
        self.app.cleanup_ctx.append(self._collector)

    # -- plumbing --------------------------------------------------------------------------------

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path.startswith("/v1/") and not self.tokens.accepts(request.headers.get("Authorization")):
            return error_response(401, "authorization: missing or wrong bearer token")
        try:
            return await handler(request)
        except AgentError as error:
            return error_response(error.status, error.message)
        except web.HTTPException as error:
            if error.status >= 400:
                return error_response(error.status, f"{request.method} {request.path}: {error.reason}")
            raise

    async def _collector(self, _app: web.Application):
        """Expire orphan staged slots and retired weights in the background."""
        period = max(0.05, min(self.options.staged_ttl_seconds, self.options.retired_grace_seconds, 20.0) / 4)

        async def loop() -> None:
            while True:
                await asyncio.sleep(period)
                self.core.collect(self.options.retired_grace_seconds, self.options.staged_ttl_seconds)

        task = asyncio.create_task(loop())
        yield
        task.cancel()

    async def _close_session(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.options.transfer_timeout_seconds, sock_read=self.options.transfer_timeout_seconds
            )
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    @staticmethod
    async def _parse(request: web.Request, model: type[BaseModel]) -> BaseModel:
        try:
            raw = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AgentError(400, "body: not a JSON document") from None
        except RecursionError:
            raise AgentError(400, "body: nested too deeply") from None
        if not isinstance(raw, dict):
            raise AgentError(400, "body: not a JSON object")
        try:
            return model.model_validate(raw)
        except ValidationError as error:
            raise AgentError(400, format_validation_error(error)) from None

    async def _mutation(
        self,
        request: web.Request,
        kind: str,
        model: type[BaseModel],
        action: Callable[[BaseModel], Awaitable[BaseModel]],
    ) -> web.Response:
        """Parse, deduplicate by request id, run, count in the metrics, answer."""
        try:
            body = await self._parse(request, model)
        except AgentError:
            self.core.metrics.migration(kind, ok=False)
            raise

        async def run() -> Answer:
            try:
                answer = await action(body)
            except AgentError as error:
                self.core.metrics.migration(kind, ok=False)
                return error.status, {"error": error.message}
            payload = answer.model_dump(mode="json")
            self.core.metrics.migration(kind, ok=True, received_bytes=payload.get("bytes", 0))
            return 200, payload

        status, payload = await self.requests.run(body.request_id, body_fingerprint(kind, body), run)
        return web.json_response(payload, status=status)

    # -- open endpoints --------------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.core.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- reads -----------------------------------------------------------------------------------

    async def placement(self, _request: web.Request) -> web.Response:
        return web.json_response(self.core.placement_answer().model_dump(mode="json"))

    async def stats(self, request: web.Request) -> web.Response:
        try:
            top = int(request.query.get("top", "256"))
        except ValueError:
            raise AgentError(400, f"top: {request.query['top']!r} is not an integer") from None
        if top < 0:
            raise AgentError(400, f"top: {top} must be >= 0")
        snapshot = await asyncio.to_thread(self.core.recorder.snapshot, top)

        def pairs(sparse) -> dict:
            return {
                "layer": sparse.layer.tolist(),
                "first": sparse.first.tolist(),
                "second": sparse.second.tolist(),
                "count": [int(c) for c in sparse.count],
            }

        answer = StatsAnswer(
            rank=self.core.rank,
            window_seconds=round(snapshot.window_seconds, 3),
            tokens=snapshot.tokens,
            num_layers=self.core.shape.num_layers,
            num_experts=self.core.shape.num_experts,
            load=snapshot.load.tolist(),
            transitions=pairs(snapshot.transitions),
            coactivation=pairs(snapshot.coactivation),
        )
        return web.json_response(answer.model_dump(mode="json"))

    async def weights(self, request: web.Request) -> web.StreamResponse:
        layer = _path_int(request, "layer")
        expert = _path_int(request, "expert")
        entry = self.core.slot_holding(layer, expert)
        data = await asyncio.to_thread(entry.weights.to_bytes)
        if entry.sha256 is None:
            # Serialisation is deterministic, so the digest of a slot's weights is computed once.
            entry.sha256 = await asyncio.to_thread(sha256_hex, data)
        digest = entry.sha256
        if self.options.corrupt_transfers:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(data)),
                SHA256_HEADER: digest,
            }
        )
        await response.prepare(request)
        throttle = self.options.throttle_bytes_per_second
        # Throttled, write small chunks (20 a second) so the bytes really trickle out.
        chunk_bytes = max(int(throttle // 20), 1) if throttle else CHUNK_BYTES
        view = memoryview(data)
        for offset in range(0, len(data), chunk_bytes):
            chunk = view[offset : offset + chunk_bytes]
            await response.write(chunk)
            if throttle:
                await asyncio.sleep(len(chunk) / throttle)
        await response.write_eof()
        return response

    # -- migration steps -------------------------------------------------------------------------

    async def stage(self, request: web.Request) -> web.Response:
        async def action(body: StageRequest) -> BaseModel:
            fetch = self._fetch_peer(body, body.source) if body.source.peer else self._fetch_checkpoint(body, body.source)
            return await self.core.stage(body.layer, body.slot, body.expert, fetch, body.timeout_seconds)

        return await self._mutation(request, "stage", StageRequest, action)

    async def retire(self, request: web.Request) -> web.Response:
        async def action(body: RetireRequest) -> BaseModel:
            return self.core.retire(body.layer, body.slot)

        return await self._mutation(request, "retire", RetireRequest, action)

    async def activate(self, request: web.Request) -> web.Response:
        async def action(body: ActivateRequest) -> BaseModel:
            return self.core.activate(body.generation, body.physical_to_logical_map)

        return await self._mutation(request, "activate", ActivateRequest, action)

    def _fetch_peer(self, body: StageRequest, source: StageSource) -> Fetch:
        url = f"{source.peer.rstrip('/')}/v1/experts/{body.layer}/{body.expert}/weights"

        async def fetch() -> Fetched:
            headers = {"Authorization": f"Bearer {self.tokens.current()}"}
            try:
                async with self._client().get(url, headers=headers) as response:
                    if response.status != 200:
                        detail = (await response.text())[:300]
                        raise AgentError(502, f"peer: {url} answered {response.status}: {detail}")
                    expected = response.headers.get(SHA256_HEADER)
                    if not expected:
                        raise AgentError(502, f"peer: {url} sent no {SHA256_HEADER} header")
                    chunks, digest = [], hashlib.sha256()
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        chunks.append(chunk)
                        digest.update(chunk)
                    # aiohttp raises when the body ends short of Content-Length (peer gone mid-way).
                    return Fetched(b"".join(chunks), expected.lower(), digest.hexdigest())
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                raise AgentError(
                    502, f"peer: transfer from {url} failed ({type(error).__name__}: {error}); slot {body.slot} stays empty"
                ) from None

        return fetch

    def _fetch_checkpoint(self, body: StageRequest, source: StageSource) -> Fetch:
        def read() -> Fetched:
            data, recorded = read_checkpoint(source.checkpoint, body.layer, body.expert)
            return Fetched(data, recorded, sha256_hex(data))

        async def fetch() -> Fetched:
            try:
                return await asyncio.to_thread(read)
            except FileNotFoundError as error:
                raise AgentError(404, f"checkpoint: {error.filename} not found") from None
            except (OSError, WeightsError) as error:
                raise AgentError(502, f"checkpoint: {error}") from None

        return fetch


def _path_int(request: web.Request, name: str) -> int:
    value = request.match_info[name]
    try:
        return int(value)
    except ValueError:
        raise AgentError(404, f"{name}: {value!r} is not a number") from None
