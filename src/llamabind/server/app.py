"""The ASGI app (Starlette): OpenAI's ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/v1/models`` over one ``Engine``, so that concurrent requests share one
context with continuous batching; ``/health``. Streams are server-sent events; a client that
goes away cancels its request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Iterable, TypeVar

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..embeddings import Embedder
from ..engine import AsyncEngine, Engine, Event
from ..errors import BusyError, ClosedError, ContextOverflowError, InvalidInputError, LlamaError
from ..generation.chatprep import CHAT_OPTIONS, prepare_chat, uses_jinja
from ..generation.events import DoneEvent
from ..model import Model
from ..sampler import TOKEN_DATA, Sampler
from .params import APIError, Call, Limits, chat_call, completion_call, embedding_input, parse_body
from .auth import KeyCheck, client_of
from .metrics import Stats
from .shapes import Answer, Pieces

log = logging.getLogger("llamabind.server")
T = TypeVar("T")
Source = str | os.PathLike | Model | Engine | AsyncEngine


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def error_of(e: BaseException) -> APIError:
    """The OpenAI error for an exception: 400 bad input, 503 busy or closed, 500 otherwise."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, InvalidInputError):
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, (BusyError, ClosedError)):
        return APIError(503, str(e), type="server_error", code="unavailable")
    return APIError(500, str(e) or type(e).__name__, type="server_error", code="internal_error")


def _reply(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _check(done: DoneEvent) -> DoneEvent:
    """A DoneEvent that answers the request, or the error it ended with."""
    if done.finish_reason == "error":
        raise error_of(done.error or LlamaError("the request failed"))
    if done.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled: the server is shutting down", type="server_error",
                       code="unavailable")
    return done


