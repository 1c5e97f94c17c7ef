"""The engine's typed, frozen configuration tree.

`EngineArgs` is what users pass (the flat keyword arguments of `LLM(...)` and the CLI flags, named
as vLLM names them); `EngineArgs.create_engine_config()` validates them into an `EngineConfig`
whose parts flow down explicitly to the runner, the cache manager and the scheduler. Nothing reads
global switches; environment variables are left to deployment.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_POLICIES = ("fcfs", "priority")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; fp8 = fp8_e4m3 (float8 e4m3fn)
SPECULATIVE_METHODS = ("ngram", "draft_model")  # vLLM's names


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: page size and how much memory the pages may take."""

    block_size: int = 16
    kv_cache_memory_bytes: Optional[int] = None  # explicit budget; overrides gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # fraction of accelerator memory for weights + activations + cache
    num_gpu_blocks_override: Optional[int] = None  # exact page count per layer (tests, benchmarks); sliding-window layers: at most this
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"  # "auto" = the model's dtype; "fp8" / "fp8_e4m3": float8 e4m3fn (KV_CACHE_DTYPES)
    # The fp8 cache's per-tensor scales (stored value = x / scale), one for all K and one for all V.
    # 1.0, as vLLM uses when a checkpoint has none (docs/architecture.md, Quantization: KV cache).
    k_scale: float = 1.0
    v_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits of one step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    policy: str = "fcfs"
    min_token_bucket: int = 8
    min_seq_bucket: int = 8
    # vLLM's name: one page pool and block table for every layer, even sliding-window ones (no pages freed
    # behind the window); for comparisons and as a fallback.
    disable_hybrid_kv_cache_manager: bool = False
    # Dispatch step N+1 before step N's tokens reach the host (None: the engine's default, on; see
    # jengine.engine.core.resolve_async_scheduling).
    async_scheduling: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE experts split over the model axis by expert (vLLM's flag)
    distributed_coordinator: Optional[str] = None
    num_processes: int = 1
    process_id: int = 0


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config` keys): n-gram (prompt lookup) drafts, or a small
    draft model (`method="draft_model"`, `model=PATH`) that shares the target's vocabulary."""

    method: str = "ngram"  # "ngram" or "draft_model"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1  # ngram only
    prompt_lookup_max: int = 4  # ngram only
    model: Optional[str] = None  # draft_model: the draft checkpoint (directory or .gguf file)

    @classmethod
    def from_dict(cls, spec: Optional[dict]) -> Optional["SpeculativeConfig"]:
        """Validates vLLM's dict form; None stays None (no speculation).

        As in vLLM, `method` may be left out: `model` then names the draft model ("ngram" / "[ngram]"
        for the n-gram method, vLLM's older spelling); with neither, the method is n-gram."""
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(spec).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        _require(not unknown, "speculative_config", f"has unsupported keys {unknown} (supported: {sorted(known)})")
        spec = dict(spec)
        if spec.get("method") is None:
            model = spec.get("model")
            spec["method"] = "ngram" if model is None or model in ("ngram", "[ngram]") else "draft_model"
            if model in ("ngram", "[ngram]"):
                del spec["model"]
        method = spec["method"]
        _require(method in SPECULATIVE_METHODS, "speculative_config.method",
                 f"{method!r} is not supported (supported: {', '.join(map(repr, SPECULATIVE_METHODS))})")
        _require("num_speculative_tokens" in spec, "speculative_config.num_speculative_tokens", "is required")
        if method == "draft_model":
            model = spec.get("model")
            _require(isinstance(model, str) and model != "", "speculative_config.model",
                     f"must name the draft model's checkpoint (a directory or .gguf file) for method 'draft_model', got {model!r}")
            assert isinstance(model, str)
            _require(os.path.exists(os.path.expanduser(model)), "speculative_config.model",
                     f"{model!r} does not exist (jengine loads local checkpoints only)")
            extra = sorted(k for k in ("prompt_lookup_min", "prompt_lookup_max") if k in spec)
            _require(not extra, f"speculative_config.{extra[0] if extra else ''}", "applies to method 'ngram' only")
        else:
            _require(spec.get("model") is None, "speculative_config.model", "applies to method 'draft_model' only")
        out = cls(**spec)
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(out, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64,
                     f"speculative_config.{name}", f"must be an integer in [1, 64], got {value!r}")
        _require(out.prompt_lookup_min <= out.prompt_lookup_max, "speculative_config.prompt_lookup_min",
                 f"must be <= prompt_lookup_max ({out.prompt_lookup_max}), got {out.prompt_lookup_min}")
        return out


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (vLLM's flags): device slots, their padded rank, host copies kept."""

    max_loras: int = 1  # adapters one step can mix (device slots)
    max_lora_rank: int = 16  # every slot is padded to this rank
    max_cpu_loras: Optional[int] = None  # adapters kept loaded on the host (LRU); None: max_loras


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: Optional[str] = None  # checkpoint dir, .gguf file, or None for the default SmolLM2
    tokenizer: Optional[str] = None
    trust_remote_code: bool = False  # a checkpoint folder's tokenizer may run its own code (as vLLM's flag)
    dtype: str = "auto"
    seed: int = 0
    load_format: str = "auto"
    quantization: Optional[str] = None  # None: the checkpoint's quantization_config, else float weights
    attention_backend: Optional[str] = None  # None: chosen from jax.default_backend()
    max_logprobs: int = 20
    compilation_cache_dir: Optional[str] = None  # "" disables the persistent compilation cache
    compile_in_background: bool = False  # serve once the first step pieces are compiled; the rest compile meanwhile
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    speculative: Optional[SpeculativeConfig] = None  # None: no speculative decoding
    lora: Optional[LoRAConfig] = None  # None: LoRA adapters off (enable_lora=False)
    reasoning_parser: Optional[str] = None  # a constraint then covers only the answer after `</think>`


def default_compilation_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jengine", "xla")


@dataclasses.dataclass
class EngineArgs:
    """Flat, vLLM-named engine arguments; validated into an `EngineConfig`."""

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    enable_prefix_caching: bool = True
    disable_hybrid_kv_cache_manager: bool = False
    kv_cache_dtype: str = "auto"  # "fp8" / "fp8_e4m3": float8 e4m3 KV cache, half the bytes of bfloat16
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    load_format: str = "auto"
    quantization: Optional[str] = None  # "int8", "fp8", ... (jengine.quantization.QUANTIZATION_METHODS)
    attention_backend: Optional[str] = None
    scheduling_policy: str = "fcfs"
    max_logprobs: int = 20
    compilation_cache_dir: Optional[str] = None
    compile_in_background: bool = False
    distributed_coordinator: Optional[str] = None
    num_processes: int = 1
    process_id: int = 0
    speculative_config: Optional[dict] = None  # e.g. {"method": "ngram", "num_speculative_tokens": 3}, {"method": "draft_model", "model": PATH, ...}
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    reasoning_parser: Optional[str] = None  # "deepseek_r1" or "qwen3" (jengine.structured_output.reasoning)
    async_scheduling: Optional[bool] = None  # None: on (off where the engine cannot: speculative decoding, several processes)

    def _lora_config(self) -> Optional[LoRAConfig]:
        if not self.enable_lora:
            return None
        _require(isinstance(self.max_loras, int) and self.max_loras >= 1, "max_loras", f"must be an integer >= 1, got {self.max_loras!r}")
        _require(isinstance(self.max_lora_rank, int) and 1 <= self.max_lora_rank <= 512, "max_lora_rank",
                 f"must be an integer in [1, 512], got {self.max_lora_rank!r}")
        _require(self.max_cpu_loras is None or (isinstance(self.max_cpu_loras, int) and self.max_cpu_loras >= self.max_loras),
                 "max_cpu_loras", f"must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras!r}")
        _require(self.num_processes == 1, "enable_lora", "is not supported with several processes yet")
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)

    def create_engine_config(self) -> EngineConfig:
        _require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _require(self.load_format in _LOAD_FORMATS, "load_format", f"must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        _require(self.scheduling_policy in _POLICIES, "scheduling_policy", f"must be one of {_POLICIES}, got {self.scheduling_policy!r}")
        _require(self.block_size in (8, 16, 32, 64, 128), "block_size", f"must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        _require(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes", "must be positive")
        _require(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 2, "num_gpu_blocks_override", "must be >= 2")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", f"must be >= 1, got {self.max_model_len}")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", f"must be >= 1, got {self.tensor_parallel_size}")
        check_quantization(self.quantization)
        _require(self.async_scheduling in (None, True, False), "async_scheduling", f"must be a bool, got {self.async_scheduling!r}")
        _require(1 <= self.max_logprobs, "max_logprobs", f"must be >= 1, got {self.max_logprobs}")
        if self.reasoning_parser is not None:
            from jengine.structured_output.reasoning import get_reasoning_markers

            get_reasoning_markers(self.reasoning_parser)
        return EngineConfig(
            reasoning_parser=self.reasoning_parser,
            lora=self._lora_config(),
            model=self.model,
            tokenizer=self.tokenizer,
            trust_remote_code=self.trust_remote_code,
            dtype=self.dtype,
            seed=self.seed,
            load_format=self.load_format,
            quantization=self.quantization,
            attention_backend=self.attention_backend,
            max_logprobs=self.max_logprobs,
            compilation_cache_dir=self.compilation_cache_dir,
            compile_in_background=self.compile_in_background,
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                enable_prefix_caching=self.enable_prefix_caching,
                cache_dtype=self.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                policy=self.scheduling_policy,
                disable_hybrid_kv_cache_manager=bool(self.disable_hybrid_kv_cache_manager),
                async_scheduling=self.async_scheduling,
            ),
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                enable_expert_parallel=bool(self.enable_expert_parallel),
                distributed_coordinator=self.distributed_coordinator,
                num_processes=self.num_processes,
                process_id=self.process_id,
            ),
            speculative=self._speculative_config(),
        )

    def _speculative_config(self) -> Optional[SpeculativeConfig]:
        spec = SpeculativeConfig.from_dict(self.speculative_config)
        _require(spec is None or spec.method != "draft_model" or self.num_processes == 1, "speculative_config.method",
                 "'draft_model' is not supported with several processes yet")
        return spec


def check_quantization(value: Optional[str]) -> None:
    from jengine.quantization import check_method

    check_method(value)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field} {message}")
