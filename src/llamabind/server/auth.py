"""Who may ask: API keys checked in constant time (ASGI middleware, as llama-server takes them),
and who asked (for the grammar penalty)."""

from __future__ import annotations

import hmac
import os
from typing import Any, Iterable

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse

from .params import APIError

PUBLIC = frozenset({"/health", "/v1/health"})  # as llama-server: answered without a key


class KeyCheck:
    """ASGI middleware: every request but ``PUBLIC`` paths needs one of ``keys``, as llama-server
    takes it (``Authorization: Bearer KEY``, else ``X-Api-Key: KEY``), compared in constant time;
    401 in OpenAI's error shape otherwise."""

    def __init__(self, app: Any, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # names are lower case in ASGI
        given = headers.get(b"authorization") or headers.get(b"x-api-key") or b""
        if given.startswith(b"Bearer "):
            given = given[7:]
        ok = False
        for key in self.keys:  # every key compared: the time says nothing about which one nearly matched
            ok |= hmac.compare_digest(given, key)
        if ok:
            return await self.app(scope, receive, send)
        err = APIError(401, "Invalid API Key", type="authentication_error", code="invalid_api_key")
        await JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def read_key_file(path: str | os.PathLike) -> list[str]:
    """API keys from a file, one a line; blank lines and lines starting with ``#`` skipped (as llama-server)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def client_of(request: HTTPRequest, keyed: bool) -> str:
    """Who sent a request, for the grammar penalty: its API key on a server that checks keys (else
    the header is the client's to choose), otherwise its address."""
    key = request.headers.get("authorization") or request.headers.get("x-api-key") if keyed else None
    if key:
        return "key:" + key.removeprefix("Bearer ")
    return "addr:" + (request.client.host if request.client else "")
