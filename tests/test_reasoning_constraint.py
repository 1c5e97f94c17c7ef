"""With a reasoning parser, a structured-output constraint covers only the answer after `</think>`.

Manager tests walk the phases (thinking unmasked, the end marker, the answer under the grammar) with
the end marker as one added token and as several ordinary tokens; engine tests steer the tiny random
model with `logit_bias` so that it writes the markers, and check what the grammar did after them.
"""
from __future__ import annotations

import numpy as np
import pytest

from jengine import LLM, SamplingParams, StructuredOutputsParams
from jengine.config import EngineArgs
from jengine.structured_output.manager import StructuredOutputManager, bitmask_words
from jengine.structured_output.reasoning import get_reasoning_markers
from tiny_models import VOCAB_SIZE, make_tiny_checkpoint, make_tiny_tokenizer

CHOICE = StructuredOutputsParams(choice=["hello", "world"])
EOS = 1


def _think_tokenizer():
    """The tiny tokenizer plus `<think>` / `</think>` as single (non-special) tokens, as in Qwen3."""
    tok = make_tiny_tokenizer()
    tok.add_tokens(["<think>", "</think>"])
    return tok


def _allowed(manager: StructuredOutputManager, seq) -> set[int]:
    out = np.zeros((1, bitmask_words(VOCAB_SIZE)), np.int32)
    manager.fill_bitmask([seq], out)
    bits = np.unpackbits(out[0].view(np.uint8), bitorder="little")[:VOCAB_SIZE]
    return set(np.nonzero(bits)[0].tolist())


def _grammar_start(tok) -> set[int]:
    plain = StructuredOutputManager(tok, VOCAB_SIZE, [EOS])
    return _allowed(plain, plain.start(CHOICE, "g"))


@pytest.mark.parametrize("single_token_marker", [True, False])
def test_deepseek_r1_thinking_is_unmasked_until_the_end_marker(single_token_marker):
    tok = _think_tokenizer() if single_token_marker else make_tiny_tokenizer()
    m = StructuredOutputManager(tok, VOCAB_SIZE, [EOS], get_reasoning_markers("deepseek_r1"))
    r = m.start(CHOICE, "r")
    assert _allowed(m, r) == set(range(VOCAB_SIZE))  # thinking: every token
    m.accept(r, tok.encode("ok so", add_special_tokens=False))
    assert _allowed(m, r) == set(range(VOCAB_SIZE)) and not m.is_terminated(r)
    end = tok.encode("</think>", add_special_tokens=False)
    assert (len(end) == 1) == single_token_marker
    m.accept(r, end)
    assert _allowed(m, r) == _grammar_start(tok)  # the answer starts under the grammar
    assert m.accept(r, tok.encode("hello", add_special_tokens=False)) and m.is_terminated(r)
    assert _allowed(m, r) == {EOS}
    # Thinking, its end and the answer can also arrive in one accepted run (speculative decoding).
    s = m.start(CHOICE, "s")
    assert m.accept(s, tok.encode("hm", add_special_tokens=False) + end + tok.encode("world", add_special_tokens=False))
    assert m.is_terminated(s)


@pytest.mark.parametrize("single_token_marker", [True, False])
def test_qwen3_answer_starts_at_once_unless_the_output_opens_thinking(single_token_marker):
    tok = _think_tokenizer() if single_token_marker else make_tiny_tokenizer()
    m = StructuredOutputManager(tok, VOCAB_SIZE, [EOS], get_reasoning_markers("qwen3"))
    start = tok.encode("<think>", add_special_tokens=False)
    assert (len(start) == 1) == single_token_marker
    grammar = _grammar_start(tok)
    assert start[0] not in grammar
    a = m.start(CHOICE, "a")
    assert _allowed(m, a) == grammar | {start[0]}  # the grammar, or opening the thinking
    m.accept(a, tok.encode("he", add_special_tokens=False)[:1])
    assert start[0] not in _allowed(m, a)  # committed to the answer
    t = m.start(CHOICE, "t")
    m.accept(t, start[:1])
    for forced in start[1:]:  # the rest of a multi-token start marker
        assert _allowed(m, t) == {forced}
        m.accept(t, [forced])
    assert _allowed(m, t) == set(range(VOCAB_SIZE))
    m.accept(t, tok.encode("x y", add_special_tokens=False) + tok.encode("</think>", add_special_tokens=False))
    assert _allowed(m, t) == grammar


def test_unknown_reasoning_parser_is_rejected():
    with pytest.raises(ValueError, match="reasoning_parser 'r1' is not supported"):
        EngineArgs(reasoning_parser="r1").create_engine_config()


@pytest.fixture(scope="module")
def think_model(tmp_path_factory) -> str:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("think"), "llama")
    _think_tokenizer().save_pretrained(path)
    return path


LIMITS = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)


def test_engine_constrains_only_the_answer(think_model, xla_cache_dir):
    llm = LLM(think_model, reasoning_parser="deepseek_r1", compilation_cache_dir=xla_cache_dir, **LIMITS)
    tok = llm.engine.tokenizer
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    prompt = {"prompt_token_ids": [5, 17, 42]}
    # The model is pushed to write `</think>` first: the answer after it obeys the choice.
    bias = SamplingParams(temperature=0.0, max_tokens=12, logit_bias={end: 100.0}, structured_outputs=CHOICE)
    (out,) = llm.generate([prompt], [bias], use_tqdm=False)
    o = out.outputs[0]
    assert o.token_ids[0] == end and o.finish_reason == "stop"
    assert o.text.split("</think>", 1)[1] in ("hello", "world")
    # Without the push the thinking is never masked: the same tokens as no constraint, up to `</think>`.
    free, held = llm.generate([prompt] * 2, [SamplingParams(temperature=0.0, max_tokens=10),
                                              SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=CHOICE)], use_tqdm=False)
    ids = list(free.outputs[0].token_ids)
    cut = ids.index(end) + 1 if end in ids else len(ids)
    assert list(held.outputs[0].token_ids[:cut]) == ids[:cut]
    assert start != end and llm.engine.compilations_after_warmup == 0
    assert not llm.engine.registry.requests


def test_engine_qwen3_constrains_from_the_start_unless_thinking(think_model, xla_cache_dir):
    llm = LLM(think_model, reasoning_parser="qwen3", compilation_cache_dir=xla_cache_dir, **LIMITS)
    start, end = llm.engine.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    prompt = {"prompt_token_ids": [5, 17, 42]}
    answer, thinking = llm.generate([prompt] * 2, [
        # `</think>` cannot start the output (neither the grammar nor the start marker): the answer does.
        SamplingParams(temperature=0.0, max_tokens=12, logit_bias={end: 100.0}, structured_outputs=CHOICE),
        # `<think>` opens the thinking, which is then unmasked: the pushed token repeats (the grammar would refuse it).
        SamplingParams(temperature=0.0, max_tokens=6, logit_bias={start: 100.0}, structured_outputs=CHOICE),
    ], use_tqdm=False)
    assert answer.outputs[0].text in ("hello", "world") and answer.outputs[0].finish_reason == "stop"
    assert list(thinking.outputs[0].token_ids) == [start] * 6 and thinking.outputs[0].finish_reason == "length"
    assert llm.engine.compilations_after_warmup == 0
