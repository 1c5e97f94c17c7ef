"""The OpenAI-compatible HTTP server against the official `openai` client, on loopback.

One real server (tiny random Llama checkpoint, real `EngineCore`) is started per module; every test
talks to it through `openai.OpenAI` or raw `httpx` (for bodies the client will not send). A second,
instant server over a scripted fake core checks what needs a broken engine: `/health` 503, 500s for
pending and new requests, 503 when overloaded.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from jengine.engine.async_engine import AsyncEngine
from jengine.outputs import CompletionOutput, RequestOutput
from jengine.server.api_server import BackgroundServer, ServerSettings
from tiny_models import make_tiny_tokenizer
from tiny_server import eventually, slow_down_steps, tiny_server

KEYS = ("sk-test-one", "sk-test-two")
MODEL = "tiny"
MAX_MODEL_LEN = 512
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, xla_cache_dir: str):
    with tiny_server(tmp_path_factory.mktemp("ckpt"), xla_cache_dir, MAX_MODEL_LEN, api_keys=KEYS, served_model_names=(MODEL, "tiny-alias"),
                     trust_request_chat_template=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def http(server: BackgroundServer):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=TIMEOUT) as c:
        yield c


def _metric(http: httpx.Client, name: str, labels: str = "") -> float:
    text = http.get("/metrics").text
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


def _metric_value(text: str, name: str) -> float:
    m = re.search(rf"^jengine:{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    assert m, f"jengine:{name} not in /metrics"
    return float(m.group(1))


def _greedy(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0.0, "ignore_eos": True, **kw}


def _completion(client: openai.OpenAI, prompt: Any, **kw: Any) -> Any:
    extra = kw.pop("extra_body", {})
    extra.update({k: kw.pop(k) for k in list(kw) if k in ("ignore_eos", "top_k", "min_p", "repetition_penalty", "min_tokens",
                                                             "stop_token_ids", "include_stop_str_in_output", "priority", "foo")})
    kw.setdefault("model", MODEL)
    return client.completions.create(prompt=prompt, extra_body=extra or None, **kw)


# ----- endpoints ---------------------------------------------------------------------------------
def test_models_version_health(client: openai.OpenAI, http: httpx.Client, server: BackgroundServer) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "tiny-alias"]
    card = http.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == MAX_MODEL_LEN and card["object"] == "model"
    assert http.get("/health").status_code == 200
    import jengine

    assert http.get("/version").json() == {"version": jengine.__version__}


def test_completion_shape_and_usage(client: openai.OpenAI) -> None:
    out = _completion(client, "Hello world", max_tokens=7, temperature=0.0, ignore_eos=True)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == out.usage.prompt_tokens + 7
    assert out.usage.prompt_tokens > 0 and out.usage.prompt_tokens_details.cached_tokens >= 0


def test_alias_model_name_and_token_id_prompts(client: openai.OpenAI, http: httpx.Client) -> None:
    text = _completion(client, "The quick brown fox", max_tokens=6, temperature=0.0, ignore_eos=True)
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": "The quick brown fox"}).json()["tokens"]
    by_ids = _completion(client, ids, model="tiny-alias", max_tokens=6, temperature=0.0, ignore_eos=True)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_multiple_prompts_match_single(client: openai.OpenAI) -> None:
    prompts = ["One two three", "Paged attention keeps"]
    batch = _completion(client, prompts, max_tokens=5, temperature=0.0, ignore_eos=True)
    assert [c.index for c in batch.choices] == [0, 1]
    for i, p in enumerate(prompts):
        single = _completion(client, p, max_tokens=5, temperature=0.0, ignore_eos=True)
        assert batch.choices[i].text == single.choices[0].text
    assert batch.usage.completion_tokens == 10


def test_echo(client: openai.OpenAI) -> None:
    out = _completion(client, "Hello world", max_tokens=3, temperature=0.0, ignore_eos=True, echo=True)
    plain = _completion(client, "Hello world", max_tokens=3, temperature=0.0, ignore_eos=True)
    assert out.choices[0].text == "Hello world" + plain.choices[0].text


def test_tokenize_detokenize_and_chat_template(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "What is the capital of France?"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json() == {"prompt": "What is the capital of France?"}
    msgs = [{"role": "user", "content": "Hello"}]
    t = http.post("/tokenize", json={"model": MODEL, "messages": msgs}).json()
    expected = make_tiny_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert http.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == expected == "<|user|>Hello<|eos|><|assistant|>"


def test_chat_uses_template(client: openai.OpenAI, http: httpx.Client) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    n_prompt = http.post("/tokenize", json={"messages": msgs}).json()["count"]
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=4, temperature=0.0, extra_body={"ignore_eos": True})
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == 4
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    # A per-request template changes the prompt the model sees.
    custom = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0.0,
                                            extra_body={"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    assert custom.usage.prompt_tokens == http.post("/tokenize", json={"prompt": "Be brief.Hello", "add_special_tokens": False}).json()["count"]


def test_metrics_use_vllm_names_and_labels(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    def has(series: str) -> bool:  # the series with exactly vLLM's labels, in any order
        for m in re.finditer(rf"^{re.escape(series)}\{{([^}}]*)\}} ", text, re.M):
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if {k: v for k, v in found.items() if k not in ("le", "finished_reason")} == {"model_name": MODEL, "engine": "0"}:
                return True
        return False

    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total", "generation_tokens_total",
                 "request_success_total", "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket", "time_per_output_token_seconds_bucket",
                 "request_time_per_output_token_seconds_bucket", "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
                 "request_prompt_tokens_bucket", "request_generation_tokens_bucket"):
        assert has(f"vllm:{name}"), name
    for name in ("compilations_after_warmup_total", "engine_healthy", "step_bucket_waits_total", "step_bucket_wait_seconds_total"):
        assert has(f"jengine:{name}"), name
    assert 'finished_reason="length"' in text
    prefixes = {line.split(":", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert prefixes == {"vllm", "jengine"}, prefixes  # nothing outside the two namespaces


# ----- streaming ---------------------------------------------------------------------------------
def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kw = dict(max_tokens=24, temperature=0.0, ignore_eos=True)
    full = _completion(client, "Hello world! This is", **kw)
    chunks = list(_completion(client, "Hello world! This is", stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    body = chunks[:-1]
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in body].count("length") == 1 and body[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=20, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"]


def test_chat_echo_continues_the_final_message(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=5, temperature=0.0)
    extra = {"ignore_eos": True, "add_generation_prompt": False, "continue_final_message": True}
    plain = client.chat.completions.create(**kw, extra_body=extra)
    echoed = client.chat.completions.create(**kw, extra_body={**extra, "echo": True})
    assert echoed.choices[0].message.role == "assistant"
    assert echoed.choices[0].message.content == "Once upon" + plain.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw, extra_body={**extra, "echo": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == echoed.choices[0].message.content
    # After a generation prompt the reply is a new assistant message: nothing to echo from the user.
    fresh = client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=3, temperature=0.0, extra_body={"echo": True})
    same = client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=3, temperature=0.0)
    assert fresh.choices[0].message.content == same.choices[0].message.content


def test_stream_without_usage_and_done_marker(http: httpx.Client) -> None:
    lines = []
    with http.stream("POST", "/v1/completions", json=_greedy(prompt="Hello", max_tokens=3, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert all("usage" not in json.loads(line[6:]) or json.loads(line[6:])["usage"] is None for line in lines[:-1])


# ----- stop strings, n and seeds, logprobs -------------------------------------------------------
def _stop_candidate(text: str) -> str:
    for k in range(len(text) // 3, len(text) - 2):
        s = text[k:k + 2]
        if s.isalnum() and s.isascii() and text.find(s) >= 2:
            return s
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_strings_in_and_out(client: openai.OpenAI) -> None:
    kw = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    text = _completion(client, "One two three", **kw).choices[0].text
    stop = _stop_candidate(text)
    cut = text[:text.find(stop)]
    out = _completion(client, "One two three", stop=[stop, "never-matches"], **kw).choices[0]
    assert (out.text, out.finish_reason, out.model_extra["stop_reason"]) == (cut, "stop", stop)
    inc = _completion(client, "One two three", stop=stop, include_stop_str_in_output=True, **kw).choices[0]
    assert inc.text == cut + stop
    streamed = list(_completion(client, "One two three", stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client: openai.OpenAI) -> None:
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = _completion(client, "One two three", logprobs=0, extra_body={"return_tokens_as_token_ids": True}, **kw)
    ids = [int(t.split(":")[1]) for t in full.choices[0].logprobs.tokens]
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # first occurrence, after a few tokens
    out = _completion(client, "One two three", stop_token_ids=[ids[k]], **kw)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] == ids[k]
    assert out.usage.completion_tokens == k + 1


def test_n_with_seeds(client: openai.OpenAI) -> None:
    kw = dict(n=3, max_tokens=12, temperature=1.5, seed=1234, ignore_eos=True)
    a = _completion(client, "Hello world", **kw)
    b = _completion(client, "Hello world", **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 36
    chat_kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=8, temperature=1.5, seed=99)
    c1, c2 = client.chat.completions.create(**chat_kw), client.chat.completions.create(**chat_kw)
    assert [c.message.content for c in c1.choices] == [c.message.content for c in c2.choices]
    streamed = list(_completion(client, "Hello world", stream=True, **kw))
    joined = {i: "".join(ch.text for c in streamed for ch in c.choices if ch.index == i) for i in range(3)}
    assert [joined[i] for i in range(3)] == [c.text for c in a.choices]
    assert sum(1 for c in streamed for ch in c.choices if ch.finish_reason) == 3


def test_completion_logprobs(client: openai.OpenAI) -> None:
    kw = dict(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    out = _completion(client, "Hello world", **kw).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.text and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    streamed = list(_completion(client, "Hello world", stream=True, **kw))
    assert sum((c.choices[0].logprobs.token_logprobs for c in streamed), []) == lp.token_logprobs


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0.0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    none = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    assert none.choices[0].logprobs is None


def test_vllm_extras_and_unknown_fields_accepted(client: openai.OpenAI, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's extra sampling fields reach the engine's `SamplingParams` (and priority its queue); an
    unknown field is ignored."""
    engine = server.engine
    seen: list[tuple[Any, int]] = []
    add = engine.add_request

    def recording_add(request_id: str, ids: Any, params: Any, **kw: Any) -> Any:
        seen.append((params, kw.get("priority")))
        return add(request_id, ids, params, **kw)

    monkeypatch.setattr(engine, "add_request", recording_add)
    out = _completion(client, "Hello", max_tokens=4, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.2,
                      min_tokens=2, presence_penalty=0.5, frequency_penalty=0.5, priority=3, foo={"bar": 1}, user="u", seed=3,
                      stop_token_ids=[7], include_stop_str_in_output=True, extra_body={"skip_special_tokens": False,
                                                                                        "spaces_between_special_tokens": False})
    assert out.usage.completion_tokens >= 2
    assert len(seen) == 1
    params, priority = seen[0]
    expected = dict(max_tokens=4, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.2, min_tokens=2,
                    presence_penalty=0.5, frequency_penalty=0.5, seed=3, stop_token_ids=[7], include_stop_str_in_output=True,
                    skip_special_tokens=False, spaces_between_special_tokens=False)
    assert {k: getattr(params, k) for k in expected} == expected
    assert priority == 3 and not hasattr(params, "foo")


