"""One chat choice's output as OpenAI message fields: reasoning, content and tool calls.

`ChoiceOutput.update(text, final)` takes the choice's cumulative text and returns the delta since
the last call (`reasoning_content`, `content`, `tool_calls` entries with `index`; a call's first
entry carries its `id`, `type` and `function.name`). The reasoning parser splits the text first and
the tool parser reads only the answer part. A non-streamed reply is one `update(text, final=True)`
followed by `message()`, the same code as streaming, so the streamed deltas concatenate to it.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from .reasoning_parsers import ReasoningParser
from .tool_parsers import ToolParser

logger = logging.getLogger("jengine.server")


class ChoiceOutput:
    def __init__(self, reasoning: Optional[ReasoningParser] = None, tools: Optional[ToolParser] = None) -> None:
        self.reasoning_parser = reasoning
        self.tool_parser = tools
        self.reasoning = ""
        self.content = ""
        self.calls: list[dict[str, Any]] = []  # {"id", "name", "arguments"} as sent

    def update(self, text: str, final: bool) -> dict[str, Any]:
        reasoning, answer = self.reasoning_parser.split(text, final) if self.reasoning_parser else ("", text)
        delta: dict[str, Any] = {}
        if reasoning != self.reasoning:
            piece = self._extend("reasoning", reasoning)
            if piece:
                delta["reasoning_content"] = piece
        if self.tool_parser is None:
            content, calls = answer, []
        else:
            parsed = self.tool_parser.parse(answer, final)
            content, calls = parsed.content, parsed.calls
        piece = self._extend("content", content)
        if piece:
            delta["content"] = piece
        entries = []
        for i, call in enumerate(calls):
            assert self.tool_parser is not None  # calls come only from it
            if i < len(self.calls):
                sent = self.calls[i]
                if call.name != sent["name"] or not call.arguments.startswith(sent["arguments"]):
                    logger.warning("tool parser %s revised call %d; the change is not sent", self.tool_parser.name, i)
                    continue
                if len(call.arguments) > len(sent["arguments"]):
                    entries.append({"index": i, "function": {"arguments": call.arguments[len(sent["arguments"]):]}})
                    sent["arguments"] = call.arguments
            else:
                sent = {"id": self.tool_parser.new_call_id(), "name": call.name, "arguments": call.arguments}
                self.calls.append(sent)
                entries.append({"index": i, "id": sent["id"], "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}})
        if entries:
            delta["tool_calls"] = entries
        return delta

    def _extend(self, field: str, value: str) -> str:
        old = getattr(self, field)
        if not value.startswith(old):
            logger.warning("%s parser revised text already sent; the change is not sent", field)
            return ""
        setattr(self, field, value)
        return value[len(old):]

    def tool_calls(self) -> list[dict[str, Any]]:
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.calls]

    def message(self, role: str, echo: str = "") -> dict[str, Any]:
        """The non-streamed message (after `update(text, final=True)`)."""
        msg: dict[str, Any] = {"role": role, "content": echo + self.content, "tool_calls": self.tool_calls()}
        if self.calls and not msg["content"]:
            msg["content"] = None
        if self.reasoning_parser is not None:
            msg["reasoning_content"] = self.reasoning or None
        return msg
