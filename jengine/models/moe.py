"""Mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE (the Llama block with a sparse MLP).

Attention is the Llama family's (`llama.py`): Mixtral like Mistral (optional sliding window),
Qwen2-MoE like Qwen2 (q/k/v biases), Qwen3-MoE like Qwen3 (per-head q/k RMSNorm). The MLP is
`layers.moe_mlp`: a softmax router, the top-k experts per token, a grouped matmul over the tokens
sorted by expert. What differs between the three:

    Mixtral     top-k weights renormalised to sum to 1
    Qwen3-MoE   renormalised when `norm_topk_prob` (true in the released models)
    Qwen2-MoE   `norm_topk_prob` false: the softmax probabilities as they are; plus a shared expert
                (a SwiGLU MLP every token runs) scaled by `sigmoid(shared_expert_gate(h))`

Qwen2-MoE and Qwen3-MoE can mix in dense layers, as HF does: layer i has a dense SwiGLU MLP of
`intermediate_size` when i is in `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0`, else the
sparse one of `moe_intermediate_size` experts (Mixtral: every layer sparse).

Parameters: the Llama family's attention and norm parameters ([L, ...], every layer), then with
Ls sparse and Ld dense layers (each stack counts only the layers that hold it, in layer order)

    layers.router            [Ls, H, E]
    layers.experts_gate      [Ls, E, H, F]   layers.experts_up [Ls, E, H, F]   layers.experts_down [Ls, E, F, H]
    layers.shared_w_gate/up  [Ls, H, Fs]     layers.shared_w_down [Ls, Fs, H]  (Qwen2-MoE shared expert)
    layers.shared_gate       [Ls, H, 1]                                        (Qwen2-MoE)
    layers.w_gate/w_up       [Ld, H, Fd]     layers.w_down [Ld, Fd, H]         (dense layers, HF `mlp.*_proj`)

The layers run as `layers.scan_layer_kinds` runs of their dense/sparse pattern: one scan when every
layer is sparse or `decoder_sparse_step` repeats (units of `step` layers), a lone dense layer unrolled
before a scan of the rest for `mlp_only_layers=[0]`. Expert weights are plain arrays (the grouped
matmul indexes them by expert); under expert parallelism (`enable_expert_parallel`) they are split
over the model axis by expert (partition kind EXPERT), else replicated.

GGUF: llama.cpp's `qwen2moe` and `qwen3moe`, and Mixtral, which llama.cpp writes as `llama` with
`llama.expert_count` > 0 (the registry sends those here). Keys `{arch}.expert_count`,
`expert_used_count`, `expert_feed_forward_length` (Mixtral: `feed_forward_length`) and Qwen2-MoE's
`expert_shared_feed_forward_length`; the top-k rule is llama.cpp's per architecture (renormalised for
Mixtral and Qwen3-MoE, not for Qwen2-MoE). Each layer's experts are one tensor `[E, out, in]`
(`ffn_{gate,up,down}_exps`), transposed per expert (an old Mixtral file's one tensor per expert,
`ffn_gate.{e}`, is stacked by the GGUF reader); Mixtral's Q/K rows are un-permuted as for `llama`.
Kept-quantized (`quantization="gguf"`) applies to the `linear` projections (attention, shared
expert); the experts and router load dequantized.

Dense layers and GGUF: llama.cpp's format has none. Its metadata has no `decoder_sparse_step` or
`mlp_only_layers`; its converter cannot write a Qwen MoE checkpoint that has dense layers (the
`qwen2moe`/`qwen3moe` tensor lists hold no `ffn_gate`/`ffn_up`/`ffn_down`, so a dense layer's
`mlp.gate_proj` fails with "Can not map tensor"), and its loader requires every layer's router and
experts. So jengine runs every layer of these files sparse, and a file whose layer holds a dense MLP
(`blk.{i}.ffn_gate.weight`, no `ffn_gate_inp`) is refused by `check_gguf_tensors`, naming the layers;
such models load from their HF checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Collection, Mapping

import jax
import numpy as np

from jengine.attention import AttentionMetadata
from jengine.models import layers as nn
from jengine.models.base import COLUMN, EXPERT, REPLICATED, ROW, GGUFNameMap, NameMap, Source
from jengine.models.config import base_fields, gguf_base_fields, parse_rope, unsupported_field
from jengine.models.llama import _PARTITION, LlamaConfig, LlamaForCausalLM, gguf_rope_scaling

ARCH_MIXTRAL = "MixtralForCausalLM"
ARCH_QWEN2_MOE = "Qwen2MoeForCausalLM"
ARCH_QWEN3_MOE = "Qwen3MoeForCausalLM"
ARCHITECTURES = (ARCH_MIXTRAL, ARCH_QWEN2_MOE, ARCH_QWEN3_MOE)
# GGUF `general.architecture` -> HF architecture (llama.cpp writes Mixtral as `llama` with experts)
GGUF_ARCHITECTURES = {"llama": ARCH_MIXTRAL, "qwen2moe": ARCH_QWEN2_MOE, "qwen3moe": ARCH_QWEN3_MOE}
GATING_SOFTMAX = 1  # llama.cpp's `expert_gating_func` value for a softmax router (gguf.ExpertGatingFuncType)


@dataclasses.dataclass(frozen=True)
class MoeConfig(LlamaConfig):
    """`intermediate_size` is each expert's FFN width; the shared expert's is `shared_expert_intermediate_size`."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP (Qwen's `mlp_only_layers`, `decoder_sparse_step`)
    dense_intermediate_size: int = 0  # their FFN width (HF `intermediate_size` of the Qwen MoE configs)

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def tp_ffn_size(self) -> int:
        """The FFN width tensor parallelism splits: it must divide the shared expert's and the dense
        layers' (experts are split by expert, if at all)."""
        return math.gcd(self.shared_expert_intermediate_size, self.dense_intermediate_size if self.dense_layers else 0)


