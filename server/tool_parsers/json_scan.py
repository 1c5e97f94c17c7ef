"""A forgiving scanner for JSON that may still be growing (a model's output, token by token).

The tool-call parsers need to know, for a text that may end in the middle of a value, where each
member of a call object starts and ends, without parsing the values: a call's `arguments` are passed
on as the exact text the model wrote (a JSON string, as OpenAI sends them), so the streamed pieces of
it are slices of that text and always concatenate to the non-streamed result. Nothing here raises:
`None` means "needs more text", `ERROR` means "this is not JSON".
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

ERROR = -1  # a scan result: the text is malformed at this point
WS = " \t\r\n"
_SCALAR_END = WS + ",}]"


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


def scan_string(text: str, i: int) -> Optional[int]:
    """`text[i]` is a quote: the index after the closing quote, or None while it is open."""
    j = i + 1
    n = len(text)
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def scan_value(text: str, i: int) -> Optional[int]:
    """The end of the JSON value starting at `text[i]` (no leading whitespace), None while it may still
    grow, ERROR when `text[i]` cannot start a value. Containers are matched by bracket depth (strings
    skipped); their contents are not validated."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return scan_string(text, i)
    if c in "{[":
        depth = 0
        j = i
        n = len(text)
        while j < n:
            c = text[j]
            if c == '"':
                end = scan_string(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    if c == "-" or c.isdigit() or c in "tfn":
        j = i
        while j < len(text) and text[j] not in _SCALAR_END:
            j += 1
        if j == len(text):
            return None  # a number or literal may still grow
        try:
            json.loads(text[i:j])
        except ValueError:
            return ERROR
        return j
    return ERROR


@dataclasses.dataclass
class ObjectScan:
    """What is known of a JSON object that may be incomplete: its members' value spans (end None while
    the value grows), where it ends (None while open), and where it broke (None unless malformed)."""

    members: dict[str, tuple[int, Optional[int]]]
    end: Optional[int] = None
    error: Optional[int] = None

    def string(self, text: str, key: str) -> Optional[str]:
        """The decoded string value of `key` once complete (None otherwise, or when not a string)."""
        span = self.members.get(key)
        if span is None or span[1] is None:
            return None
        try:
            value = json.loads(text[span[0]:span[1]])
        except ValueError:
            return None
        return value if isinstance(value, str) else None

    def raw(self, text: str, keys: tuple[str, ...]) -> Optional[tuple[str, bool]]:
        """(the value's text so far, complete) of the first of `keys` present; None when none is."""
        for key in keys:
            span = self.members.get(key)
            if span is not None:
                return (text[span[0]:span[1]] if span[1] is not None else text[span[0]:]), span[1] is not None
        return None


def scan_object(text: str, i: int) -> ObjectScan:
    """Scans the object whose `{` is at `text[i]`, as far as the text goes."""
    members: dict[str, tuple[int, Optional[int]]] = {}
    out = ObjectScan(members)
    j = skip_ws(text, i + 1)
    first = True
    while True:
        if j >= len(text):
            return out
        if text[j] == "}" and first:
            out.end = j + 1
            return out
        if text[j] != '"':
            out.error = j
            return out
        key_end = scan_string(text, j)
        if key_end is None:
            return out
        try:
            key = json.loads(text[j:key_end])
        except ValueError:
            out.error = j
            return out
        j = skip_ws(text, key_end)
        if j >= len(text):
            return out
        if text[j] != ":":
            out.error = j
            return out
        j = skip_ws(text, j + 1)
        if j >= len(text):
            return out
        end = scan_value(text, j)
        if end == ERROR:
            out.error = j
            return out
        members.setdefault(key, (j, end))
        if end is None:
            return out
        j = skip_ws(text, end)
        if j >= len(text):
            return out
        if text[j] == "}":
            out.end = j + 1
            return out
        if text[j] != ",":
            out.error = j
            return out
        j = skip_ws(text, j + 1)
        first = False


def held_back(text: str, *markers: str) -> int:
    """How many characters at the end of `text` could be the start of one of `markers` (so must wait)."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best

