"""The OpenAI-compatible request handlers, independent of the web framework.

`OpenAIServing` turns a parsed request into engine requests (tokenize or render the chat template,
build `SamplingParams`, check the context window) and the engine's cumulative `RequestOutput`s back
into OpenAI responses: one JSON body, or SSE chunks whose deltas are the difference between
consecutive cumulative outputs. Stop strings are held back by the engine's output processor, so the
concatenated deltas equal the non-streamed text.

Work that grows with the request (tokenizing, rendering the chat template, checking the parameters)
runs on a small thread pool, each thread with its own tokenizer copy, so the event loop stays free to
answer `/health` and stream other responses; the engine's device work happens on its own thread
(`AsyncEngine`). Chat templates render under a deadline (`guards.call_with_deadline`) and a size
bound; a template sent with the request is refused unless the operator trusts request templates.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import inspect
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Optional, Union

from jengine.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError, RequestStream
from jengine.sampling_params import SamplingParams
from jengine.structured_output.params import StructuredOutputsParams

from .chat_output import ChoiceOutput
from .guards import RenderTimeout, call_with_deadline, check_text
from .lora import LoRAModules
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .reasoning_parsers import get_reasoning_parser
from .tool_parsers import NamedToolParser, RequiredToolParser, ToolParser, get_tool_parser
from .tools import ToolPlan, plan_tools, template_tool_calls

_LOGPROB_FLOOR = -9999.0  # JSON has no -inf
MAX_PROMPTS_PER_REQUEST = 256  # prompts in one /v1/completions batch
MAX_CHARS_PER_TOKEN = 64  # text longer than this many characters per token of max_model_len cannot fit: refused untokenized
DEFAULT_CHAT_TEMPLATE_TIMEOUT_S = 5.0
RETRY_AFTER_S = "1"  # the Retry-After header of a 503 (overloaded): the queue moves every engine step
_FIELD_RE = re.compile(r"^(?:SamplingParams\.)?([a-z_]+)\b")


def clamp_logprob(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return _LOGPROB_FLOOR if math.isnan(value) or value < _LOGPROB_FLOOR else value


def sse(payload: Union[dict, str]) -> str:
    """One server-sent event line pair."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return f"data: {data}\n\n"


def bad_request(error: ValueError, *, prompt_param: str = "prompt", rename: Optional[dict[str, str]] = None) -> APIError:
    """Maps an engine/SamplingParams ValueError to a 400 whose `param` names the request field."""
    message = str(error)
    m = _FIELD_RE.match(message)
    param = "structured_outputs" if message.startswith("StructuredOutputsParams") else m.group(1) if m else None
    if param in ("prompt", "prompt_token_ids"):
        param = prompt_param
    if rename and param in rename:
        param = rename[param]
    return APIError(400, message, param=param)


def parse_logit_bias(bias: Optional[dict[Any, Any]]) -> Optional[dict[int, float]]:
    """OpenAI's `logit_bias` (token ids as JSON object keys, so strings) as {token id: bias}, each bias
    clamped to [-100, 100] as vLLM does; a key that is not an integer or a bias that is not a finite
    number is a 400 naming `logit_bias`."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise APIError(400, f"logit_bias keys must be token ids (integers), got {key!r}", param="logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise APIError(400, f"logit_bias values must be finite numbers, got {value!r} for token {key}", param="logit_bias")
        out[token] = min(100.0, max(-100.0, float(value)))
    return out


def structured_outputs_of(response_format: Optional[dict[str, Any]], structured: Optional[dict[str, Any]]) -> Optional[StructuredOutputsParams]:
    """The request's output constraint: OpenAI's `response_format` (`json_object`, or `json_schema` with
    its `schema`; `strict` is accepted as vLLM does, without narrowing schemas to OpenAI's strict subset)
    or vLLM's `structured_outputs` field. A 400 naming the field when it is malformed or both are set."""
    kind = None if response_format is None else response_format.get("type")
    if response_format is not None and kind not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"response_format type {kind!r} is not supported: use 'text', 'json_object' or 'json_schema'", param="response_format")
    if structured is not None and kind not in (None, "text"):
        raise APIError(400, "give either response_format or structured_outputs, not both", param="structured_outputs")
    try:
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            assert response_format is not None  # `kind` came from it
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("response_format.json_schema must be an object with a 'schema' object")
            return StructuredOutputsParams(json=spec["schema"])
        if structured is not None:
            unknown = sorted(set(structured) - {"json", "regex", "choice", "grammar", "json_object"})
            if unknown:
                raise ValueError(f"structured_outputs has unknown keys {unknown}")
            return StructuredOutputsParams(**structured)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param="response_format" if kind in ("json_object", "json_schema") else "structured_outputs") from e
    return None


