"""`SamplingParams`: how to pick each next token, with vLLM's names and defaults.

Validation lives here so every frontend (Python API, HTTP, gRPC) rejects bad values the same way:
a `ValueError` whose message names the field and the allowed range.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Union

from jengine.structured_output.params import StructuredOutputsParams  # re-exported (vLLM imports it from here)

_SAMPLING_EPS = 1e-5
DEFAULT_MAX_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
    """Sampling parameters of one request (vLLM-compatible; see each field's comment)."""

    n: int = 1  # completions to return for the prompt
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted per occurrence in the generated text
    repetition_penalty: float = 1.0  # > 0; divides positive / multiplies negative logits of seen tokens
    temperature: float = 1.0  # >= 0; 0 means greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 or -1 disables; else >= 1
    min_p: float = 0.0  # in [0, 1]
    seed: Optional[int] = None  # per-request seed: same tokens whatever shares the batch
    stop: Optional[Union[str, list[str]]] = None  # stop strings (not included unless asked)
    stop_token_ids: Optional[list[int]] = None  # extra tokens that end the sequence
    ignore_eos: bool = False  # keep going past EOS
    max_tokens: Optional[int] = 16  # None: up to the context window
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens are out
    logprobs: Optional[int] = None  # top logprobs per generated token (the sampled one comes too)
    prompt_logprobs: Optional[int] = None  # top logprobs per prompt token
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None  # token id -> bias added to its logit before penalties
    structured_outputs: Optional[StructuredOutputsParams] = None  # constrain the output (JSON schema, regex, ...)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None:
            self.seed = int(self.seed)
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", f"must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            _check(all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in self.logit_bias), "logit_bias",
                   "keys must be integer token ids")
            _check(all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in self.logit_bias.values()),
                   "logit_bias", "values must be numbers")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None
        self.verify(max_logprobs=None)  # the engine checks logprobs against its own max_logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def verify(self, max_logprobs: Optional[int] = DEFAULT_MAX_LOGPROBS) -> None:
        """Raises ValueError naming the first field out of range (`max_logprobs=None`: no upper bound)."""
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be -1, 0 (disabled) or >= 1, got {self.top_k!r}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None:
            _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check(isinstance(value, int) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
                if max_logprobs is not None:
                    _check(value <= max_logprobs, name, f"must be <= max_logprobs={max_logprobs}, got {value}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative integers")
        if self.seed is not None:
            _check(-(2**63) <= self.seed < 2**64, "seed", f"must fit in 64 bits, got {self.seed}")
        if self.logit_bias:
            bad = next((t for t in self.logit_bias if t < 0), None)
            _check(bad is None, "logit_bias", f"token ids must be non-negative, got {bad}")
            bad_bias = next((b for b in self.logit_bias.values() if not math.isfinite(b)), None)
            _check(bad_bias is None, "logit_bias", f"biases must be finite, got {bad_bias}")
        if self.structured_outputs is not None:
            _check(isinstance(self.structured_outputs, StructuredOutputsParams), "structured_outputs",
                   f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
            self.structured_outputs.verify()

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} {message}")
