"""Where a reasoning model's answer starts, so a constraint covers only the answer.

With `reasoning_parser` set (`--reasoning-parser`, vLLM's engine argument), a constrained sequence is
not masked while the model thinks: the grammar starts at the first token after the one that
completes `</think>`. The rules match the server's parsers (`jengine.server.reasoning_parsers`),
which split the same text into `reasoning_content` and `content`:

- `deepseek_r1`: the template opens `<think>` in the prompt, so the output thinks from its start.
- `qwen3`: the output thinks only if it opens with `<think>`; otherwise it is all answer. At the first
  token the mask allows the grammar's tokens plus the first token of `<think>`; taking that token
  commits to thinking (the rest of a multi-token `<think>` is then forced).
"""
from __future__ import annotations

import dataclasses

THINK_START, THINK_END = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ReasoningMarkers:
    """One reasoning format: its tags, and whether output thinks before any tag is written."""

    name: str
    thinks_from_start: bool  # True: thinking until THINK_END; False: thinking only after a leading THINK_START
    start: str = THINK_START
    end: str = THINK_END


REASONING_MARKERS: dict[str, ReasoningMarkers] = {
    "deepseek_r1": ReasoningMarkers("deepseek_r1", thinks_from_start=True),
    "qwen3": ReasoningMarkers("qwen3", thinks_from_start=False),
}


def get_reasoning_markers(name: str) -> ReasoningMarkers:
    """The markers of a `--reasoning-parser` name; ValueError naming the field otherwise."""
    try:
        return REASONING_MARKERS[name]
    except KeyError:
        raise ValueError(f"reasoning_parser {name!r} is not supported (supported: {', '.join(sorted(REASONING_MARKERS))})") from None
