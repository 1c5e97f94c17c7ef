"""Draft-model speculation: a small model with the target's vocabulary proposes the next k tokens.

    DraftModel.load(config, target_config, target_dtype, plan)    reads the draft (ValueError naming speculative_config.model)
    draft.page_bytes                                              its KV bytes per page (the target's page budget counts them)
    draft.attach(runner, max_model_len); draft.warmup()           its cache and its compiled buckets
    draft.propose(scheduled)                                      fills the k draft slots schedule() reserved per row
    draft.commit(seq, num_accepted)                                 how far each request's draft KV is valid (on its record)

The draft's KV cache is its own array (its own layers, KV heads and head size) indexed by the target's page
ids: same page size, same number of pages, the rows' block tables and slot mappings as the scheduler gave
them. So the KV cache manager and the scheduler keep no extra books: a page a request holds holds the
draft's KV of the same positions, prefix-cache hits share it too, and freeing a page frees both.

Each synchronous step, after `schedule()` has reserved k draft slots on each decoding row that may
speculate, `propose` runs the draft over the step's rows:

  pass 1   every scheduled row feeds the committed tokens whose draft KV is not valid yet (a prefill
           chunk: the chunk; a decode row: its last token, and the last accepted draft when the target
           accepted every draft of the previous step), so the draft cache keeps up with the target's;
           rows with draft slots take the argmax at their last position as d_0;
  pass j   (j = 1 .. k-1) the rows with more slots feed d_{j-1} and take the argmax as d_j.

Each pass is one bucketed `StepInputs` step (`build_step_inputs`), compiled at warm-up over the draft's
own (tokens, rows) buckets. Drafts are greedy (argmax), as vLLM's draft-model and EAGLE proposers draft:
the draft distribution q is then a point mass, for which the speculator's accept rule (keep d_i while the
target's own draw at position i equals it) is exact rejection sampling, and seeded requests emit exactly
the tokens they emit without speculation (`jengine.spec_decode.speculator`).

After the target accepted m of a row's r drafts, the draft KV is valid through d_{min(m, r-1) - 1}: the
draft never fed its last draft d_{r-1}. The next pass 1 feeds from there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jengine import pallas_kernels
from jengine.attention import AttentionMetadata
from jengine.config import EngineConfig
from jengine.sampler import argmax_rows
from jengine.worker.model_runner import _CompileCounter, kv_cache_dtype
from jengine.worker.step_inputs import (
    StepInputs, build_step_inputs, empty_step_inputs, make_token_buckets, num_logit_rows, pick_bucket, pick_seq_bucket, seq_bucket_pairs,
)
from jengine.worker.warmup import PieceCompiler

logger = logging.getLogger(__name__)

FIELD = "speculative_config.model"
_NO_PROMPT_LOGPROBS = type("_Params", (), {"prompt_logprobs": None})()


@dataclasses.dataclass
class _Tokens:
    """The token view `build_step_inputs` reads of a request: its prompt, and its outputs plus drafts so far."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    sampling_params: Any = _NO_PROMPT_LOGPROBS


@dataclasses.dataclass
class _Row:
    """One row of a draft pass, shaped like the scheduler's `ScheduledSeq` where `build_step_inputs` reads it."""

    request: _Tokens
    start: int
    num_new_tokens: int
    block_ids: list[int]


