"""POST /v1/completions (streamed as server-sent events with `stream: true`). A language-model run.

A request with several prompts is one job per prompt, admitted to the queue together; each job reports back
from the worker thread through callbacks that settle an asyncio future (and, when streaming, put its text
on an asyncio queue the response reads).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kiln.model.generation_settings import GenerationError, check_generation
from kiln.serve.context import Served, ServedDep, resolve, submit, wait
from kiln.serve.errors import APIError, error_body, job_error
from kiln.serve.jobs import Job
from kiln.serve.schemas import CompletionRequest

router = APIRouter()


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, s: ServedDep):
    if not s.is_lm:
        raise APIError(404, "this server serves a classifier, not a language model: POST /v1/classify",
                       code="not_found")
    s.check_model(req.model)
    try:  # the ranges every face shares, as kiln generate and kiln.sample check them
        check_generation(req.max_tokens, req.temperature, req.top_k, req.top_p,
                         names={"max_new_tokens": "max_tokens"})
    except GenerationError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    encoded = _encode_prompts(req, s.backend)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue | None = asyncio.Queue() if req.stream else None
    futures = [loop.create_future() for _ in encoded]
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    jobs = [Job("complete", *_callbacks(loop, fut, events, i), ids=ids, max_tokens=req.max_tokens,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stop)
            for i, (ids, fut) in enumerate(zip(encoded, futures))]
    submit(s.engine, jobs)
    reply = _Reply(s.model_id, encoded, [s.backend.decode(ids) if req.echo else "" for ids in encoded])
    if events is not None:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(reply, jobs, events, s, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return reply.whole(await wait(futures, jobs, request, s.engine))


def _encode_prompts(req: CompletionRequest, backend) -> list[list[int]]:
    """Each prompt's token ids; a prompt the tokenizer cannot encode, or longer than the context, is a 400."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    ctx = backend.context_length
    encoded = []
    for i, p in enumerate(prompts):
        where = "prompt" if isinstance(req.prompt, str) else f"prompt.{i}"
        try:
            ids = backend.encode(p)
        except ValueError as e:
            raise APIError(400, f"{where}: {e}", param="prompt") from None
        if len(ids) > ctx:
            raise APIError(400, f"{where}: the prompt is {len(ids)} tokens, longer than this model's context "
                           f"of {ctx} tokens", param="prompt", code="context_length_exceeded")
        encoded.append(ids)
    return encoded


def _callbacks(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, events: asyncio.Queue | None, i: int):
    """(on_done, on_error, on_delta) for prompt i's job, called on the worker thread: they settle its future
    and, when streaming, queue ("delta" | "done" | "error", i, payload) for the response to send."""
    def emit(what: str, payload) -> None:
        if events is not None:
            loop.call_soon_threadsafe(events.put_nowait, (what, i, payload))

    def on_done(res):
        emit("done", res)
        resolve(loop, fut, res)

    def on_error(e):
        emit("error", e)
        resolve(loop, fut, error=e)

    # no on_delta when not streaming: the worker then skips decoding the text after every token
    return on_done, on_error, ((lambda text: emit("delta", text)) if events is not None else None)


@dataclass
class _Reply:
    """The response bodies of one request: OpenAI's text_completion object, whole or as stream chunks."""

    model_id: str
    encoded: list[list[int]]
    echoes: list[str]                          # the prompt text per choice when echo=true, else ""
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.encoded))

    def _body(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def chunk(self, i: int, text: str, finish=None, usage=None) -> str:
        """One server-sent event: choice i's new text (i < 0: no choice, the closing usage chunk)."""
        choices = [] if i < 0 else [{"text": text, "index": i, "logprobs": None, "finish_reason": finish}]
        return f"data: {json.dumps(self._body(choices, usage))}\n\n"

    def whole(self, results: list[dict]) -> dict:
        choices = [{"text": self.echoes[i] + r["text"], "index": i, "logprobs": None,
                    "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]
        completion_tokens = sum(r["completion_tokens"] for r in results)
        return self._body(choices, {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                                    "total_tokens": self.prompt_tokens + completion_tokens})


async def _stream(reply: _Reply, jobs: list[Job], events: asyncio.Queue, s: Served, include_usage: bool):
    """The server-sent events of a streamed request, in the order the worker reports them; an error ends the
    stream with an error event (the status line is already sent)."""
    usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": 0}
    try:
        for i, text in enumerate(reply.echoes):
            if text:
                yield reply.chunk(i, text)
        left = len(jobs)
        while left:
            what, i, payload = await events.get()
            if what == "delta":
                yield reply.chunk(i, payload)
            elif what == "done":
                left -= 1
                usage["completion_tokens"] += payload["completion_tokens"]
                yield reply.chunk(i, "", payload["finish_reason"])
            else:
                e = job_error(payload, s.engine)
                yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
                return
        if include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield reply.chunk(-1, "", usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        for j in jobs:  # the client went away (or we are done): free the rows
            j.cancelled = True
