"""Multi-LoRA serving: many PEFT adapters over one base model, mixed per token in one step.

    request.py  LoRARequest (vLLM's fields)
    peft.py     reading and validating PEFT adapter folders against the model family
    weight.py   LoRAWeight: base projection + each token's slot delta (a `Weight` for `linear`)
    manager.py  LoRAManager: host LRU cache (max_cpu_loras) and device slots (max_loras x max_lora_rank)
"""
from jengine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
