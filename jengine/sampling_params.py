"""`SamplingParams`: how to pick each next token, with vLLM's names and defaults.

Validation lives here so every frontend (Python API, HTTP, gRPC) rejects bad values the same way:
a `ValueError` whose message names the field and the allowed range. Every count and list has an
upper bound (`MAX_N`, `MAX_STOP_STRINGS`, ...), checked before any work is queued: one request must
not be able to tie up the engine or overflow the int32 step tensors. The bounds that depend on the
model (token ids within the vocabulary, the context window) are `EngineCore.validate_prompt`'s.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Union

from jengine.structured_output.params import StructuredOutputsParams  # re-exported (vLLM imports it from here)

_SAMPLING_EPS = 1e-5
DEFAULT_MAX_LOGPROBS = 20
MAX_N = 128  # completions per prompt (each is a sequence of its own)
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
INT32_MAX = 2**31 - 1  # token ids and counts go into int32 step tensors
# The sampler works in float32: these bounds keep logits / repetition_penalty, logits / temperature and
# logits + bias finite (a penalty of 1e-38 overflowed to inf, and the sampler then picked no valid token).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-6, 1e6
MAX_TEMPERATURE = 1e6
MAX_ABS_LOGIT_BIAS = 1e6


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
            _check(isinstance(self.stop, (list, tuple)), "stop", f"must be a string or a list of strings, got {type(self.stop).__name__}")
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            _check(isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids", f"must be a list of token ids, got {type(self.stop_token_ids).__name__}")
            self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None:
            _check(_is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
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
        _check_int(self.n, "n", 1, MAX_N)
        for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
            value = _check_real(getattr(self, name), name)
            _check(lo <= value <= hi, name, f"must be in [{lo:g}, {hi:g}], got {value}")
        _check(MIN_REPETITION_PENALTY <= _check_real(self.repetition_penalty, "repetition_penalty") <= MAX_REPETITION_PENALTY,
               "repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (> 0), got {self.repetition_penalty}")
        _check(0.0 <= _check_real(self.temperature, "temperature") <= MAX_TEMPERATURE, "temperature",
               f"must be in [0, {MAX_TEMPERATURE:g}] (>= 0), got {self.temperature}")
        _check(0.0 < _check_real(self.top_p, "top_p") <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(_is_int(self.top_k) and 0 <= self.top_k <= INT32_MAX, "top_k", f"must be -1, 0 (disabled) or in [1, {INT32_MAX}], got {self.top_k!r}")
        _check(0.0 <= _check_real(self.min_p, "min_p") <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens", 1, INT32_MAX)
        _check_int(self.min_tokens, "min_tokens", 0, INT32_MAX)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(value, name, 0, INT32_MAX if max_logprobs is None else max_logprobs,
                           "" if max_logprobs is None else f" (max_logprobs={max_logprobs})")
        stop = self.stop or []  # __post_init__ made both lists
        stop_token_ids = self.stop_token_ids or []
        _check(len(stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stop)}")
        for s in stop:
            _check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS, "stop",
                   f"must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters")
            _check(_encodable(s), "stop", "must be valid Unicode text (no lone surrogates)")
        _check(len(stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"at most {MAX_STOP_TOKEN_IDS} stop token ids are supported, got {len(stop_token_ids)}")
        bad = next((t for t in stop_token_ids if not (_is_int(t) and 0 <= t <= INT32_MAX)), None)
        _check(bad is None, "stop_token_ids", f"must be token ids (non-negative integers), got {bad!r}")
        for name in ("ignore_eos", "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output"):
            _check(isinstance(getattr(self, name), bool), name, f"must be a boolean, got {getattr(self, name)!r}")
        if self.seed is not None:
            _check(-(2**63) <= self.seed < 2**64, "seed", f"must fit in 64 bits, got {self.seed}")
        if self.logit_bias:
            bad = next((t for t in self.logit_bias if not 0 <= t <= INT32_MAX), None)
            _check(bad is None, "logit_bias", f"keys must be token ids (non-negative integers), got {bad}")
            bad_bias = next((b for b in self.logit_bias.values() if not (math.isfinite(b) and abs(b) <= MAX_ABS_LOGIT_BIAS)), None)
            _check(bad_bias is None, "logit_bias", f"biases must be finite numbers in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}], got {bad_bias}")
        if self.structured_outputs is not None:
            _check(isinstance(self.structured_outputs, StructuredOutputsParams), "structured_outputs",
                   f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
            self.structured_outputs.verify()

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(value: object, field: str, lo: int, hi: int, why: str = "") -> None:
    _check(_is_int(value), field, f"must be an integer, got {value!r}")
    _check(lo <= value <= hi, field, f"must be in [{lo}, {hi}]{why}, got {value}")  # type: ignore[operator]


def _check_real(value: object, field: str) -> float:
    """`value` as a float, or a ValueError naming `field` when it is not a finite number."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    _check(ok, field, f"must be a finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
