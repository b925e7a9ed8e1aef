"""GET /health and GET /v1/models: what is served, and how busy the server is."""

from __future__ import annotations

from fastapi import APIRouter

from kiln.serve.context import Served, ServedDep

router = APIRouter()


@router.get("/health")
async def health(s: ServedDep):
    engine = s.engine
    return {"status": "ok", "model": s.model_id, **s.backend.info,
            "queue": {"waiting": len(engine.queue), "limit": engine.queue.limit, "max_batch": engine.max_batch},
            "served": dict(engine.stats)}


def _model_card(s: Served) -> dict:
    return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "kiln", **s.backend.info}


@router.get("/v1/models")
async def models(s: ServedDep):
    return {"object": "list", "data": [_model_card(s)]}


@router.get("/v1/models/{name:path}")
async def one_model(name: str, s: ServedDep):
    s.check_model(name)
    return _model_card(s)
