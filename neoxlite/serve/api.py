"""The OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions, plus /health and /metrics.

The model loads on a thread while the server already answers (503 until it is ready). Each generation request
becomes a `neoxlite.batching.Request` on the shared Batcher; its tokens come back through an asyncio queue (one
wake-up of the event loop per decode step carries every row's token) and leave as text (whole characters only,
cut before any stop string), streamed as server-sent events or at once. A client that goes away, streaming or
not, cancels its request: the batcher frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from neoxlite.app.prompting import cut_at_stop, render
from neoxlite.app.prompting import stop_strings as chat_stop_strings
from neoxlite.batching import Batcher, Event, Finish, QueueFull, Token, eos_token_ids
from neoxlite.batching import Request as BatchRequest
from neoxlite.limits import check_text_fits
from neoxlite.serve.requests import ApiError, Generation, parse

# A generation request's body past this is refused (413) unread: a prompt that long fits no context anyway.
MAX_BODY_BYTES = 4 * 2**20


class Server:
    """The served model's name, the loading state, and the batcher that runs the requests.

    `batcher` gives that Batcher: called once on a loading thread (it may load the model; the server answers 503
    until it returns), and again whenever the one it gave was closed (the app's Models tab loaded another chat
    model, with `neoxlite serve --ui`).
    """

    def __init__(self, name: str, batcher: Callable[[], Batcher], *, api_key: str | None = None) -> None:
        self.name, self.api_key = name, api_key
        self.state = "loading"  # loading | ready | failed
        self.error = ""
        self.started = time.time()
        self.mailbox: _Mailbox | None = None  # made on the event loop's first request
        self._get_batcher = batcher
        self._batcher: Batcher | None = None

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._load_now, name="neoxlite-serve-load", daemon=True)
        thread.start()
        return thread

    def _load_now(self) -> None:
        try:
            self._batcher = self._get_batcher()
            self.state = "ready"
        except Exception as error:  # noqa: BLE001 - reported by every request, traceback to stderr once
            traceback.print_exc(file=sys.stderr)
            self.error, self.state = f"{type(error).__name__}: {error}", "failed"

    @property
    def batcher(self) -> Batcher | None:
        """The batcher to run on once loaded (None before)."""
        if self._batcher is not None and self._batcher.closed:
            self._batcher = self._get_batcher()
        return self._batcher

    @property
    def model(self) -> Any:
        return self.batcher.model if self.batcher is not None else None

    @property
    def tokenizer(self) -> Any:
        return self.batcher.tokenizer if self.batcher is not None else None

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()


def own_batcher(load: Callable[[], tuple[Any, Any]], **batching: Any) -> Callable[[], Batcher]:
    """A Server's `batcher` for a model of its own: loads it and makes its Batcher (keywords: Batcher's) once."""
    return functools.cache(lambda: Batcher(*load(), **batching))


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="neoxlite", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> Response:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        return _error_response(ApiError(error.status_code, str(error.detail), code=None))

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if server.state == "ready" else 503
        return JSONResponse({"status": server.state, "error": server.error or None}, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request) -> dict[str, Any]:
        _authorize(server, request)
        return _metrics(server)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(server, request)
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": int(server.started),
                                            "owned_by": "neoxlite"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _generate(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _generate(server, request, chat=True)

    return app


def _error_response(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    # ASCII JSON: a message that quotes the request's text may hold a lone surrogate, which UTF-8 cannot encode
    return Response(json.dumps(error.body()), error.status, headers, media_type="application/json")


def _authorize(server: Server, request: Request) -> None:
    if server.api_key is not None and not _key_given(request.headers.get("authorization", ""), server.api_key):
        raise ApiError(401, "missing or wrong API key: send the key given to --api-key as 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


def _key_given(authorization: str, key: str) -> bool:
    """Whether an Authorization header carries `key`: as a Bearer token, or as the password of HTTP Basic auth
    (what a browser sends after its login prompt; any user name)."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode().partition(":")[2]
        except ValueError:
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.encode(), key.encode())


