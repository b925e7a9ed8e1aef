"""POST /v1/audio/transcriptions: OpenAI's speech-to-text shape (a multipart upload) for an ASR run."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse

from kiln.serve.context import ServedDep, resolve, submit, wait
from kiln.serve.errors import APIError
from kiln.serve.jobs import Job

router = APIRouter()
FORMATS = ("json", "text", "verbose_json")


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request, s: ServedDep, file: UploadFile = File(...), model: str = Form(None),
                         response_format: str = Form("json"), language: str = Form(None), prompt: str = Form(None),
                         temperature: float = Form(0.0)):
    if s.backend.kind != "transcribe":
        raise APIError(404, "this server does not serve a speech recognition run (kiln finetune asr)", code="not_found")
    s.check_model(model)
    if response_format not in FORMATS:
        raise APIError(400, f"response_format {response_format!r}: kiln answers {', '.join(FORMATS)}",
                       param="response_format")
    data = await file.read()
    if not data:
        raise APIError(400, f"file: {file.filename or 'the upload'} is empty", param="file")
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    # greedy CTC decoding: language, prompt and temperature have nothing to change
    job = Job("transcribe", lambda res: resolve(loop, fut, res), lambda e: resolve(loop, fut, error=e),
              texts=[file.filename or "upload", data])
    submit(s.engine, [job])
    (res,) = await wait([fut], [job], request, s.engine)
    if response_format == "text":
        return PlainTextResponse(res["text"])
    if response_format == "verbose_json":
        return {"task": "transcribe", "language": language or "", "text": res["text"], "segments": []}
    return {"text": res["text"]}
