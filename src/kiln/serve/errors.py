"""OpenAI-shaped errors for every route of `kiln serve`, in one place.

Every error is JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: a bad request is a
400 naming the field (an unknown parameter, a wrong type, a value out of range, a prompt longer than the
context), an overloaded server a 503 with Retry-After, never a 500 with a traceback.
install() registers the handlers that turn every failure (ours, pydantic's, starlette's, a bug) into one.
"""

from __future__ import annotations

import json
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import KilnError, did_you_mean
from kiln.serve.jobs import QueueFull, ShuttingDown
from kiln.serve.schemas import body_model


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


def busy(engine) -> APIError:
    return APIError(503, f"the server is busy: {engine.queue.limit} requests are already waiting (kiln serve "
                    "--queue); retry later", code="server_busy", type_="server_error", headers={"Retry-After": "1"})


def job_error(e: BaseException, engine) -> APIError:
    """The answer to a request whose job failed: the server's state (503), the user's error (400) or a bug."""
    if isinstance(e, ShuttingDown):
        return APIError(503, "the server is shutting down", code="shutting_down", type_="server_error")
    if isinstance(e, QueueFull):
        return busy(engine)
    if isinstance(e, KilnError):
        return APIError(400, str(e))
    return APIError(500, f"internal error ({type(e).__name__}); the server log has the details",
                    type_="server_error")


def validation_error(exc: RequestValidationError, fields) -> APIError:
    """pydantic's list of complaints as one 400 naming the field: the one the user most likely got wrong."""
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


# ----------------------------------------------------------------------------------------------- handlers


async def _api_error(request: Request, exc: APIError):
    return error_response(exc)


async def _invalid(request: Request, exc: RequestValidationError):
    return error_response(validation_error(exc, body_model(request.url.path).model_fields))


async def _http(request: Request, exc: StarletteHTTPException):
    # starlette's own 404 / 405 (a route that does not exist), reworded to say which
    msg = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
           f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(msg, code="not_found" if exc.status_code == 404 else None),
                        status_code=exc.status_code)


async def _crash(request: Request, exc: Exception):
    traceback.print_exception(exc)  # a bug: the details go to the server log, the client gets a one-line 500
    return error_response(job_error(exc, request.app.state.served.engine))


def install(app: FastAPI) -> None:
    """Every failure answered in OpenAI's shape: ours, a malformed body, an unknown route, a bug."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
