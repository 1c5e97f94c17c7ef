"""Request models of the OpenAI-compatible HTTP API (OpenAI's fields plus vLLM's extras) and its errors.

Requests are pydantic models that ignore unknown fields, as OpenAI-compatible servers must (clients
send fields this server does not know). Sampling ranges are not checked here: `SamplingParams.verify`
owns them, so HTTP, gRPC and the Python API reject the same values with the same messages; only
`priority` (not a sampling field) is bounded here. `parse_request` parses a body with pydantic's JSON
parser, which also rejects lone surrogate escapes and nesting over a fixed depth. Responses are built
as plain dicts (see `serving.py`): they are only ever serialized.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLargeError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None, type: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else str(status)
        self.type = type or self.TYPES.get(status, "APIError")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: Optional[str] = None
    n: int = 1
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict[str, Any]] = None  # only {"type": "text"}: no structured output yet
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: Optional[int] = None
    priority: int = Field(0, ge=-(2**63), lt=2**63)
    request_id: Optional[str] = None
    return_tokens_as_token_ids: bool = False


PromptField = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    add_special_tokens: bool = True


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = False
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Any] = None


class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False
    tools: Optional[list[dict[str, Any]]] = None


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]


def validation_error(errors: Sequence[Any]) -> APIError:
    """A 400 from pydantic's error list: malformed JSON says so, otherwise up to five `field: problem`."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        detail = str(first.get("ctx", {}).get("error", first.get("msg")))
        if "hex escape" in detail or "surrogate" in detail:
            detail += " (a \\uD800-\\uDFFF escape without its pair is not valid Unicode text)"
        return APIError(400, f"malformed JSON body: {detail}")
    message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}" for err in errors[:5])
    return APIError(400, message, param=loc[0] if loc else None)


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(cls: type[RequestT], raw: bytes) -> RequestT:
    """`cls` from a JSON body, or a 400 APIError (OpenAI shape) naming the first bad field."""
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
