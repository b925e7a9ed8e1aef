"""POST /v1/classify: class probabilities for one text or a list (a classifier run)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from kiln.serve.context import ServedDep, resolve, submit, wait
from kiln.serve.errors import APIError
from kiln.serve.jobs import Job
from kiln.serve.schemas import ClassifyRequest

router = APIRouter()


def _texts(req: ClassifyRequest, reads_pairs: bool) -> tuple[list[str], list[str] | None]:
    """The request's texts (and pair texts), checked against what this classifier reads."""
    texts = [req.input] if isinstance(req.input, str) else req.input
    pairs = None if req.input_pair is None else \
        ([req.input_pair] if isinstance(req.input_pair, str) else req.input_pair)
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"input{'' if isinstance(req.input, str) else f'.{i}'}: the text is empty",
                           param="input")
    if reads_pairs and pairs is None:
        raise APIError(400, "input_pair: this classifier reads text pairs; send input_pair alongside input",
                       param="input_pair")
    if not reads_pairs and pairs is not None:
        raise APIError(400, "input_pair: this classifier reads single texts", param="input_pair")
    if pairs is not None and len(pairs) != len(texts):
        raise APIError(400, f"input_pair: {len(pairs)} pair texts for {len(texts)} inputs", param="input_pair")
    return texts, pairs


@router.post("/v1/classify")
async def classify(req: ClassifyRequest, request: Request, s: ServedDep):
    if s.is_lm:
        raise APIError(404, "this server serves a language model, not a classifier: POST /v1/completions",
                       code="not_found")
    s.check_model(req.model)
    texts, pairs = _texts(req, s.backend.pairs)
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    job = Job("classify", lambda res: resolve(loop, fut, res), lambda e: resolve(loop, fut, error=e),
              texts=texts, pairs=pairs)
    submit(s.engine, [job])
    (res,) = await wait([fut], [job], request, s.engine)
    labels = s.backend.labels
    data = []
    for i, p in enumerate(res["probs"]):
        best = max(range(len(labels)), key=lambda k: p[k])
        data.append({"index": i, "label": labels[best], "score": p[best],
                     "probabilities": {name: p[k] for k, name in enumerate(labels)}})
    return {"object": "list", "model": s.model_id, "labels": labels, "data": data}
