"""Reasoning parsers (`--reasoning-parser NAME`): split `<think>...</think>` output into the thinking
(`reasoning_content`) and the answer (`content`).

    split(text, final) -> (reasoning, content)

Like the tool parsers, a split is a prefix-monotone function of the text (a half-written tag waits),
so streamed `reasoning_content` / `content` deltas concatenate to the non-streamed message.

- `deepseek_r1`: DeepSeek-R1's template opens `<think>` in the prompt, so the output is thinking from
  its start (a `<think>` the model writes itself is dropped) up to `</think>`; no `</think>` at all
  means the whole output is thinking.
- `qwen3`: Qwen3 writes `<think>` itself when thinking (and nothing when thinking is switched off):
  output that starts with `<think>` is thinking up to `</think>`, anything else is all content.
"""
from __future__ import annotations

from typing import ClassVar

from jengine.structured_output.reasoning import REASONING_MARKERS, THINK_END, THINK_START

from .tool_parsers.json_scan import held_back


class ReasoningParser:
    name: ClassVar[str] = ""
    start_optional: ClassVar[bool] = True  # thinking without the opening tag (it was in the prompt)

    def split(self, text: str, final: bool) -> tuple[str, str]:
        i = len(text) - len(text.lstrip())
        if text.startswith(THINK_START, i):
            i += len(THINK_START)
        elif not final and THINK_START.startswith(text[i:]):
            return "", ""  # may be the opening tag
        elif self.start_optional:
            i = 0
        else:
            return "", text
        j = text.find(THINK_END, i)
        if j >= 0:
            return text[i:j], text[j + len(THINK_END):]
        thinking = text[i:]
        if not final:
            thinking = thinking[: len(thinking) - held_back(thinking, THINK_END)]
        return thinking, ""


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    start_optional = REASONING_MARKERS[name].thinks_from_start  # the engine's constraint starts where content does


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    start_optional = REASONING_MARKERS[name].thinks_from_start


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}") from None
