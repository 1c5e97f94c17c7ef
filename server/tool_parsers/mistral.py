"""`mistral`: Mistral tool calls after the `[TOOL_CALLS]` token, in either of Mistral's formats:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]     (tokenizer v3-v7)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]...                   (tokenizer v11+)

`[TOOL_CALLS]` is a special token, so requests keep special tokens in the text (as vLLM does); text
before it is the content. Call ids are 9 letters and digits, which Mistral's chat templates require.
"""
from __future__ import annotations

import random
import string
from typing import Any

from .base import Parsed, ParsedCall, ToolParser, calls_from_array, tail
from .json_scan import ERROR, scan_value, skip_ws

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_ID_CHARS = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    name = "mistral"

    def adjust_request(self, params: Any) -> None:
        params.skip_special_tokens = False

    @staticmethod
    def new_call_id() -> str:
        return "".join(random.choices(_ID_CHARS, k=9))

    def parse(self, text: str, final: bool) -> Parsed:
        j = text.find(TOOL_CALLS)
        if j < 0:
            return Parsed(tail(text, final, (TOOL_CALLS,)))
        out = Parsed(text[:j].rstrip())
        k = skip_ws(text, j + len(TOOL_CALLS))
        if k >= len(text):
            if final:
                out.content = text
            return out
        if text[k] == "[":
            calls, end, error = calls_from_array(text, k)
            out.calls = calls
            if error is not None or (end is None and final and not calls):
                if calls:
                    out.content += tail(text[error:], final)
                else:
                    out.content = tail(text, final)
            elif end is not None:
                out.content += tail(text[end:], final, (TOOL_CALLS,), after_call=True)
            return out
        return self._named_calls(text, k, final, out, j)

    @staticmethod
    def _named_calls(text: str, k: int, final: bool, out: Parsed, start: int) -> Parsed:
        """`name[ARGS]{...}` calls, each after its own `[TOOL_CALLS]`."""
        while True:
            a = text.find(ARGS, k)
            head = text[k:] if a < 0 else text[k:a]
            name = head.split(CALL_ID)[0].strip()
            if a < 0 or not name or any(c.isspace() for c in name):
                if a < 0 and not final and not any(c.isspace() for c in head.strip()):
                    return out  # the name (or [ARGS]) is still being written
                if out.calls:  # not a call: plain text from this marker on
                    out.content += tail(text[start:], final)
                else:
                    out.content = tail(text, final)
                return out
            v = skip_ws(text, a + len(ARGS))
            end = scan_value(text, v) if v < len(text) else None
            if end == ERROR:
                out.calls.append(ParsedCall(name, ""))
                out.content += tail(text[v:], final)
                return out
            out.calls.append(ParsedCall(name, text[v:end] if end is not None else text[v:]))
            if end is None:
                return out
            e = skip_ws(text, end)
            if text.startswith(TOOL_CALLS, e):
                k = skip_ws(text, e + len(TOOL_CALLS))
                start = e
                continue
            out.content += tail(text[e:], final, (TOOL_CALLS,), after_call=True)
            return out
