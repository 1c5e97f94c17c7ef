"""The request side of tool calling: `tools` checked, `tool_choice` turned into a plan.

    plan_tools(tools, tool_choice, auto_enabled=...) -> ToolPlan(mode, function, constraint)

`none` renders the tools into the chat template and parses nothing. `auto` (needs
`--enable-auto-tool-choice` and `--tool-call-parser`, as in vLLM) lets the model write freely and
the parser finds the calls. `required` and a named function constrain decoding with a JSON schema,
so any model returns well-formed calls: `required` a non-empty array of `{"name", "parameters"}`
objects, one branch per function with its `parameters` schema (vLLM's form); a named function its
arguments object. Without `tool_choice`, tools default to `auto` when the server enables it and to
`none` otherwise (vLLM answers that case with a 400; a request that only shows the model its tools
is served instead).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

from jengine.structured_output.params import StructuredOutputsParams

from .protocol import APIError

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    mode: str = "none"  # "none" | "auto" | "required" | "named"
    function: Optional[str] = None  # the named function
    constraint: Optional[StructuredOutputsParams] = None  # the grammar of "required" / "named"


def tool_functions(tools: Any) -> dict[str, dict[str, Any]]:
    """{name: parameters schema} of the request's `tools`; a 400 naming `tools` when malformed."""
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {type: 'function', function: {name, description, parameters}}", param="tools")
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"tools holds {len(tools)} tools; at most {MAX_TOOLS} are accepted", param="tools")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}] must be {{type: 'function', function: {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(400, f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}", param="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        if "description" in fn and not isinstance(fn["description"], (str, type(None))):
            raise APIError(400, f"tools[{i}].function.description must be a string", param="tools")
        out.setdefault(name, params if params else NO_PARAMETERS)  # a repeated name: the first wins (vLLM does not refuse it either)
    return out


def required_schema(functions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A JSON array of one or more calls, each `{"name": <a tool>, "parameters": <its arguments>}`."""
    branches = [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                 "required": ["name", "parameters"], "additionalProperties": False} for name, params in functions.items()]
    item = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return {"type": "array", "minItems": 1, "items": item}


def plan_tools(tools: Optional[list[Any]], tool_choice: Any, *, auto_enabled: bool) -> ToolPlan:
    """What the request's `tools` / `tool_choice` ask for; a 400 naming the field when they do not fit."""
    functions = tool_functions(tools) if tools is not None else {}
    if tool_choice is None:
        tool_choice = "auto" if functions and auto_enabled else "none"
    if tool_choice == "none":
        return ToolPlan()
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "required"):
        raise APIError(400, f"tool_choice {tool_choice!r} is not one of 'none', 'auto', 'required' or a named function", param="tool_choice")
    if not functions:
        raise APIError(400, "tool_choice other than 'none' needs tools", param="tool_choice")
    if tool_choice == "auto":
        if not auto_enabled:
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set', param="tool_choice")
        return ToolPlan("auto")
    if tool_choice == "required":
        return ToolPlan("required", constraint=StructuredOutputsParams(json=required_schema(functions)))
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {type: 'function', function: {name}}", param="tool_choice")
    if name not in functions:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
    return ToolPlan("named", name, StructuredOutputsParams(json=functions[name]))


def template_tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` for the chat template: each call's `arguments` JSON string
    decoded into an object (templates write them with `tojson`, as vLLM passes them)."""
    if not isinstance(calls, list):
        raise APIError(400, f"messages[{index}].tool_calls must be a list", param="messages")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"messages[{index}].tool_calls[{k}] must be {{id, type: 'function', function: {{name, arguments}}}}", param="messages")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                decoded = json.loads(args)
                args = decoded if isinstance(decoded, dict) else args
            except ValueError:
                pass
        out.append({**call, "function": {**fn, "arguments": args}})
    return out
