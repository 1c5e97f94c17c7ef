"""Tiny random Hugging Face checkpoints of each supported architecture, built offline for tests.

    make_tiny_checkpoint(tmp_path, arch="llama", *, seed=0, sharded=False, tokenizer=True, **overrides) -> str
    make_tiny_tokenizer() -> PreTrainedTokenizerFast
    to_transformers4_config(path) -> None     # rewrites config.json in the transformers-4 spelling
    make_tiny_gguf(tmp_path, arch="llama", *, quant="F32", edit=None, **overrides) -> str   # path of a .gguf
    PagedRunner(model, page_size=4, ...).step([(seq_id, new_token_ids), ...]) -> [logits[n, V], ...]
    ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")

A checkpoint is 2 layers (Gemma 2: 3, Gemma 3: 8), hidden 64, 4 query / 2 KV heads, vocab 320, float32 safetensors, plus a
small byte-level BPE tokenizer (trained in code) with a chat template, so engine tests can use text.
Weights are drawn wider than HF's init (std 0.2, norms/biases non-trivial) so logits are not flat and
greedy tokens are decisive. `overrides` go to the transformers config class (e.g. `num_hidden_layers`,
`tie_word_embeddings`, `rope_scaling`, `sliding_window`).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
# what make_tiny_gguf writes: our arch name -> llama.cpp's `general.architecture`
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "mixtral": "llama",
              "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
VOCAB_SIZE = 320
BOS, EOS = "<|bos|>", "<|eos|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello world! This is a tiny tokenizer for jengine tests.",
    "Paged attention keeps the key value cache in fixed size pages.",
    "One two three four five six seven eight nine ten.",
] * 4


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 8, special_tokens=[BOS, EOS, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


def make_tiny_tokenizer() -> Any:
    """A byte-level BPE PreTrainedTokenizerFast (BOS id 0, EOS id 1) with a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token=BOS, eos_token=EOS, pad_token=EOS
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(arch: str, overrides: dict[str, Any]) -> Any:
    import transformers

    base = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
    )
    cls = {
        "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config, "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
    }[arch]
    if arch == "mistral":
        base["sliding_window"] = None
    if arch == "qwen3":
        base["head_dim"] = 32  # explicit head_dim != hidden / heads
    if arch.startswith("gemma"):
        # Small window, caps and scalar so that each one changes the logits within a test's few tokens;
        # Gemma 3 gets 8 layers: its 5:1 sliding/global pattern, scanned as one unit of 6 plus 2 layers.
        base.update(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, final_logit_softcapping=10.0)
        if arch == "gemma2":
            base.update(attn_logit_softcapping=5.0, num_hidden_layers=3)
        else:
            base.update(num_hidden_layers=8, rope_local_base_freq=100.0)
    if arch == "phi3":
        # Phi-4-mini's partial rotary (0.75 of head_dim 16: 12 features rotate) and a small original
        # context, so a test can run LongRoPE's short and long factors within a few tokens.
        base.update(partial_rotary_factor=0.75, original_max_position_embeddings=256)
    if arch == "mixtral":
        # 8 experts, top-2 (Mixtral's shape); 32 wide each, so 8 fake devices hold one expert each
        base.update(sliding_window=None, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
    if arch in ("qwen2_moe", "qwen3_moe"):
        base.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[], norm_topk_prob=arch == "qwen3_moe")
        if arch == "qwen2_moe":
            base.update(shared_expert_intermediate_size=48)
        else:
            base["head_dim"] = 32
    base.update(overrides)
    return cls(**base)


