"""A GGUF file's tokenizer, built from its metadata with the `tokenizers` library alone.

    tokenizer_from_gguf(path) -> transformers.PreTrainedTokenizerFast
    backend_from_metadata(meta) -> tokenizers.Tokenizer

Why our own builder: transformers' GGUF tokenizer path imports torch (transformers 5's GGUF reader
does, at import), and a JAX server must not need torch to start; it also took tens of seconds on a
small CPU, while this takes well under a second, so nothing is cached on disk.

A GGUF stores llama.cpp's description of the tokenizer (`tokenizer.ggml.*` keys): the vocabulary,
per-token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), merges or scores,
and a pre-tokenizer name. Two model kinds cover the architectures jengine serves:

- `gpt2`: byte-level BPE (SmolLM2, Llama 3, Qwen 2/3). Text is split by the regex llama.cpp names in
  `tokenizer.ggml.pre`, then mapped to the byte alphabet and merged with the file's merges.
- `llama`: SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma). Spaces become "▁";
  merges are not stored, so they are derived from the vocabulary: every split of a token into two
  vocabulary pieces, ranked by the token's score (Gemma: by its position in the file, the order its
  merges were learned in, since its scores do not follow it).

Control tokens become special added tokens and user-defined ones plain added tokens, so both are
matched whole before any splitting, as llama.cpp does.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name (the splits each vocabulary was trained on).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex, digits split one by one first, ignore_merges: a whole word in the vocabulary wins)
PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    "default": (_GPT2, False, False),
    "gpt-2": (_GPT2, False, False),
    "gpt2": (_GPT2, False, False),
    "llama3": (_LLAMA3, False, True),
    "llama-v3": (_LLAMA3, False, True),
    "llama-bpe": (_LLAMA3, False, True),
    "smaug-bpe": (_LLAMA3, False, True),
    "qwen2": (_QWEN2, False, False),
    "deepseek-r1-qwen": (_QWEN2, False, False),
    "smollm": (_GPT2, True, False),
    "starcoder": (_GPT2, True, False),
    "refact": (_GPT2, True, False),
}
MODEL_KINDS = ("gpt2", "llama")
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def tokenizer_from_gguf(path: str) -> Any:
    """The transformers fast tokenizer (chat template included) that `path`'s metadata describes."""
    from transformers import PreTrainedTokenizerFast

    from jengine.loader.gguf_format import read_gguf

    meta, _ = read_gguf(path)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path} carries no tokenizer (no tokenizer.ggml.tokens); pass --tokenizer with a tokenizer folder")

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend_from_metadata(meta),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def backend_from_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """The `tokenizers.Tokenizer` for GGUF metadata (see the module docstring)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        tok = _byte_level(meta, tokens, types)
        add_bos_default = False
    elif kind == "llama":
        tok = _sentencepiece(meta, tokens, types)
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: {', '.join(MODEL_KINDS)})")

    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    # A user-defined token the model's vocabulary spells differently (Gemma's runs of spaces, respelled as
    # "▁" runs) stays a plain vocabulary token, as in transformers: added under the file's spelling it
    # would get a new id.
    known = tok.get_vocab(with_added_tokens=False)
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in known]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):  # an added token must reuse its vocabulary id
        raise ValueError("GGUF vocabulary has added tokens that are missing from its token list")
    _set_post_processor(tok, meta, tokens, add_bos_default)
    return tok


def _byte_level(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))}); "
            "pass --tokenizer with the model's tokenizer folder"
        )
    regex, split_digits, ignore_merges = PRE_TOKENIZERS[pre]
    alphabet = _byte_alphabet()
    charset = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # Files spell normal tokens in the byte alphabet already; added tokens keep their spelling (they are
        # matched whole, never merged), and anything else is respelled byte by byte.
        key = t if set(t) <= charset or ty in (CONTROL, USER_DEFINED) else "".join(alphabet[b] for b in t.encode())
        vocab.setdefault(key, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=ignore_merges))
    steps: list[pre_tokenizers.PreTokenizer] = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    gemma = meta.get("general.architecture") in GEMMA_ARCHITECTURES
    stored = tokens
    if gemma:  # Gemma files store runs of spaces as spaces; the model looks them up as "▁" runs
        tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
        rank = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        rank = dict(zip(tokens, scores))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # Tokens matched whole (added tokens) take no part in merges; a respelled one is a plain token now.
    skip = {t for t, raw, ty in zip(tokens, stored, types) if ty in (CONTROL, USER_DEFINED) and t == raw}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(
        models.BPE(vocab, _derived_merges(vocab, rank, skip), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def _derived_merges(vocab: dict[str, int], rank: Mapping[str, float], skip: set[str]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary pieces, best-ranked token first (SentencePiece BPE)."""
    found: list[tuple[float, int, int, int, str, str]] = []
    for t in vocab:
        if t in skip or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                found.append((-rank.get(t, 0.0), len(left), len(right), vocab[left], left, right))
    found.sort(key=lambda m: m[:4])
    return [(m[4], m[5]) for m in found]


def _set_post_processor(tok: Tokenizer, meta: Mapping[str, Any], tokens: list[str], add_bos_default: bool) -> None:
    """BOS/EOS around every encoded text as the file's `add_bos_token` / `add_eos_token` say."""
    ends = []
    for flag, key, default in (("add_bos_token", "bos_token_id", add_bos_default), ("add_eos_token", "eos_token_id", False)):
        i = meta.get(f"tokenizer.ggml.{key}")
        ends.append((tokens[i], i) if meta.get(f"tokenizer.ggml.{flag}", default) and i is not None else None)
    bos, eos = ends
    if bos is None and eos is None:
        return

    def part(seq: str, type_id: int) -> str:
        return " ".join([*([f"{bos[0]}:{type_id}"] if bos else []), f"${seq}:{type_id}", *([f"{eos[0]}:{type_id}"] if eos else [])])

    tok.post_processor = processors.TemplateProcessing(
        single=part("A", 0), pair=f"{part('A', 0)} {part('B', 1)}", special_tokens=list(dict.fromkeys(e for e in ends if e))
    )


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