def _dense_layers(cfg: Mapping[str, Any], arch: str, num_layers: int) -> tuple[int, ...]:
    """HF's rule: layer i is dense when in `mlp_only_layers` or when `(i + 1) % decoder_sparse_step != 0`."""
    step = cfg.get("decoder_sparse_step", 1)
    step = 1 if step is None else step
    if not isinstance(step, int) or step < 1:
        raise unsupported_field(arch, "decoder_sparse_step", step)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, (list, tuple)) or not all(isinstance(i, int) for i in only):
        raise unsupported_field(arch, "mlp_only_layers", only)
    return tuple(i for i in range(num_layers) if i in only or (i + 1) % step != 0)


class MoeForCausalLM(LlamaForCausalLM[MoeConfig]):
    """Mixtral / Qwen2-MoE / Qwen3-MoE over a paged KV cache (see the module docstring)."""

    config_class = MoeConfig
    expert_mesh: Any = None  # a Mesh whose "model" axis splits the experts (expert parallelism), or None
    grouped_matmul: str | None = None  # "ragged" / "blocked" / None: the platform's choice (see `layers.MoeSpec`)

    @classmethod
    def config_from_hf(cls, cfg: Mapping[str, Any]) -> MoeConfig:
        arch = cfg["architectures"][0]
        if arch not in ARCHITECTURES:
            raise NotImplementedError(f"architecture {arch!r} is not a mixture-of-experts family ({', '.join(ARCHITECTURES)})")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise unsupported_field(arch, "hidden_act", act)
        if arch != ARCH_MIXTRAL and cfg.get("use_sliding_window"):
            raise unsupported_field(arch, "use_sliding_window", cfg["use_sliding_window"])
        theta, scaling = parse_rope(cfg)
        base = base_fields(cfg, arch)
        if arch == ARCH_MIXTRAL:
            experts, norm, shared = int(cfg.get("num_local_experts", 8)), True, 0
            dense: tuple[int, ...] = ()
            dense_ffn = 0
            window = cfg.get("sliding_window")
            qkv_bias = o_bias = False
        else:
            dense = _dense_layers(cfg, arch, base["num_layers"])
            dense_ffn = base["intermediate_size"]
            experts = int(cfg.get("num_experts", 8))
            base["intermediate_size"] = int(cfg.get("moe_intermediate_size") or base["intermediate_size"])
            norm = bool(cfg.get("norm_topk_prob", arch == ARCH_QWEN3_MOE))
            shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == ARCH_QWEN2_MOE else 0
            window = None
            if arch == ARCH_QWEN2_MOE:
                qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
            else:
                qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        top_k = int(cfg.get("num_experts_per_tok", 2))
        if not 1 <= top_k <= experts:
            raise unsupported_field(arch, "num_experts_per_tok", top_k)
        return MoeConfig(
            **base,
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=arch == ARCH_QWEN3_MOE,
            sliding_window=int(window) if window else None,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm,
            shared_expert_intermediate_size=shared,
            dense_layers=dense,
            dense_intermediate_size=dense_ffn if dense else 0,
        )

    @classmethod
    def config_from_gguf(cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool, freq_factors: Any = None) -> MoeConfig:
        """llama.cpp's `qwen2moe`, `qwen3moe` and `llama`-with-experts (Mixtral) metadata (see the module docstring)."""
        garch = meta["general.architecture"]
        arch = GGUF_ARCHITECTURES.get(garch)
        if arch is None:
            raise NotImplementedError(f"GGUF architecture {garch!r} is not a mixture-of-experts family ({', '.join(GGUF_ARCHITECTURES)})")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{garch}.{key}", default)

        experts, top_k = int(get("expert_count") or 0), int(get("expert_used_count") or 0)
        if experts < 1:
            raise ValueError(f"GGUF {garch}: {garch}.expert_count is {get('expert_count')!r}, a mixture of experts needs >= 1")
        if not 1 <= top_k <= experts:
            raise unsupported_field(arch, f"{garch}.expert_used_count", get("expert_used_count"))
        gating = get("expert_gating_func")
        if gating not in (None, GATING_SOFTMAX):
            raise unsupported_field(arch, f"{garch}.expert_gating_func", gating)
        ffn = get("feed_forward_length")
        expert_ffn = get("expert_feed_forward_length") or ffn
        if expert_ffn is None:
            raise ValueError(f"GGUF {garch}: neither {garch}.expert_feed_forward_length nor {garch}.feed_forward_length is set")
        shared = 0
        if arch == ARCH_QWEN2_MOE:
            shared = int(get("expert_shared_feed_forward_length") or ffn or 0)
        # the experts' width is the family's `intermediate_size`; every layer is sparse (llama.cpp's rule)
        base = gguf_base_fields({**meta, f"{garch}.feed_forward_length": expert_ffn}, arch, tie_word_embeddings=tie_word_embeddings)
        return MoeConfig(
            **base,
            rope_scaling=gguf_rope_scaling(meta, freq_factors),
            attention_bias=arch == ARCH_QWEN2_MOE,
            qk_norm=arch == ARCH_QWEN3_MOE,
            sliding_window=None,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=arch != ARCH_QWEN2_MOE,
            shared_expert_intermediate_size=shared,
        )

    @classmethod
    def gguf_names(cls, cfg: MoeConfig) -> GGUFNameMap:
        """Attention and norms as the Llama family's; each layer's experts are one stacked tensor."""
        if cfg.dense_layers:
            raise NotImplementedError("GGUF names for MoE layers with dense MLPs: llama.cpp's MoE files have none")
        names = super().gguf_names(cfg)
        for k in _DENSE:
            del names[k]
        names.update({
            "layers.router": ("blk.{i}.ffn_gate_inp.weight", True),
            # [E, out, in] as stored: the loader swaps the last two axes -> [E, in, out]
            "layers.experts_gate": ("blk.{i}.ffn_gate_exps.weight", True),
            "layers.experts_up": ("blk.{i}.ffn_up_exps.weight", True),
            "layers.experts_down": ("blk.{i}.ffn_down_exps.weight", True),
            "layers.shared_w_gate": ("blk.{i}.ffn_gate_shexp.weight", True),
            "layers.shared_w_up": ("blk.{i}.ffn_up_shexp.weight", True),
            "layers.shared_w_down": ("blk.{i}.ffn_down_shexp.weight", True),
            "layers.shared_gate": ("blk.{i}.ffn_gate_inp_shexp.weight", True),
        })
        return names

    @classmethod
    def check_gguf_tensors(cls, cfg: MoeConfig, tensor_names: Collection[str]) -> None:
        """A layer with a dense MLP and no router: not llama.cpp's format (see the module docstring)."""
        names = set(tensor_names)
        dense = [i for i in range(cfg.num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in names
                 and any(f"blk.{i}.ffn_{w}.weight" in names for w in ("gate", "up", "down"))]
        if dense:
            raise NotImplementedError(
                f"GGUF {cfg.architecture} file: layer(s) {dense} hold a dense MLP (blk.{dense[0]}.ffn_gate/up/down) "
                f"and no router (ffn_gate_inp). llama.cpp's MoE format has no dense layers (its converter cannot write "
                f"them and its loader needs every layer's experts), so jengine does not read such files; load the "
                f"HF checkpoint instead (`mlp_only_layers` and `decoder_sparse_step` are supported there)")

    @classmethod
    def from_gguf_tensor(cls, name: str, w: np.ndarray, cfg: MoeConfig, meta: Mapping[str, Any]) -> np.ndarray:
        """Mixtral's Q/K rows as the Llama family's; the shared-expert gate may be stored as a vector [H]."""
        if name == "layers.shared_gate" and w.ndim == 1:
            return w.reshape(1, -1)
        return super().from_gguf_tensor(name, w, cfg, meta)

    @classmethod
    def param_shapes(cls, cfg: MoeConfig) -> dict[str, tuple[int, ...]]:
        H, E, F = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        Ls, Ld = len(cfg.sparse_layers), len(cfg.dense_layers)
        shapes = {k: v for k, v in super().param_shapes(cfg).items() if k not in _DENSE}
        shapes.update({
            "layers.router": (Ls, H, E),
            "layers.experts_gate": (Ls, E, H, F),
            "layers.experts_up": (Ls, E, H, F),
            "layers.experts_down": (Ls, E, F, H),
        })
        if Fs := cfg.shared_expert_intermediate_size:
            shapes.update({"layers.shared_w_gate": (Ls, H, Fs), "layers.shared_w_up": (Ls, H, Fs),
                           "layers.shared_w_down": (Ls, Fs, H), "layers.shared_gate": (Ls, H, 1)})
        if Ld:
            Fd = cfg.dense_intermediate_size
            shapes.update({"layers.w_gate": (Ld, H, Fd), "layers.w_up": (Ld, H, Fd), "layers.w_down": (Ld, Fd, H)})
        return shapes

    @classmethod
    def hf_names(cls, cfg: MoeConfig) -> NameMap:
        names = super().hf_names(cfg)  # attention, norms and the dense layers' `mlp.{gate,up,down}_proj`
        E = cfg.num_experts
        if cfg.architecture == ARCH_MIXTRAL:
            moe, gate, up, down = "block_sparse_moe", "w1", "w3", "w2"
        else:
            moe, gate, up, down = "mlp", "gate_proj", "up_proj", "down_proj"
        layer = f"model.layers.{{i}}.{moe}"
        # stacks that only some layers hold name the checkpoint layer of each stacked index
        sparse = cfg.sparse_layers if cfg.dense_layers else None
        if cfg.dense_layers:
            for k in _DENSE:
                names[k] = Source(names[k][0], names[k][1], layers=cfg.dense_layers)
        names.update({
            "layers.router": Source(f"{layer}.gate.weight", True, layers=sparse),
            "layers.experts_gate": Source(f"{layer}.experts.{{e}}.{gate}.weight", True, experts=E, layers=sparse),
            "layers.experts_up": Source(f"{layer}.experts.{{e}}.{up}.weight", True, experts=E, layers=sparse),
            "layers.experts_down": Source(f"{layer}.experts.{{e}}.{down}.weight", True, experts=E, layers=sparse),
            "layers.shared_w_gate": Source(f"{layer}.shared_expert.gate_proj.weight", True, layers=sparse),
            "layers.shared_w_up": Source(f"{layer}.shared_expert.up_proj.weight", True, layers=sparse),
            "layers.shared_w_down": Source(f"{layer}.shared_expert.down_proj.weight", True, layers=sparse),
            "layers.shared_gate": Source(f"{layer}.shared_expert_gate.weight", True, layers=sparse),
        })
        return names

    @classmethod
    def partition_kinds(cls, cfg: MoeConfig) -> dict[str, str]:
        return {
            **_PARTITION,  # includes the dense layers' w_gate/w_up (COLUMN) and w_down (ROW)
            "layers.router": REPLICATED, "layers.shared_gate": REPLICATED,
            "layers.experts_gate": EXPERT, "layers.experts_up": EXPERT, "layers.experts_down": EXPERT,
            "layers.shared_w_gate": COLUMN, "layers.shared_w_up": COLUMN, "layers.shared_w_down": ROW,
        }

    def sparse_mlp(self, h: jax.Array, p: nn.Params, md: AttentionMetadata) -> jax.Array:
        """The experts (and Qwen2-MoE's gated shared expert) of one sparse layer."""
        cfg = self.config
        spec = nn.MoeSpec(cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, grouped=self.grouped_matmul)
        num_tokens = md.num_tokens()[0]
        experts = {k: p[k].stack for k in _EXPERTS}  # whole [Ls, E, ...] stacks: each block reads one expert
        layer = p[_EXPERTS[0]].layer
        out = nn.moe_mlp(h, {"router": p["router"], **experts}, spec, layer=layer, num_tokens=num_tokens, mesh=self.expert_mesh,
                         in_place=nn.reads_weights_in_place(md))
        if cfg.shared_expert_intermediate_size:
            shared = {"w_gate": p["shared_w_gate"], "w_up": p["shared_w_up"], "w_down": p["shared_w_down"]}
            out = out + jax.nn.sigmoid(nn.linear(h, p["shared_gate"])) * nn.swiglu(h, shared)
        return out

    def __call__(self, kv_cache: Any, token_ids: jax.Array, positions: jax.Array, md: AttentionMetadata) -> tuple[Any, jax.Array]:
        cfg = self.config
        rope = self.rope(positions, md)
        norm = functools.partial(nn.rms_norm, eps=cfg.rms_norm_eps)
        spec = nn.AttentionSpec(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, sm_scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window,
            qk_norm=norm if cfg.qk_norm else None,
        )
        kinds = tuple(DENSE if i in cfg.dense_layers else SPARSE for i in range(cfg.num_layers))
        arrays = self.layers.arrays()
        held_by = {k.removeprefix("layers."): cfg.dense_layers for k in _DENSE}
        held_by.update({k: cfg.sparse_layers for k in _SPARSE})

        def layer(kind: str, i: Any, p: nn.Params, carry: Any) -> Any:
            x, cache = carry
            cache, o = nn.attention(spec, p, norm(x, p["attn_norm"]), cache, i, md, rope)
            x = x + o
            h = norm(x, p["mlp_norm"])
            return x + (self.sparse_mlp(h, p, md) if kind == SPARSE else nn.swiglu(h, p)), cache

        x = nn.embed(self.embed[...], token_ids)
        x, kv_cache = nn.scan_layer_kinds(layer, arrays, (x, kv_cache), kinds, held_by, whole=_EXPERTS,
                                          in_place=nn.reads_weights_in_place(md), rows=md.num_tokens())
        return kv_cache, norm(x, self.final_norm[...])


DENSE, SPARSE = "dense", "sparse"
_DENSE = ("layers.w_gate", "layers.w_up", "layers.w_down")
_EXPERTS = ("experts_gate", "experts_up", "experts_down")
_SPARSE = ("router", *_EXPERTS, "shared_w_gate", "shared_w_up", "shared_w_down", "shared_gate")  # sparse layers' stacks
