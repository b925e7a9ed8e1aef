"""POST /v1/audio/transcriptions (OpenAI's speech-to-text shape: a multipart upload) for an ASR run, and POST
/v1/audio/classifications (the same upload; /v1/classify's answer) for an audio classifier run."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse

from kiln.serve.context import ServedDep, resolve, submit, wait
from kiln.serve.errors import APIError
from kiln.serve.jobs import Job

router = APIRouter()
FORMATS = ("json", "text", "verbose_json")


async def _run(request: Request, s, file: UploadFile, kind: str, what: str) -> dict:
    """The backend's answer for one upload (a 404 when this server serves another kind of run)."""
    if getattr(s.backend, "kind", "") != kind:
        raise APIError(404, f"this server does not serve {what}", code="not_found")
    data = await file.read()
    if not data:
        raise APIError(400, f"file: {file.filename or 'the upload'} is empty", param="file")
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    job = Job(kind, lambda res: resolve(loop, fut, res), lambda e: resolve(loop, fut, error=e),
              texts=[file.filename or "upload", data])
    submit(s.engine, [job])
    (res,) = await wait([fut], [job], request, s.engine)
    return res


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request, s: ServedDep, file: UploadFile = File(...), model: str = Form(None),
                         response_format: str = Form("json"), language: str = Form(None), prompt: str = Form(None),
                         temperature: float = Form(0.0)):
    s.check_model(model)
    if response_format not in FORMATS:
        raise APIError(400, f"response_format {response_format!r}: kiln answers {', '.join(FORMATS)}",
                       param="response_format")
    # greedy CTC decoding: language, prompt and temperature have nothing to change
    res = await _run(request, s, file, "transcribe", "a speech recognition run (kiln finetune asr)")
    if response_format == "text":
        return PlainTextResponse(res["text"])
    if response_format == "verbose_json":
        return {"task": "transcribe", "language": language or "", "text": res["text"], "segments": []}
    return {"text": res["text"]}


@router.post("/v1/audio/classifications")
async def classifications(request: Request, s: ServedDep, file: UploadFile = File(...), model: str = Form(None)):
    s.check_model(model)
    res = await _run(request, s, file, "classify_audio", "an audio classifier run (kiln finetune audio)")
    labels, p = s.backend.labels, res["probs"]
    best = max(range(len(labels)), key=lambda k: p[k])
    return {"object": "list", "model": s.model_id, "labels": labels,
            "data": [{"index": 0, "label": labels[best], "score": p[best],
                      "probabilities": {name: p[k] for k, name in enumerate(labels)}}]}
