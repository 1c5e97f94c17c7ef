"""Tokenizer loading for local checkpoints: HF tokenizer files or the vocabulary inside a GGUF.

    load_tokenizer(model_path_or_gguf, tokenizer=None, *, trust_remote_code=False) -> PreTrainedTokenizerBase
    get_chat_template(tokenizer) -> str | None

Local paths load with `local_files_only=True`, so nothing touches the network.
"""
from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer


def _load(path: str, trust_remote_code: bool) -> Any:
    path = os.path.expanduser(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        # transformers rebuilds a fast tokenizer (and chat template) from the GGUF metadata.
        return AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), local_files_only=True,
            trust_remote_code=trust_remote_code,
        )
    local = os.path.isdir(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=local, trust_remote_code=trust_remote_code)


def load_tokenizer(model_path_or_gguf: str, tokenizer: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a checkpoint directory or `.gguf` file, or of an explicit `tokenizer` path."""
    return _load(tokenizer if tokenizer is not None else model_path_or_gguf, trust_remote_code)


def get_chat_template(tokenizer: Any) -> str | None:
    """The Jinja chat template the tokenizer carries (None when it has none)."""
    return getattr(tokenizer, "chat_template", None) or None
