"""An OpenAI-compatible HTTP server over the engine (``pip install 'llamabind[server]'``):
``create_app(model)`` gives an ASGI app to run with uvicorn; ``python -m llamabind serve`` runs one."""

from .app import Server, create_app
from .params import APIError, Limits

__all__ = ["APIError", "Limits", "Server", "create_app"]