def make_tiny_checkpoint(
    tmp_path: Any, arch: str = "llama", *, seed: int = 0, sharded: bool = False, tokenizer: bool = True, **overrides: Any
) -> str:
    """Writes a tiny random float32 checkpoint of `arch` under tmp_path and returns its directory."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}")
    path = os.path.join(str(tmp_path), f"tiny-{arch}{'-sharded' if sharded else ''}-{seed}")
    torch.manual_seed(seed)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_config(_config(arch, overrides), **{dtype_kw: torch.float32})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "40KB"} if sharded else {}))
    if tokenizer:
        make_tiny_tokenizer().save_pretrained(path)
    return path


def to_transformers4_config(path: str) -> None:
    """Rewrites `config.json` with top-level `rope_theta`/`rope_scaling` and `torch_dtype` (transformers 4)."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope.pop("rope_theta")
    rtype = rope.get("rope_type", "default")
    cfg["rope_scaling"] = None if rtype == "default" else {**rope, "type": rtype}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def _llama_cpp_permute(w: Any, n_heads: int) -> Any:
    """llama.cpp's Q/K row order for its interleaved RoPE (what its converter writes for `llama`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_gguf(tmp_path: Any, arch: str = "llama", *, quant: str = "F32", seed: int = 0, edit: Any = None,
                   **overrides: Any) -> str:
    """A GGUF of the same tiny model `make_tiny_checkpoint` builds (its directory sits next to it).

    Written the way llama.cpp's converter does for these architectures (Q/K rows permuted for
    `llama`, byte-level BPE vocabulary, merges and chat template in the metadata), so the GGUF path can
    be checked against transformers' GGUF loader in seconds. `quant`: "F32", "F16" or "Q8_0". Mixture-of-
    experts models (`mixtral` as llama.cpp's `llama` with experts, `qwen2_moe`, `qwen3_moe`) get the expert
    keys and each layer's experts stacked in one tensor, as llama.cpp's converter writes them.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    garch = GGUF_ARCHS.get(arch)
    if garch is None:
        raise ValueError(f"make_tiny_gguf supports {', '.join(GGUF_ARCHS)}")
    src = make_tiny_checkpoint(tmp_path, arch, seed=seed, **overrides)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    weights = load_file(os.path.join(src, "model.safetensors"))
    tok = json.loads(_tokenizer_json())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<|unused{i}|>" for i in range(cfg["vocab_size"] - len(vocab))]
    specials = {a["content"] for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    path = os.path.join(str(tmp_path), f"tiny-{arch}-{quant}-{seed}.gguf")
    w = gguf.GGUFWriter(path, garch)
    L, H, heads, kv_heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or H // heads
    w.add_block_count(L)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_feed_forward_length(cfg["intermediate_size"])  # Mixtral: each expert's; Qwen MoE: the (unused) dense width
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe"):  # what llama.cpp's converter writes for them
        w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if arch != "mixtral":
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if arch == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    rope = cfg.get("rope_parameters") or cfg
    if arch == "phi3":  # llama.cpp writes the rotary part of a head, and no key length
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))))
        if rope.get("rope_type") == "longrope":
            w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]))
            for k in ("long", "short"):
                w.add_tensor(f"rope_factors_{k}.weight", np.asarray(rope[f"{k}_factor"], np.float32))
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials or t.startswith("<|unused") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    qtype = getattr(gguf.GGMLQuantizationType, quant)
    names = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
        "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",  # Phi-3's fused ones
        # mixture of experts: the router, each layer's experts stacked [E, out, in], Qwen2-MoE's shared expert
        "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
        "experts.gate": "ffn_gate_exps.weight", "experts.up": "ffn_up_exps.weight", "experts.down": "ffn_down_exps.weight",
        "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight", "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight", "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    }
    tensors = _stack_experts(weights, L, cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    out: dict[str, Any] = {}
    for name, arr in tensors.items():
        arr = arr.astype(np.float32)
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{names[rest]}"
            if garch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                arr = _llama_cpp_permute(arr, heads)
            elif garch == "llama" and rest in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
                arr = _llama_cpp_permute(arr, kv_heads)
            elif rest == "mlp.shared_expert_gate.weight":  # llama.cpp keeps it as a vector [H]
                arr = arr.reshape(-1)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        out[gname] = arr
    if edit is not None:  # tests of bad files: edit(tensors by GGUF name) changes them in place
        edit(out)
    for gname, arr in out.items():
        # rows that are not whole blocks stay F32 (llama.cpp's converter falls back to a float type too)
        if arr.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32 and arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _stack_experts(weights: dict[str, Any], num_layers: int, num_experts: int) -> dict[str, Any]:
    """HF's per-expert tensors -> one `model.layers.{i}.experts.{gate,up,down}` [E, out, in] per layer (llama.cpp's form)."""
    import numpy as np

    if not num_experts:
        return weights
    out = dict(weights)
    for i in range(num_layers):
        for kind, hf_names in (("gate", ("mlp", "gate_proj", "block_sparse_moe", "w1")), ("up", ("mlp", "up_proj", "block_sparse_moe", "w3")),
                               ("down", ("mlp", "down_proj", "block_sparse_moe", "w2"))):
            qwen, mixtral = (f"model.layers.{i}.{hf_names[0]}.experts.{{e}}.{hf_names[1]}.weight",
                             f"model.layers.{i}.{hf_names[2]}.experts.{{e}}.{hf_names[3]}.weight")
            template = qwen if qwen.format(e=0) in weights else mixtral
            out[f"model.layers.{i}.experts.{kind}"] = np.stack([out.pop(template.format(e=e)) for e in range(num_experts)])
    return out


class PagedRunner:
    """A minimal stand-in for the engine in model tests: a page allocator and one jitted padded step.

    Pages are handed out in a shuffled order (page 0 stays the null page); every call pads to
    `max_tokens` tokens and `max_seqs` rows so prefill and decode share one compiled step.
    """

    def __init__(self, model: Any, *, page_size: int = 4, pages_per_layer: int = 24, max_tokens: int = 16,
                 max_seqs: int = 2, seed: int = 0, cache_dtype: Any = None):
        import jax
        import numpy as np
        from flax import nnx

        from jengine.pallas_kernels import new_kv_cache

        cfg = model.config
        self.page_size, self.pages_per_layer, self.T, self.S = page_size, pages_per_layer, max_tokens, max_seqs
        self.P = pages_per_layer - 1
        self.cache = new_kv_cache(cfg.num_layers * pages_per_layer, page_size, cfg.num_kv_heads, cfg.head_dim,
                                  cache_dtype or model.dtype)
        self.free = [int(p) for p in np.random.default_rng(seed).permutation(np.arange(1, pages_per_layer))]
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, cache, ids, pos, md):
            m = nnx.merge(graphdef, state)
            cache, hidden = m(cache, ids, pos, md)
            return cache, m.compute_logits(hidden, md)

        self._step, self._state = step, state

    def compiled_text(self) -> str:
        """The optimized HLO of the step, as compiled for the last `step` call's inputs."""
        return self._step.lower(self._state, self.cache, *self.last_inputs).compile().as_text()

    def step(self, batch: list[tuple[int, list[int]]]) -> list[Any]:
        """Runs the new tokens of each (seq_id, tokens) in one ragged call; returns each one's logits[n, V]."""
        import jax.numpy as jnp
        import numpy as np

        from jengine.attention import AttentionMetadata

        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl, seq_lens = [0], []
        tables = np.zeros((self.S, self.P), np.int32)
        for row, (sid, toks) in enumerate(batch):
            start = self.lens.get(sid, 0)
            pages = self.pages.setdefault(sid, [])
            for p in range(start, start + len(toks)):
                if p // self.page_size >= len(pages):
                    pages.append(self.free.pop())
                slots.append(pages[p // self.page_size] * self.page_size + p % self.page_size)
                pos.append(p)
            ids += toks
            self.lens[sid] = start + len(toks)
            qsl.append(len(ids))
            seq_lens.append(self.lens[sid])
            tables[row, : len(pages)] = pages
        n = len(ids)
        assert n <= self.T and len(batch) <= self.S
        pad = self.T - n
        md = AttentionMetadata(
            slot_mapping=jnp.asarray(slots + [0] * pad, jnp.int32),
            seq_lens=jnp.asarray(seq_lens + [0] * (self.S - len(batch)), jnp.int32),
            block_tables=jnp.asarray(tables),
            query_start_loc=jnp.asarray(qsl + [n] * (self.S - len(batch)), jnp.int32),
            num_seqs=jnp.asarray([len(batch)], jnp.int32),
            pages_per_layer=self.pages_per_layer,
            page_size=self.page_size,
        )
        self.last_inputs = (jnp.asarray(ids + [0] * pad, jnp.int32), jnp.asarray(pos + [0] * pad, jnp.int32), md)
        self.cache, logits = self._step(self._state, self.cache, *self.last_inputs)
        logits = np.asarray(logits)
        return [logits[qsl[i] : qsl[i + 1]] for i in range(len(batch))]
