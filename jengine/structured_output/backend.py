"""The grammar backend: llguidance, bridged to the engine's Hugging Face fast tokenizer.

    GrammarCompiler(tokenizer, vocab_size, eos_token_ids).compile(params) -> llguidance.LLMatcher

llguidance (not xgrammar) because it declares no install requirements and computes masks into numpy
buffers, where xgrammar requires torch and triton; a JAX engine must not need either (see
docs/architecture.md). Compiling is per constraint: the first request with a given constraint builds a
matcher (and validates it; errors raise ValueError naming the field), later ones deep-copy a cached
template (an LRU keyed by `StructuredOutputsParams.cache_key`). Work is bounded by explicit parser
limits: a pathological regex or schema errors out instead of running long.
"""
from __future__ import annotations

import collections
import json
import threading
from typing import Any, Optional, Sequence

from jengine.structured_output.params import StructuredOutputsParams


DEFAULT_CACHE_SIZE = 128
# JSON: fixed separators and no free whitespace, so a model cannot spend its tokens on whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
# llguidance's documented defaults, pinned here so a library upgrade cannot loosen the bounds.
PARSER_LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                     step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=500_000,
                     verbose_errors=False)  # errors go back to clients: the reason, not a parser state dump


def _llg() -> Any:
    import llguidance

    return llguidance


def build_ll_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """An `llguidance.LLTokenizer` from a HF fast tokenizer: the Rust tokenizer's JSON goes to
    llguidance directly (what `llguidance.hf` does, without its transformers class check). `vocab_size`
    is the model's; ids past the tokenizer's vocabulary are never allowed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("structured outputs need a fast (Rust `tokenizers`) tokenizer")
    n_tok = backend.get_vocab_size(with_added_tokens=True)
    eos = [int(t) for t in eos_token_ids] or None
    return _llg().LLTokenizer(backend.to_str(), n_vocab=max(int(vocab_size), n_tok), eos_token=eos)


def grammar_text(params: StructuredOutputsParams) -> tuple[str, str]:
    """(field name, llguidance grammar) for the constraint; raises ValueError naming the field."""
    llg = _llg()
    kind = params.kind
    try:
        if kind == "json":
            schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
            return kind, llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if kind == "json_object":
            return kind, llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=JSON_OPTIONS)
        if kind == "regex":
            # \d means an ASCII digit (as in xgrammar and JSON Schema), not any Unicode digit.
            return kind, llg.LLMatcher.grammar_from_lark("start: /" + llg.regex_to_lark(params.regex, "d") + "/")
        if kind == "choice":
            assert params.choice is not None  # `kind` names the field that is set
            lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return kind, llg.LLMatcher.grammar_from_lark(lark)
        from llguidance.gbnf_to_lark import any_to_lark

        assert params.grammar is not None  # the one kind left
        return kind, llg.LLMatcher.grammar_from_lark(any_to_lark(params.grammar))
    except ValueError as e:
        raise ValueError(f"StructuredOutputsParams.{kind} is invalid: {e}") from None
    except Exception as e:  # the GBNF converter raises its own error types
        raise ValueError(f"StructuredOutputsParams.{kind} is invalid: {e}") from None


class GrammarCompiler:
    """Compiles constraints into fresh matchers; thread-safe (frontends validate off the engine thread).

    The llguidance tokenizer (about 0.7 s for a 49k vocabulary) is built on first use, so engines that
    never see a constrained request do not pay for it.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = DEFAULT_CACHE_SIZE, limits: Optional[dict[str, Any]] = None) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._ll_tokenizer: Any = None
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cache_size = cache_size
        self._limits: dict[str, Any] = {**PARSER_LIMITS, **(limits or {})}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = build_ll_tokenizer(self._tokenizer, self.vocab_size, self.eos_token_ids)
            return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> Any:
        """A fresh `LLMatcher` in its start state; ValueError (naming the field) when invalid."""
        key = params.cache_key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return template.deep_copy()
        tok = self.ll_tokenizer
        field, grammar = grammar_text(params)
        llg = _llg()
        matcher = llg.LLMatcher(tok, grammar, log_level=0, limits=llg.LLParserLimits(**self._limits))
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first mask builds the lexer: its limits fail here, not mid-request
        if matcher.is_error():
            raise ValueError(f"StructuredOutputsParams.{field} is invalid: {matcher.get_error()}")
        with self._lock:
            self.misses += 1
            self._cache[key] = matcher
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher.deep_copy()
