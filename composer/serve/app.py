"""``compose serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a bundle or a checkpoint.

Routes: ``POST /v1/chat/completions`` (``stream: true``: server-sent events), ``GET /v1/models``,
``GET /health``. Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``:
400 a bad request (``param`` names the field), 401 a missing API key (``api_key``), 404 an unknown
model, 408 a body not received in time, 413 a body over the limit, 415 a body that is not JSON,
429 the queue is full, 500 a generation that failed (that request only), 503 shutting down or too
many bodies being received. Every limit (``Limits``) is checked before the work it bounds.
SIGTERM/SIGINT (uvicorn's graceful shutdown) stop accepting connections and let the requests in
flight finish before the process exits.

    from composer.serve import create_app
    app = create_app(OnnxPipeline("out/smol-demo.onnx"))   # any ASGI server runs it
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from composer.errors import ComposerError, first_line
from composer.serve.engine import Batcher, Job, QueueFull
from composer.serve.protocol import (
    Limits,
    RequestError,
    TextStream,
    check_limits,
    chunk,
    completion,
    completion_id,
    max_text_chars,
    parse_request,
    to_inputs,
    usage,
)

log = logging.getLogger("composer.serve")


def model_name(runtime) -> str:
    return runtime.name


def create_app(
    runtime,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    max_batch: int = 8,
    batch_wait_s: float = 0.01,
    api_key: str | None = None,
    allowed_hosts: list[str] | None = None,
):
    """The ASGI app serving ``runtime`` (an ``OnnxPipeline`` or a ``ComposedModel``) as ``name``
    (default: the spec's name). The batcher's thread starts and stops with the app's lifespan."""
    import threading

    limits = limits or Limits()
    srv = _Served(
        runtime=runtime,
        name=name or model_name(runtime),
        limits=limits,
        batcher=Batcher(runtime, max_batch=max_batch, batch_wait_s=batch_wait_s, max_queue=limits.max_queue),
        prepare_lock=threading.Lock(),  # one tokenizer / processor user at a time
        started=time.time(),
        text_chars=max_text_chars(runtime.tokenizer, getattr(runtime, "context_length", None)),
        state={"closing": False, "pending_body": 0},
    )
    hosts = None if allowed_hosts is None or "*" in allowed_hosts else {h.lower().strip("[]") for h in allowed_hosts}

    @asynccontextmanager
    async def lifespan(app):
        srv.batcher.start()
        log.info("serving %s (max batch %d, wait %.0f ms)", srv.name, max_batch, batch_wait_s * 1000)
        try:
            yield
        finally:
            srv.state["closing"] = True
            await run_in_threadpool(srv.batcher.close)

    app = FastAPI(title="composer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = srv.batcher
    app.add_middleware(_Guard, hosts=hosts, api_key=api_key)

    @app.get("/health")
    async def health():
        return {
            "status": "closing" if srv.state["closing"] else "ok",
            "model": srv.name,
            "waiting": srv.batcher.waiting,
            "batches": srv.batcher.batches,
            "rows": srv.batcher.rows,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": srv.name, "object": "model", "created": int(srv.started), "owned_by": "composer"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _chat(request, srv)

    return app


@dataclass
class _Served:
    """What one app's routes share: the runtime and its name, the limits, the batcher."""

    runtime: Any
    name: str
    limits: Limits
    batcher: Batcher
    prepare_lock: Any  # one tokenizer / processor user at a time
    started: float
    text_chars: int | None  # max_text_chars: more characters than could fit the context are refused
    state: dict  # "closing": shutting down; "pending_body": bytes of request bodies being received


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _chat(request: Request, srv: _Served):
    """``POST /v1/chat/completions``: the request checked and prepared, queued for the batcher,
    answered as server-sent events (``stream``) or one completion; every failure OpenAI's JSON error."""
    try:
        req, job = await _accept(request, srv)
    except RequestError as e:
        return _error(e)
    except Exception as e:  # noqa: BLE001 - a bug in preparing one request: that request's 500, as JSON
        log.exception("preparing a request failed")
        return _error(RequestError(f"internal error: {type(e).__name__}: {first_line(e)}", status=500))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
    try:
        srv.batcher.submit(job)
    except QueueFull as e:
        return _error(RequestError(f"server busy: {e}; retry later", status=429, kind="rate_limit_error"))
    text = TextStream(srv.runtime.tokenizer, req.stops)
    cid = completion_id()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(job, events, text, cid, srv.name, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(request, job, events, text, cid, srv.name)


async def _accept(request: Request, srv: _Served) -> tuple[Any, Job]:
    """The request read, parsed and checked against the limits, for this model, while the server
    is not closing; -> (the request, its prepared job). Raises ``RequestError``."""
    req = parse_request(await _read_json(request, srv.limits, srv.state))
    check_limits(req, srv.limits, srv.text_chars)
    if req.model != srv.name:
        raise RequestError(
            f"model: {req.model!r} is not served here (this server serves {srv.name!r})",
            param="model",
            status=404,
            kind="not_found_error",
        )
    if srv.state["closing"]:
        raise RequestError("the server is shutting down", status=503, kind="server_error")
    return req, await run_in_threadpool(_job, req, srv.runtime, srv.limits, srv.prepare_lock)


async def _complete(request: Request, job: Job, events: asyncio.Queue, text: TextStream, cid: str, name: str):
    """A non-streaming answer: the job's tokens until it ends or a stop string is out -> one
    completion (or a 500 error). The job is cancelled when this returns, however it returns."""
    loop = asyncio.get_running_loop()
    try:
        pieces, finish, n, checked = [], None, 0, [loop.time()]
        while finish is None:
            ev = await _next(events, request, job, checked)
            if ev[0] == "token":
                n += 1
                pieces.append(text.push(ev[1]))
                if text.stopped:  # the stop string is out: the tokens after it are not returned
                    finish = "stop"
            elif ev[0] == "end":
                finish = ev[1]
            else:
                return _error(RequestError(ev[1], status=500))
        pieces.append(text.finish())
        finish = "stop" if text.stopped else finish
        return completion(cid, name, "".join(pieces), finish, job.prompt_tokens, n)
    finally:
        job.cancelled = True  # stops the row if it still runs (the client left, or a stop string ended it)


class _Guard:
    """Before any route (a pure ASGI middleware: it leaves ``receive`` alone, so disconnects still
    reach ``request.is_disconnected``): the Host header (DNS rebinding: a web page's script reaching
    a server on 127.0.0.1 through a name it controls), the API key on ``/v1/`` routes, and a POST
    body's content type (a cross-site form POST is sent without a CORS preflight, as text/plain or
    a form)."""

    def __init__(self, app, hosts: set[str] | None, api_key: str | None):
        self.app, self.hosts, self.api_key = app, hosts, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refused = self._refused(scope)
            if refused is not None:
                await JSONResponse(refused.body(), status_code=refused.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refused(self, scope) -> RequestError | None:
        import hmac

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.hosts is not None and _host(headers.get("host", "")) not in self.hosts:
            return RequestError("Host header not allowed by this server (--allowed-host)", param="Host")
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return RequestError(
                    "invalid or missing API key (send Authorization: Bearer <key>)",
                    status=401,
                    kind="authentication_error",
                )
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return RequestError(f"Content-Type must be application/json, got {ctype or 'none'!r}", status=415)
        return None


DISCONNECT_CHECK_S = 0.25  # how often a non-streaming request checks that its client is still there


def _host(header: str) -> str:
    """The host name of a Host header, without the port: ``[::1]:8000`` -> ``::1``."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


async def _read_json(request, limits: Limits, state: dict) -> Any:
    """The request body as JSON: refused past ``max_body_bytes`` (from Content-Length when declared),
    when not received in full within ``body_timeout_s`` (408), and when the bodies being received
    by all requests together would pass ``max_pending_body_bytes`` (503)."""
    limit = limits.max_body_bytes
    budget = limits.max_pending_body_bytes or 4 * limit
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", status=413)
    body = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for piece in request.stream():
                if state["pending_body"] + len(piece) > budget:
                    raise RequestError("server busy: too many request bodies being received; retry later", status=503)
                body += piece
                state["pending_body"] += len(piece)
                if len(body) > limit:
                    raise RequestError(f"request body exceeds the limit of {limit} bytes", status=413)
    except TimeoutError:
        raise RequestError(f"request body not received within {limits.body_timeout_s:g} s", status=408) from None
    finally:
        state["pending_body"] -= len(body)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"invalid JSON body: {e}") from None
    except RecursionError:
        raise RequestError("invalid JSON body: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise RequestError(f"invalid JSON body: {first_line(e)}") from None


def _job(req, runtime, limits: Limits, lock) -> Job:
    """Validate and prepare one request (in a worker thread of the event loop): media decoded and
    checked, the prompt tokenized and preprocessed, the settings resolved."""
    import torch

    from composer.generation import resolve_generation
    from composer.prompting import check_context, check_window

    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise RequestError(f"{param}: {max_tokens} exceeds this server's limit of {limits.max_tokens}", param=param)
    greedy = req.temperature == 0
    try:
        sampling = resolve_generation(
            runtime.generation_spec,
            max_new_tokens=max_tokens,
            do_sample=None if req.temperature is None else not greedy,
            temperature=None if req.temperature is None or greedy else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            stop_strings=req.stops or None,
        )
    except ComposerError as e:
        field = str(e).split(":", 1)[0]
        raise RequestError(str(e), param={"max_new_tokens": "max_tokens"}.get(field, field)) from None
    if sampling.max_new_tokens > limits.max_tokens:
        sampling.max_new_tokens = limits.max_tokens  # the spec's default, capped
    try:
        with lock:  # media decoded and tokenized one request at a time: memory bounded by one request's limits
            prompt, media = to_inputs(req, runtime, limits)
            batch = runtime.prepare(**prompt, **media)
        check_context(batch["attention_mask"], sampling.max_new_tokens, runtime.context_length)
        check_window(batch["input_ids"].shape[1], sampling.max_new_tokens, runtime.sliding_window)
    except ComposerError as e:
        raise RequestError(first_line(e), param="messages") from None
    generator = None
    if sampling.do_sample:
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(6), "little")
        generator = torch.Generator().manual_seed(seed)
    return Job(batch=batch, sampling=sampling, emit=lambda ev: None, generator=generator)


async def _next(events: asyncio.Queue, request, job: Job, checked: list[float]) -> tuple:
    """The job's next event; every ``DISCONNECT_CHECK_S``, while tokens keep coming as while they do
    not, a check that the client is still there (``checked[0]``: when it was last checked): a client
    that disconnected cancels the job."""
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() - checked[0] > DISCONNECT_CHECK_S:
            checked[0] = loop.time()
            if await request.is_disconnected():
                job.cancelled = True
                return ("error", "the client disconnected")
        try:
            return await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
        except TimeoutError:
            pass


async def _sse(job: Job, events: asyncio.Queue, text: TextStream, cid: str, name: str, include_usage: bool):
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    n = 0
    try:
        yield sse(chunk(cid, name, {"role": "assistant", "content": ""}))
        finish = None
        while finish is None:
            ev = await events.get()
            if ev[0] == "token":
                n += 1
                piece = text.push(ev[1])
                if piece:
                    yield sse(chunk(cid, name, {"content": piece}))
                if text.stopped:
                    finish = "stop"
            elif ev[0] == "end":
                finish = ev[1]
            else:
                yield sse({"error": {"message": ev[1], "type": "server_error", "param": None, "code": None}})
                return
        rest = text.finish()
        if rest:
            yield sse(chunk(cid, name, {"content": rest}))
        yield sse(chunk(cid, name, {}, "stop" if text.stopped else finish))
        if include_usage:
            yield sse(chunk(cid, name, {}, usage_=usage(job.prompt_tokens, n)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a client that went away (the generator is closed early) frees its row
