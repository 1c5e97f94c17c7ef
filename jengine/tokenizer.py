"""Tokenizer loading for local checkpoints: HF tokenizer files or the vocabulary inside a GGUF.

    load_tokenizer(model_path_or_gguf, tokenizer=None, *, trust_remote_code=False) -> PreTrainedTokenizerBase
    check_encodable(text, field)   # ValueError naming the field for text no tokenizer can encode
    get_chat_template(tokenizer) -> str | None

Local paths load with `local_files_only=True`, so nothing touches the network. A GGUF's tokenizer (and
chat template) is built from the file's metadata by `jengine.gguf_tokenizer` with the `tokenizers`
library, not through transformers' GGUF path, which imports torch.
"""
from __future__ import annotations

import os
from typing import Any

from jengine.gguf_tokenizer import tokenizer_from_gguf


def load_tokenizer(model_path_or_gguf: str, tokenizer: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a checkpoint directory or `.gguf` file, or of an explicit `tokenizer` path."""
    path = os.path.expanduser(tokenizer if tokenizer is not None else model_path_or_gguf)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return tokenizer_from_gguf(path)
    from transformers import AutoTokenizer  # here, not at the top: it imports transformers' model configs (and torch when installed)

    return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path), trust_remote_code=trust_remote_code)


def check_encodable(text: str, field: str) -> None:
    """ValueError naming `field` when `text` cannot be encoded as UTF-8 (a lone surrogate such as
    "\\ud800"), which tokenizers would otherwise fail on with a TypeError from deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field} is not valid Unicode text: {e.reason} at character {e.start}") from None


def get_chat_template(tokenizer: Any) -> str | None:
    """The Jinja chat template the tokenizer carries (None when it has none)."""
    return getattr(tokenizer, "chat_template", None) or None
