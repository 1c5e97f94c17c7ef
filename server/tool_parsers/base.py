"""The tool-parser contract and the helpers the parsers share.

A parser is a pure function of the text generated so far: `parse(text, final)` returns the content
and the calls found in it. It must be *prefix-monotone*: for a text that later grows, the content it
returned is a prefix of the later content, the calls are the first calls of the later list with the
same names, and each call's arguments are a prefix of its later arguments. Anything that may still
change (a half-written tag, trailing whitespace that may precede a call, a call whose name is not
complete) is held back until it cannot. The streaming side (`server/chat_output.py`) sends the
differences between successive results, and a non-streamed reply is the result for the whole text
with `final=True`, so the streamed deltas always concatenate to the non-streamed reply.
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, ClassVar, Optional

from .json_scan import ERROR, ObjectScan, held_back, scan_object, skip_ws

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclasses.dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text as far as it is known


@dataclasses.dataclass
class Parsed:
    content: str
    calls: list[ParsedCall] = dataclasses.field(default_factory=list)


class ToolParser:
    """Finds tool calls in a model's free text (`tool_choice: "auto"`)."""

    name: ClassVar[str] = ""

    def __init__(self, tools: Optional[list[dict[str, Any]]] = None) -> None:
        self.tools = tools or []

    def adjust_request(self, params: Any) -> None:
        """Changes the request's `SamplingParams` the format needs (e.g. keep special-token markers)."""

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError

    @staticmethod
    def new_call_id() -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tail(segment: str, final: bool, markers: tuple[str, ...] = (), after_call: bool = False) -> str:
    """Content text at the end of what has been parsed: a possible start of a marker and trailing
    whitespace wait until the text goes on (or ends); whitespace right after a call is dropped."""
    if not final:
        segment = segment[: len(segment) - held_back(segment, *markers)].rstrip()
    return segment.lstrip() if after_call else segment


def call_from_object(text: str, i: int) -> tuple[Optional[ParsedCall], ObjectScan]:
    """The call in the `{"name": ..., "arguments" | "parameters": {...}}` object at `text[i]`, once its
    name is complete (arguments: the raw JSON text so far; "{}" when the object closes without them)."""
    scan = scan_object(text, i)
    name = scan.string(text, "name")
    if name is None:
        return None, scan
    raw = scan.raw(text, ARGUMENT_KEYS)
    if raw is None:
        return ParsedCall(name, "{}" if scan.end is not None else ""), scan
    return ParsedCall(name, raw[0]), scan


def calls_from_array(text: str, i: int) -> tuple[list[ParsedCall], Optional[int], Optional[int]]:
    """The calls in the JSON array of call objects at `text[i]` (a `[`): (calls, end or None while
    open, index where it is malformed or None)."""
    calls: list[ParsedCall] = []
    j = skip_ws(text, i + 1)
    if j < len(text) and text[j] == "]":
        return calls, j + 1, None
    while True:
        if j >= len(text):
            return calls, None, None
        if text[j] != "{":
            return calls, None, j
        call, scan = call_from_object(text, j)
        if call is not None:
            calls.append(call)
        if scan.error is not None:
            return calls, None, scan.error
        if scan.end is None:
            return calls, None, None
        if call is None:
            return calls, None, j  # an object without a name is not a call
        j = skip_ws(text, scan.end)
        if j >= len(text):
            return calls, None, None
        if text[j] == "]":
            return calls, j + 1, None
        if text[j] != ",":
            return calls, None, j
        j = skip_ws(text, j + 1)


__all__ = ["ARGUMENT_KEYS", "ERROR", "Parsed", "ParsedCall", "ToolParser", "call_from_object", "calls_from_array", "tail"]
