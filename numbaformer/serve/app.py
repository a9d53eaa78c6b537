"""The FastAPI app: OpenAI routes, validation into the error envelope, the API key and body cap,
admission (429 past a bounded queue), /health, /metrics. Handlers parse, validate, tokenize and
wait on their job's queue (serve.bridge); the engine thread alone runs the model.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from . import openai as oa
from .bridge import Bridge, Job
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, CompletionRequest, check_limits, check_prompt_ids,
                       check_request, param_of, parse_logit_bias)

DISCONNECT_POLL_S = 0.1
OPEN_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/redoc")


@dataclass
class Settings:
    model_name: str = "numbaformer"
    api_key: str | None = None
    max_queue: int = 64                 # requests waiting beyond the running ones; then 429
    max_body: int = 4 << 20             # bytes; larger bodies: 413
    retry_after_s: int = 1
    n_predict: int = -1                 # caps each request's max_tokens (-1: the context)


class Guard:
    """ASGI middleware before the app: the API key (401) on the /v1 routes, then the body cap
    (413, by Content-Length or by counting a chunked body), the body handed on already read."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        key = self.settings.api_key
        if key and not scope["path"].startswith(OPEN_PATHS) and \
                headers.get("authorization", "") != f"Bearer {key}":
            return await _send_error(send, APIError(
                401, "invalid or missing API key (Authorization: Bearer KEY)",
                type="authentication_error", code="invalid_api_key"))
        cap = self.settings.max_body
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            return await _send_error(send, _too_large(cap))
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return                                  # gone before the body arrived
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                return await _send_error(send, _too_large(cap))
            if not msg.get("more_body"):
                break
        body, sent = b"".join(chunks), False
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            # OpenAI's API and llama-server read any body as JSON; so do we (curl -d sends a
            # form content type)
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"]
                                         if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")])

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(cap: int) -> APIError:
    return APIError(413, f"request body larger than {cap} bytes", code="request_too_large")


async def _send_error(send, err: APIError) -> None:
    data = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _error_response(err: APIError, metrics: Metrics | None = None) -> JSONResponse:
    if metrics:
        metrics.error(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    e = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if e.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON: {e.get('ctx', {}).get('error', e['msg'])}")
    param = param_of(e.get("loc", ()))
    if e.get("type") == "missing" and param is None:
        return APIError(400, "the request needs a JSON body")
    return APIError(400, f"{param or 'body'}: {e.get('msg', 'invalid value')}", param)


class Service:
    """What the routes share: the bridge, the settings, the metrics, the requests in flight."""

    def __init__(self, bridge: Bridge, settings: Settings, metrics: Metrics | None):
        self.bridge, self.settings, self.metrics = bridge, settings, metrics
        self.in_flight = 0
        self.started = int(time.time())

    def engine(self):
        """The loaded engine, or 503 while it loads (or after it failed)."""
        b = self.bridge
        if b.failure:
            raise APIError(503, f"the model failed to load: {b.failure}", type="server_error")
        if not b.ready.is_set():
            raise APIError(503, "the model is loading", type="server_error",
                           headers={"Retry-After": "5"})
        if not b.thread.is_alive():
            raise APIError(503, "the engine thread has stopped", type="server_error")
        return b.engine

    def admit(self, job: Job) -> None:
        """Hand job to the engine thread, or 429 when -np + --max-queue are in flight."""
        if self.in_flight >= self.bridge.n_seqs + self.settings.max_queue:
            raise APIError(429, "the server is busy: too many requests in flight, retry later",
                           type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.in_flight += 1
        job.loop, job.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.bridge.submit(job)

    def release(self, job: Job) -> None:
        """The handler's side of job is over (once, from whichever end comes first): cancel it
        on the engine thread unless it finished."""
        if not job.released:
            job.released = True
            self.in_flight -= 1
            self.bridge.cancel(job)

    async def respond(self, job: Job, req, request: Request, chat: bool):
        """Run job; the SSE stream or the whole response."""
        self.admit(job)
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        tok, name = self.bridge.engine.tokenizer, self.settings.model_name
        logprobs = job.n_logprobs is not None
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            events = oa.sse_events(self._deltas(job), tok, rid, name, chat=chat,
                                   include_usage=include, logprobs=logprobs)
            return _Stream(events, on_close=lambda: self.release(job),
                           media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            deltas = await self._collect(job, request)
            if deltas is None:
                return Response(status_code=499)    # nobody reads it; the job is cancelled
            return oa.whole_response(deltas, tok, rid, name, chat=chat, logprobs=logprobs)
        finally:
            self.release(job)

    async def _deltas(self, job: Job):
        try:
            while True:
                d = await job.queue.get()
                yield d
                if d.finish_reason or d.error:
                    return
        finally:
            self.release(job)

    async def _collect(self, job: Job, request: Request) -> list | None:
        """All of job's deltas (raising its error), or None when the client went away: asked
        every DISCONNECT_POLL_S whether deltas arrive meanwhile or not (a running job sends one
        each engine step, far more often than that)."""
        deltas, loop = [], asyncio.get_running_loop()
        t_check = loop.time()
        while True:
            try:
                d = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                d = None
            if loop.time() - t_check >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    return None
                t_check = loop.time()
            if d is None:
                continue
            if d.error:
                raise d.error
            deltas.append(d)
            if d.finish_reason:
                return deltas


def _error_handlers(app: FastAPI, metrics: Metrics | None) -> None:
    """Every error in OpenAI's envelope; an unexpected one a 500 without a traceback."""

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return _error_response(exc, metrics)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        return _error_response(_validation_error(exc), metrics)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind), metrics)

    @app.exception_handler(Exception)
    async def on_other(request, exc):
        print(f"numbaformer serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _error_response(APIError(500, "internal server error", type="server_error"),
                               metrics)


def create_app(bridge: Bridge, settings: Settings, metrics: Metrics | None = None):
    """The ASGI app over a Bridge (started and stopped by the app's lifespan)."""
    svc = Service(bridge, settings, metrics)

    @asynccontextmanager
    async def lifespan(app):
        bridge.start()
        yield
        bridge.stop()

    app = FastAPI(title="numbaformer", version="0.1.0", lifespan=lifespan)
    _error_handlers(app, metrics)

    @app.get("/health")
    async def health():
        svc.engine()
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        if metrics is None:
            raise APIError(404, "metrics are off", type="not_found_error")
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        eng = svc.engine()
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": svc.started,
            "owned_by": "numbaformer",
            "meta": {"n_ctx": eng.model.n_ctx, "n_vocab": eng.config.n_vocab}}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        eng = svc.engine()
        check_request(req)
        ids = await run_in_threadpool(_chat_ids, eng, req)
        job = _job(eng, req, ids, req.max_completion_tokens or req.max_tokens, "messages",
                   settings.n_predict)
        return await svc.respond(job, req, request, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        eng = svc.engine()
        check_request(req)
        ids = await run_in_threadpool(_prompt_ids, eng, req.prompt)
        job = _job(eng, req, ids, req.max_tokens, "prompt", settings.n_predict)
        return await svc.respond(job, req, request, chat=False)

    return app


class _Stream(StreamingResponse):
    """A StreamingResponse that calls on_close however it ends: a client gone before the body
    iterator even started (whose `finally` then never runs) still releases its job."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _chat_ids(eng, req: ChatRequest) -> list[int]:
    """The prompt ids of a chat: the messages through the model's chat template (400 when the
    template raises)."""
    from ..chat_template import ChatTemplateError, render_model_chat
    msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = render_model_chat(eng.mf.gguf.metadata, eng.tokenizer, msgs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), "messages") from None
    return eng.tokenizer.encode(text, add_special=True, parse_special=True)


def _prompt_ids(eng, prompt) -> list[int]:
    """A completion's prompt: a string (tokenized with special tokens parsed) or token ids, alone
    or as a list of one."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        return eng.tokenizer.encode(prompt, add_special=True, parse_special=True)
    ids = list(prompt)
    check_prompt_ids(ids, eng.config.n_vocab)
    return ids


