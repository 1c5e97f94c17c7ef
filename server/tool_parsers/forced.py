"""The parsers for grammar-enforced tool choices (not selectable by `--tool-call-parser`).

`tool_choice: "required"` constrains the output to a JSON array of `{"name", "parameters"}` objects
(vLLM's form); a named `tool_choice` constrains it to that function's arguments object, so the
whole output is the arguments.
"""
from __future__ import annotations

from typing import Any

from .base import Parsed, ParsedCall, ToolParser, calls_from_array
from .json_scan import skip_ws


class RequiredToolParser(ToolParser):
    name = "required"

    def parse(self, text: str, final: bool) -> Parsed:
        j = skip_ws(text, 0)
        if j >= len(text) or text[j] != "[":
            return Parsed(text if final else "")  # cannot happen under the grammar
        calls, _, _ = calls_from_array(text, j)
        return Parsed("", calls)


class NamedToolParser(ToolParser):
    name = "named"

    def __init__(self, function_name: str, tools: Any = None) -> None:
        super().__init__(tools)
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> Parsed:
        return Parsed("", [ParsedCall(self.function_name, text)])
