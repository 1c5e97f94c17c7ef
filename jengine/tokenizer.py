"""Tokenizer loading for local checkpoints: HF tokenizer files or the vocabulary inside a GGUF.

    load_tokenizer(model_path_or_gguf, tokenizer=None, *, trust_remote_code=False) -> PreTrainedTokenizerBase
    get_chat_template(tokenizer) -> str | None
    tokenizer_cache_dir() -> str     # $JENGINE_CACHE_DIR or ~/.cache/jengine

Local paths load with `local_files_only=True`, so nothing touches the network. transformers builds
a GGUF's tokenizer (and chat template) from the file's metadata, which takes tens of seconds on a
small CPU; the result is saved under the cache directory, keyed by the file's path, size and mtime
and the transformers version, so later loads take well under a second.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

import transformers
from transformers import AutoTokenizer


def tokenizer_cache_dir() -> str:
    return os.environ.get("JENGINE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jengine")


def _gguf_tokenizer(path: str, trust_remote_code: bool) -> Any:
    path = os.path.abspath(path)
    st = os.stat(path)
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()[:24]
    cached = os.path.join(tokenizer_cache_dir(), "gguf-tokenizers", key)
    if os.path.exists(os.path.join(cached, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cached, local_files_only=True, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True, trust_remote_code=trust_remote_code
    )
    try:  # write to a temporary folder, then rename: concurrent loaders never see half a cache entry
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cached))
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, cached)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # a read-only home is fine: we just convert again next time
    return tok


def load_tokenizer(model_path_or_gguf: str, tokenizer: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a checkpoint directory or `.gguf` file, or of an explicit `tokenizer` path."""
    path = os.path.expanduser(tokenizer if tokenizer is not None else model_path_or_gguf)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _gguf_tokenizer(path, trust_remote_code)
    return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path), trust_remote_code=trust_remote_code)


def get_chat_template(tokenizer: Any) -> str | None:
    """The Jinja chat template the tokenizer carries (None when it has none)."""
    return getattr(tokenizer, "chat_template", None) or None
