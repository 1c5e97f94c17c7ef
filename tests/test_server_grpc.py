"""The gRPC frontend (`jengine.v1.Generation`) through its generated stub, on loopback.

One real server (tiny random Llama checkpoint) per module with HTTP and gRPC on free ports; the
stub calls every method, a cancelled stream must leave the engine's running batch, invalid requests
get INVALID_ARGUMENT, and the standard health and reflection services answer.
"""
from __future__ import annotations

import json
import re
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from jengine.engine.async_engine import AsyncEngine
from jengine.server import gen_proto
from jengine.server import jengine_pb2 as pb
from jengine.server import jengine_pb2_grpc as pb_grpc
from jengine.server.api_server import BackgroundServer, ServerSettings
from tiny_server import StepWatch, slow_down_steps, tiny_server

MAX_MODEL_LEN = 512
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, xla_cache_dir: str):
    with tiny_server(tmp_path_factory.mktemp("ckpt"), xla_cache_dir, MAX_MODEL_LEN, grpc_port=0, served_model_names=("tiny",), model_path=None) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: BackgroundServer):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(channel)


def _greedy(**kw: Any) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, ignore_eos=True, **kw)


def _collect(responses: Any) -> tuple[dict[int, str], dict[int, list[int]], list[Any]]:
    msgs = list(responses)
    texts: dict[int, str] = {}
    ids: dict[int, list[int]] = {}
    for m in msgs:
        texts[m.index] = texts.get(m.index, "") + m.text
        ids.setdefault(m.index, []).extend(m.token_ids)
    return texts, ids, msgs


def test_stubs_are_up_to_date() -> None:
    assert gen_proto.main(["--check"]) == 0


def test_list_models_and_tokenize(stub: pb_grpc.GenerationStub) -> None:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == MAX_MODEL_LEN
    tok = stub.Tokenize(pb.TokenizeRequest(prompt="Hello world"), timeout=TIMEOUT)
    assert tok.count == len(tok.tokens) > 0 and tok.max_model_len == MAX_MODEL_LEN
    chat = stub.Tokenize(pb.TokenizeRequest(messages=[pb.ChatMessage(role="user", content="Hello")]), timeout=TIMEOUT)
    rendered = stub.Tokenize(pb.TokenizeRequest(prompt="<|user|>Hello<|eos|><|assistant|>", add_special_tokens=False), timeout=TIMEOUT)
    assert list(chat.tokens) == list(rendered.tokens)  # the chat template was applied


def test_generate_prompt_and_token_ids_agree(stub: pb_grpc.GenerationStub, server: BackgroundServer) -> None:
    texts, ids, msgs = _collect(stub.Generate(pb.GenerateRequest(prompt="Hello world", sampling_params=_greedy(max_tokens=9)), timeout=TIMEOUT))
    assert len(ids[0]) == 9 and texts[0]
    assert [m.finish_reason for m in msgs if m.finish_reason] == ["length"] and msgs[-1].finish_reason == "length"
    assert msgs[-1].usage.completion_tokens == 9 and msgs[-1].usage.total_tokens == msgs[-1].usage.prompt_tokens + 9
    assert all(not m.HasField("usage") for m in msgs[:-1])
    prompt_ids = list(msgs[0].prompt_token_ids)
    assert len(prompt_ids) == msgs[-1].usage.prompt_tokens
    texts2, ids2, _ = _collect(stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt_ids, request_id="by-ids", sampling_params=_greedy(max_tokens=9)),
                                             timeout=TIMEOUT))
    assert ids2 == ids and texts2 == texts
    # Same tokens as the HTTP API for the same greedy request.
    import httpx

    http = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "Hello world", "max_tokens": 9, "temperature": 0, "ignore_eos": True},
                      timeout=TIMEOUT).json()
    assert http["choices"][0]["text"] == texts[0]