class DraftModel:
    """The draft model's weights, its paged KV cache and its jitted greedy step (see the module docstring)."""

    def __init__(self, config: EngineConfig, loaded: Any, plan: Any):
        self.config = config
        self.loaded = loaded
        self.model_config = mc = loaded.config
        self.dtype = jnp.dtype(loaded.dtype)
        self.cache_dtype = kv_cache_dtype(config.cache.cache_dtype, self.dtype)
        self.plan = plan  # the draft's own TensorParallelPlan on the target's mesh, or None
        shards = plan.kv_shards if plan is not None else 1
        self.page_bytes = config.cache.block_size * 2 * mc.num_kv_heads * mc.head_dim * self.cache_dtype.itemsize * mc.num_layers // shards
        self.k = config.speculative.num_speculative_tokens if config.speculative is not None else 0
        self.runner: Any = None
        self.propose_seconds = 0.0  # host + device time of the draft passes (benchmarks)

    # ----- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig, target_config: Any, target_dtype: str, plan: Any = None) -> "DraftModel":
        """Loads the draft named by `speculative_config.model` in the target's dtype, sharded on the target's
        mesh with the same partition rules; ValueError (naming the field) when it cannot serve as a draft."""
        from jengine.loader import load_model
        from jengine.sharding import TensorParallelPlan, read_model_config

        spec = config.speculative
        assert spec is not None and spec.model is not None  # SpeculativeConfig.from_dict checked the method's keys
        load_format = "dummy" if config.load_format == "dummy" else "auto"
        try:
            draft_config = read_model_config(spec.model, load_format)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{FIELD} {spec.model!r} cannot be read as a model checkpoint: {e}") from e
        if draft_config.vocab_size != target_config.vocab_size:
            raise ValueError(
                f"{FIELD} {spec.model!r} has a vocabulary of {draft_config.vocab_size} tokens, the target "
                f"{target_config.vocab_size}: a draft model must share the target's tokenizer")
        draft_plan = None
        if plan is not None:
            try:
                draft_plan = TensorParallelPlan(plan.mesh, draft_config, backend=plan.backend)
            except ValueError as e:
                raise ValueError(f"{FIELD} {spec.model!r} cannot be sharded like the target: {e}") from e
        loaded = load_model(spec.model, dtype=target_dtype, load_format=load_format,
                            place=draft_plan.place if draft_plan is not None else None)
        return cls(config, loaded, draft_plan)

    def attach(self, runner: Any, max_model_len: int) -> None:
        """Builds the draft's cache with the target runner's page count and page size, and its jitted step."""
        mc, sc = self.model_config, self.config.scheduler
        if runner.num_kv_groups > 1:
            raise ValueError(f"{FIELD}: a draft model needs the target's layers to share one KV cache page table; "
                             "start the engine with disable_hybrid_kv_cache_manager=True")
        if mc.max_position_embeddings < max_model_len:
            raise ValueError(f"{FIELD} supports {mc.max_position_embeddings} positions, fewer than max_model_len={max_model_len}; "
                             "lower max_model_len")
        self.runner = runner
        self.page_size = runner.page_size
        self.pages_per_layer = runner.pages_per_layer
        self.max_pages_per_seq = runner.max_pages_per_seq
        self.backend, self.interpret = runner.backend, runner.interpret
        self.graphdef, self.params = nnx.split(self.loaded.model)
        self.loaded = None  # the weights live in self.params now

        def make_cache() -> Any:
            return pallas_kernels.new_kv_cache(self.pages_per_layer * mc.num_layers, self.page_size, mc.num_kv_heads, mc.head_dim,
                                               self.cache_dtype, backend=self.backend)

        self.kv_cache = self.plan.place_cache(make_cache) if self.plan is not None else make_cache()
        # Pass 1 feeds a decode row up to 2 tokens where the target step has 1 (a row that got no drafts this
        # step after all its drafts were accepted in the last): room for one more token per row.
        self.min_seq_bucket = sc.min_seq_bucket
        self.max_rows = sc.max_num_seqs
        self.token_buckets = make_token_buckets(sc.min_token_bucket, sc.max_num_batched_tokens + sc.max_num_seqs)
        self.step_buckets = seq_bucket_pairs(self.token_buckets, sc.min_seq_bucket, sc.max_num_seqs)
        self._step: Any
        if self.plan is not None:
            from jengine.sharding import PinnedJit

            kinds = self.plan.jit_kwargs(("params", "cache", "replicated"), ("cache", "replicated"), params=self.params, kv_cache=self.kv_cache)
            self._step = PinnedJit(self._step_fn, donate_argnums=(1,), **kinds)
        else:
            self._step = jax.jit(self._step_fn, donate_argnums=(1,))

    @property
    def kv_cache_bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.kv_cache))

    # ----- the jitted step ----------------------------------------------------------------------
    def _step_fn(self, params: Any, kv_cache: Any, inputs: StepInputs) -> tuple[Any, jax.Array]:
        """Writes the fed tokens' draft KV and returns the argmax token at each row's logits index."""
        precision = jax.default_matmul_precision("highest") if self.dtype == jnp.float32 else contextlib.nullcontext()
        with precision:  # as the target: float32 models compute float32 matmuls on every platform
            model = nnx.merge(self.graphdef, params)
            assert inputs.block_tables is not None  # the draft's passes carry their block tables (no persistent table)
            md = AttentionMetadata(
                slot_mapping=inputs.slot_mapping, seq_lens=inputs.seq_lens, block_tables=inputs.block_tables,
                query_start_loc=inputs.query_start_loc, num_seqs=inputs.num_seqs, pages_per_layer=self.pages_per_layer,
                page_size=self.page_size, backend=self.backend,
                mesh=self.plan.mesh if self.plan is not None and self.backend != "reference" else None,
                shard_kv=self.plan is not None and self.plan.shard_kv, interpret=self.interpret,
                k_scale=self.config.cache.k_scale, v_scale=self.config.cache.v_scale,
            )
            kv_cache, hidden = model(kv_cache, inputs.token_ids, inputs.positions, md)
            logits = model.compute_logits(hidden[inputs.logits_indices], md, num_logit_rows(inputs.logits_indices))
        return kv_cache, argmax_rows(logits)

    def warmup(self) -> None:
        """Compiles every draft bucket before serving (on worker threads, through the persistent cache)."""
        start = time.perf_counter()
        params, kv0, maxp = self.params, self.kv_cache, self.max_pages_per_seq

        def lower(t: int, s: int) -> Any:
            return lambda: self._step.lower(params, kv0, empty_step_inputs(t, s, maxp))

        compiler = PieceCompiler([(("draft", t, s), lower(t, s)) for t, s in self.step_buckets], workers=os.cpu_count() or 1)
        compiler.wait_all()
        logger.info("compiled %d draft-model step pieces in %.1f s", len(self.step_buckets), time.perf_counter() - start)

    def _run(self, rows: Sequence[_Row]) -> np.ndarray:
        """One draft pass over `rows`: writes their draft KV, returns each row's argmax token."""
        num_tokens = sum(r.num_new_tokens for r in rows)
        t = pick_bucket(self.token_buckets, num_tokens)
        s = pick_seq_bucket(t, len(rows), self.min_seq_bucket, self.max_rows)
        inputs = build_step_inputs(rows, t, s, self.max_pages_per_seq, self.page_size)
        with _CompileCounter.watching(self.runner):  # the engine's no-compilation-after-warm-up counter covers the draft
            self.kv_cache, tokens = self._step(self.params, self.kv_cache, inputs)
            return np.asarray(jax.device_get(tokens))[:len(rows)]

    # ----- proposing ----------------------------------------------------------------------------
    def propose(self, scheduled: Sequence[Any]) -> None:
        """Fills each scheduled row's reserved draft slots (`spec_token_ids`, placeholders until now) with
        the draft's greedy tokens, and brings every row's draft KV up to its committed tokens."""
        if not scheduled:
            return
        start_time = time.perf_counter()
        first: list[_Row] = []
        for seq in scheduled:
            req = seq.request
            end = seq.start + seq.num_new_tokens - len(seq.spec_token_ids)  # the row's known tokens end here
            # Valid draft KV ends at most one position before the target's (see the module docstring); after a
            # preemption the target recomputes from `start` and so does the draft.
            begin = max(min(seq.start if req.draft_num_valid is None else req.draft_num_valid, seq.start), seq.start - 1)
            first.append(_Row(_Tokens(req.prompt_token_ids, req.output_token_ids), begin, end - begin, seq.block_ids))
        tokens = self._run(first)
        drafting = [(i, seq) for i, seq in enumerate(scheduled) if seq.spec_token_ids]
        drafts = {i: [int(tokens[i])] for i, _ in drafting}
        for j in range(1, max((len(seq.spec_token_ids) for _, seq in drafting), default=0)):
            rows = [(i, seq) for i, seq in drafting if len(seq.spec_token_ids) > j]
            step = [_Row(_Tokens(seq.request.prompt_token_ids, seq.request.output_token_ids + drafts[i]),
                         first[i].start + first[i].num_new_tokens + j - 1, 1, seq.block_ids) for i, seq in rows]
            for (i, _), token in zip(rows, self._run(step)):
                drafts[i].append(int(token))
        for i, seq in drafting:
            seq.spec_token_ids[:] = drafts[i]
        self.propose_seconds += time.perf_counter() - start_time

    def commit(self, seq: Any, num_accepted: Optional[int]) -> None:
        """Records how far the row's request has valid draft KV after the target accepted `num_accepted` of its drafts."""
        known_end = seq.start + seq.num_new_tokens - len(seq.spec_token_ids)
        r = len(seq.spec_token_ids)
        seq.request.draft_num_valid = known_end + (min(num_accepted or 0, r - 1) if r else 0)
