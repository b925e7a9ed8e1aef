"""The HTTP face of `kiln serve`: OpenAI-shaped routes over kiln.serve.engine, request validation, errors.

Every error is JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: a bad request is a
400 naming the field (an unknown parameter, a wrong type, a value out of range, a prompt longer than the
context), an overloaded server a 503 with Retry-After, never a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import KilnError, did_you_mean
from kiln.model.generation_settings import GenerationError, check_generation
from kiln.serve.engine import Engine, Job, QueueFull, ShuttingDown, _Cancelled

MAX_TOKENS = 4096          # one request's max_tokens ceiling
MAX_BODY = 1 << 20         # bytes of a request body
MAX_INPUTS = 256           # texts in one /v1/classify request


# ----------------------------------------------------------------------------------------------- schemas


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


def _only(value, allowed, what: str):
    if value not in allowed:
        raise ValueError(f"kiln serve supports {what}")
    return value


class CompletionRequest(_Strict):
    """POST /v1/completions: OpenAI's fields (those kiln can honour) plus top_k."""

    model: str | None = None
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)]
    # the server's own bounds (OpenAI's); the ranges every face shares are kiln.model.generation_settings's,
    # checked in completions() as kiln generate and kiln.sample check them
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, le=2)
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        return _only(v, (1,), "only n=1 (send one request per completion)")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        return _only(v, (None, 1), "no best_of but 1")

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        return _only(v, (None,), "no logprobs")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        return _only(v, (0, 0.0), "no penalty but 0")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        return _only(v or None, (None,), "no logit_bias")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        return _only(v, (None,), "no suffix")


class ClassifyRequest(_Strict):
    """POST /v1/classify: one text or a list; input_pair for a run trained on text pairs."""

    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
    input_pair: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)] | None = None


# ----------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = \
            status, message, param, code, type_, headers


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def _busy(engine: Engine) -> APIError:
    return APIError(503, f"the server is busy: {engine.queue.limit} requests are already waiting (kiln serve "
                    "--queue); retry later", code="server_busy", type_="server_error", headers={"Retry-After": "1"})


def _job_error(e: BaseException, engine: Engine) -> APIError:
    if isinstance(e, ShuttingDown):
        return APIError(503, "the server is shutting down", code="shutting_down", type_="server_error")
    if isinstance(e, QueueFull):
        return _busy(engine)
    if isinstance(e, KilnError):
        return APIError(400, str(e))
    return APIError(500, f"internal error ({type(e).__name__}); the server log has the details",
                    type_="server_error")


def _validation_error(exc: RequestValidationError, fields) -> APIError:
    errors = sorted(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")  # unknown names first
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
    first = max(same, key=lambda e: len(e.get("loc", ())), default=first)  # a union: the most specific member
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('msg', '')})", code="invalid_json")
    if not loc:
        return APIError(400, "the request needs a JSON object body: " + first.get("msg", ""), code="invalid_body")
    param = loc[0]
    if kind == "extra_forbidden":
        return APIError(400, f"unknown parameter {param!r}{did_you_mean(param, fields)}", param=param,
                        code="unknown_parameter")
    # union members show up in the location as type names (prompt.str, prompt.list[str].0): keep the field path
    path = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    where = ".".join(path) or param
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "missing":
        msg = "this field is required"
    elif "input" in first and kind not in ("value_error",):
        msg += f" (got {json.dumps(first['input'])[:80]})"
    return APIError(400, f"{where}: {msg}", param=param, code="invalid_value" if kind != "missing" else "missing")


# ----------------------------------------------------------------------------------------------- the app


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value=None, error: BaseException | None = None):
    def settle():
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(value)
    loop.call_soon_threadsafe(settle)


