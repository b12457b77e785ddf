"""The HTTP side of `moepack serve`: an OpenAI-compatible API over the engine thread (FastAPI + uvicorn).

    POST /v1/chat/completions   chat through the pack's chat template (stream: server-sent events)
    POST /v1/completions        raw text (or token id) prompts
    GET  /v1/models             the one model served
    GET  /health                liveness, batch and queue sizes
    GET  /metrics               Prometheus text format

With an API key every /v1 route needs `Authorization: Bearer KEY` (401 otherwise); /health and /metrics stay
open for probes. The `model` field of a request is not checked: the server serves one model and answers
with its name. Omitted sampling values take OpenAI's defaults (temperature 1, top_p 1); max_tokens defaults
to the rest of the context. Bodies over `body_limit` bytes get 413, requests past the batch and the queue
429, bad input 400 with a message naming the field; the server never answers bad input with a 500."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moepack.errors import ConfigError, MoepackError
from moepack.runtime.config import SamplingParams
from moepack.serve.metrics import Metrics
from moepack.serve.protocol import ApiError, ChatRequest, CompletionRequest, validation_message
from moepack.serve.template import ChatTemplate, ChatTemplateError
from moepack.serve.worker import EngineWorker, Event, Job, QueueFullError, ShuttingDownError

MAX_TEMPERATURE = 2.0  # as OpenAI
DISCONNECT_POLL_S = 0.25  # a non-streaming request checks this often whether its client is still there


@dataclass
class ServerState:
    model: Any  # runtime.api.MoePackModel
    worker: EngineWorker
    template: ChatTemplate
    metrics: Metrics
    name: str
    api_key: str | None = None
    stop_ids: frozenset[int] = frozenset()  # end-of-turn tokens of chat requests
    body_limit: int = 1 << 20
    created: int = 0

    @property
    def context(self) -> int:
        return self.model.context


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moepack", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.moepack = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        state.metrics.request(request.url.path, exc.status)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       type_=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: say so in the error shape, keep serving
        state.metrics.request(request.url.path, 500)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))

    @app.get("/health")
    async def health():
        m = state.metrics.snapshot()
        return {"status": "ok", "model": state.name, "running": m["running"], "waiting": m["waiting"]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(state, request)
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(state, request)
        if name != state.name:
            raise ApiError(404, f"model {name!r} is not served here (this server serves {state.name!r})",
                           param="model", code="model_not_found")
        return model_card(state)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(state, request, chat=False)

    return app


def model_card(state: ServerState) -> dict:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "moepack",
            "context_length": state.context}


def check_key(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


async def read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def parse(state: ServerState, data: Any, chat: bool) -> ChatRequest | CompletionRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = (ChatRequest if chat else CompletionRequest).model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise ApiError(400, message, param=param) from None
    req.check_supported()
    return req


def prompt_ids(state: ServerState, req) -> list[int]:
    tok = state.model.tokenizer
    if isinstance(req, ChatRequest):
        if tok is None:
            raise ApiError(400, "this pack has no tokenizer, so it cannot chat; use /v1/completions with token ids")
        try:
            text = state.template.render(req.conversation(), add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return tok.encode(text, add_special_tokens=False).ids
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = state.model.spec.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, f"one prompt per request (got {len(prompt)})", param="prompt")
        prompt = prompt[0]
    if tok is None:
        raise ApiError(400, "this pack has no tokenizer: send the prompt as token ids", param="prompt")
    return tok.encode(prompt).ids


def sampling_for(state: ServerState, req, n_prompt: int) -> SamplingParams:
    context = state.context
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", param="prompt" if isinstance(req, CompletionRequest) else "messages")
    if n_prompt >= context:
        raise ApiError(400, f"the prompt is {n_prompt} tokens; this server's context is {context} tokens "
                            f"(prompt + max_tokens must fit)", code="context_length_exceeded")
    limit = req.token_limit
    if limit is None:
        limit = context - n_prompt
    elif limit < 1:
        raise ApiError(400, f"max_tokens must be at least 1, not {limit}", param="max_tokens")
    elif n_prompt + limit > context:
        raise ApiError(400, f"prompt ({n_prompt} tokens) + max_tokens ({limit}) exceed this server's context of "
                            f"{context} tokens", param="max_tokens", code="context_length_exceeded")
    t = 1.0 if req.temperature is None else float(req.temperature)
    if not 0 <= t <= MAX_TEMPERATURE:
        raise ApiError(400, f"temperature must lie in [0, {MAX_TEMPERATURE:g}] (0 is greedy), not {t:g}",
                       param="temperature")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise ApiError(400, f"seed must lie in [0, 2^63), not {req.seed}", param="seed")
    try:
        return SamplingParams(max_new_tokens=limit, temperature=t,
                              top_p=1.0 if req.top_p is None else float(req.top_p), seed=req.seed)
    except ConfigError as exc:
        param = next((p for p in ("temperature", "top_p", "seed") if p.replace("_", "-") in str(exc)), None)
        raise ApiError(400, str(exc).replace("--top-p", "top_p").replace("--", ""), param=param) from None


async def generate(state: ServerState, request: Request, *, chat: bool):
    check_key(state, request)
    req = parse(state, await read_json(request, state.body_limit), chat)
    ids = prompt_ids(state, req)
    sampling = sampling_for(state, req, len(ids))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    stops = req.stops() + (state.template.stop_strings if chat else ())  # the plain form's "\nUser:"
    job = Job(ids, sampling, emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), stop=stops,
              stop_ids=state.stop_ids if chat else frozenset())
    try:
        state.worker.submit(job)
    except QueueFullError as exc:
        raise ApiError(429, str(exc), type_="rate_limit_exceeded", code="queue_full") from None
    except ShuttingDownError as exc:
        raise ApiError(503, str(exc), type_="server_error") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if req.stream:
        state.metrics.request(request.url.path, 200)
        return StreamingResponse(stream(state, job, queue, rid, chat, req.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await complete(state, request, job, queue, rid, chat)


def usage(ev: Event) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


async def complete(state: ServerState, request: Request, job: Job, queue: asyncio.Queue, rid: str, chat: bool):
    parts: list[str] = []
    done = False
    checked = time.monotonic()
    getter = None  # one pending get, kept across polls, so that no event is lost to a timeout
    try:
        while True:
            if time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    state.metrics.request(request.url.path, 499)
                    return PlainTextResponse("", status_code=499)  # nobody reads it; `finally` frees the slot
            getter = getter or asyncio.ensure_future(queue.get())
            finished, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if not finished:
                continue
            ev, getter = getter.result(), None
            if ev.kind == "text":
                parts.append(ev.text)
                continue
            done = True
            if ev.kind == "error":
                raise ApiError(ev.status, ev.text, type_="server_error")
            break
    finally:
        if getter is not None:
            getter.cancel()
        if not done:
            state.worker.cancel(job)
    text, reason = "".join(parts), ev.finish_reason if ev.finish_reason != "cancelled" else "stop"
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": reason} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    state.metrics.request(request.url.path, 200)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": state.name, "choices": [choice], "usage": usage(ev)}


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def stream(state: ServerState, job: Job, queue: asyncio.Queue, rid: str, chat: bool, include_usage: bool):
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": state.name}

    def chunk(text: str | None, reason: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}

    done = False
    try:
        if chat:
            yield sse(chunk(None, role=True))
        while True:
            ev = await queue.get()
            if ev.kind == "text":
                yield sse(chunk(ev.text))
                continue
            done = True
            if ev.kind == "error":
                yield sse(ApiError(ev.status, ev.text, type_="server_error").body())
            else:
                yield sse(chunk(None, ev.finish_reason if ev.finish_reason != "cancelled" else "stop"))
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(ev)})
            yield sse("[DONE]")
            return
    finally:
        if not done:  # the client went away (or the server stops): free the slot now
            state.worker.cancel(job)


def build_state(model, *, name: str, worker: EngineWorker, metrics: Metrics, api_key: str | None) -> ServerState:
    """The server's state for a loaded MoePackModel: its chat template and end-of-turn tokens."""
    from moepack.serve.template import generation_eos_ids

    try:
        template = ChatTemplate.from_pack(model.pack)
    except ChatTemplateError:
        raise
    except MoepackError as exc:
        raise ChatTemplateError(f"cannot read the chat template: {exc}") from None
    eos = tuple(model.spec.eos_token_ids) + generation_eos_ids(model.pack)
    return ServerState(model=model, worker=worker, template=template, metrics=metrics, name=name, api_key=api_key,
                       stop_ids=template.stop_ids(model.tokenizer, eos), body_limit=max(1 << 20, 64 * model.context),
                       created=int(time.time()))