def test_logit_bias(client: openai.OpenAI, http: httpx.Client) -> None:
    kw = dict(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    forced = _completion(client, "One two three", logit_bias={"77": 100}, **kw)
    assert [int(t.split(":")[1]) for t in forced.choices[0].logprobs.tokens] == [77] * 4
    clamped = _completion(client, "One two three", logit_bias={"77": 1e6}, **kw)  # clamped to 100, as vLLM
    assert clamped.choices[0].text == forced.choices[0].text
    base = _completion(client, "One two three", **kw)
    first = int(base.choices[0].logprobs.tokens[0].split(":")[1])
    banned = _completion(client, "One two three", logit_bias={str(first): -100}, **kw)
    assert int(banned.choices[0].logprobs.tokens[0].split(":")[1]) != first
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0.0,
                                          logit_bias={"91": 100}, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert chat.choices[0].message.content == http.post("/detokenize", json={"model": MODEL, "tokens": [91] * 3}).json()["prompt"]


def test_tools_reach_the_chat_template_and_text_response_format(client: openai.OpenAI, http: httpx.Client) -> None:
    template = "{% for t in tools or [] %}[tool {{ t['function']['name'] }}]{% endfor %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "Hi"}]
    with_tools = http.post("/tokenize", json={"model": MODEL, "messages": msgs, "tools": TOOLS, "chat_template": template}).json()
    without = http.post("/tokenize", json={"model": MODEL, "messages": msgs, "chat_template": template}).json()
    text = http.post("/detokenize", json={"model": MODEL, "tokens": with_tools["tokens"]}).json()["prompt"]
    assert "get_weather" in text and with_tools["count"] > without["count"]
    out = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=2, response_format={"type": "text"},
                                         extra_body={"chat_template": template})
    assert out.usage.prompt_tokens == with_tools["count"] and not out.choices[0].message.tool_calls


