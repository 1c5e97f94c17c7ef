"""Output types handed back to callers, shaped like vLLM's so client code ports unchanged.

Logprobs are per position a ``dict[token_id, Logprob]`` holding the sampled (or prompt) token and the
top-k tokens, as vLLM returns them. ``prompt_logprobs`` has ``None`` for the first prompt token (nothing
predicts it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"


@dataclasses.dataclass
class Logprob:
    """One token's log probability, its 1-based rank in the vocabulary, and its text if detokenized."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclasses.dataclass
class CompletionOutput:
    """One completion of a request (there are `n` per request).

    finish_reason: None while running, then "stop" (EOS, a stop token or a stop string), "length"
    (max_tokens or the context window) or "abort". stop_reason: the stop string or stop token id that
    ended it; None for EOS and for the other finish reasons.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of a request's life; None until they happen."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclasses.dataclass
class RequestOutput:
    """Everything the engine reports about one request at one step (or at its end)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: Optional[list[int]]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: Optional[int] = None
    metrics: Optional[Any] = None
