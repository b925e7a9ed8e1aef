"""POST /v1/chat/completions: the conversation rendered with the run's chat template (kiln.data.chat; ChatML
when the run has none), one job on the engine as a completion is, the reply ended at the template's
end-of-turn token; whole, or streamed as OpenAI's chat.completion.chunk events with `stream: true`.
`kiln chat` runs the same job (kiln.serve.chat), so at temperature 0 both give the same reply.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kiln.errors import KilnError
from kiln.model.generation_settings import GenerationError, check_generation
from kiln.serve.context import ServedDep, submit, wait
from kiln.serve.errors import APIError, error_body, job_error
from kiln.serve.jobs import Job
from kiln.serve.routes.completions import _callbacks
from kiln.serve.schemas import MAX_TOKENS, ChatRequest

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: Request, s: ServedDep):
    if not s.is_lm:
        raise APIError(404, "this server serves a classifier: POST /v1/classify", code="not_found")
    s.check_model(req.model)
    max_tokens = req.max_completion_tokens or req.max_tokens
    try:
        check_generation(max_tokens, req.temperature, req.top_k, req.top_p, names={"max_new_tokens": "max_tokens"})
    except GenerationError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    messages = [m.as_dict() for m in req.messages]
    try:
        ids = s.backend.encode_chat(messages)
    except KilnError as e:
        code = "context_length_exceeded" if "context is" in str(e) else "invalid_value"
        raise APIError(400, str(e), param="messages", code=code) from None
    room = s.backend.context_length - len(ids)
    max_tokens = min(max_tokens or MAX_TOKENS, room)
    _, stop_ids, stop_strings = s.backend.chat
    stop = stop_strings + ([req.stop] if isinstance(req.stop, str) else list(req.stop or []))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue | None = asyncio.Queue() if req.stream else None
    future = loop.create_future()
    job = Job("complete", *_callbacks(loop, future, events, 0), ids=ids, max_tokens=max_tokens,
              temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stop,
              stop_ids=stop_ids)
    submit(s.engine, [job])
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": s.model_id}
    if events is not None:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(head, len(ids), job, events, s, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = (await wait([future], [job], request, s.engine))[0]
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": None, "finish_reason": result["finish_reason"]}],
            "usage": _usage(len(ids), result["completion_tokens"])}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(head: dict, delta: dict | None, finish=None, usage=None) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {**head, "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _stream(head: dict, prompt_tokens: int, job: Job, events: asyncio.Queue, s, include_usage: bool):
    """The role first, then the reply's text as it becomes final, then the finish reason (and usage)."""
    try:
        yield _chunk(head, {"role": "assistant", "content": ""})
        while True:
            what, _, payload = await events.get()
            if what == "delta":
                yield _chunk(head, {"content": payload})
            elif what == "done":
                yield _chunk(head, {}, payload["finish_reason"])
                if include_usage:
                    yield _chunk(head, None, usage=_usage(prompt_tokens, payload["completion_tokens"]))
                break
            else:
                e = job_error(payload, s.engine)
                yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
                return
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # the client went away (or we are done): free the row
