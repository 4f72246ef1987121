"""The ASGI application (Starlette): OpenAI's chat-completions API, the chat page, health and stats.

Handlers parse and check a request, decode its images in a worker thread,
and hand a `Job` to the model thread (`scheduler.Scheduler`); tokens come
back on the job's asyncio queue and go out as one JSON answer or as
server-sent events. Every failure is OpenAI's error JSON with its status;
nothing a client sends reaches it as a traceback or stops the server.
"""

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..batch import Request
from . import protocol
from .images import open_image
from .protocol import APIError
from .scheduler import Job, Scheduler

log = logging.getLogger("mlx_llava.serve")


@dataclass
class Settings:
    model_id: str = "mlx-llava"
    api_key: Optional[str] = None
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests waiting beyond those; more get 503
    max_body_mb: float = 32.0
    max_image_pixels: int = 25_000_000
    allow_local_files: bool = False
    prefix_cache_mb: float = 1024.0  # KV caches of shared prefixes kept; 0: none
    image_timeout: float = 30.0  # seconds to fetch an http(s) image

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def create_app(model, processor, settings: Optional[Settings] = None) -> Starlette:
    """The server's ASGI app for a loaded model; its model thread runs while the app does
    (`app.state.scheduler`)."""
    settings = settings or Settings()
    scheduler = Scheduler(model, processor, settings.max_batch, settings.max_queue,
                          int(settings.prefix_cache_mb * 1024 * 1024))
    created = int(time.time())

    def authorize(request: HTTPRequest):
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided" if token else
                           "You didn't provide an API key (Authorization: Bearer KEY)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def page(request):
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    async def health(request):
        return JSONResponse({"status": "ok", "model": settings.model_id})

    async def stats(request):
        authorize(request)
        return JSONResponse(scheduler.snapshot())

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": created, "owned_by": "mlx-llava"}

    async def models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request):
        authorize(request)
        if request.path_params["name"] != settings.model_id:
            raise unknown_model(request.path_params["name"])
        return JSONResponse(model_card())

    def unknown_model(name) -> APIError:
        return APIError(404, f"The model {name!r} does not exist: this server serves {settings.model_id!r}",
                        "model", "model_not_found")

    async def chat_completions(request):
        authorize(request)
        body = await read_body(request, settings.max_body_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise protocol.bad(f"the request body is not valid JSON ({e})") from None
        chat = protocol.parse_chat(data)
        if chat.model is not None and chat.model != settings.model_id:
            raise unknown_model(chat.model)
        images = []
        if chat.image_urls:
            images = await run_in_threadpool(
                lambda: [open_image(u, settings.max_image_pixels, settings.max_body_bytes,
                                    settings.allow_local_files, settings.image_timeout) for u in chat.image_urls])
        context = processor.context_length
        job = Job(Request(chat.messages, images, max_tokens=chat.max_tokens or context, temperature=chat.temperature,
                          top_p=chat.top_p, repetition_penalty=chat.repetition_penalty, seed=chat.seed),
                  chat.stop)
        scheduler.submit(job)
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            kind, value = await job.events.get()
            if kind == "error":
                raise value
            if kind == "gone":
                raise APIError(400, "the client went away")  # nobody reads this
        except BaseException:
            watcher.cancel()
            scheduler.cancel(job)
            raise
        cid = protocol.completion_id()
        if chat.stream:
            return StreamingResponse(stream(job, chat, cid, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = []
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    text.append(value)
                elif kind == "done":
                    job.finished = True
                    finish, prompt_tokens, completion_tokens = value
                    return JSONResponse(protocol.completion(cid, settings.model_id, "".join(text), finish,
                                                            prompt_tokens, completion_tokens))
                elif kind == "error":
                    job.finished = True
                    raise value
                elif kind == "gone":
                    raise APIError(400, "the client went away")
        finally:
            watcher.cancel()
            scheduler.cancel(job)  # nothing if it finished

    async def stream(job: Job, chat, cid: str, watcher):
        created_at = int(time.time())
        usage_field = chat.include_usage

        def event(data) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            yield event(protocol.chunk(cid, settings.model_id, created_at, {"role": "assistant", "content": ""},
                                       with_usage=usage_field))
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield event(protocol.chunk(cid, settings.model_id, created_at, {"content": value},
                                               with_usage=usage_field))
                elif kind == "done":
                    job.finished = True
                    finish, prompt_tokens, completion_tokens = value
                    yield event(protocol.chunk(cid, settings.model_id, created_at, {}, finish,
                                               with_usage=usage_field))
                    if chat.include_usage:
                        last = {"id": cid, "object": "chat.completion.chunk", "created": created_at,
                                "model": settings.model_id, "choices": [],
                                "usage": protocol.usage(prompt_tokens, completion_tokens)}
                        yield event(last)
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "error":  # the status is sent: the error goes in the stream
                    job.finished = True
                    yield event(value.body())
                    return
                elif kind == "gone":
                    return
        finally:
            watcher.cancel()
            scheduler.cancel(job)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        log.info("serving %s (up to %d requests at once, %d waiting)", settings.model_id, settings.max_batch,
                 settings.max_queue)
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.close)

    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(request, e: HTTPException):
        message = {404: f"Not found: {request.method} {request.url.path}",
                   405: f"Method {request.method} not allowed on {request.url.path}"}.get(e.status_code, e.detail)
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    async def server_error(request, e: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(APIError(500, f"internal server error ({type(e).__name__})").body(), status_code=500)

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/health", health),
            Route("/stats", stats),
            Route("/v1/models", models),
            Route("/v1/models/{name:path}", one_model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    app.state.settings = settings
    return app


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes (the rest is read and dropped up to
    twice the limit, so that the client gets to read the answer)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > 2 * limit + (1 << 20):
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            if size > 2 * limit + (1 << 20):
                break
            continue
        chunks.append(chunk)
    if size > limit:
        raise too_large(limit)
    return b"".join(chunks)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is more than this server's --max-body-mb "
                         f"({limit / (1 << 20):g} MB)", code="request_too_large")


async def watch_disconnect(request: HTTPRequest, job: Job):
    """Tell the job's reader when its client disconnects (the body is read: the
    next message can only be http.disconnect)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.events.put_nowait(("gone", None))
                return
    except asyncio.CancelledError:
        pass
    except Exception:  # the connection's own errors: treat as gone
        job.events.put_nowait(("gone", None))
