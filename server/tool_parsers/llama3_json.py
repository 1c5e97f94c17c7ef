"""`llama3_json`: Llama 3.1 / 3.2 / 3.3 JSON tool calls,

    {"name": "get_weather", "parameters": {"city": "Paris"}}

(optionally after `<|python_tag|>`; several calls separated by `;`). Output that does not start with
an object is plain content.
"""
from __future__ import annotations

from .base import Parsed, ToolParser, call_from_object, tail
from .json_scan import skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def parse(self, text: str, final: bool) -> Parsed:
        j = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, j):
            j = skip_ws(text, j + len(PYTHON_TAG))
        elif j < len(text) and PYTHON_TAG.startswith(text[j:]) and not final:
            return Parsed("")
        if j >= len(text) and not final:
            return Parsed("")
        if j >= len(text) or text[j] != "{":
            return Parsed(tail(text, final))
        out = Parsed("")
        while True:
            call, scan = call_from_object(text, j)
            if call is None:
                if scan.end is None and scan.error is None and not final:
                    return out  # the name is still being written
                out.content = tail(text if not out.calls else text[j:], final)
                return out
            out.calls.append(call)
            if scan.error is not None:
                out.content = tail(text[scan.error:], final)
                return out
            if scan.end is None:
                return out
            k = skip_ws(text, scan.end)
            if k < len(text) and text[k] == ";":
                j = skip_ws(text, k + 1)
                if j >= len(text):
                    return out
                if text[j] == "{":
                    continue
                k = j
            out.content = tail(text[k:], final)
            return out
