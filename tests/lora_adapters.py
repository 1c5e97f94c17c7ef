"""Tiny PEFT LoRA adapters for tests, made with `peft` on a tiny checkpoint (random non-zero A and B,
so each adapter changes greedy output), and the Hugging Face PEFT model that serves as the reference.

    make_adapter(base_path, out_dir, *, seed, r=4, alpha=8, targets=(...), use_rslora=False) -> str
    peft_model(base_path, adapter_path) -> torch model (base + adapter, eval mode)
"""
from __future__ import annotations

import os
from typing import Sequence

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(
    base_path: str, out_dir: str, *, seed: int, r: int = 4, alpha: float = 8, targets: Sequence[str] = ("q_proj", "v_proj", "down_proj"),
    use_rslora: bool = False, std: float = 0.3,
) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora, lora_dropout=0.0)
    peft = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    os.makedirs(out_dir, exist_ok=True)
    peft.save_pretrained(out_dir)
    return out_dir


def peft_model(base_path: str, adapter_path: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_path).eval()
