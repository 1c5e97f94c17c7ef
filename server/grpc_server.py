"""The gRPC frontend (`jengine.v1.Generation`) on `grpc.aio`, sharing the HTTP server's engine and event loop.

`Generate` is server-streaming: one message per choice whenever that choice has new text (or ends),
usage on the last message. Sampling parameters go through the same `build_sampling_params` and engine
validation as HTTP (on the same preprocessing pool, off the event loop), so an invalid request gets
INVALID_ARGUMENT with the same message. A cancelled call
(client gone, deadline) cancels the handler task, whose `finally` aborts the engine request. A dead
engine answers UNAVAILABLE. The standard `grpc.health.v1.Health` service (overall and per service,
flipped to NOT_SERVING when the engine dies) and server reflection are registered.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jengine.engine.async_engine import EngineDeadError, EngineOverloadedError
from jengine.structured_output.params import StructuredOutputsParams

from . import jengine_pb2 as pb
from . import jengine_pb2_grpc as pb_grpc
from .protocol import APIError
from .serving import OpenAIServing, bad_request, build_sampling_params, clamp_logprob, parse_logit_bias

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "jengine.v1.Generation"

_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed",
    "include_stop_str_in_output", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "skip_special_tokens", "spaces_between_special_tokens",
)


def _status_for(error: APIError) -> grpc.StatusCode:
    if error.code == "shutting_down":
        return grpc.StatusCode.UNAVAILABLE
    return {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
            503: grpc.StatusCode.RESOURCE_EXHAUSTED}.get(error.status, grpc.StatusCode.UNAVAILABLE if error.status == 500 else grpc.StatusCode.INTERNAL)


class GenerationServicer(pb_grpc.GenerationServicer):
    """Implements `jengine.v1.Generation` with the HTTP frontend's `OpenAIServing` helpers."""

    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving
        self.engine = serving.engine

    # ----- request conversion ---------------------------------------------------------------------
    def _sampling_fields(self, sp: pb.SamplingParams) -> dict[str, Any]:
        fields: dict[str, Any] = {name: getattr(sp, name) for name in _SAMPLING_FIELDS if sp.HasField(name)}
        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "seed"):
            if name in fields:
                fields[name] = int(fields[name])
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if name in fields:
                fields[name] = float(fields[name])
        if sp.stop:
            fields["stop"] = list(sp.stop)
        if sp.stop_token_ids:
            fields["stop_token_ids"] = [int(t) for t in sp.stop_token_ids]
        if sp.logit_bias:
            fields["logit_bias"] = parse_logit_bias(dict(sp.logit_bias))
        if sp.HasField("structured_outputs"):
            fields["structured_outputs"] = self._structured_outputs(sp.structured_outputs)
        return fields

    @staticmethod
    def _structured_outputs(so: Any) -> StructuredOutputsParams:
        kind = so.WhichOneof("kind")
        if kind is None:
            raise APIError(400, "structured_outputs must set one of json, regex, choice, grammar, json_object", param="structured_outputs")
        value: Any = list(getattr(so, kind).choices) if kind == "choice" else getattr(so, kind)
        try:
            return StructuredOutputsParams(**{kind: value})
        except ValueError as e:
            raise APIError(400, str(e), param="structured_outputs") from e

    def _prompt(self, request: Any) -> tuple[Optional[str], list[int], str]:
        given = [bool(request.prompt), len(request.prompt_token_ids) > 0, len(request.messages) > 0]
        if sum(given) != 1:
            raise APIError(400, "set exactly one of prompt, prompt_token_ids or messages", param="prompt")
        special = request.add_special_tokens if request.HasField("add_special_tokens") else None
        if request.messages:
            msgs = [{"role": m.role, "content": m.content} for m in request.messages]
            text = self.serving.render_chat(msgs, chat_template=None, add_generation_prompt=True, continue_final_message=False, kwargs=None)
            return text, self.serving.encode(text, bool(special), param="messages"), "messages"
        if request.prompt:
            return request.prompt, self.serving.encode(request.prompt, True if special is None else special), "prompt"
        return None, [int(t) for t in request.prompt_token_ids], "prompt_token_ids"

    def _logprobs(self, token_ids: list[int], entries: list[Any], num_top: int) -> list[Any]:
        out = []
        for tid, entry in zip(token_ids, entries):
            lp = entry.get(tid) if entry else None
            msg = pb.TokenLogprob(token_id=tid, logprob=clamp_logprob(lp.logprob) if lp else 0.0,
                                  token=self.serving._token_str(tid, lp, False), rank=int(lp.rank or 0) if lp else 0)
            ranked = sorted(((k, v) for k, v in (entry or {}).items() if v.rank is not None and v.rank <= num_top), key=lambda kv: kv[1].rank)
            for k, v in ranked[:num_top]:
                msg.top_logprobs.add(token_id=k, logprob=clamp_logprob(v.logprob), token=self.serving._token_str(k, v, False), rank=int(v.rank))
            out.append(msg)
        return out

    def _prepare(self, request: Any) -> tuple[Optional[str], list[int], Any]:
        """Checks, renders/tokenizes and validates a Generate request (on the preprocessing pool)."""
        self.serving.check_model(request.model)
        text, ids, prompt_param = self._prompt(request)
        fields = self._sampling_fields(request.sampling_params)
        max_tokens = self.serving._max_tokens(fields.pop("max_tokens", None), len(ids), "max_tokens", prompt_param)
        try:
            params = build_sampling_params({**fields, "max_tokens": max_tokens}, self.serving.max_logprobs)
            self.engine.validate(ids, params)
        except ValueError as e:
            raise bad_request(e, prompt_param=prompt_param) from e
        return text, ids, params

    @staticmethod
    async def _abort(context: Any, error: APIError) -> None:
        await context.abort(_status_for(error), error.message)

    # ----- RPCs -----------------------------------------------------------------------------------
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            self.serving.check_admitting()
            self.serving.check_capacity()
            text, ids, params = await self.serving.run_sync(self._prepare, request)  # off the event loop
            rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
            lora = self.serving.loras.get(request.model)  # `model` may name a LoRA adapter (NOT_FOUND if unknown)
            try:
                stream = self.engine.add_request(rid, ids, params, prompt=text, priority=request.priority, lora_request=lora)
            except ValueError as e:
                raise APIError(400, str(e)) from e
            except EngineOverloadedError as e:
                raise APIError(503, str(e)) from e
            except EngineDeadError as e:
                raise APIError(500, f"the engine is not running: {e}") from e
        except APIError as e:
            await self._abort(context, e)
            return
        sent: dict[int, tuple[int, int, bool]] = {}  # index -> (text length, token count, finished)
        first = True
        try:
            async for out in stream:
                failed = next((c for c in out.outputs if c.finish_reason == "error"), None)
                if failed is not None:  # the engine could not run this request (the others go on)
                    await context.abort(grpc.StatusCode.INTERNAL, str(failed.stop_reason or "the engine could not serve this request"))
                msgs = []
                for c in out.outputs:
                    text_len, num_tokens, done = sent.get(c.index, (0, 0, False))
                    if done:
                        continue
                    delta = c.text[text_len:]
                    new_ids = list(c.token_ids[num_tokens:])
                    if not delta and not new_ids and c.finish_reason is None:
                        continue
                    msg = pb.GenerateResponse(request_id=rid, index=c.index, text=delta, token_ids=new_ids,
                                              finish_reason=c.finish_reason or "",
                                              stop_reason="" if c.stop_reason is None else str(c.stop_reason))
                    if params.logprobs is not None and c.logprobs:
                        msg.logprobs.extend(self._logprobs(new_ids, list(c.logprobs[num_tokens:]), params.logprobs))
                    if first:
                        msg.prompt_token_ids.extend(ids)
                        first = False
                    sent[c.index] = (len(c.text), len(c.token_ids), c.finish_reason is not None)
                    msgs.append(msg)
                if out.finished:
                    u = self.serving.usage([out])
                    usage = pb.Usage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                                     total_tokens=u["total_tokens"], cached_prompt_tokens=u["prompt_tokens_details"]["cached_tokens"])
                    if not msgs:
                        msgs.append(pb.GenerateResponse(request_id=rid, index=0))
                    msgs[-1].usage.CopyFrom(usage)
                for msg in msgs:
                    yield msg
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine is not running: {e}")
        finally:
            stream.cancel()  # no-op after a normal finish; aborts on cancellation or error

    def _tokenize(self, request: Any) -> list[int]:
        self.serving.check_model(request.model)
        if bool(request.prompt) == bool(request.messages):
            raise APIError(400, "set exactly one of prompt or messages", param="prompt")
        special = request.add_special_tokens if request.HasField("add_special_tokens") else None
        if request.messages:
            msgs = [{"role": m.role, "content": m.content} for m in request.messages]
            text = self.serving.render_chat(msgs, chat_template=None, add_generation_prompt=True, continue_final_message=False, kwargs=None)
            return self.serving.encode(text, bool(special), param="messages")
        return self.serving.encode(request.prompt, True if special is None else special)

    async def Tokenize(self, request: Any, context: Any) -> Any:
        try:
            ids = await self.serving.run_sync(self._tokenize, request)  # off the event loop
        except APIError as e:
            await self._abort(context, e)
            return pb.TokenizeResponse()
        return pb.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.serving.max_model_len)

    async def ListModels(self, request: Any, context: Any) -> Any:
        return pb.ListModelsResponse(models=[pb.ModelCard(id=name, root=self.serving.model_path, max_model_len=self.serving.max_model_len,
                                                          owned_by="jengine") for name in self.serving.served_model_names]
                                     + [pb.ModelCard(id=lora.lora_name, root=lora.lora_path, max_model_len=self.serving.max_model_len,
                                                     owned_by="jengine") for lora in self.serving.loras.list()])


async def start_grpc_server(serving: OpenAIServing, host: str, port: int) -> tuple[Any, int]:
    """Starts the gRPC server on the running loop; returns (server, bound port). Port 0 picks a free one."""
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(serving), server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    await server.start()
    loop = asyncio.get_running_loop()

    async def set_status(status: int) -> None:
        for name in ("", SERVICE_NAME):
            res = health_servicer.set(name, status)
            if asyncio.iscoroutine(res):
                await res

    await set_status(health_pb2.HealthCheckResponse.SERVING if serving.engine.healthy else health_pb2.HealthCheckResponse.NOT_SERVING)

    def on_death() -> None:  # runs on the engine thread
        if loop.is_closed():
            return
        coro = set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop closed meanwhile
            coro.close()

    serving.engine.add_death_callback(on_death)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    server.mark_not_serving = lambda: set_status(health_pb2.HealthCheckResponse.NOT_SERVING)  # type: ignore[attr-defined]
    return server, bound