def test_auto_tool_choice_needs_the_server_flags(http: httpx.Client) -> None:
    """As vLLM: "auto" is refused without --enable-auto-tool-choice; tools without tool_choice are only rendered."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, "max_tokens": 2}
    err = http.post("/v1/chat/completions", json={**body, "tool_choice": "auto"}).json()["error"]
    assert err["param"] == "tool_choice" and "--enable-auto-tool-choice" in err["message"] and "--tool-call-parser" in err["message"]
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == []


# ----- errors ------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi " * MAX_MODEL_LEN, "max_tokens": 1}, None),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 100000]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"seven": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"-3": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "("}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"},
                              "structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_MODEL_LEN}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
]


def test_structured_outputs_through_the_openai_client(client: openai.OpenAI) -> None:
    """response_format json_schema / json_object and vLLM's structured_outputs (choice, regex) constrain the
    tiny model's output; a reply cut by max_tokens ends with "length", a complete one with "stop"."""
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "n"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Pick a color."}]
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=1.0, seed=seed,
                                           response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}})
        value = json.loads(r.choices[0].message.content)
        assert value["color"] in ("red", "green") and 0 <= value["n"] <= 9 and set(value) == {"color", "n"}
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, temperature=0.0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=10, temperature=1.0, seed=1,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert r.choices[0].text in ("yes", "no", "maybe") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=12, temperature=1.0, seed=2,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS, ids=[f"{p}:{param}:{i}" for i, (p, _, param) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_400(http: httpx.Client, path: str, body: dict, param: Any) -> None:
    r = http.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_malformed_json_and_context_message(http: httpx.Client) -> None:
    r = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN})
    assert str(MAX_MODEL_LEN) in r.json()["error"]["message"]


