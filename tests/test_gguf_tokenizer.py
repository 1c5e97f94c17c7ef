"""SentencePiece-style GGUF vocabularies (Llama 2, Mistral, Gemma) through jengine's metadata builder.

A tiny SentencePiece BPE model is trained here, written into a vocabulary-only GGUF the way llama.cpp's
converter writes one (pieces, scores, token types, no merges), and the tokenizer jengine builds from
that metadata is checked against sentencepiece itself and against transformers' GGUF tokenizer.
"""
from __future__ import annotations

import io
import os

import pytest
import transformers

from jengine.gguf_tokenizer import backend_from_metadata
from jengine.tokenizer import load_tokenizer

spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "A paged cache keeps the keys and values of every request.",
    "Continuous batching schedules new requests while others decode.", "Hello, world! How are you today?",
    "Numbers like 12, 345 and 6789 appear in text.", "Spaces  and   runs of spaces matter to some tokenizers.",
    "Tabs\tand newlines\nare bytes too.", "Émilie a mangé des crêpes à Paris.", "東京は日本の首都です。",
] * 20
TEXTS = ["The quick brown fox", "Hello, world!", " leading space", "double  space", "crêpes à Paris", "東京 and 大阪",
         "unseen symbols: ∑ ∫ 🤖", "tabs\tand\nnewlines", "12 345 6789"]


def train_spm(tmp_path) -> "spm.SentencePieceProcessor":
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=600, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, character_coverage=1.0, user_defined_symbols=["<tool>"], minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def write_vocab_gguf(path: str, sp, arch: str = "llama") -> str:
    """A vocabulary-only GGUF with llama.cpp's tokenizer keys for a SentencePiece model."""
    import gguf

    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) == "<tool>" else 1

    n = sp.get_piece_size()
    w = gguf.GGUFWriter(path, arch)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def gguf_path(sp, tmp_path_factory) -> str:
    return write_vocab_gguf(str(tmp_path_factory.mktemp("vocab") / "spm-vocab.gguf"), sp)


def test_sentencepiece_gguf_matches_sentencepiece(sp, gguf_path):
    """Same ids as sentencepiece on text with spaces, bytes it never saw (byte fallback) and a user symbol."""
    ours = load_tokenizer(gguf_path)
    # Not text that starts with a space: there transformers' Metaspace (which jengine follows) adds no second "▁".
    for text in [t for t in TEXTS if not t.startswith(" ")] + ["call <tool> now"]:
        assert ours(text).input_ids == [sp.bos_id(), *sp.encode(text)], text  # BOS added, as the file says
        assert ours.decode(ours(text).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert sp.piece_to_id("<tool>") in ours("call <tool> now").input_ids  # a user-defined symbol stays whole


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_gguf_matches_transformers(sp, tmp_path, arch):
    """Llama-style and Gemma-style (no prefix space, merges in file order) against transformers' GGUF tokenizer."""
    gguf_path = write_vocab_gguf(str(tmp_path / f"{arch}-vocab.gguf"), sp, arch)
    ours = load_tokenizer(gguf_path)
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    for text in TEXTS:
        assert ours(text).input_ids == reference(text).input_ids, text
        ids = reference(text).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (reference.bos_token, reference.eos_token, reference.unk_token)


def test_unsupported_tokenizer_is_named(gguf_path):
    from jengine.loader.gguf_format import read_gguf

    meta, _ = read_gguf(gguf_path)
    with pytest.raises(ValueError, match="'rwkv' is not supported"):
        backend_from_metadata({**meta, "tokenizer.ggml.model": "rwkv"})
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery' is not supported"):
        backend_from_metadata({**meta, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.merges": []})