def chat_role_and_echo(req: ChatCompletionRequest) -> tuple[str, str]:
    """The reply's role ("assistant" after a generation prompt, else the last message's role, as vLLM)
    and, with `echo`, the text to put before the completion: the last message's content when that
    message has the reply's role (continuing a partial assistant message)."""
    last = normalize_messages(req.messages)[-1]
    role = "assistant" if req.add_generation_prompt else last["role"]
    echo = last["content"] if req.echo and last["role"] == role else ""
    return role, echo


def build_sampling_params(fields: dict[str, Any], max_logprobs: int) -> SamplingParams:
    """`SamplingParams` from request fields (None = default). Logprob counts are checked against the
    server's `--max-logprobs` rather than the dataclass default."""
    kw = {k: v for k, v in fields.items() if v is not None}
    logprobs = kw.pop("logprobs", None)
    prompt_logprobs = kw.pop("prompt_logprobs", None)
    if kw.get("top_k") == -1:
        kw["top_k"] = 0
    params = SamplingParams(**kw)
    params.logprobs = logprobs
    params.prompt_logprobs = prompt_logprobs
    params.verify(max_logprobs)
    return params


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Chat messages with string contents (text parts joined by newlines), or a 400 saying what is wrong."""
    if not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(400, f"messages[{i}].content: part type {kind!r} is not supported (text only)", param="messages")
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string, a list of text parts or null", param="messages")
        msg = {**msg, "content": "" if content is None else content}
        if msg.get("tool_calls") is not None:
            msg["tool_calls"] = template_tool_calls(msg["tool_calls"], i)
        out.append(msg)
    return out


class _Choice:
    """What has been sent of one choice of a streamed response."""

    __slots__ = ("text_len", "num_tokens", "started", "finished")

    def __init__(self) -> None:
        self.text_len = 0
        self.num_tokens = 0
        self.started = False
        self.finished = False


class OpenAIServing:
    """Completions, chat completions, tokenize/detokenize and model listing over one `AsyncEngine`."""

    def __init__(self, engine: AsyncEngine, served_model_names: Sequence[str], *, model_path: Optional[str] = None,
                 chat_template: Optional[str] = None, trust_request_chat_template: bool = False,
                 chat_template_timeout_s: float = DEFAULT_CHAT_TEMPLATE_TIMEOUT_S, preprocess_threads: Optional[int] = None,
                 enable_auto_tool_choice: bool = False, tool_call_parser: Optional[str] = None,
                 reasoning_parser: Optional[str] = None) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must not be empty")
        if enable_auto_tool_choice and not tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        self.tool_parser_cls = get_tool_parser(tool_call_parser) if tool_call_parser else None
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.reasoning_parser_cls = get_reasoning_parser(reasoning_parser) if reasoning_parser else None
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.model_name = self.served_model_names[0]
        self.model_path = model_path or self.model_name
        self.chat_template = chat_template
        self.max_model_len = engine.max_model_len
        self.max_logprobs = int(getattr(engine.config, "max_logprobs", 20))
        self.created = int(time.time())
        self.trust_request_chat_template = trust_request_chat_template
        self.draining = False  # set on SIGTERM: new requests get 503 while those in flight finish
        self.loras = LoRAModules(engine, self.served_model_names)  # adapter names a request's `model` may pick
        self._preparing = 0  # run_sync calls queued or running (event loop only)
        self.chat_template_timeout_s = chat_template_timeout_s
        # Private copies: the engine thread decodes with its own tokenizer, the event loop (this thread)
        # uses `self.tokenizer`, and each preprocessing thread makes its own on first use.
        self.tokenizer = self._copy_tokenizer()
        self._local = threading.local()
        self._local.tokenizer = self.tokenizer
        threads = preprocess_threads or min(4, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jengine-preprocess")
        try:
            params = inspect.signature(self.tokenizer.apply_chat_template).parameters.values()
            self._reserved_template_kwargs = frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        except (TypeError, ValueError):
            self._reserved_template_kwargs = frozenset()
        self._reserved_template_kwargs |= {"messages", "conversation", "tools", "documents", "chat_template", "tokenize"}

    def _copy_tokenizer(self) -> Any:
        try:
            return copy.deepcopy(self.engine.tokenizer)
        except Exception:  # noqa: BLE001 - some tokenizers do not copy; sharing is read-only anyway
            return self.engine.tokenizer

    @property
    def _tok(self) -> Any:
        """This thread's tokenizer (fast tokenizers must not be used from several threads at once)."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = self._copy_tokenizer()
        return tok

    async def run_sync(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` on the preprocessing pool, awaited from the event loop."""
        self._preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))
        finally:
            self._preparing -= 1

    def check_capacity(self) -> None:
        """503 (before the body is even read) when requests being prepared plus those in the engine
        already reach `--max-pending-requests`: a flood cannot pile up bodies and work in front of the
        engine either."""
        limit = self.engine.max_pending_requests
        if limit is not None and self.engine.num_pending_requests + self._preparing >= limit:
            raise APIError(503, f"the server is at its limit of {limit} pending requests; retry later",
                           headers={"Retry-After": RETRY_AFTER_S})

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ----- shared helpers -------------------------------------------------------------------------
    def check_model(self, name: Optional[str]) -> None:
        """404 unless `name` is empty, a served name of the base model or a loaded LoRA adapter."""
        self.loras.get(name)

    @property
    def max_text_chars(self) -> int:
        return MAX_CHARS_PER_TOKEN * self.max_model_len

    def check_prompt_text(self, text: str, param: str) -> None:
        """400 for text the tokenizer cannot take (lone surrogates) or that cannot fit the context window
        whatever it tokenizes to, before spending time tokenizing it."""
        check_text(text, param)
        if len(text) > self.max_text_chars:
            raise APIError(400, f"{param} is {len(text)} characters: more than max_model_len={self.max_model_len} tokens can hold "
                                f"({MAX_CHARS_PER_TOKEN} characters per token at most)", param=param)

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        self.check_prompt_text(text, param)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: Sequence[Any], *, chat_template: Optional[str], add_generation_prompt: bool,
                    continue_final_message: bool, kwargs: Optional[dict[str, Any]],
                    tools: Optional[list[dict[str, Any]]] = None) -> str:
        """The chat prompt text; refuses request templates unless trusted, and bounds rendering in time
        (`chat_template_timeout_s`) and size (what max_model_len can hold)."""
        msgs = normalize_messages(messages)
        if chat_template is not None and not self.trust_request_chat_template:
            raise APIError(400, "this server does not accept chat templates in requests (start it with --trust-request-chat-template "
                                "to allow them)", param="chat_template")
        kwargs = dict(kwargs or {})
        reserved = sorted(k for k in kwargs if k in self._reserved_template_kwargs)
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)} (use the request fields)", param="chat_template_kwargs")
        tok = self._tok
        template = chat_template or self.chat_template
        if template is None and not getattr(tok, "chat_template", None):
            raise APIError(400, "the model has no chat template; start the server with --chat-template", param="messages")
        if add_generation_prompt and continue_final_message:
            raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true", param="continue_final_message")
        try:
            text = call_with_deadline(
                tok.apply_chat_template, self.chat_template_timeout_s,
                msgs, chat_template=template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False,
                **({"tools": tools} if tools is not None else {}), **kwargs,
            )
        except APIError:
            raise
        except RenderTimeout as e:
            raise APIError(400, f"could not apply the chat template: {e}", param="chat_template" if chat_template is not None else "messages") from None
        except (Exception, RecursionError) as e:  # noqa: BLE001 - template errors are the request's fault
            raise APIError(400, f"could not apply the chat template: {e}", param="messages") from e
        if not isinstance(text, str):
            raise APIError(400, "the chat template did not render to text", param="messages")
        self.check_prompt_text(text, "messages")
        return text

    def _token_str(self, token_id: int, lp: Any, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        if lp is not None and getattr(lp, "decoded_token", None) is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[Optional[dict]], num_top: int,
                            offset: int, as_ids: bool) -> dict[str, Any]:
        """OpenAI completions `logprobs` object for `token_ids` starting at text offset `offset`."""
        tops: list[Optional[dict[str, Any]]] = []
        tokens, token_lps, offsets = [], [], []
        for tid, entry in zip(token_ids, logprobs):
            lp = None if entry is None else entry.get(tid)
            s = self._token_str(tid, lp, as_ids)
            tokens.append(s)
            token_lps.append(None if lp is None else clamp_logprob(lp.logprob))
            if entry is None:
                tops.append(None)
            else:
                ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))
                tops.append({self._token_str(k, v, as_ids): clamp_logprob(v.logprob) for k, v in ranked
                             if k == tid or (v.rank is not None and v.rank <= num_top)})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[dict], num_top: int, as_ids: bool) -> dict[str, Any]:
        content = []
        for tid, entry in zip(token_ids, logprobs):
            lp = entry.get(tid)
            s = self._token_str(tid, lp, as_ids)
            ranked = sorted(((k, v) for k, v in entry.items() if v.rank is not None and v.rank <= num_top), key=lambda kv: kv[1].rank)
            top = []
            for k, v in ranked[:num_top]:
                ts = self._token_str(k, v, as_ids)
                top.append({"token": ts, "logprob": clamp_logprob(v.logprob), "bytes": list(ts.encode("utf-8"))})
            content.append({"token": s, "logprob": _LOGPROB_FLOOR if lp is None else clamp_logprob(lp.logprob),
                            "bytes": list(s.encode("utf-8")), "top_logprobs": top})
        return {"content": content}

    @staticmethod
    def usage(finals: Sequence[Any]) -> dict[str, Any]:
        prompt = sum(len(o.prompt_token_ids or ()) for o in finals)
        completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
        cached = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in finals)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _max_tokens(self, requested: Optional[int], prompt_len: int, field: str, prompt_param: str = "prompt") -> Optional[int]:
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"prompt is {prompt_len} tokens, but max_model_len is {self.max_model_len}: the prompt must leave room "
                                "for at least one generated token", param=prompt_param)
        if requested is None:
            return max(1, self.max_model_len - prompt_len)
        if isinstance(requested, int) and requested >= 1 and prompt_len + requested > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
                f"Please reduce the length of the prompt or {field}.",
                param=field,
            )
        return requested

    def _params(self, req: Any, *, max_tokens: Optional[int], logprobs: Optional[int], rename: dict[str, str],
                tool_plan: Optional[ToolPlan] = None) -> SamplingParams:
        structured = structured_outputs_of(req.response_format, req.structured_outputs)
        if structured is not None and req.response_format is not None:
            rename = {**rename, "structured_outputs": "response_format"}
        if tool_plan is not None and tool_plan.constraint is not None:
            if structured is not None:
                raise APIError(400, f"tool_choice {tool_plan.mode!r} constrains the output itself: drop response_format / structured_outputs",
                               param="tool_choice")
            structured, rename = tool_plan.constraint, {**rename, "structured_outputs": "tools"}
        fields = dict(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
            prompt_logprobs=req.prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, logit_bias=parse_logit_bias(req.logit_bias),
            structured_outputs=structured,
        )
        try:
            params = build_sampling_params(fields, self.max_logprobs)
        except (ValueError, TypeError) as e:
            raise bad_request(ValueError(str(e)), rename=rename) from e
        if tool_plan is not None and tool_plan.mode == "auto" and self.tool_parser_cls is not None:
            self.tool_parser_cls().adjust_request(params)
        return params

    def check_admitting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down: send the request to another replica", code="shutting_down",
                           headers={"Retry-After": RETRY_AFTER_S})

    def _start(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: Optional[str],
               priority: int, prompt_param: str, rename: dict[str, str], model: Optional[str] = None) -> RequestStream:
        self.check_admitting()
        lora = self.loras.get(model)  # a LoRA adapter named by the request's `model` (404 if unloaded meanwhile)
        try:
            return self.engine.add_request(request_id, prompt_ids, params, prompt=prompt, priority=priority, lora_request=lora)
        except EngineOverloadedError as e:
            raise APIError(503, str(e), headers={"Retry-After": RETRY_AFTER_S}) from e
        except EngineDeadError as e:
            raise APIError(500, f"the engine is not running: {e}") from e
        except ValueError as e:
            raise bad_request(e, prompt_param=prompt_param, rename=rename) from e

    @staticmethod
    async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, output) from several streams as they come; aborts them all when closed early."""
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                queue.put_nowait((i, e))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.cancel()

    @staticmethod
    def _raise_if_failed(out: Any) -> None:
        """An output whose choice the engine ended with finish_reason "error" (it could not run the
        request) becomes a 500 for its client; other requests are not affected."""
        for c in out.outputs:
            if c.finish_reason == "error":
                raise APIError(500, str(c.stop_reason or "the engine could not serve this request"), code="engine_error")

    @staticmethod
    def _engine_error(e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, EngineDeadError):
            return APIError(500, f"the engine is not running: {e}")
        if isinstance(e, ValueError):
            return bad_request(e)
        return APIError(500, f"internal error: {e!r}")

    # ----- /v1/completions ------------------------------------------------------------------------
    def _completion_prompts(self, req: CompletionRequest) -> list[tuple[Optional[str], list[int]]]:
        p = req.prompt
        if isinstance(p, str):
            items: list[Any] = [p]
        elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            items = [p]
        else:
            items = list(p)
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(items) > MAX_PROMPTS_PER_REQUEST:
            raise APIError(400, f"prompt holds {len(items)} prompts; at most {MAX_PROMPTS_PER_REQUEST} are served in one request", param="prompt")
        for item in items:  # cheap checks of every prompt before tokenizing any
            if isinstance(item, str):
                self.check_prompt_text(item, "prompt")
            elif len(item) >= self.max_model_len:
                raise APIError(400, f"prompt is {len(item)} tokens, but max_model_len is {self.max_model_len}: the prompt must leave "
                                    "room for at least one generated token", param="prompt")
        out: list[tuple[Optional[str], list[int]]] = []
        for item in items:
            if isinstance(item, str):
                ids = self.encode(item, req.add_special_tokens)
                self._max_tokens(None, len(ids), "max_tokens")  # an over-long prompt stops the work at once
                out.append((item, ids))
            else:
                out.append((None, [int(t) for t in item]))
        return out

    def prepare_completion(self, req: CompletionRequest) -> list[tuple[Optional[str], list[int], SamplingParams]]:
        """Checks, tokenizes and validates every prompt of a completions request (on the preprocessing
        pool): (text, token ids, params) per prompt, or an APIError before anything is queued."""
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        want_prompt_lps = req.prompt_logprobs
        if req.echo and req.logprobs is not None and want_prompt_lps is None:
            want_prompt_lps = req.logprobs
        req_fields = req.model_copy(update={"prompt_logprobs": want_prompt_lps})
        # Every field checked once before the prompts are tokenized (max_tokens against the window below).
        self._params(req_fields, max_tokens=req.max_tokens, logprobs=req.logprobs, rename={})
        plans = []
        for text, ids in self._completion_prompts(req):
            max_tokens = self._max_tokens(req.max_tokens, len(ids), "max_tokens")
            params = self._params(req_fields, max_tokens=max_tokens, logprobs=req.logprobs, rename={})
            try:
                self.engine.validate(ids, params)
            except ValueError as e:
                raise bad_request(e) from e
            plans.append((text, ids, params))
        return plans

    async def create_completion(self, req: CompletionRequest) -> Union[dict[str, Any], AsyncIterator[str]]:
        self.check_admitting()
        plans = await self.run_sync(self.prepare_completion, req)
        base = req.request_id or f"cmpl-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []
        try:
            for i, (text, ids, params) in enumerate(plans):
                rid = base if len(plans) == 1 else f"{base}-{i}"
                streams.append(self._start(rid, ids, params, text, req.priority, "prompt", {}, req.model))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream_completion(base, created, req, plans, streams, include_usage)
        finals: dict[int, Any] = {}
        try:
            async for i, out in self._merge(streams):
                if out.finished:
                    finals[i] = out
        except BaseException as e:
            for s in streams:
                s.cancel()
            if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt)):
                raise
            raise self._engine_error(e) from e
        if len(finals) != len(streams):
            raise APIError(500, "a request ended without a final output (aborted)")
        for out in finals.values():
            self._raise_if_failed(out)
        choices = []
        for i in range(len(plans)):
            out = finals[i]
            prefix, prefix_lps = self._echo(req, plans[i], out)
            for c in out.outputs:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self.completion_logprobs(c.token_ids, c.logprobs or [], req.logprobs, len(prefix), req.return_tokens_as_token_ids)
                    if prefix_lps is not None:
                        logprobs = {k: prefix_lps[k] + logprobs[k] for k in logprobs}
                choices.append({"index": i * req.n + c.index, "text": prefix + c.text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "prompt_logprobs": None})
        return {"id": base, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self.usage([finals[i] for i in range(len(plans))])}

    def _echo(self, req: CompletionRequest, plan: tuple, out: Any) -> tuple[str, Optional[dict[str, list]]]:
        if not req.echo:
            return "", None
        text, ids, _ = plan
        prefix = text if text is not None else self.tokenizer.decode(ids)
        lps = None
        if req.logprobs is not None:
            plps = out.prompt_logprobs or [None] * len(ids)
            lps = self.completion_logprobs(ids, list(plps), req.logprobs, 0, req.return_tokens_as_token_ids)
        return prefix, lps

    async def _stream_completion(self, base: str, created: int, req: CompletionRequest, plans: list, streams: list[RequestStream],
                                 include_usage: bool) -> AsyncIterator[str]:
        states = {(i, c): _Choice() for i in range(len(plans)) for c in range(req.n)}
        finals: dict[int, Any] = {}
        try:
            async for i, out in self._merge(streams):
                self._raise_if_failed(out)
                if out.finished:
                    finals[i] = out
                chunk_choices = []
                for c in out.outputs:
                    st = states[(i, c.index)]
                    if st.finished:
                        continue
                    prefix, prefix_lps = ("", None)
                    if not st.started:
                        prefix, prefix_lps = self._echo(req, plans[i], out)
                    delta = c.text[st.text_len:]
                    if not delta and not prefix and c.finish_reason is None:
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        new_ids = c.token_ids[st.num_tokens:]
                        new_lps = (c.logprobs or [])[st.num_tokens:]
                        logprobs = self.completion_logprobs(new_ids, new_lps, req.logprobs, st.text_len + len(prefix), req.return_tokens_as_token_ids)
                        if prefix_lps is not None:
                            logprobs = {k: prefix_lps[k] + logprobs[k] for k in logprobs}
                    st.started = True
                    st.text_len = len(c.text)
                    st.num_tokens = len(c.token_ids)
                    st.finished = c.finish_reason is not None
                    chunk_choices.append({"index": i * req.n + c.index, "text": prefix + delta, "logprobs": logprobs,
                                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if chunk_choices:
                    yield sse({"id": base, "object": "text_completion", "created": created, "model": self.model_name, "choices": chunk_choices})
            if include_usage and len(finals) == len(plans):
                yield sse({"id": base, "object": "text_completion", "created": created, "model": self.model_name,
                           "choices": [], "usage": self.usage([finals[i] for i in range(len(plans))])})
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001 - reported in-band: the status line is already sent
            yield sse(self._engine_error(e).body())
        finally:
            for s in streams:
                s.cancel()
        yield sse("[DONE]")

    # ----- /v1/chat/completions -------------------------------------------------------------------
    def prepare_chat(self, req: ChatCompletionRequest) -> tuple[str, list[int], SamplingParams, dict[str, str], ToolPlan]:
        """Checks the request, renders and tokenizes the chat (on the preprocessing pool): (text, token
        ids, params, field renames, tool plan), or an APIError before anything is queued."""
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        plan = plan_tools(req.tools, req.tool_choice, auto_enabled=self.enable_auto_tool_choice)
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        rename = {"max_tokens": field, "logprobs": "top_logprobs"}
        num_top = (req.top_logprobs or 0) if req.logprobs else None
        self._params(req, max_tokens=requested, logprobs=num_top, rename=rename, tool_plan=plan)  # every field, before rendering
        text = self.render_chat(req.messages, chat_template=req.chat_template, add_generation_prompt=req.add_generation_prompt,
                                continue_final_message=req.continue_final_message, kwargs=req.chat_template_kwargs, tools=req.tools)
        ids = self.encode(text, req.add_special_tokens, param="messages")
        max_tokens = self._max_tokens(requested, len(ids), field, "messages")
        if plan.constraint is not None:
            rename = {**rename, "structured_outputs": "tools"}
        params = self._params(req, max_tokens=max_tokens, logprobs=num_top, rename=rename, tool_plan=plan)
        try:
            self.engine.validate(ids, params)
        except ValueError as e:
            raise bad_request(e, prompt_param="messages", rename=rename) from e
        return text, ids, params, rename, plan

    def _choice_output(self, req: ChatCompletionRequest, plan: ToolPlan) -> ChoiceOutput:
        """A fresh parser of one choice's text (reasoning first, then tool calls as the plan says)."""
        tools: Optional[ToolParser] = None
        if plan.mode == "auto" and self.tool_parser_cls is not None:
            tools = self.tool_parser_cls(req.tools)
        elif plan.mode == "required":
            tools = RequiredToolParser(req.tools)
        elif plan.mode == "named":
            tools = NamedToolParser(plan.function or "", req.tools)
        return ChoiceOutput(self.reasoning_parser_cls() if self.reasoning_parser_cls else None, tools)

    @staticmethod
    def _finish_reason(plan: ToolPlan, out: ChoiceOutput, reason: Optional[str]) -> Optional[str]:
        """"tool_calls" when the model chose to call tools and finished (auto, required); a named
        function keeps "stop", as OpenAI and vLLM answer a forced call."""
        if reason == "stop" and out.calls and plan.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    async def create_chat_completion(self, req: ChatCompletionRequest) -> Union[dict[str, Any], AsyncIterator[str]]:
        self.check_admitting()
        text, ids, params, rename, plan = await self.run_sync(self.prepare_chat, req)
        num_top = params.logprobs
        role, echo = chat_role_and_echo(req)
        base = req.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        stream = self._start(base, ids, params, text, req.priority, "messages", rename, req.model)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream_chat(base, created, req, stream, num_top, include_usage, role, echo, plan)
        final = None
        try:
            async for out in stream:
                if out.finished:
                    final = out
        except BaseException as e:
            stream.cancel()
            if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt)):
                raise
            raise self._engine_error(e) from e
        if final is None:
            raise APIError(500, "the request ended without a final output (aborted)")
        self._raise_if_failed(final)
        choices = []
        for c in final.outputs:
            logprobs = None if num_top is None else self.chat_logprobs(c.token_ids, c.logprobs or [], num_top, req.return_tokens_as_token_ids)
            parsed = self._choice_output(req, plan)
            parsed.update(c.text, final=True)
            choices.append({"index": c.index, "message": parsed.message(role, echo), "logprobs": logprobs,
                            "finish_reason": self._finish_reason(plan, parsed, c.finish_reason), "stop_reason": c.stop_reason})
        return {"id": base, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self.usage([final])}

    async def _stream_chat(self, base: str, created: int, req: ChatCompletionRequest, stream: RequestStream,
                           num_top: Optional[int], include_usage: bool, role: str, echo: str, plan: ToolPlan) -> AsyncIterator[str]:
        head = {"id": base, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        states = [_Choice() for _ in range(req.n)]
        parsers = [self._choice_output(req, plan) for _ in range(req.n)]
        final = None
        try:
            for c in range(req.n):  # the first delta of every choice carries the role (then the echo, if any)
                yield sse({**head, "choices": [{"index": c, "delta": {"role": role, "content": ""}, "logprobs": None, "finish_reason": None}]})
                if echo:
                    yield sse({**head, "choices": [{"index": c, "delta": {"content": echo}, "logprobs": None, "finish_reason": None}]})
            async for out in stream:
                self._raise_if_failed(out)
                if out.finished:
                    final = out
                chunk_choices = []
                for c in out.outputs:
                    st = states[c.index]
                    if st.finished:
                        continue
                    delta = parsers[c.index].update(c.text, final=c.finish_reason is not None)
                    if not delta and c.finish_reason is None:
                        continue
                    logprobs = None
                    if num_top is not None:
                        logprobs = self.chat_logprobs(c.token_ids[st.num_tokens:], (c.logprobs or [])[st.num_tokens:], num_top, req.return_tokens_as_token_ids)
                    st.text_len, st.num_tokens, st.finished = len(c.text), len(c.token_ids), c.finish_reason is not None
                    chunk_choices.append({"index": c.index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": self._finish_reason(plan, parsers[c.index], c.finish_reason), "stop_reason": c.stop_reason})
                if chunk_choices:
                    yield sse({**head, "choices": chunk_choices})
            if include_usage and final is not None:
                yield sse({**head, "choices": [], "usage": self.usage([final])})
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001
            yield sse(self._engine_error(e).body())
        finally:
            stream.cancel()
        yield sse("[DONE]")

    # ----- tokenizer and models -------------------------------------------------------------------
    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "pass exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            text = self.render_chat(req.messages, chat_template=req.chat_template, add_generation_prompt=req.add_generation_prompt,
                                    continue_final_message=req.continue_final_message, kwargs=req.chat_template_kwargs, tools=req.tools)
            ids = self.encode(text, bool(req.add_special_tokens), param="messages")
        else:
            assert req.prompt is not None  # exactly one of prompt and messages, checked above
            ids = self.encode(req.prompt, True if req.add_special_tokens is None else req.add_special_tokens)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = self._tok.convert_ids_to_tokens(ids)
        return body

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.engine.core, "vocab_size", 0) or len(self.tokenizer))

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        vocab = self.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens contains {bad[0]}, outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": self._tok.decode(req.tokens)}

    def list_models(self) -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "jengine", "root": self.model_path,
                 "parent": None, "max_model_len": self.max_model_len} for name in self.served_model_names]
        data += [{"id": lora.lora_name, "object": "model", "created": self.created, "owned_by": "jengine", "root": lora.lora_path,
                  "parent": self.model_name, "max_model_len": self.max_model_len} for lora in self.loras.list()]
        return {"object": "list", "data": data}