def test_openai_client_errors(client: openai.OpenAI, server: BackgroundServer) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=-3)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    for key in ("wrong-key", ""):
        with openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0, timeout=TIMEOUT,
                           default_headers=None if key else {"Authorization": ""}) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()


def test_api_keys(server: BackgroundServer) -> None:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-test-on"}).status_code == 401
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers={"Authorization": "Basic sk-test-one"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for key in KEYS:
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/health").status_code == 200  # only /v1/* is guarded
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/nope", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()["error"]["code"] == "404"


def test_api_keys_compared_in_constant_time(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared with hmac.compare_digest, with no early exit on a match, so the
    time taken says neither whether nor which key matched."""
    from jengine.server import api_server

    calls: list[tuple[bytes, bytes]] = []
    real = api_server.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api_server.hmac, "compare_digest", counting)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        for given, status in ((KEYS[0], 200), (KEYS[1], 200), ("sk-wrong", 401)):
            calls.clear()
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {given}"}).status_code == status
            assert sorted(calls) == sorted((given.encode(), k.encode()) for k in KEYS)


def test_still_serving_after_bad_requests(client: openai.OpenAI, http: httpx.Client) -> None:
    for body in ({"prompt": "hi", "n": -1}, {"prompt": "x" * 5000}, {"prompt": "hi", "stop": [""]}):
        assert http.post("/v1/completions", json={"model": MODEL, **body}).status_code == 400
    out = _completion(client, "Hello", max_tokens=3, temperature=0.0, ignore_eos=True)
    assert out.usage.completion_tokens == 3
    assert http.get("/health").status_code == 200


# ----- concurrency and disconnects ---------------------------------------------------------------
def test_sixteen_concurrent_requests(client: openai.OpenAI) -> None:
    prompts = [f"Request number {i} says hello" for i in range(16)]

    def one(i: int) -> Any:
        if i % 2:
            return "".join(c.choices[0].text for c in _completion(client, prompts[i], max_tokens=12, temperature=0.0, ignore_eos=True, stream=True))
        return _completion(client, prompts[i], max_tokens=12, temperature=0.0, ignore_eos=True).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16), timeout=TIMEOUT * 2))
    assert all(isinstance(r, str) and r for r in results)
    # Greedy results under load match the same prompts served alone (batching does not change tokens).
    for i in (0, 1):
        assert results[i] == _completion(client, prompts[i], max_tokens=12, temperature=0.0, ignore_eos=True).choices[0].text


def test_disconnecting_stream_is_aborted(server: BackgroundServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_down_steps(server.engine, monkeypatch)
    aborted_before = _metric(http, "vllm:request_success_total", 'finished_reason="abort"')
    body = _greedy(prompt="Hello", max_tokens=MAX_MODEL_LEN - 8, stream=True)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=TIMEOUT) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert all(g.startswith("data: ") or g == "" for g in got)
            assert _metric(http, "vllm:num_requests_running") >= 1
    # The client closed the connection mid-stream: the request leaves the batch within seconds.
    assert eventually(lambda: _metric(http, "vllm:num_requests_running") == 0), "request still running after disconnect"
    assert eventually(lambda: _metric(http, "vllm:request_success_total", 'finished_reason="abort"') == aborted_before + 1)


def test_disconnecting_non_stream_is_aborted(server: BackgroundServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_down_steps(server.engine, monkeypatch)
    aborted_before = _metric(http, "vllm:request_success_total", 'finished_reason="abort"')
    body = _greedy(prompt="Hello", max_tokens=MAX_MODEL_LEN - 8)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=httpx.Timeout(10.0, read=0.2)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body)
    assert eventually(lambda: _metric(http, "vllm:request_success_total", 'finished_reason="abort"') == aborted_before + 1)
    assert eventually(lambda: _metric(http, "vllm:num_requests_running") == 0)


def test_token_counters_move(client: openai.OpenAI, http: httpx.Client) -> None:
    gen0, prompt0 = _metric(http, "vllm:generation_tokens_total"), _metric(http, "vllm:prompt_tokens_total")
    hist0 = {h: _metric(http, f"vllm:{h}") for h in ("request_generation_tokens_sum", "request_prompt_tokens_sum", "request_time_per_output_token_seconds_count")}
    out = _completion(client, "Hello world", max_tokens=5, temperature=0.0, ignore_eos=True)
    assert eventually(lambda: _metric(http, "vllm:generation_tokens_total") == gen0 + 5)
    assert _metric(http, "vllm:prompt_tokens_total") == prompt0 + out.usage.prompt_tokens
    assert eventually(lambda: _metric(http, "vllm:request_generation_tokens_sum") == hist0["request_generation_tokens_sum"] + 5)
    assert _metric(http, "vllm:request_prompt_tokens_sum") == hist0["request_prompt_tokens_sum"] + out.usage.prompt_tokens
    assert _metric(http, "vllm:request_time_per_output_token_seconds_count") == hist0["request_time_per_output_token_seconds_count"] + 1
    assert _metric(http, "jengine:compilations_after_warmup_total") == 0


# ----- a broken engine (scripted fake core: no model, instant) -------------------------------------
class _FakeCore:
    """Emits token 100 + k at step k; `fail` makes the next step raise. Enough of EngineCore's surface."""

    def __init__(self) -> None:
        self.tokenizer = make_tiny_tokenizer()
        self.max_model_len = 64
        self.vocab_size = 320
        self.config = SimpleNamespace(max_logprobs=20)
        self.scheduler = SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0)
        self.requests: dict[str, Any] = {}
        self.fail = threading.Event()
        self.slow = 0.0

    def validate_prompt(self, ids: Any, params: Any) -> None:
        params.verify(20)
        if not ids:
            raise ValueError("prompt must not be empty")

    def add_request(self, rid: str, ids: Any, params: Any, **_: Any) -> None:
        self.requests[rid] = (list(ids), params, [])

    def abort_request(self, rids: Any) -> None:
        for rid in rids:
            self.requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.fail.is_set():
            raise RuntimeError("device lost")
        time.sleep(self.slow)
        outs = []
        for rid, (ids, params, toks) in list(self.requests.items()):
            toks.append(100 + len(toks))
            done = len(toks) >= params.max_tokens
            c = CompletionOutput(0, self.tokenizer.decode(toks), list(toks), None, None, "length" if done else None)
            outs.append(RequestOutput(rid, None, ids, None, [c], done))
            if done:
                del self.requests[rid]
        self.scheduler.num_running = len(self.requests)
        return outs


def test_engine_death_gives_503_health_and_500s() -> None:
    core = _FakeCore()
    engine = AsyncEngine(core, log_requests=False)
    with BackgroundServer(engine, ServerSettings(port=0, served_model_names=("fake",), uvicorn_log_level="warning")) as srv:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            ok = c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 3}).json()
            assert ok["usage"]["completion_tokens"] == 3 and ok["choices"][0]["finish_reason"] == "length"
            assert _metric_value(c.get("/metrics").text, "engine_healthy") == 1.0
            core.slow = 0.05
            done: dict[str, Any] = {}
            pending = threading.Thread(target=lambda: done.update(r=c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 60})))
            pending.start()
            assert eventually(lambda: bool(core.requests), 5)
            core.fail.set()
            pending.join(10)
            assert not pending.is_alive() and done["r"].status_code == 500, "a pending request must fail, not hang"
            assert c.get("/health").status_code == 503
            r = c.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
            assert r.status_code == 500 and r.json()["error"]["message"]
            with c.stream("POST", "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True}) as s:
                assert s.status_code == 500
            assert _metric_value(c.get("/metrics").text, "engine_healthy") == 0.0


def test_overloaded_engine_gives_503() -> None:
    core = _FakeCore()
    core.slow = 0.05
    engine = AsyncEngine(core, log_requests=False, max_pending_requests=1)
    with BackgroundServer(engine, ServerSettings(port=0, served_model_names=("fake",), uvicorn_log_level="warning")) as srv:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            t = threading.Thread(target=lambda: c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 20}))
            t.start()
            assert eventually(lambda: engine.num_pending_requests == 1, 5)
            r = c.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
            t.join(10)
    engine.shutdown()


