"""Request models of the OpenAI-compatible HTTP API (OpenAI's fields plus vLLM's extras) and its errors.

Requests are pydantic models that ignore unknown fields, as OpenAI-compatible servers must (clients
send fields this server does not know). Sampling ranges are not checked here: `SamplingParams.verify`
owns them, so HTTP, gRPC and the Python API reject the same values with the same messages; only
`priority` (not a sampling field) is bounded here. The OpenAPI schema still states those ranges
(`_doc`: schema-only annotations built from the same constants, plus the model-dependent bounds that
`api_server` fills in), so clients and schema-driven fuzzers know what is accepted. `parse_request` parses a body with pydantic's JSON
parser, which also rejects lone surrogate escapes and nesting over a fixed depth. Responses are built
as plain dicts (see `serving.py`): they are only ever serialized.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jengine.sampling_params import (INT32_MAX, MAX_N, MAX_REPETITION_PENALTY, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                                     MAX_TEMPERATURE, MIN_REPETITION_PENALTY)
from jengine.worker.model_runner import MAX_LOGIT_BIAS as MAX_LOGIT_BIAS_ENTRIES


def _doc(default: Any = None, **schema: Any) -> Any:
    """A field whose OpenAPI schema carries `schema` (ranges, lengths) without pydantic enforcing it."""
    return Field(default, json_schema_extra=schema)


_TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}, "required": ["type", "text"]}
_FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}
_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {"name": _FUNCTION_NAME, "arguments": {"type": "string"}}}}}
MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["role"],
    "properties": {"role": {"type": "string"},
                   "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]},
                   "tool_calls": {"type": "array", "items": _TOOL_CALL}, "tool_call_id": {"type": "string"}, "name": {"type": "string"}},
}
# Any JSON schema is accepted as a tool's `parameters`; the OpenAPI document states the common shape
# (flat properties of simple types), which is what schema-driven clients and fuzzers should send.
_PARAMETERS = {"type": "object", "required": ["type"], "additionalProperties": False, "properties": {
    "type": {"const": "object"}, "required": {"type": "array", "items": {"type": "string"}},
    "properties": {"type": "object", "maxProperties": 4, "additionalProperties": {
        "type": "object", "required": ["type"], "additionalProperties": False,
        "properties": {"type": {"enum": ["string", "integer", "number", "boolean"]}, "description": {"type": "string"}}}}}}
TOOLS_SCHEMA = {"anyOf": [{"type": "array", "maxItems": 8, "items": {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {"name": _FUNCTION_NAME, "description": {"type": "string"},
                                                                        "parameters": _PARAMETERS}}}}},
    {"type": "null"}]}
NAMED_TOOL_CHOICE = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"}, "function": {"type": "object", "required": ["name"], "properties": {"name": _FUNCTION_NAME}}}}
_STOP = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS},
                   {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS}},
                   {"type": "null"}]}
_TOKEN_IDS: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0}}


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
    n: int = _doc(1, minimum=1, maximum=MAX_N)
    seed: Optional[int] = _doc(minimum=-(2**63), maximum=2**64 - 1)
    stop: Optional[Union[str, list[str]]] = _doc(**_STOP)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = _doc(minimum=0, maximum=MAX_TEMPERATURE)
    top_p: Optional[float] = _doc(exclusiveMinimum=0, maximum=1)
    presence_penalty: float = _doc(0.0, minimum=-2, maximum=2)
    frequency_penalty: float = _doc(0.0, minimum=-2, maximum=2)
    logit_bias: Optional[dict[str, float]] = _doc(anyOf=[{"type": "object", "maxProperties": MAX_LOGIT_BIAS_ENTRIES, "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                                                          "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}, {"type": "null"}])
    response_format: Optional[dict[str, Any]] = _doc(anyOf=[
        {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}, "required": ["type"]},
        {"type": "object", "properties": {"type": {"const": "json_schema"}, "json_schema": {
            "type": "object", "properties": {"name": {"type": "string"}, "schema": {"type": "object"}, "strict": {"type": ["boolean", "null"]}},
            "required": ["schema"]}}, "required": ["type", "json_schema"]},
        {"type": "null"}])
    # vLLM's body field: exactly one of json (a schema), regex, choice, grammar, json_object
    structured_outputs: Optional[dict[str, Any]] = _doc(anyOf=[{"type": "object", "minProperties": 1, "maxProperties": 1, "properties": {
        "json": {"type": ["object", "string"]}, "regex": {"type": "string"}, "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "grammar": {"type": "string"}, "json_object": {"const": True}}, "additionalProperties": False}, {"type": "null"}])
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = _doc(minimum=-1, maximum=INT32_MAX)
    min_p: Optional[float] = _doc(minimum=0, maximum=1)
    repetition_penalty: Optional[float] = _doc(minimum=MIN_REPETITION_PENALTY, maximum=MAX_REPETITION_PENALTY)
    min_tokens: int = _doc(0, minimum=0, maximum=INT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = _doc(anyOf=[{**_TOKEN_IDS, "maxItems": MAX_STOP_TOKEN_IDS}, {"type": "null"}])
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: Optional[int] = _doc(minimum=0)
    priority: int = Field(0, ge=-(2**63), lt=2**63)
    request_id: Optional[str] = None
    return_tokens_as_token_ids: bool = False


PromptField = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "maxItems": 256, "items": {"type": "string", "minLength": 1}},
        {**_TOKEN_IDS, "minItems": 1}, {"type": "array", "minItems": 1, "maxItems": 256, "items": {**_TOKEN_IDS, "minItems": 1}}]})
    max_tokens: Optional[int] = _doc(16, minimum=1)
    echo: bool = False
    logprobs: Optional[int] = _doc(minimum=0)
    best_of: Optional[int] = _doc(minimum=1, maximum=MAX_N, description="must equal n when set")
    suffix: Optional[str] = _doc(maxLength=0, description="not supported: only empty")
    add_special_tokens: bool = True


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(json_schema_extra={"minItems": 1, "items": MESSAGE_SCHEMA})
    max_tokens: Optional[int] = _doc(minimum=1)
    max_completion_tokens: Optional[int] = _doc(minimum=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = _doc(minimum=0, description="needs logprobs: true")
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = False
    tools: Optional[list[dict[str, Any]]] = _doc(**TOOLS_SCHEMA)
    tool_choice: Optional[Any] = _doc(anyOf=[{"enum": ["none", "auto", "required"]}, NAMED_TOOL_CHOICE, {"type": "null"}],
                                      description='"auto" needs --enable-auto-tool-choice; a named function must be in tools')


class TokenizeRequest(_Request):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"oneOf": [  # exactly one of prompt and messages
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}}]})

    model: Optional[str] = None
    prompt: Optional[str] = _doc(description="exactly one of prompt and messages")
    messages: Optional[list[dict[str, Any]]] = _doc(anyOf=[{"type": "array", "minItems": 1, "items": MESSAGE_SCHEMA}, {"type": "null"}])
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False
    tools: Optional[list[dict[str, Any]]] = None


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int] = Field(json_schema_extra=_TOKEN_IDS)


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


def specialize_schema(components: dict[str, Any], *, model_names: Sequence[str], vocab_size: int, max_model_len: int,
                      max_logprobs: int, trust_request_chat_template: bool, auto_tool_choice: bool = False) -> None:
    """Fills the bounds that depend on the served model and the server's flags into the request
    schemas (OpenAPI components, in place): model names, token ids below the vocabulary size, token
    counts within the context window, logprob counts up to --max-logprobs, request chat templates only
    when trusted."""
    def token_ids(node: Any) -> None:  # every integer array item in a token-id field gets the vocabulary bound
        if isinstance(node, dict):
            if node.get("type") == "integer" and node.get("minimum") == 0:
                node["maximum"] = vocab_size - 1
            for value in node.values():
                token_ids(value)
        elif isinstance(node, list):
            for value in node:
                token_ids(value)

    for name in ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest"):
        props = components.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"] = {"anyOf": [{"enum": list(model_names)}, {"type": "null"}], "default": None}
        for field in ("prompt", "stop_token_ids", "tokens"):
            if field in props:
                token_ids(props[field])
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field]["maximum"] = max_model_len - 1
        for field in ("logprobs", "top_logprobs", "prompt_logprobs"):
            if field in props and props[field].get("minimum") == 0:
                props[field]["maximum"] = max_logprobs
        if "top_k" in props:
            props["top_k"]["maximum"] = vocab_size
        if "tool_choice" in props and not auto_tool_choice:
            # Stated without "auto" (refused without the flag) and without "required" / named functions, which
            # need `tools` naming them: a constraint between two fields that a schema-driven client cannot follow.
            props["tool_choice"] = {"anyOf": [{"const": "none"}, {"type": "null"}], "default": None,
                                    "description": '"required" or {"type": "function", "function": {"name"}} with tools naming it; '
                                                   '"auto" needs --enable-auto-tool-choice (off)'}
        if "chat_template" in props and not trust_request_chat_template:
            props["chat_template"] = {"type": "null", "default": None, "description": "refused unless --trust-request-chat-template"}
