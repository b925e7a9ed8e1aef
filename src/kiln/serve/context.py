"""What every route of `kiln serve` shares: the served model, the model-name check, and the hand-off of jobs
to the engine's worker thread and back to the event loop.

create_app puts one Served on app.state; a route asks for it with a `ServedDep` parameter (a FastAPI
dependency) instead of closing over it, so each route is a plain module-level function.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from kiln.serve.engine import Engine
from kiln.serve.errors import APIError, busy, job_error
from kiln.serve.jobs import Cancelled, Job, QueueFull, ShuttingDown


@dataclass
class Served:
    """The engine and the name this server answers to (a run folder's name)."""

    engine: Engine
    model_id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def backend(self):
        return self.engine.backend

    @property
    def is_lm(self) -> bool:
        return self.backend.kind == "complete"

    def check_model(self, name: str | None) -> None:
        """A request may name the model (OpenAI's clients always do); a name that is not ours is a 404."""
        if name is not None and name != self.model_id:
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.model_id!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")


def _served(request: Request) -> Served:
    return request.app.state.served


ServedDep = Annotated[Served, Depends(_served)]


def resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value=None, error: BaseException | None = None):
    """Settle `fut` from the worker thread: futures belong to the event loop and are set on its thread."""
    def settle():
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(value)
    loop.call_soon_threadsafe(settle)


def submit(engine: Engine, jobs: list[Job]) -> None:
    """Queue a request's jobs (all or none); a full queue or a stopping server is a 503 at once."""
    try:
        engine.submit(jobs)
    except QueueFull:
        raise busy(engine) from None
    except ShuttingDown as e:
        raise job_error(e, engine) from None


async def wait(futures: list[asyncio.Future], jobs: list[Job], request: Request, engine: Engine) -> list[dict]:
    """The jobs' results; if the client disconnects first, the jobs are cancelled (their rows freed)."""
    everything = asyncio.gather(*futures)
    try:
        while True:
            done, _ = await asyncio.wait({everything}, timeout=1.0)
            if done:
                break
            if await request.is_disconnected():
                raise Cancelled()
        return everything.result()
    except Cancelled:
        everything.cancel()
        raise APIError(499, "the client closed the connection", code="client_closed") from None
    except Exception as e:
        raise job_error(e, engine) from None
    finally:
        for j in jobs:
            j.cancelled = True
