"""The OpenAI-compatible and Triton generate request bodies, validated, and OpenAI's error shape.

Fields the agent does not use (`user`, `logit_bias`, penalties, ...) are accepted and
ignored, as the stock `openai` SDK and LangChain send some of them by default. Every
error is `BadRequest` with the parameter it concerns, answered as
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import AgentError

__all__ = [
    "MAX_STOP_CHARS",
    "MAX_STOPS",
    "BadRequest",
    "ChatRequest",
    "CompletionRequest",
    "GenerateRequest",
    "Message",
    "SamplingFields",
    "error_body",
    "parse",
]

MAX_STOPS = 4
_M = TypeVar("_M", bound=BaseModel)
MAX_STOP_CHARS = 64


class BadRequest(AgentError, ValueError):
    """A request the agent refuses with 400 (or `status`), in OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str = "invalid_value",
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status
        self.kind = kind


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """Return OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    """`stream_options` of OpenAI's API."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The parameters chat, completions and Triton generate share."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: list[str] | None = None
    n: int = 1

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(value)}")
        for stop in value:
            if not stop:
                raise ValueError("a stop sequence is empty")
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence is {len(stop)} characters, at most {MAX_STOP_CHARS}")
        return value

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value


class Message(BaseModel):
    """One chat turn; content is a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """Return the content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("only text content parts are supported", "messages", "invalid_value")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def limit(self) -> int | None:
        """Return the requested token limit (the newer name wins)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    """`POST /v1/completions` (one prompt string)."""

    model: str = Field(min_length=1)
    prompt: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False

    def limit(self) -> int | None:
        """Return the requested token limit."""
        return self.max_tokens


class GenerateRequest(BaseModel):
    """Triton's `POST /v2/models/{name}/generate`: `text_input` and model parameters."""

    model_config = ConfigDict(extra="ignore")

    text_input: str
    parameters: SamplingFields = Field(default_factory=SamplingFields)

    def limit(self) -> int | None:
        """Return the requested token limit (`max_tokens`)."""
        return self.parameters.max_tokens


def parse(model: type[_M], body: Any) -> _M:
    """Validate a JSON body; raise BadRequest naming the first parameter at fault."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        if model is GenerateRequest and loc[:1] == ["parameters"]:
            loc = loc[1:]
        param = ".".join(loc) or None
        message = first["msg"].removeprefix("Value error, ")
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise BadRequest(f"{param}: {message}" if param else message, param, code) from exc