# ----- the CLI fails fast on bad flags (before loading any model) ------------------------------------
@pytest.mark.parametrize("argv", [["--port", "70000"], ["--dtype", "float8"], ["--max-num-seqs", "0"], ["--uvicorn-log-level", "loud"]])
def test_serve_rejects_bad_flags_at_parse(argv: list[str]) -> None:
    from jengine.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])


@pytest.mark.parametrize("argv,needle", [(["--chat-template", "no-such-file"], "chat-template"),
                                          (["--gpu-memory-utilization", "2"], "gpu_memory_utilization")])
def test_serve_rejects_bad_values_before_loading(argv: list[str], needle: str, capsys: pytest.CaptureFixture, tmp_path) -> None:
    from jengine.cli import main

    t0 = time.monotonic()
    assert main(["serve", str(tmp_path), *argv]) == 2  # an existing folder: the flag, not the path, must fail
    assert needle in capsys.readouterr().err and time.monotonic() - t0 < 5
    ns = __import__("jengine.cli", fromlist=["build_parser"]).build_parser().parse_args(
        ["serve", "m", "--api-key", "a", "--api-key", "b", "--served-model-name", "x", "y", "--grpc-port", "0"])
    assert (ns.api_key, ns.served_model_name, ns.grpc_port, ns.host, ns.port) == (["a", "b"], ["x", "y"], 0, "127.0.0.1", 8000)
