"""The request bodies `kiln serve` accepts: OpenAI's fields that kiln can honour, strictly typed.

Strict models with extra="forbid": a misspelt or unsupported parameter is a 400 naming it (kiln.serve.errors
turns pydantic's report into OpenAI's error shape), never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS = 4096          # one request's max_tokens ceiling
MAX_INPUTS = 256           # texts in one /v1/classify request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


def _only(value, allowed, what: str):
    if value not in allowed:
        raise ValueError(f"kiln serve supports {what}")
    return value


class _Sampling(_Strict):
    """The sampling fields /v1/completions and /v1/chat/completions share (those kiln can honour) plus top_k."""

    temperature: float = Field(1.0, le=2)
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        return _only(v, (1,), "only n=1 (send one request per completion)")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        return _only(v, (0, 0.0), "no penalty but 0")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        return _only(v or None, (None,), "no logit_bias")


class CompletionRequest(_Sampling):
    """POST /v1/completions: OpenAI's fields (those kiln can honour) plus top_k."""

    model: str | None = None
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)]
    # the server's own bounds (OpenAI's); the ranges every face shares are kiln.model.generation_settings's,
    # checked in kiln.serve.routes.completions as kiln generate and kiln.sample check them
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        return _only(v, (None, 1), "no best_of but 1")

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        return _only(v, (None,), "no logprobs")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        return _only(v, (None,), "no suffix")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message; content as a string or as OpenAI's list of text parts (joined)."""

    role: str
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def as_dict(self) -> dict:
        """{role, content[, name]} as a chat template reads it; OpenAI's `developer` role is the system's."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        return out | ({"name": self.name} if self.name is not None else {})


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: OpenAI's fields (those kiln can honour) plus top_k. Without max_tokens a
    reply may fill the rest of the context."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        return _only(v, (None, False), "no logprobs")


class ClassifyRequest(_Strict):
    """POST /v1/classify: one text or a list; input_pair for a run trained on text pairs."""

    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
    input_pair: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)] | None = None


def body_model(path: str) -> type[_Strict]:
    """The request body a route reads, for naming the known fields in an "unknown parameter" error."""
    if path.endswith("/chat/completions"):
        return ChatRequest
    return CompletionRequest if path.endswith("/completions") else ClassifyRequest