async def _disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: HTTPRequest, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and with it the engine's request) if the client disconnects."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled
        task.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, gone, return_exceptions=True)
    raise ClientGone()


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class Server:
    """What the routes share: the engine (driven by its thread), the names, the embedder."""

    def __init__(self, engine: AsyncEngine, name: str, embedder: Embedder | None, embedding_name: str,
                 owned: list[Any], limits: Limits, system: str | None = None) -> None:
        self.engine, self.name, self.limits, self.system = engine, name, limits, system
        self.embedder, self.embedding_name = embedder, embedding_name
        self._owned = owned
        self._embed_lock = anyio.Lock()
        ctx = engine.engine.ctx
        self.n_ctx_seq = ctx.n_ctx_seq
        self.pieces = Pieces(ctx.vocab)
        self.jinja = uses_jinja(ctx, None)
        self.created = int(time.time())
        self.stats = Stats()
        self.running = 0  # completions being answered (a stream until its last chunk)
        self.stopping = False
        self._probes = anyio.CapacityLimiter(1)
        self._penalty: dict[str, float] = {}  # client -> until when its grammars are refused
        self.keyed = False  # whether clients are told apart by their API keys

    async def aclose(self) -> None:
        self.stopping = True
        await self.engine.aclose()
        for thing in self._owned:
            thing.close()

    async def drain(self, timeout: float) -> None:
        """Shut down: take no more requests (503), give those running ``timeout`` seconds to end,
        then end them: streams get a last chunk (``finish_reason``) and an error, not a cut connection."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.running and loop.time() < end:
            await asyncio.sleep(0.05)
        await self.engine.aclose()  # what still runs ends with "cancelled"

    def metrics(self) -> str:
        return self.stats.render(self.engine.engine.metrics(), self.running)

    def check_model(self, body: Any, names: tuple[str, ...]) -> None:
        name = body.get("model") if isinstance(body, dict) else None
        if name is not None and name not in names:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")

    # -- completions -------------------------------------------------------------------------------
    async def answer(self, request: HTTPRequest, kind: str, call: Call) -> Response:
        if self.stopping:
            raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
        if self.limits.max_prompt_tokens is not None:
            await self._check_prompt(call.options)
        client = ""
        if "grammar" in call.options:
            client = client_of(request, self.keyed)
            if self._penalty.get(client, 0.0) > time.monotonic():
                raise APIError(429, "a grammar of this client ran out of llama.cpp's work budget lately: no grammar "
                               "from it for a while", type="rate_limit_error", param="grammar", code="rate_limit_exceeded")
            await self._probe_grammar(call.options["grammar"], client)
        ans = Answer(kind, self.name, self.pieces, call.top_logprobs, kind == "chat" and not self.jinja)
        # an async generator (annotated as an iterator): closing it cancels the request
        events = self.engine.stream(**call.options)
        self.running += 1
        streaming = False
        try:
            if not call.stream:
                done = await _unless_gone(request, self._collect(events, ans, client))
                return JSONResponse(ans.response(done))
            first = await _unless_gone(request, events.__anext__())  # submit's errors answer with their status
            if isinstance(first, DoneEvent):
                self._record(first, client)
                _check(first)
            streaming = True
            return StreamingResponse(self._stream(ans, first, events, call.include_usage, client),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finally:
            if not streaming:
                self.running -= 1

    async def _check_prompt(self, options: dict[str, Any]) -> None:
        """A 400 for a prompt past ``max_prompt_tokens``, rendered and tokenized (off the event loop)
        as the engine will: a long prompt is refused before it takes the engine's time."""
        most, ctx = self.limits.max_prompt_tokens, self.engine.engine.ctx

        def count() -> int:
            if "prompt" in options:
                p = options["prompt"]
                return len(p) if isinstance(p, list) else int(ctx.vocab.tokenize(p).size)
            chat = {k: options.get(k) for k in CHAT_OPTIONS}
            setup = prepare_chat(ctx, options["messages"], None, chat, None, [], True)
            if setup.sampler is not None:
                setup.sampler.close()
            return int(setup.tokens.size)

        n = await anyio.to_thread.run_sync(count)
        if most is not None and n > most:
            raise APIError(400, f"the prompt has {n} tokens, more than the {most} this server takes",
                           param="messages" if "messages" in options else "prompt", code="context_length_exceeded")

    async def _probe_grammar(self, grammar: str, client: str) -> None:
        """A client's grammar parsed and applied once to the whole vocabulary, on a worker thread (one
        at a time): a malformed grammar, or one too ambiguous for llama.cpp's work budget
        (``LLAMA_GRAMMAR_MAX_WORK``), is a 400 before it can hold the engine's thread."""
        vocab = self.engine.engine.ctx.vocab

        def probe() -> None:
            s = Sampler.grammar(vocab, grammar, limits=self.limits.grammar)
            try:
                cand = np.zeros(vocab.n_tokens, dtype=TOKEN_DATA)
                cand["id"] = np.arange(vocab.n_tokens)
                s.apply(cand)
            finally:
                s.close()

        try:
            await anyio.to_thread.run_sync(probe, limiter=self._probes)
        except InvalidInputError as e:
            self._punish(client, e)
            raise APIError(400, str(e), param="grammar", code="invalid_value") from None

    def _record(self, done: DoneEvent, client: str) -> None:
        self.stats.record(done)
        if client and done.error is not None:
            self._punish(client, done.error)

    def _punish(self, client: str, error: BaseException) -> None:
        """A client grammar past llama.cpp's work budget (in the probe or the engine) puts its client
        in the penalty box: each such grammar costs a thread up to a budget of work."""
        if "LLAMA_GRAMMAR_MAX_WORK" in str(error) and self.limits.grammar_penalty_s > 0:
            now = time.monotonic()
            self._penalty[client] = now + self.limits.grammar_penalty_s
            if len(self._penalty) > 10_000:  # forget those whose time is up
                self._penalty = {k: t for k, t in self._penalty.items() if t > now}

    async def _collect(self, events: AsyncIterator[Event], ans: Answer, client: str) -> DoneEvent:
        async for ev in events:
            if isinstance(ev, DoneEvent):
                self._record(ev, client)
                return _check(ev)
            ans.take(ev)
        raise LlamaError("the request ended without a result")

    async def _stream(self, ans: Answer, ev: Event, events: AsyncGenerator[Event, None],
                      include_usage: bool, client: str) -> AsyncIterator[bytes]:
        """The chunks, one write per token; ``data: [DONE]`` at the end, or the error that ended it
        (after a last chunk with its ``finish_reason`` where the text so far stands: a shutdown, a
        grammar over its budget)."""
        try:
            head = b"".join(_sse(c) for c in ans.first())
            while not isinstance(ev, DoneEvent):
                out = head + b"".join(_sse(c) for c in ans.chunks(ev))
                head = b""
                if out:
                    yield out
                ev = await events.__anext__()
            self._record(ev, client)
            try:
                _check(ev)
            except APIError as e:
                yield head + b"".join(_sse(c) for c in ans.last(ev, include_usage)) + _sse(e.body())
                return
            yield head + b"".join(_sse(c) for c in ans.last(ev, include_usage)) + b"data: [DONE]\n\n"
        finally:
            self.running -= 1
            await events.aclose()  # a client that left: the engine's request is cancelled

    # -- embeddings --------------------------------------------------------------------------------
    async def embed(self, body: Any) -> dict[str, Any]:
        if self.embedder is None:
            raise APIError(404, "this server has no embedding model: start it with --embedding-model",
                           code="model_not_found")
        self.check_model(body, (self.embedding_name,))
        texts, dim, b64 = embedding_input(body)
        emb = self.embedder
        async with self._embed_lock:  # one batch at a time, off the event loop
            n, vecs = await anyio.to_thread.run_sync(
                lambda: (sum(int(t.size) for t in emb.tokenize(texts)), emb.embed(texts, dim=dim)))
        return {"object": "list", "model": self.embedding_name,
                "data": [{"object": "embedding", "index": i,
                          "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist()}
                         for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}


def _name(source: Any, given: str | None) -> str:
    if given:
        return given
    path = getattr(source, "path", source)
    return Path(os.fspath(path)).stem if isinstance(path, (str, os.PathLike)) else "model"


def create_app(model: Source, *, model_name: str | None = None, n_slots: int = 4, n_ctx: int = 8192,
               n_threads: int | None = None, embedding_model: str | os.PathLike | Model | Embedder | None = None,
               embedding_name: str | None = None, embedding_pooling: str | None = None, max_queue: int = 256,
               limits: Limits | None = None, api_keys: Iterable[str] = (), metrics: bool = False,
               system: str | None = None, **ctx_params: Any) -> Starlette:
    """The OpenAI-compatible app over ``model``: a GGUF path or Model (an engine of ``n_slots``
    sequences sharing ``n_ctx`` KV cells is made), or an Engine / AsyncEngine to serve as it is.
    The app closes what it made, and the engine it drives, when it shuts down.
    ``embedding_model`` (a path, Model or Embedder) enables ``/v1/embeddings``; it needs a pooled
    output (``embedding_pooling``: mean, cls, last; default: the model's own). ``limits``: what one
    request may ask (body size and nesting, prompt and output tokens, grammars and schemas).
    ``api_keys``: when given, every endpoint but ``/health`` answers 401 without one of them.
    ``metrics``: serve ``/metrics`` (Prometheus text, llama-server's names). ``system``: a system
    message for chats that bring none (llama-server adds none: the template's default applies)."""
    owned: list[Any] = []
    try:
        if isinstance(model, AsyncEngine):
            aeng = model
        elif isinstance(model, Engine):
            aeng = AsyncEngine(model)
        else:
            m = model if isinstance(model, Model) else Model(model)
            if m is not model:
                owned.append(m)
            aeng = AsyncEngine(Engine.load(m, n_slots=n_slots, n_ctx=n_ctx, n_threads=n_threads, max_queue=max_queue,
                                           **ctx_params))
        emb = embedding_model
        if emb is not None and not isinstance(emb, Embedder):
            emb = Embedder(emb, n_threads=n_threads, pooling=embedding_pooling)
            owned.append(emb)
        if emb is not None and emb.pooling in ("none", "rank"):
            raise InvalidInputError(f"the embedding model pools with {emb.pooling!r}: /v1/embeddings needs one vector "
                                    "per text (pass embedding_pooling='mean', 'cls' or 'last')")
    except BaseException:
        for thing in owned:
            thing.close()
        raise
    srv = Server(aeng, _name(getattr(aeng.engine.ctx, "model", model), model_name), emb,
                 _name(embedding_model, embedding_name) if emb is not None else "", owned, limits or Limits(), system)
    return _routes(srv, api_keys, metrics)


def _routes(srv: Server, api_keys: Iterable[str], with_metrics: bool) -> Starlette:
    lim = srv.limits
    keys = [k for k in api_keys if k]
    srv.keyed = bool(keys)

    async def body_of(request: HTTPRequest) -> Any:
        """The body as JSON, read no further than ``max_body_bytes`` (413 past it)."""
        size = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is larger than {lim.max_body_bytes} bytes",
                           code="request_too_large")
        if size.isdigit() and int(size) > lim.max_body_bytes:
            raise too_big
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > lim.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        raw = b"".join(chunks)
        if n < 1 << 16:
            return parse_body(raw, lim.max_json_depth)
        return await anyio.to_thread.run_sync(parse_body, raw, lim.max_json_depth)  # off the event loop

    def api(fn):  # type: ignore[no-untyped-def]
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                res = await fn(request)
            except ClientGone:
                res = Response(status_code=499)  # nobody reads it
            except Exception as e:
                err = error_of(e)
                if err.status >= 500 and not isinstance(e, (APIError, LlamaError)):
                    log.exception("request failed")
                res = _reply(err)
            srv.stats.responses[res.status_code] += 1
            return res
        return endpoint

    @api
    async def chat(request: HTTPRequest) -> Response:
        body = await body_of(request)
        srv.check_model(body, (srv.name,))
        return await srv.answer(request, "chat", chat_call(body, srv.n_ctx_seq, lim, srv.system))

    @api
    async def completions(request: HTTPRequest) -> Response:
        body = await body_of(request)
        srv.check_model(body, (srv.name,))
        return await srv.answer(request, "text", completion_call(body, srv.n_ctx_seq, lim))

    @api
    async def embeddings(request: HTTPRequest) -> Response:
        return JSONResponse(await srv.embed(await body_of(request)))

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": srv.created, "owned_by": "llamabind"}

    names = [srv.name] + ([srv.embedding_name] if srv.embedder is not None else [])

    async def models(request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [card(n) for n in names]})

    @api
    async def model(request: HTTPRequest) -> Response:
        name = request.path_params["name"]
        srv.check_model({"model": name}, tuple(names))
        return JSONResponse(card(name))

    async def health(request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok"})

    @api
    async def metrics(request: HTTPRequest) -> Response:
        if not with_metrics:
            raise APIError(404, "This server does not support metrics endpoint. Start it with `--metrics`",
                           type="not_supported_error", code="not_found")  # llama-server: 501; no client error is a 5xx
        return PlainTextResponse(srv.metrics(), media_type="text/plain; version=0.0.4")

    async def http_error(request: HTTPRequest, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        msg = f"{request.method} {request.url.path}: " + (exc.detail if isinstance(exc, HTTPException) else "error")
        return _reply(APIError(status, msg, code=code))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await srv.aclose()

    app = Starlette(routes=[Route("/health", health), Route("/v1/health", health), Route("/v1/models", models),
                            Route("/v1/models/{name:path}", model),
                            Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/embeddings", embeddings, methods=["POST"]),
                            Route("/metrics", metrics)],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan,
                    middleware=[Middleware(KeyCheck, keys=keys)] if keys else None)
    app.state.server = srv
    return app