def _job(eng, req, ids: list[int], max_tokens: int | None, what: str, cap: int = -1) -> Job:
    """The engine job of a validated request: limits against the context (then the server's
    cap, -n), sampling params."""
    n = check_limits(len(ids), max_tokens, eng.model.n_ctx, what)
    n = min(n, cap) if cap > 0 else n
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p or 0.0, repeat_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0, seed=req.seed)
    try:
        params.validate()
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return Job(ids, n, params, req.stops(), parse_logit_bias(req.logit_bias, eng.config.n_vocab),
               req.n_logprobs(), req.ignore_eos)


def _check_listen(host: str, port: int) -> None:
    """OSError with one line when host:port cannot be listened on (in use, no such address),
    before anything loads (uvicorn would log its own error and exit 1 after starting up)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(load, *, host: str, port: int, n_seqs: int, max_batched_tokens: int,
        settings: Settings, graceful_s: int = 30, decode_steps: int = 1) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's: stop accepting, let in-flight requests finish for
    up to graceful_s, then end them), loading the model on the engine thread meanwhile (/health:
    503 until it is ready). Returns the exit code: 0, or 2 when the model failed to load (a
    one-line error on stderr; the server does not stay up half-working)."""
    import uvicorn
    _check_listen(host, port)
    metrics = Metrics()
    server_box: list = []

    def on_fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        if server_box:
            server_box[0].should_exit = True

    bridge = Bridge(load, n_seqs, max_batched_tokens, metrics, on_fail, decode_steps)
    app = Guard(create_app(bridge, settings, metrics), settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=graceful_s, access_log=False)
    server = uvicorn.Server(config)
    server_box.append(server)
    # uvicorn re-raises the SIGTERM it shut down for, under the handler it found: exit 0 then
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2 if bridge.failure else 0))
    print(f"numbaformer serve: listening on http://{host}:{port} (model loading; GET /health "
          f"is 200 when ready)", file=sys.stderr, flush=True)
    server.run()
    return 2 if bridge.failure else 0
