"""`hermes`: Hermes 2 Pro / Qwen 2.5 / Qwen 3 tool calls,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, with free text around them (the content).
"""
from __future__ import annotations

from .base import Parsed, ToolParser, call_from_object, tail
from .json_scan import skip_ws

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> Parsed:
        out = Parsed("")
        i, after_call = 0, False
        while True:
            j = text.find(START, i)
            if j < 0:
                out.content += tail(text[i:], final, (START,), after_call)
                return out
            before = text[i:j].lstrip() if after_call else text[i:j]
            k = skip_ws(text, j + len(START))
            if k >= len(text) and not final:
                out.content += before.rstrip()
                return out
            call, scan = call_from_object(text, k) if k < len(text) and text[k] == "{" else (None, None)
            if call is None:
                if scan is not None and scan.end is None and scan.error is None and not final:
                    out.content += before.rstrip()  # the name is still being written
                    return out
                out.content += tail(text[i:], final, after_call=after_call)  # not a call: plain text from here
                return out
            out.content += before.rstrip()
            out.calls.append(call)
            assert scan is not None  # a call comes with its scan
            if scan.error is not None:
                out.content += tail(text[scan.error:], final)
                return out
            if scan.end is None:
                return out
            e = skip_ws(text, scan.end)
            if text.startswith(END, e):
                i = e + len(END)
            elif not final and END.startswith(text[e:]):
                return out  # the closing tag is on its way
            else:
                i = scan.end  # no closing tag: the text goes on as content
            after_call = True
