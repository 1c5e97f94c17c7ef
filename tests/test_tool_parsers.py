"""Tool-call and reasoning parsers on outputs in each model family's real format, streamed and not.

Streaming feeds every prefix of the text (a delta per character, the hardest case) and checks that the
deltas concatenate to the non-streamed message: same content, same calls, same arguments.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import pytest

from jengine.server.chat_output import ChoiceOutput
from jengine.server.reasoning_parsers import get_reasoning_parser
from jengine.server.tool_parsers import NamedToolParser, RequiredToolParser, get_tool_parser


def _whole(parser: Any, text: str, reasoning: Any = None) -> dict[str, Any]:
    out = ChoiceOutput(reasoning, parser)
    out.update(text, final=True)
    return out.message("assistant")


def _streamed(parser: Any, text: str, reasoning: Any = None, step: int = 1) -> dict[str, Any]:
    """The message rebuilt from the deltas of feeding `text` `step` characters at a time."""
    out = ChoiceOutput(reasoning, parser)
    content, thinking, calls = "", "", {}
    cuts = list(range(step, len(text), step)) + [len(text)]
    for n, cut in enumerate(cuts):
        delta = out.update(text[:cut], final=n == len(cuts) - 1)
        content += delta.get("content", "")
        thinking += delta.get("reasoning_content", "")
        for entry in delta.get("tool_calls", []):
            if "id" in entry:
                assert entry["index"] not in calls and entry["type"] == "function" and entry["function"]["name"]
                calls[entry["index"]] = {"name": entry["function"]["name"], "arguments": ""}
            calls[entry["index"]]["arguments"] += entry["function"]["arguments"]
    return {"content": content, "reasoning": thinking, "calls": [calls[i] for i in sorted(calls)]}


def _check(parser_name: Optional[str], text: str, content: Optional[str], calls: list[tuple[str, Any]],
           reasoning_name: Optional[str] = None, reasoning: Optional[str] = None) -> None:
    make = (lambda: get_tool_parser(parser_name)()) if parser_name else (lambda: None)
    make_r = (lambda: get_reasoning_parser(reasoning_name)()) if reasoning_name else (lambda: None)
    msg = _whole(make(), text, make_r())
    assert msg["content"] == content, msg
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]]
    assert got == calls, msg
    assert all(c["id"] and c["type"] == "function" for c in msg["tool_calls"])
    if reasoning_name:
        assert msg["reasoning_content"] == reasoning
    for step in (1, 3, 7):
        s = _streamed(make(), text, make_r(), step)
        assert s["content"] == (msg["content"] or ""), (step, s)
        assert s["calls"] == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in msg["tool_calls"]], (step, s)
        assert s["reasoning"] == (msg.get("reasoning_content") or "")


WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME = ("get_time", {"zone": "CET"})

CASES = [
    # hermes (Qwen 2.5 / Qwen 3 / Hermes 2 Pro)
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>', None, [WEATHER]),
    ("hermes", 'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>', "Let me check both.", [WEATHER, TIME]),
    ("hermes", '<tool_call>\n{"arguments": {"zone": "CET"}, "name": "get_time"}\n</tool_call>\nDone.', "Done.", [TIME]),
    ("hermes", "The capital of France is Paris. Use <b>tags</b> freely.", "The capital of France is Paris. Use <b>tags</b> freely.", []),
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>", "<tool_call>\nnot json at all\n</tool_call>", []),
    ("hermes", '<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", {})]),
    # llama3_json (Llama 3.1 / 3.2 / 3.3)
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [WEATHER]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {"zone": "CET"}}', None, [WEATHER, TIME]),
    ("llama3_json", "Paris is the capital of France.", "Paris is the capital of France.", []),
    ("llama3_json", '{"city": "Paris"} is a JSON object.', '{"city": "Paris"} is a JSON object.', []),
    # mistral (tokenizer v3-v7 JSON array, v11+ name[ARGS]json)
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]', None, [WEATHER, TIME]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
     "Sure.", [WEATHER, TIME]),
    ("mistral", "No tools needed [here].", "No tools needed [here].", []),
    # pythonic (Llama 3.2 / Llama 4)
    ("pythonic", "[get_weather(city='Paris', unit=\"celsius\"), get_time(zone='CET')]", None, [WEATHER, TIME]),
    ("pythonic", '<|python_start|>[get_weather(city="Paris", unit="celsius")]<|python_end|>', None, [WEATHER]),
    ("pythonic", "[search(query='a, b) [c]', limit=3, opts={'x': [1, 2]}, exact=True, after=None)]", None,
     [("search", {"query": "a, b) [c]", "limit": 3, "opts": {"x": [1, 2]}, "exact": True, "after": None})]),
    ("pythonic", "[1, 2, 3] are numbers.", "[1, 2, 3] are numbers.", []),
    ("pythonic", "The answer [is] here.", "The answer [is] here.", []),
]


@pytest.mark.parametrize("name,text,content,calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_tool_parsers_streamed_and_not(name: str, text: str, content: Optional[str], calls: list) -> None:
    _check(name, text, content, calls)


def test_arguments_are_the_models_text_and_truncated_calls_stay_prefixes() -> None:
    raw = '{"city":  "Paris",\n "unit": "celsius"}'
    msg = _whole(get_tool_parser("hermes")(), f"<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {raw}}}\n</tool_call>")
    assert msg["tool_calls"][0]["function"]["arguments"] == raw  # passed on as written: streamed slices of it add up
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    msg = _whole(get_tool_parser("hermes")(), cut)  # max_tokens: the call is kept with what was written
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"city": "Par'
    msg = _whole(get_tool_parser("pythonic")(), "[get_weather(city='Paris', unit='cel")
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}  # an open call is closed


def test_forced_tool_choice_parsers() -> None:
    text = '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, {"name": "get_time", "parameters": {"zone": "CET"}}]'
    msg = _whole(RequiredToolParser(), text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == [WEATHER, TIME]
    assert msg["content"] is None
    s = _streamed(RequiredToolParser(), text)
    assert [c["arguments"] for c in s["calls"]] == [c["function"]["arguments"] for c in msg["tool_calls"]]
    msg = _whole(NamedToolParser("get_time"), '{"zone": "CET"}')
    assert msg["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zone": "CET"}'}
    assert _streamed(NamedToolParser("get_time"), '{"zone": "CET"}', step=2)["calls"] == [{"name": "get_time", "arguments": '{"zone": "CET"}'}]


def test_mistral_keeps_special_tokens_and_uses_nine_character_ids() -> None:
    from jengine.sampling_params import SamplingParams

    params = SamplingParams()
    parser = get_tool_parser("mistral")()
    parser.adjust_request(params)
    assert params.skip_special_tokens is False
    call_id = parser.new_call_id()
    assert len(call_id) == 9 and call_id.isalnum()
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")


REASONING = [
    ("deepseek_r1", "<think>\nThe user wants a city.\n</think>\n\nParis.", "\nThe user wants a city.\n", "\n\nParis."),
    ("deepseek_r1", "The template opened the tag.</think>Paris.", "The template opened the tag.", "Paris."),
    ("deepseek_r1", "Still thinking when max_tokens hit", "Still thinking when max_tokens hit", ""),
    ("qwen3", "<think>\nShort thought.\n</think>\n\nParis.", "\nShort thought.\n", "\n\nParis."),
    ("qwen3", "Paris, with thinking off.", "", "Paris, with thinking off."),
]


@pytest.mark.parametrize("name,text,reasoning,content", REASONING)
def test_reasoning_parsers_streamed_and_not(name: str, text: str, reasoning: str, content: str) -> None:
    _check(None, text, content, [], reasoning_name=name, reasoning=reasoning or None)


def test_reasoning_then_tool_calls() -> None:
    text = '<think>I need the weather.</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    _check("hermes", text, None, [WEATHER], reasoning_name="qwen3", reasoning="I need the weather.")
