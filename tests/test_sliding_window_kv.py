"""Sliding-window memory through the engine: a tiny Gemma 3 at 4x its window.

Its local layers keep only the pages their window still sees (at most `window / page + 1` between steps
and in decode, `cdiv(window - 1 + n, page) + 1` during a prefill chunk of n tokens), greedy tokens still
equal HF transformers float32, and a prefix hit past the window gives the same tokens as no prefix cache.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jengine import LLM, SamplingParams
from jengine.core.hybrid_kv_cache_manager import HybridKVCacheManager
from jengine.core.kv_cache_layout import cdiv
from test_engine import hf_greedy, random_prompts
from tiny_models import make_tiny_checkpoint

WINDOW, PAGE = 16, 8
LIMITS = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=24, block_size=PAGE)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> str:
    # 8 layers: sliding 0-4, global 5, sliding 6-7 (Gemma 3's 5:1 pattern)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "gemma3", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def hf_gemma3(tiny_gemma3):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()


class HeldPages:
    """Records, for each allocation and after each step, the pages every request holds per group."""

    def __init__(self, kv: HybridKVCacheManager) -> None:
        self.during: list[tuple[int, int, tuple[int, ...]]] = []  # (tokens computed before, new tokens, held)
        self.after: list[tuple[int, ...]] = []
        allocate, cache = kv.allocate_slots, kv.cache_full_pages

        def allocate_slots(request, num_new_tokens, computed=None):
            pages = allocate(request, num_new_tokens, computed)
            if pages is not None:
                self.during.append((request.num_computed_tokens, num_new_tokens, kv.num_held_pages(request.request_id)))
            return pages

        def cache_full_pages(request, num_tokens):
            cache(request, num_tokens)
            self.after.append(kv.num_held_pages(request.request_id))

        kv.allocate_slots, kv.cache_full_pages = allocate_slots, cache_full_pages  # type: ignore[method-assign]


def test_local_layers_hold_only_their_window_with_hf_parity(tiny_gemma3, hf_gemma3, xla_cache_dir):
    llm = LLM(tiny_gemma3, compilation_cache_dir=xla_cache_dir, enable_prefix_caching=False, **LIMITS)
    kv = llm.engine.kv_cache_manager
    assert isinstance(kv, HybridKVCacheManager)
    assert [m.sliding_window for m in kv.groups] == [None, WINDOW]
    assert llm.engine.runner.kv_layout.groups[1].layers == (0, 1, 2, 3, 4, 6, 7)
    held = HeldPages(kv)
    prompts = random_prompts(3, [4 * WINDOW - 24, 30])  # 40 + 24 = 64 = 4x the window; 40 > 24: chunked prefill
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf_gemma3, p, GREEDY.max_tokens)
    assert llm.engine.compilations_after_warmup == 0

    bound = WINDOW // PAGE + 1
    chunks = [n for _, n, _ in held.during if n > 1]
    assert chunks and max(chunks) > PAGE  # prefill chunks longer than a page did run
    for computed, n, (full, local) in held.during:
        assert full == cdiv(computed + n, PAGE)  # the global layer keeps everything
        assert local <= (bound if n == 1 else cdiv(WINDOW - 1 + n, PAGE) + 1), (computed, n, local)
    assert all(local <= bound for _, local in held.after)
    assert max(full for _, _, (full, _) in held.during) == cdiv(4 * WINDOW - 1, PAGE)  # 4x the window reached
    assert kv.groups[1].num_free_pages == kv.groups[1].num_usable_pages  # all given back at the end


def test_without_the_window_aware_manager_local_layers_hold_everything(tiny_gemma3, hf_gemma3, xla_cache_dir):
    llm = LLM(tiny_gemma3, compilation_cache_dir=xla_cache_dir, disable_hybrid_kv_cache_manager=True, **LIMITS)
    kv = llm.engine.kv_cache_manager
    assert not isinstance(kv, HybridKVCacheManager) and kv.sliding_window is None
    [prompt] = random_prompts(3, [4 * WINDOW - 24])
    seen: list[int] = []
    cache = kv.cache_full_pages

    def record(request, num_tokens):
        cache(request, num_tokens)
        seen.append(kv.num_held_pages(request.request_id))

    kv.cache_full_pages = record  # type: ignore[method-assign]
    [out] = llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(hf_gemma3, prompt, GREEDY.max_tokens)
    assert max(seen) == cdiv(4 * WINDOW - 1, PAGE) > WINDOW // PAGE + 1


def test_prefix_hit_past_the_window_matches_no_prefix_cache(tiny_gemma3, hf_gemma3, xla_cache_dir):
    """A second request shares a 56-token prefix (3.5 windows) with the first; its local layers' hit needs
    only the pages of the window at the hit's end, all still cached, and the tokens match a run without
    prefix caching and HF."""
    rng = np.random.default_rng(7)
    shared = rng.integers(2, 320, size=56).tolist()
    first, second = shared + [5, 6, 7], shared + rng.integers(2, 320, size=9).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(tiny_gemma3, compilation_cache_dir=xla_cache_dir, **LIMITS)
    kv = llm.engine.kv_cache_manager
    assert isinstance(kv, HybridKVCacheManager)
    llm.generate([{"prompt_token_ids": first}], params, use_tqdm=False)
    hits_before = kv.prefix_cache_hits
    taken: list = []
    allocate = kv.allocate_slots

    def allocate_slots(request, num_new_tokens, computed=None):
        if computed is not None:
            taken.append(computed)
        return allocate(request, num_new_tokens, computed)

    kv.allocate_slots = allocate_slots  # type: ignore[method-assign]
    [hit] = llm.generate([{"prompt_token_ids": second}], params, use_tqdm=False)
    assert kv.prefix_cache_hits - hits_before == 56  # seven pages of eight
    [(full, local)] = taken
    # The global layer takes all seven pages; the local layers only pages 5 and 6 (positions 41..55 are the
    # window of position 56), never the ones given back while the first request ran.
    assert len(full) == len(local) == 7 and 0 not in full
    assert local[:5] == [0] * 5 and 0 not in local[5:]
    plain = LLM(tiny_gemma3, compilation_cache_dir=xla_cache_dir, enable_prefix_caching=False, **LIMITS)
    [ref] = plain.generate([{"prompt_token_ids": second}], params, use_tqdm=False)
    assert hit.outputs[0].token_ids == ref.outputs[0].token_ids == hf_greedy(hf_gemma3, second, 8)


# ---------------------------------------------------------------- kernels: null pages behind the window


@pytest.mark.parametrize("backend", ["reference", "cpu", "gpu", "tpu"])
def test_kernels_ignore_null_pages_behind_the_window(backend):
    """A sliding-window group's block tables hold page 0 for pages wholly behind a row's window, and page
    0 holds whatever padding tokens wrote there (here: large random values). Every backend must give the
    dense oracle's output: it starts at the window's first page or masks the null page to exactly zero."""
    import jax.numpy as jnp

    from jengine import pallas_kernels as pk
    from test_kernels import Batch, dense_oracle, rel_err, run

    if backend == "cpu":
        from test_kernels import _native_cpu

        _native_cpu()
    window = 40
    seqs = [(130, 1), (75, 1), (97, 20)]  # decode rows and a chunked prefill past the window
    b = Batch(seqs, hq=4, hkv=2, page_size=16).build()
    tables = b.arrays["block_tables"]
    nulled = 0
    for s, (n, qn) in enumerate(seqs):
        first = max(0, n - qn - window + 1) // b.page_size
        tables[s, :first] = 0
        nulled += first
    assert nulled == 5 + 2 + 2
    cache = b.cache

    def garbage_in_null_page(backend_name: str, interpret: bool = False):
        c = cache(backend_name, interpret)
        rng = np.random.default_rng(1)
        junk = jnp.asarray(1e4 * rng.standard_normal((b.page_size, b.hkv, b.d)), b.dtype)
        return pk.write_kv(c, junk, -junk, jnp.arange(b.page_size, dtype=jnp.int32), backend=backend_name, interpret=interpret)

    b.cache = garbage_in_null_page  # type: ignore[method-assign]
    out = run(b, backend, sliding_window=window, interpret=pk.runs_interpreted(backend))
    assert rel_err(out, dense_oracle(b, sliding_window=window), b.num_real_tokens) < 1e-4
