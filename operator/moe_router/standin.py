"""A stand-in OpenAI-compatible engine rank for tests, benchmarks and demos: it answers
``/v1/completions`` and ``/v1/chat/completions`` (streaming too) with the rank that served, taken
from the ``X-Data-Parallel-Rank`` header when present (one URL for all ranks, as SGLang and vLLM
take it) or its own ``--rank``. ``python -m moe_router.standin --port P [--rank R] [--delay-ms D]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

RANK_HEADER = "X-Data-Parallel-Rank"
STREAM_CHUNKS = 3


def build_app(rank: int, delay_s: float) -> web.Application:
    async def complete(request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except json.JSONDecodeError:
            return web.json_response({"error": "body: not JSON"}, status=400)
        served = int(request.headers.get(RANK_HEADER, rank))
        if delay_s:
            await asyncio.sleep(delay_s)
        chat = request.path.endswith("/chat/completions")
        created = int(time.time())
        if not body.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": f"rank {served}"}}
                if chat
                else {"index": 0, "text": f"rank {served}"}
            )
            return web.json_response(
                {
                    "id": f"standin-{served}",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": body.get("model", "standin"),
                    "choices": [{**choice, "finish_reason": "stop"}],
                    "served_rank": served,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(STREAM_CHUNKS):
            delta = {"delta": {"content": f"{index}"}} if chat else {"text": f"{index}"}
            chunk = {"id": f"standin-{served}", "choices": [{"index": 0, **delta}], "served_rank": served}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "standin", "object": "model"}]})

    app = web.Application()
    app.add_routes(
        [
            web.post("/v1/completions", complete),
            web.post("/v1/chat/completions", complete),
            web.get("/v1/models", models),
        ]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rank", type=int, default=0, help="rank served without the header")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="time each answer takes")
    args = parser.parse_args()
    web.run_app(
        build_app(args.rank, args.delay_ms / 1e3),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
