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
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..embeddings import Embedder
from ..engine import AsyncEngine, Engine, Event
from ..errors import BusyError, ClosedError, ContextOverflowError, InvalidInputError, LlamaError
from ..generation.chatprep import uses_jinja
from ..generation.events import DoneEvent
from ..model import Model
from .params import APIError, Call, chat_call, completion_call, embedding_input
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
                 owned: list[Any]) -> None:
        self.engine, self.name = engine, name
        self.embedder, self.embedding_name = embedder, embedding_name
        self._owned = owned
        self._embed_lock = anyio.Lock()
        ctx = engine.engine.ctx
        self.n_ctx_seq = ctx.n_ctx_seq
        self.pieces = Pieces(ctx.vocab)
        self.jinja = uses_jinja(ctx, None)
        self.created = int(time.time())

    async def aclose(self) -> None:
        await self.engine.aclose()
        for thing in self._owned:
            thing.close()

    def check_model(self, body: Any, names: tuple[str, ...]) -> None:
        name = body.get("model") if isinstance(body, dict) else None
        if name is not None and name not in names:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")

    # -- completions -------------------------------------------------------------------------------
    async def answer(self, request: HTTPRequest, kind: str, call: Call) -> Response:
        ans = Answer(kind, self.name, self.pieces, call.top_logprobs, kind == "chat" and not self.jinja)
        # an async generator (annotated as an iterator): closing it cancels the request
        events = self.engine.stream(**call.options)
        if not call.stream:
            done = await _unless_gone(request, self._collect(events, ans))
            return JSONResponse(ans.response(done))
        first = await _unless_gone(request, events.__anext__())  # submit's errors answer with their status
        if isinstance(first, DoneEvent):
            _check(first)
        return StreamingResponse(self._stream(ans, first, events, call.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    async def _collect(events: AsyncIterator[Event], ans: Answer) -> DoneEvent:
        async for ev in events:
            if isinstance(ev, DoneEvent):
                return _check(ev)
            ans.take(ev)
        raise LlamaError("the request ended without a result")

    @staticmethod
    async def _stream(ans: Answer, ev: Event, events: AsyncGenerator[Event, None],
                      include_usage: bool) -> AsyncIterator[bytes]:
        """The chunks, one write per token; ``data: [DONE]`` at the end, or the error that ended it."""
        try:
            head = b"".join(_sse(c) for c in ans.first())
            while not isinstance(ev, DoneEvent):
                out = head + b"".join(_sse(c) for c in ans.chunks(ev))
                head = b""
                if out:
                    yield out
                ev = await events.__anext__()
            try:
                _check(ev)
            except APIError as e:
                yield head + _sse(e.body())
                return
            yield head + b"".join(_sse(c) for c in ans.last(ev, include_usage)) + b"data: [DONE]\n\n"
        finally:
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
               **ctx_params: Any) -> Starlette:
    """The OpenAI-compatible app over ``model``: a GGUF path or Model (an engine of ``n_slots``
    sequences sharing ``n_ctx`` KV cells is made), or an Engine / AsyncEngine to serve as it is.
    The app closes what it made, and the engine it drives, when it shuts down.
    ``embedding_model`` (a path, Model or Embedder) enables ``/v1/embeddings``; it needs a pooled
    output (``embedding_pooling``: mean, cls, last; default: the model's own)."""
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
                 _name(embedding_model, embedding_name) if emb is not None else "", owned)
    return _routes(srv)


def _routes(srv: Server) -> Starlette:
    async def body_of(request: HTTPRequest) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def api(fn):  # type: ignore[no-untyped-def]
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                return await fn(request)
            except ClientGone:
                return Response(status_code=499)  # nobody reads it
            except Exception as e:
                err = error_of(e)
                if err.status >= 500 and not isinstance(e, (APIError, LlamaError)):
                    log.exception("request failed")
                return _reply(err)
        return endpoint

    @api
    async def chat(request: HTTPRequest) -> Response:
        body = await body_of(request)
        srv.check_model(body, (srv.name,))
        return await srv.answer(request, "chat", chat_call(body, srv.n_ctx_seq))

    @api
    async def completions(request: HTTPRequest) -> Response:
        body = await body_of(request)
        srv.check_model(body, (srv.name,))
        return await srv.answer(request, "text", completion_call(body, srv.n_ctx_seq))

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

    async def http_error(request: HTTPRequest, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        msg = f"{request.method} {request.url.path}: " + (exc.detail if isinstance(exc, HTTPException) else "error")
        return _reply(APIError(status, msg, code=code))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await srv.aclose()

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/models/{name:path}", model),
                            Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/embeddings", embeddings, methods=["POST"])],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.server = srv
    return app
