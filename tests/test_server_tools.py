"""Tool calling and reasoning through the official `openai` client, on a real server over the tiny model.

The server runs with `--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3`.
`required` and named tool choices are enforced by the grammar, so even the tiny random model returns
calls whose arguments validate against each function's schema. For `auto` and the reasoning parser
the tiny model is steered into the formats with a regex constraint (it would never write them on its
own), which exercises the parsers end to end, streamed and not.
"""
from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from jengine.server.api_server import BackgroundServer
from tiny_server import tiny_server

MODEL = "tiny"
MAX_MODEL_LEN = 512
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, xla_cache_dir: str):
    with tiny_server(tmp_path_factory.mktemp("ckpt"), xla_cache_dir, MAX_MODEL_LEN, served_model_names=(MODEL,), trust_request_chat_template=True,
                     enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server: BackgroundServer):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _stream(client: openai.OpenAI, **kw: Any) -> dict[str, Any]:
    """A streamed chat completion folded back into one message (tool-call deltas joined by index)."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or (delta.model_extra or {}).get("reasoning_content") or ""
            for tc in delta.tool_calls or []:
                if tc.id is not None:
                    assert tc.index not in calls and tc.type == "function"
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def _calls(message: Any) -> list[dict[str, str]]:
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


def test_required_tool_calls_validate_and_stream_the_same(client: openai.OpenAI) -> None:
    for seed in range(3):
        kw = dict(messages=MSGS, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=1.0, seed=seed)
        r = client.chat.completions.create(model=MODEL, **kw)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        s = _stream(client, **kw)
        assert s["calls"] and [{"name": c["name"], "arguments": c["arguments"]} for c in s["calls"]] == _calls(choice.message)
        assert s["finish"] == "tool_calls" and s["content"] == ""


def test_named_tool_choice_returns_that_function(client: openai.OpenAI) -> None:
    for name in ("get_time", "get_weather"):
        kw = dict(messages=MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}}, max_tokens=60, temperature=0.0)
        r = client.chat.completions.create(model=MODEL, **kw)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == name and r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[name])
        assert _stream(client, **kw)["calls"][0]["arguments"] == call.function.arguments


def test_auto_parses_hermes_calls_from_free_text(client: openai.OpenAI) -> None:
    pattern = r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}\n</tool_call>'
    kw = dict(messages=MSGS, tools=TOOLS, max_tokens=100, temperature=1.0, seed=3, extra_body={"structured_outputs": {"regex": pattern}})
    r = client.chat.completions.create(model=MODEL, **kw)  # tool_choice defaults to "auto" with --enable-auto-tool-choice
    choice = r.choices[0]
    assert choice.message.content == "Let me check." and choice.finish_reason == "tool_calls"
    (call,) = _calls(choice.message)
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    s = _stream(client, **kw)
    assert s["content"] == "Let me check." and [{"name": c["name"], "arguments": c["arguments"]} for c in s["calls"]] == [call]
    plain = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="auto", max_tokens=8, temperature=0.0,
                                           extra_body={"structured_outputs": {"regex": "[a-z ]{4,8}"}})
    assert plain.choices[0].message.tool_calls == [] and plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_reasoning_content_streamed_and_not(client: openai.OpenAI) -> None:
    kw = dict(messages=MSGS, max_tokens=60, temperature=1.0, seed=5, extra_body={"structured_outputs": {"regex": r"<think>[a-z ]{3,12}</think>\n(yes|no)"}})
    r = client.chat.completions.create(model=MODEL, **kw)
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert msg.content in ("\nyes", "\nno") and reasoning and "<think>" not in reasoning and "think>" not in msg.content
    s = _stream(client, **kw)
    assert s["reasoning"] == reasoning and s["content"] == msg.content


def test_multi_turn_tool_messages_reach_the_template(client: openai.OpenAI, http: httpx.Client) -> None:
    template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                "{% for c in m.get('tool_calls') or [] %}CALL {{ c['function']['name'] }} {{ c['function']['arguments']['city'] }}{% endfor %}"
                "{% if m.get('tool_call_id') %} for {{ m['tool_call_id'] }}{% endif %}{% endfor %}")
    msgs = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call1", "content": "sunny"}]
    ids = http.post("/tokenize", json={"model": MODEL, "messages": msgs, "tools": TOOLS, "chat_template": template,
                                       "add_generation_prompt": False}).json()["tokens"]
    text = http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
    assert "CALL get_weather Paris" in text and "[tool]sunny for call1" in text  # arguments reach the template as an object
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=3, temperature=0.0,
                                       extra_body={"chat_template": template, "ignore_eos": True})
    assert r.choices[0].message.tool_calls == [] and r.usage.completion_tokens == 3


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice", "get_stock"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}], "tool_choice": "required"}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]}, "tools", "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}],
      "tool_choice": "required"}, "tools", "invalid"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "response_format"),
    ({"messages": MSGS + [{"role": "assistant", "tool_calls": [{"id": "x", "type": "function"}]}]}, "messages", "tool_calls"),
]


@pytest.mark.parametrize("body,param,needle", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_tool_requests_get_400_naming_the_field(http: httpx.Client, body: dict, param: str, needle: str) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_no_compilation_after_warmup(server: BackgroundServer) -> None:
    assert server.engine.core.compilations_after_warmup == 0
