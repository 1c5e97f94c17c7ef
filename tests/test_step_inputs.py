"""Step buckets and the host-side layout of a ragged batch (`jengine.worker.step_inputs`)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jengine.sampling_params import SamplingParams
from jengine.worker.step_inputs import (
    build_step_inputs, make_token_buckets, pick_bucket, pick_seq_bucket, seq_bucket_pairs,
)


def test_token_buckets_are_fine_below_128_then_geometric() -> None:
    assert make_token_buckets(8, 2048) == [8, 16, 32, 48, 64, 80, 96, 112, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert make_token_buckets(8, 100) == [8, 16, 32, 48, 64, 80, 96, 100]  # the limit is always a bucket
    assert make_token_buckets(16, 16) == [16]
    assert make_token_buckets(1, 8) == [1, 2, 4, 8]


@pytest.mark.parametrize("max_tokens,max_seqs,min_seq", [(2048, 256, 8), (512, 32, 8), (64, 4, 8), (100, 128, 8)])
def test_every_batch_gets_a_compiled_shape_that_fits(max_tokens: int, max_seqs: int, min_seq: int) -> None:
    tokens = make_token_buckets(8, max_tokens)
    pairs = set(seq_bucket_pairs(tokens, min_seq, max_seqs))
    assert len(pairs) <= 2 * len(tokens)  # the grid grows with the token buckets only
    for num_tokens in range(1, max_tokens + 1, 7):
        t = pick_bucket(tokens, num_tokens)
        for rows in {1, min_seq, min_seq + 1, min(num_tokens, max_seqs)}:
            if rows > min(num_tokens, max_seqs):
                continue
            s = pick_seq_bucket(t, rows, min_seq, max_seqs)
            assert (t, s) in pairs and rows <= s <= t
            if rows <= min_seq:
                assert s == min(min_seq, max_seqs, t)  # a lone prompt does not pay for a T-row LM head


def test_build_step_inputs_lays_out_rows() -> None:
    params = SamplingParams(max_tokens=4)
    decode = SimpleNamespace(request=SimpleNamespace(prompt_token_ids=[5, 6, 7], output_token_ids=[8], sampling_params=params),
                             start=3, num_new_tokens=1, block_ids=[3])
    prompt = SimpleNamespace(request=SimpleNamespace(prompt_token_ids=list(range(10, 30)), output_token_ids=[], sampling_params=params),
                             start=0, num_new_tokens=20, block_ids=[4, 9])
    x = build_step_inputs([decode, prompt], num_tokens=32, num_seqs=8, max_pages_per_seq=4, page_size=16)
    assert x.token_ids[:21].tolist() == [8] + list(range(10, 30))
    assert x.positions[:21].tolist() == [3] + list(range(20))
    assert x.slot_mapping[0] == 3 * 16 + 3 and x.slot_mapping[1 + 17] == 9 * 16 + 1
    assert x.query_start_loc.tolist() == [0, 1, 21] + [21] * 6
    assert x.seq_lens.tolist() == [4, 20] + [0] * 6
    assert x.logits_indices[:2].tolist() == [0, 20]
    assert x.block_tables[1, :2].tolist() == [4, 9] and int(x.num_seqs[0]) == 2
    assert not np.any(x.token_ids[21:])
