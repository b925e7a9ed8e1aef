"""The HTTP face of `kiln serve`: a FastAPI app assembled from the routes over kiln.serve.engine.

The pieces: kiln.serve.routes (one module per endpoint group: completions, classify, models and health, the
playground page), kiln.serve.schemas (the request bodies), kiln.serve.errors (OpenAI-shaped errors for all
of them) and kiln.serve.context (what the routes share: the served model, handing jobs to the engine).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request

from kiln.serve.context import Served
from kiln.serve.engine import Engine
from kiln.serve.errors import APIError, error_response, install
from kiln.serve.routes import ROUTERS

MAX_BODY = 1 << 20         # bytes of a request body


def create_app(engine: Engine, model_id: str) -> FastAPI:
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop)  # uvicorn is stopping: fail what waits, let the running batch end

    app = FastAPI(title="kiln serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.served = Served(engine, model_id)
    install(app)
    app.middleware("http")(_limit_body)
    for router in ROUTERS:
        app.include_router(router)
    return app


async def _limit_body(request: Request, call_next):
    """Refuse an oversized body from its Content-Length, before reading any of it."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
        return error_response(APIError(413, f"the request body is larger than {MAX_BODY} bytes",
                                       code="body_too_large"))
    return await call_next(request)