def create_app(engine: Engine, model_id: str) -> FastAPI:
    backend = engine.backend
    created = int(time.time())
    is_lm = backend.kind == "complete"

    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="kiln serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        model = CompletionRequest if request.url.path.endswith("/completions") else ClassifyRequest
        return error_response(_validation_error(exc, model.model_fields))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
               f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(msg, code="not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        import traceback

        traceback.print_exception(exc)
        return error_response(_job_error(exc, engine))

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return error_response(APIError(413, f"the request body is larger than {MAX_BODY} bytes",
                                           code="body_too_large"))
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_id!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")

    # ------------------------------------------------------------------------------ informational routes

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse((resources.files("kiln.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **backend.info,
                "queue": {"waiting": len(engine.queue), "limit": engine.queue.limit, "max_batch": engine.max_batch},
                "served": dict(engine.stats)}

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "kiln", **backend.info}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        check_model(name)
        return model_card()

    # ------------------------------------------------------------------------------ completions

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if not is_lm:
            raise APIError(404, "this server serves a classifier: POST /v1/classify", code="not_found")
        raise APIError(400, "this model's tokenizer has no chat template (kiln's character and BPE tokenizers "
                       "have none), so there is no chat format to apply: use /v1/completions with a plain "
                       "prompt", code="no_chat_template")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if not is_lm:
            raise APIError(404, "this server serves a classifier, not a language model: POST /v1/classify",
                           code="not_found")
        check_model(req.model)
        try:
            check_generation(req.max_tokens, req.temperature, req.top_k, req.top_p,
                             names={"max_new_tokens": "max_tokens"})
        except GenerationError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
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
        loop = asyncio.get_running_loop()
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        stream_q: asyncio.Queue | None = asyncio.Queue() if req.stream else None
        futures, jobs = [], []
        for i, ids in enumerate(encoded):
            fut = loop.create_future()
            on_delta = None
            if stream_q is not None:
                def on_delta(text, i=i):
                    loop.call_soon_threadsafe(stream_q.put_nowait, ("delta", i, text))

                def on_done(res, i=i, fut=fut):
                    loop.call_soon_threadsafe(stream_q.put_nowait, ("done", i, res))
                    _resolve(loop, fut, res)

                def on_error(e, i=i, fut=fut):
                    loop.call_soon_threadsafe(stream_q.put_nowait, ("error", i, e))
                    _resolve(loop, fut, error=e)
            else:
                def on_done(res, fut=fut):
                    _resolve(loop, fut, res)

                def on_error(e, fut=fut):
                    _resolve(loop, fut, error=e)
            jobs.append(Job("complete", on_done, on_error, on_delta, ids=ids, max_tokens=req.max_tokens,
                            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                            stop=stop))
            futures.append(fut)
        try:
            engine.submit(jobs)
        except QueueFull:
            raise _busy(engine) from None
        except ShuttingDown as e:
            raise _job_error(e, engine) from None
        echoes = [backend.decode(ids) if req.echo else "" for ids in encoded]

        def chunk(i: int, text: str, finish=None, usage=None) -> str:
            body = {"id": cid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": [] if i < 0 else [{"text": text, "index": i, "logprobs": None,
                                                  "finish_reason": finish}]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        if stream_q is not None:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                usage = {"prompt_tokens": sum(map(len, encoded)), "completion_tokens": 0}
                try:
                    for i, text in enumerate(echoes):
                        if text:
                            yield chunk(i, text)
                    left = len(jobs)
                    while left:
                        what, i, payload = await stream_q.get()
                        if what == "delta":
                            yield chunk(i, payload)
                        elif what == "done":
                            left -= 1
                            usage["completion_tokens"] += payload["completion_tokens"]
                            yield chunk(i, "", payload["finish_reason"])
                        else:
                            e = _job_error(payload, engine)
                            yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
                            return
                    if include_usage:
                        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                        yield chunk(-1, "", usage=usage)
                    yield "data: [DONE]\n\n"
                finally:
                    for j in jobs:  # the client went away (or we are done): free the rows
                        j.cancelled = True

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        results = await _wait(futures, jobs, request, engine)
        choices = [{"text": echoes[i] + r["text"], "index": i, "logprobs": None, "finish_reason": r["finish_reason"]}
                   for i, r in enumerate(results)]
        completion_tokens = sum(r["completion_tokens"] for r in results)
        prompt_tokens = sum(map(len, encoded))
        return {"id": cid, "object": "text_completion", "created": now, "model": model_id, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    # ------------------------------------------------------------------------------ classification

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest, request: Request):
        if is_lm:
            raise APIError(404, "this server serves a language model, not a classifier: POST /v1/completions",
                           code="not_found")
        check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        pairs = None if req.input_pair is None else \
            ([req.input_pair] if isinstance(req.input_pair, str) else req.input_pair)
        for i, t in enumerate(texts):
            if not t.strip():
                raise APIError(400, f"input{'' if isinstance(req.input, str) else f'.{i}'}: the text is empty",
                               param="input")
        if backend.pairs and pairs is None:
            raise APIError(400, "input_pair: this classifier reads text pairs; send input_pair alongside input",
                           param="input_pair")
        if not backend.pairs and pairs is not None:
            raise APIError(400, "input_pair: this classifier reads single texts", param="input_pair")
        if pairs is not None and len(pairs) != len(texts):
            raise APIError(400, f"input_pair: {len(pairs)} pair texts for {len(texts)} inputs", param="input_pair")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        job = Job("classify", lambda res: _resolve(loop, fut, res), lambda e: _resolve(loop, fut, error=e),
                  texts=texts, pairs=pairs)
        try:
            engine.submit([job])
        except QueueFull:
            raise _busy(engine) from None
        except ShuttingDown as e:
            raise _job_error(e, engine) from None
        (res,) = await _wait([fut], [job], request, engine)
        labels = backend.labels
        data = []
        for i, p in enumerate(res["probs"]):
            best = max(range(len(labels)), key=lambda k: p[k])
            data.append({"index": i, "label": labels[best], "score": p[best],
                         "probabilities": {name: p[k] for k, name in enumerate(labels)}})
        return {"object": "list", "model": model_id, "labels": labels, "data": data}

    return app


async def _wait(futures: list[asyncio.Future], jobs: list[Job], request: Request, engine: Engine) -> list[dict]:
    """The jobs' results; if the client disconnects first, the jobs are cancelled (their rows freed)."""
    everything = asyncio.gather(*futures)
    try:
        while True:
            done, _ = await asyncio.wait({everything}, timeout=1.0)
            if done:
                break
            if await request.is_disconnected():
                raise _Cancelled()
        return everything.result()
    except _Cancelled:
        everything.cancel()
        raise APIError(499, "the client closed the connection", code="client_closed") from None
    except Exception as e:
        raise _job_error(e, engine) from None
    finally:
        for j in jobs:
            j.cancelled = True

