"""The one place a request is checked before anything is queued.

    RequestValidator(...).validate(prompt_token_ids, params)   ValueError naming the field, or nothing

`LLM`, the asyncio engine behind HTTP and gRPC, and `EngineCore.add_request` all call it, so every
frontend refuses the same requests with the same messages. Each rule is written once:

- the parameters alone: `SamplingParams.verify` (ranges and counts);
- the model: token ids within the vocabulary, `top_k`, the stop-token and `logit_bias` bounds of the
  sampler's fixed-shape tensors, and compiling a structured-output constraint;
- the engine's capacity (`jengine.core.scheduler.capacity_error`, which the scheduler's own guard
  also calls): the prompt leaves room for one generated token, and prompt plus `max_tokens` can fit
  the KV cache.

Past this point the scheduler, the sampling-tensor builder and the output processor assume a valid
request; the builder still refuses out-of-bounds values rather than write them into a tensor, which
is how `EngineCore` finds a request that slipped past (its step fails that request alone).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from jengine.sampling_params import SamplingParams
from jengine.worker.model_runner import MAX_LOGIT_BIAS, MAX_STOP_TOKENS  # the sampling tensors' widths


class RequestValidator:
    """Checks a prompt and its parameters against the model and the engine (see the module docstring)."""

    def __init__(self, *, vocab_size: int, max_model_len: int, max_logprobs: int, eos_token_ids: Sequence[int],
                 capacity_error: Callable[[int, Optional[int]], Optional[str]], compile_constraint: Callable[[Any], None]) -> None:
        self.vocab_size = int(vocab_size)
        self.max_model_len = int(max_model_len)
        self.max_logprobs = max_logprobs
        self.eos_token_ids = tuple(eos_token_ids)
        self._capacity_error = capacity_error  # (prompt length, max_tokens) -> why it can never run, or None
        self._compile_constraint = compile_constraint  # raises ValueError naming the field; caches the result

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field for a prompt or parameters the engine cannot serve."""
        params.verify(self.max_logprobs)
        V = self.vocab_size
        outside = next((t for t in params.stop_token_ids or () if not 0 <= t < V), None)
        if outside is not None:
            raise ValueError(f"SamplingParams.stop_token_ids has token id {outside}, outside the vocabulary [0, {V})")
        if params.top_k > V:
            raise ValueError(f"SamplingParams.top_k must be at most the vocabulary size {V}, got {params.top_k}")
        if params.min_tokens and len(set(params.stop_token_ids or ()) | set(self.eos_token_ids)) > MAX_STOP_TOKENS:
            raise ValueError(f"SamplingParams.stop_token_ids: at most {MAX_STOP_TOKENS} stop and EOS token ids are supported together with min_tokens")
        if params.logit_bias:
            if len(params.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"SamplingParams.logit_bias: at most {MAX_LOGIT_BIAS} entries are supported, got {len(params.logit_bias)}")
            outside = next((t for t in params.logit_bias if not 0 <= t < V), None)
            if outside is not None:
                raise ValueError(f"SamplingParams.logit_bias has token id {outside}, outside the vocabulary [0, {V})")
        if params.structured_outputs is not None:
            self._compile_constraint(params.structured_outputs)
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must not be empty")
        bad = next((t for t in prompt_token_ids if not 0 <= int(t) < V), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids contains {bad}, outside the vocabulary [0, {V})")
        why = self._capacity_error(n, params.max_tokens)
        if why is not None:
            raise ValueError(why)