def test_generate_chat_n_seed_logprobs_stop(stub: pb_grpc.GenerationStub) -> None:
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Hi")], sampling_params=pb.SamplingParams(n=2, seed=5, temperature=1.5, max_tokens=8, ignore_eos=True, logprobs=2))
    a_texts, a_ids, msgs = _collect(stub.Generate(req, timeout=TIMEOUT))
    b_texts, b_ids, _ = _collect(stub.Generate(req, timeout=TIMEOUT))
    assert sorted(a_ids) == [0, 1] and a_ids == b_ids and a_texts == b_texts
    assert sum(1 for m in msgs if m.finish_reason) == 2 and msgs[-1].usage.completion_tokens == 16
    lps = [lp for m in msgs for lp in m.logprobs]
    assert len(lps) == 16 and all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in lps)
    # Stop string: the text ends right before it; finish_reason "stop" with the string as stop_reason.
    full, _, _ = _collect(stub.Generate(pb.GenerateRequest(prompt="One two three", sampling_params=_greedy(max_tokens=30)), timeout=TIMEOUT))
    text = full[0]
    stop = next((text[k:k + 2] for k in range(len(text) // 3, len(text) - 2) if text[k:k + 2].isalnum() and text[k:k + 2].isascii()), None)
    if stop is None:
        pytest.skip("no usable stop string")
    cut, _, msgs = _collect(stub.Generate(pb.GenerateRequest(prompt="One two three", sampling_params=_greedy(max_tokens=30, stop=[stop])), timeout=TIMEOUT))
    assert cut[0] == text[:text.find(stop)] and msgs[-1].finish_reason == "stop" and msgs[-1].stop_reason == stop


def test_generate_logit_bias(stub: pb_grpc.GenerationStub) -> None:
    _, ids, _ = _collect(stub.Generate(pb.GenerateRequest(prompt="Hello", sampling_params=_greedy(max_tokens=4, logit_bias={77: 100.0})), timeout=TIMEOUT))
    assert ids == {0: [77] * 4}


def test_generate_structured_outputs(stub: pb_grpc.GenerationStub) -> None:
    """The same constraints as the HTTP API's structured_outputs: choice, regex, JSON schema."""
    def text(so: Any, **kw: Any) -> tuple[str, str]:
        out, _, msgs = _collect(stub.Generate(pb.GenerateRequest(prompt="Answer:", sampling_params=pb.SamplingParams(
            temperature=1.0, seed=3, max_tokens=40, structured_outputs=so, **kw)), timeout=TIMEOUT))
        return out[0], msgs[-1].finish_reason

    assert text(pb.StructuredOutputs(choice=pb.Choices(choices=["yes", "no"]))) in (("yes", "stop"), ("no", "stop"))
    code, finish = text(pb.StructuredOutputs(regex="[A-Z]{2}-[0-9]{3}"))
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", code) and finish == "stop"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}, "required": ["ok", "n"], "additionalProperties": False}
    value, finish = text(pb.StructuredOutputs(json=json.dumps(schema)))
    assert finish == "stop" and set(json.loads(value)) == {"ok", "n"} and json.loads(value)["n"] in (1, 2, 3)


@pytest.mark.parametrize("request_kw,needle", [
    (dict(prompt="hi", sampling_params=pb.SamplingParams(temperature=-1.0)), "temperature"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(top_p=0.0)), "top_p"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(logprobs=99)), "logprobs"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(max_tokens=MAX_MODEL_LEN)), "maximum context length"),
    (dict(), "exactly one"),
    (dict(prompt="hi", prompt_token_ids=[1, 2]), "exactly one"),
    (dict(prompt_token_ids=[1, 2, 100000]), "vocabulary"),
    (dict(prompt="hi " * MAX_MODEL_LEN), "max_model_len"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(logit_bias={100000: 1.0})), "logit_bias"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(logit_bias={5: float("inf")})), "logit_bias"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(regex="("))), "regex"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(json="{not json"))), "json"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(json='{"type": "nonsense"}'))), "json"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(grammar="root ::= ("))), "grammar"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(choice=pb.Choices()))), "choice"),
    (dict(prompt="hi", sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs())), "structured_outputs"),
])
def test_invalid_arguments(stub: pb_grpc.GenerationStub, request_kw: dict, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(**request_kw), timeout=TIMEOUT))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


def test_unknown_model_and_bad_tokenize(stub: pb_grpc.GenerationStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(model="nope", prompt="hi"), timeout=TIMEOUT))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(pb.TokenizeRequest(), timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models  # still serving


def test_cancel_aborts_request(stub: pb_grpc.GenerationStub, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled call aborts its request, whose pages are free again within one engine step."""
    engine = server.engine
    kv = engine.core.kv_cache_manager
    free_before = kv.num_free_pages
    slow_down_steps(engine, monkeypatch)
    watch = StepWatch(engine, monkeypatch)
    call = stub.Generate(pb.GenerateRequest(prompt="Hello", request_id="to-cancel", sampling_params=_greedy(max_tokens=MAX_MODEL_LEN - 8)), timeout=TIMEOUT)
    first = next(call)
    assert first.request_id == "to-cancel" and engine.stats().num_requests_running + engine.stats().num_requests_waiting >= 1
    call.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (engine.num_pending_requests or engine.stats().num_requests_running or "to-cancel" not in watch.freed):
        time.sleep(0.02)
    assert engine.num_pending_requests == 0 and engine.stats().num_requests_running == 0
    assert watch.min_free_pages < free_before and kv.num_free_pages == free_before
    assert watch.freed["to-cancel"] - watch.asked["to-cancel"] <= 1, (watch.asked, watch.freed)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED


def test_health(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jengine.v1.Generation"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"jengine.v1.Generation", "grpc.health.v1.Health"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(db)
    svc = pool.FindServiceByName("jengine.v1.Generation")
    assert {m.name for m in svc.methods} == {"Generate", "Tokenize", "ListModels"}
    assert svc.FindMethodByName("Generate").server_streaming


def test_dead_engine_is_unavailable() -> None:
    from test_server_openai import _FakeCore

    core = _FakeCore()
    engine = AsyncEngine(core, log_requests=False)
    with BackgroundServer(engine, ServerSettings(port=0, grpc_port=0, served_model_names=("fake",), uvicorn_log_level="warning")) as srv:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            texts, _, _ = _collect(stub.Generate(pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(max_tokens=2)), timeout=10))
            assert texts[0]
            core.slow = 0.05
            call = stub.Generate(pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(max_tokens=50)), timeout=10)
            next(call)
            core.fail.set()
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 5
            status = None
            while time.monotonic() < deadline and status != health_pb2.HealthCheckResponse.NOT_SERVING:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
