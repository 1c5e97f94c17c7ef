"""`pythonic`: Llama 3.2 / Llama 4 style calls written as a Python list of calls,

    [get_weather(city="Paris", unit="celsius"), get_time(zone='CET')]

(optionally between `<|python_start|>` and `<|python_end|>`). Arguments are keyword arguments whose
values are Python literals; each call's `arguments` are the JSON object of them, built argument by
argument as each value completes, so the streamed pieces concatenate to the whole. Output that does
not start with `[name(` is plain content.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any, Optional

from .base import Parsed, ParsedCall, ToolParser, tail
from .json_scan import ERROR, skip_ws

PY_START, PY_END = "<|python_start|>", "<|python_end|>"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def scan_literal(text: str, i: int) -> Optional[int]:
    """The end of the Python literal at `text[i]`: the index of the `,` or `)` that follows it at depth
    0 (None while the text may still grow, ERROR on an unbalanced bracket)."""
    depth = 0
    j = i
    n = len(text)
    while j < n:
        c = text[j]
        if c in "'\"":
            quote = c * 3 if text.startswith(c * 3, j) else c
            j += len(quote)
            while j < n and not text.startswith(quote, j):
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                return None
            j += len(quote)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return j if c == ")" else ERROR
            depth -= 1
        elif c == "," and depth == 0:
            return j
        j += 1
    return None


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def parse(self, text: str, final: bool) -> Parsed:
        j = skip_ws(text, 0)
        if text.startswith(PY_START, j):
            j = skip_ws(text, j + len(PY_START))
        elif j < len(text) and PY_START.startswith(text[j:]) and not final:
            return Parsed("")
        if j >= len(text):
            return Parsed(text if final else "")
        if text[j] != "[":
            return Parsed(tail(text, final))
        out = Parsed("")
        k = skip_ws(text, j + 1)
        while True:
            before = len(out.calls)
            result = self._call(text, k, final, out)
            started = len(out.calls) > before  # this call's name and "(" were written
            if result is None:  # still being written
                return self._broken(text, len(text), final, out, started) if final else out
            if result == ERROR or isinstance(result, tuple):
                return self._broken(text, result[1] if isinstance(result, tuple) else k, final, out, started)
            r = skip_ws(text, result)
            if r >= len(text):
                return self._broken(text, r, final, out, False) if final else out
            if text[r] == ",":
                k = skip_ws(text, r + 1)
                continue
            if text[r] != "]":
                return self._broken(text, r, final, out, False)
            r = skip_ws(text, r + 1)
            if text.startswith(PY_END, r):
                r += len(PY_END)
            elif not final and r < len(text) and PY_END.startswith(text[r:]):
                return out
            out.content = tail(text[r:], final, after_call=True)
            return out

    @staticmethod
    def _broken(text: str, at: int, final: bool, out: Parsed, open_call: bool) -> Parsed:
        """Not (or no longer) a call list: plain text when no call was found, else the text from where it
        broke; an open call is closed."""
        if not out.calls:
            return Parsed(tail(text, final))
        if open_call:
            out.calls[-1].arguments += "}"
        out.content = tail(text[at:], final)
        return out

    @staticmethod
    def _call(text: str, k: int, final: bool, out: Parsed) -> Any:
        """Parses the call at `text[k]` into `out.calls` (appended once its name and `(` are written):
        the index after its `)`, None while unfinished, ERROR before a call started, or
        ("broken", index) after."""
        m = _NAME.match(text, k)
        if m is None:
            return None if k >= len(text) else ERROR
        p = skip_ws(text, m.end())
        if p >= len(text):
            return None
        if text[p] != "(":
            return ERROR
        call = ParsedCall(m.group(), "{")
        out.calls.append(call)
        parts: list[str] = []
        q = skip_ws(text, p + 1)
        while True:
            if q >= len(text):
                return None
            if text[q] == ")":
                call.arguments = "{" + ", ".join(parts) + "}"
                return q + 1
            km = _KEYWORD.match(text, q)
            if km is None:
                return ("broken", q)
            e = skip_ws(text, km.end())
            if e >= len(text):
                return None
            if text[e] != "=":
                return ("broken", e)
            v = skip_ws(text, e + 1)
            end = scan_literal(text, v)
            if end is None:
                return None
            if end == ERROR:
                return ("broken", v)
            try:
                value = ast.literal_eval(text[v:end].strip())
                arg = f"{json.dumps(km.group())}: {json.dumps(value, ensure_ascii=False)}"
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return ("broken", v)
            parts.append(arg)
            call.arguments = "{" + ", ".join(parts)
            q = skip_ws(text, end + 1) if text[end] == "," else end
