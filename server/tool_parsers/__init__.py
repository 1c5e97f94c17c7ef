"""Tool-call parsers: find the calls in a model's output, streamed or not (`--tool-call-parser NAME`).

    parser = get_tool_parser("hermes")(tools)
    parser.parse(text, final) -> Parsed(content, [ParsedCall(name, arguments), ...])

Each format is one module; `TOOL_PARSERS` maps vLLM's parser names to them. The contract (every
parser is a prefix-monotone function of the text, so the streamed deltas concatenate to the
non-streamed result) is in `base.py`.
"""
from __future__ import annotations

from .base import Parsed, ParsedCall, ToolParser
from .forced import NamedToolParser, RequiredToolParser
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser
from .pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name`; ValueError listing the known names otherwise."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None


__all__ = ["NamedToolParser", "Parsed", "ParsedCall", "RequiredToolParser", "TOOL_PARSERS", "ToolParser", "get_tool_parser"]
