"""The OpenAI API's request bodies and error shape, as the server checks them.

Values OpenAI rejects are rejected here with a 400 that names the field; fields alignkit does not use
(`frequency_penalty`, `logit_bias`, `user`, ...) are accepted and ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant", "tool")
GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding (as vLLM does): dividing by it overflows
INT64 = 2**63
MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's chat limit, vLLM's)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role `{role}`; use one of {', '.join(ROLES)}")
        return role

    def text(self) -> str:
        """The content as one string: text parts joined; other parts (images, audio) are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise APIError(
                    400, f"content part of type `{part.type}`: this server takes text only", "messages"
                )
        return "".join(p.text or "" for p in self.content)


def _valid_text(value: Any, where: str) -> None:
    """Every string of the body must be valid Unicode: JSON lets a lone surrogate (\\ud800) through, which
    no tokenizer, database or response can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{where or 'the body'} holds text that is not valid Unicode ({exc.reason})"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_text(key, where)
            _valid_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _valid_text(item, f"{where}.{i}")


class Body(BaseModel):
    """A request body: unknown fields allowed, invalid Unicode refused, `null` meaning "the default" (some
    clients send every field, unset ones as null)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: Any) -> Any:
        _valid_text(data, "")
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class Sampling(Body):
    """The settings both endpoints share."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy(cls, temperature: float) -> float:
        return 0.0 if temperature < GREEDY_BELOW else temperature

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("`stop` takes at most 4 non-empty strings")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives per token the request wants with its tokens' log-probs (None: no log-probs)."""
        return None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "`top_logprobs` needs `logprobs: true`", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        # `developer` is the newer name of `system` in OpenAI's API; chat templates know `system`
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    echo: bool = False

    def token_limit(self) -> int | None:
        return self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        if self.logprobs is not None and self.echo:
            raise APIError(
                400,
                "`echo` with `logprobs` is not supported: the log-probs are the generated tokens' only; "
                "leave `echo` out",
                "echo",
            )
        return self.logprobs

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise APIError(400, "`prompt` is an empty list", "prompt")
        return prompts


class Feedback(Body):
    id: str
    label: Literal["up", "down"]
    comment: str | None = None
    index: int = Field(0, ge=0, lt=2**31)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) of pydantic's first error, with the field's path, e.g. `messages.0.role: ...`."""
    first = errors[0]
    # pydantic names the branch of a union it tried (`content.str`, `stop.list[str]`): not a field
    loc = [
        str(x) for x in first.get("loc", ()) if x != "body" and str(x) not in _TYPE_TAGS and "[" not in str(x)
    ]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON: " + str(first.get("ctx", {}).get("error", first.get("msg"))), None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param
