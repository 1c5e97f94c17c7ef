"""Tiny random Hugging Face checkpoints of each supported architecture, built offline for tests.

    make_tiny_checkpoint(tmp_path, arch="llama", *, seed=0, sharded=False, tokenizer=True, **overrides) -> str
    make_tiny_tokenizer() -> PreTrainedTokenizerFast
    to_transformers4_config(path) -> None     # rewrites config.json in the transformers-4 spelling
    ARCHS = ("llama", "mistral", "qwen2", "qwen3")

A checkpoint is 2 layers, hidden 64, 4 query / 2 KV heads, vocab 320, float32 safetensors, plus a
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

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
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
    }[arch]
    if arch == "mistral":
        base["sliding_window"] = None
    if arch == "qwen3":
        base["head_dim"] = 32  # explicit head_dim != hidden / heads
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