class KeyRequired:
    """ASGI middleware: every request under `prefix` (the app with `serve --ui`, its page and its Gradio API) must
    carry the API key, as a Bearer token or as the password of the browser's login prompt (HTTP Basic)."""

    def __init__(self, app: ASGIApp, prefix: str, key: str) -> None:
        self.app, self.prefix, self.key = app, prefix.rstrip("/"), key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        guarded = scope["type"] in ("http", "websocket") and (path == self.prefix or path.startswith(self.prefix + "/"))
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"), "")
        if not guarded or _key_given(given, self.key):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            error = ApiError(401, f"{self.prefix} needs the server's API key: log in with any user name and the key "
                                  "given to --api-key as password, or send 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
            await _error_response(error, {"WWW-Authenticate": 'Basic realm="neoxlite", charset="UTF-8"'})(
                scope, receive, send)


def _ready(server: Server) -> Batcher:
    if server.state == "loading":
        raise ApiError(503, "the model is still loading; retry in a moment", kind="server_error",
                       code="model_loading")
    if server.state == "failed":
        raise ApiError(503, f"the model failed to load: {server.error}", kind="server_error", code="model_failed")
    try:
        batcher = server.batcher
    except ValueError as error:  # the app's Models tab unloaded the chat model
        raise ApiError(503, str(error), kind="server_error", code="model_unloaded") from None
    assert batcher is not None
    return batcher


async def _generate(server: Server, request: Request, chat: bool) -> Any:
    _authorize(server, request)
    batcher = _ready(server)
    try:
        body = json.loads(await _body(request))
    except ValueError as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON here: it nests arrays or objects too deeply") from None
    generation = parse(body, chat)
    if generation.model != server.name:
        raise ApiError(404, f"the model '{generation.model}' does not exist here; this server serves '{server.name}'",
                       "model", "model_not_found")
    vocab_size = batcher.model.config.vocab_size
    outside = [i for i in generation.logit_bias if not i < vocab_size]
    if outside:
        raise ApiError(400, f"logit_bias names token id {outside[0]}, but this model's token ids lie in "
                            f"[0, {vocab_size})", "logit_bias")
    prompt_ids, stops = _prompt(batcher, generation, chat)
    room = batcher.max_context - len(prompt_ids)
    max_tokens = generation.max_tokens if generation.max_tokens is not None else room
    if max_tokens > room:
        raise ApiError(400, f"this model's context holds {batcher.max_context} tokens, but the prompt takes "
                            f"{len(prompt_ids)} and max_tokens asks for {max_tokens}; lower max_tokens to {room} "
                            "or shorten the prompt", "max_tokens", "context_length_exceeded")
    loop = asyncio.get_running_loop()
    if server.mailbox is None or server.mailbox.loop is not loop:
        server.mailbox = _Mailbox(loop)
    events: asyncio.Queue = asyncio.Queue()
    eos_ids = eos_token_ids(batcher.model, batcher.tokenizer)
    job = BatchRequest(prompt_ids, max_tokens, generation.sampling, generation.seed, eos_ids, stops,
                       generation.presence_penalty, generation.frequency_penalty, generation.logprobs,
                       generation.logit_bias, sink=server.mailbox.sink(events))
    try:
        batcher.submit(job)
    except QueueFull as error:
        raise ApiError(429, str(error), kind="rate_limit_error", code="rate_limit_exceeded") from None
    reply = _Reply(server.name, batcher.tokenizer, generation, chat, len(prompt_ids), stops)
    if generation.stream:
        return StreamingResponse(_stream(reply, job, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        while not isinstance(event := await events.get(), Finish):
            reply.add(event)
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once finished; frees the row if this handler was cancelled
    reply.finish(event)
    if event.reason == "error":
        raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
    return reply.whole()


async def _body(request: Request) -> bytes:
    """The request's body, refused (413) once it passes MAX_BODY_BYTES, before the rest is read."""
    too_large = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB; send a shorter prompt "
                              "(no model's context holds that much text)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


async def _cancel_on_disconnect(request: Request, job: BatchRequest) -> None:
    """Cancels `job` when the client of a non-streaming request goes away (uvicorn does not cancel the handler;
    the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


class _Mailbox:
    """Events from the batcher's thread to the event loop. The first event after a delivery schedules the next
    delivery; the events that follow ride along, so a decode step of 16 rows wakes the loop once, not 16 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: deque[tuple[asyncio.Queue, Event]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def sink(self, events: asyncio.Queue) -> Callable[[Event], None]:
        """A Request sink (called on the batcher's thread) that puts its events into `events`."""
        def put(event: Event) -> None:
            with self._lock:
                self._pending.append((events, event))
                if self._scheduled:
                    return
                self._scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)
        return put

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, deque(), False
        for events, event in pending:
            events.put_nowait(event)


def _prompt(batcher: Batcher, generation: Generation, chat: bool) -> tuple[list[int], list[str]]:
    """The prompt's token ids (text refused from its length before tokenizing) and the stop strings."""
    tokenizer, context, vocab_size = batcher.tokenizer, batcher.max_context, batcher.model.config.vocab_size
    param = "messages" if chat else "prompt"
    stops = list(generation.stop)
    if isinstance(generation.prompt, list):  # token ids
        ids = generation.prompt
        if any(not 0 <= i < vocab_size for i in ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab_size})", "prompt")
    else:
        if chat:
            for m in generation.messages:
                _fits(m["content"], tokenizer, context, "message", param)
            system = "\n".join(m["content"] for m in generation.messages if m["role"] == "system")
            text = render(tokenizer, system, [m for m in generation.messages if m["role"] != "system"], "chat")
            stops += [s for s in chat_stop_strings(tokenizer) if s not in stops]  # the end of the assistant's turn
        else:
            text = generation.prompt
        _fits(text, tokenizer, context, "prompt", param)
        ids = tokenizer.encode(text)
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenizing", param)
    if len(ids) >= context:
        raise ApiError(400, f"the prompt takes {len(ids)} tokens; this model's context holds {context}, with room "
                            "for at least one new token", param, "context_length_exceeded")
    return ids, stops


def _fits(text: str, tokenizer: Any, context: int, what: str, param: str) -> None:
    """Refuses text too long for the context from its length, before tokenizing it."""
    try:
        check_text_fits(text, tokenizer, context, what)
    except ValueError as error:
        raise ApiError(400, str(error), param, "context_length_exceeded") from None


class _Reply:
    """Tokens -> the reply's text: whole characters only, held back where a stop string may begin, cut before
    one; the usage and the logprobs; and the OpenAI objects that carry them."""

    def __init__(self, model_name: str, tokenizer: Any, generation: Generation, chat: bool, prompt_tokens: int,
                 stops: list[str]) -> None:
        self.model_name, self.tokenizer = model_name, tokenizer
        self.generation, self.chat, self.stops = generation, chat, tuple(stops)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:self._read], decoded a few tokens at a time
        self._prefix = self._read = 0  # ids[_prefix:_read]: the last decoded piece, context for the next one
        self.shown = ""  # text already handed out
        self.stopped = False
        self.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list] | None = (
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if generation.logprobs is not None else None)
        self._pending_logprobs = 0  # tokens whose logprobs were not sent yet (streaming)

    def add(self, token: Token) -> str:
        """Takes one token; returns the text it adds that is safe to show now."""
        self.ids.append(token.id)
        if self.logprobs is not None:
            decode = self.tokenizer.decode
            self.logprobs["tokens"].append(decode([token.id]))
            self.logprobs["token_logprobs"].append(token.logprob)
            self.logprobs["top_logprobs"].append({decode([i]): p for i, p in token.top_logprobs})
            self.logprobs["text_offset"].append(len(self.shown))
            self._pending_logprobs += 1
        if self.stopped:
            return ""
        if not self._decode_new():
            return ""  # part of a character: wait for the rest
        return self._show(self.text, final=False)

    def _decode_new(self) -> bool:
        """Adds the text of the tokens not decoded yet to self.text (decoding only them and the piece before,
        so a reply costs linear time); False while they end inside a character."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if after.endswith("\ufffd") or not after.startswith(before):
            return False
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return True

    def _show(self, text: str, final: bool) -> str:
        safe, self.stopped = cut_at_stop(text, self.stops) if self.stops else (text, False)
        if final and not self.stopped:
            safe = text
        delta = safe[len(self.shown):] if safe.startswith(self.shown) else ""
        self.shown += delta
        return delta

    def finish(self, event: Finish) -> str:
        """Takes the Finish; returns the text held back until now."""
        delta = "" if self.stopped else self._show(self.tokenizer.decode(self.ids, skip_special_tokens=True),
                                                    final=True)
        self.finish_reason = "stop" if self.stopped or event.reason == "stop" else "length"
        self.usage.update(completion_tokens=event.completion_tokens,
                          total_tokens=event.prompt_tokens + event.completion_tokens)
        return delta

    def _choice(self, text: str, finish_reason: str | None, whole: bool) -> dict[str, Any]:
        if self.chat:
            key = "message" if whole else "delta"
            message = {"role": "assistant", "content": text} if whole else ({"content": text} if text else {})
            return {"index": 0, key: message, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": self._logprobs_since(whole), "finish_reason": finish_reason}

    def _logprobs_since(self, whole: bool) -> dict[str, list] | None:
        if self.logprobs is None:
            return None
        count = len(self.logprobs["tokens"]) if whole else self._pending_logprobs
        self._pending_logprobs = 0
        return {key: values[len(values) - count:] for key, values in self.logprobs.items()}

    def whole(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name,
                "choices": [self._choice(self.shown, self.finish_reason, whole=True)], "usage": self.usage}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        choice = self._choice(text, finish_reason, whole=False)
        if self.chat and first:
            choice["delta"] = {"role": "assistant", "content": text}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [choice],
                **({"usage": None} if self.generation.include_usage else {})}

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [], "usage": self.usage}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream(reply: _Reply, job: BatchRequest, events: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the finish, the usage when asked, then [DONE]. A client
    that goes away cancels this generator; its row is freed at the batcher's next step."""
    try:
        if reply.chat:
            yield _sse(reply.chunk("", first=True))
        while not isinstance(event := await events.get(), Finish):
            text = reply.add(event)
            if text or reply.logprobs is not None:
                yield _sse(reply.chunk(text))
        if event.reason == "error":
            yield _sse(ApiError(500, f"generation failed: {event.error}", kind="server_error").body())
        else:
            tail = reply.finish(event)
            yield _sse(reply.chunk(tail, reply.finish_reason))
            if reply.generation.include_usage:
                yield _sse(reply.usage_chunk())
        yield _sse("[DONE]")
    finally:
        job.cancel()


def _metrics(server: Server) -> dict[str, Any]:
    from neoxlite.app.engine import memory_now

    out: dict[str, Any] = {"model": server.name, "state": server.state, "uptime_s": round(time.time() - server.started)}
    batcher = server.batcher if server.state == "ready" else None
    if batcher is not None:
        out.update(batcher.metrics())
    memory: dict[str, Any] = dict(memory_now())
    plan = getattr(batcher.model if batcher is not None else None, "offload_plan", None)
    if plan is not None:
        memory["budgets"] = dict(plan.budgets)
    if batcher is not None:
        memory["kv_cache"] = out.pop("kv_cache_bytes")
    out["memory"] = memory
    return out
