"""Write a float32 GGUF of the default model: the shipped Q4_1 file's values dequantized, with its
tokenizer and settings unchanged, so that the numpy backend and llama.cpp decode the same float32
weights from the same file (issue 12's "≥ 0.9x llama.cpp on the same float32 weights").

    .venv/bin/python benchmarks/float32_gguf.py OUT.gguf
    .venv/bin/ferrum bench --model OUT.gguf --backend cpu --workload decode-1 --prompt-len 64 --gen-len 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from ferrum.default_model import default_gguf_path


def write_float32(source: Path, target: Path) -> None:
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(target, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # written by the writer itself
            continue
        value = gguf.LlamaFileType.ALL_F32 if key == "general.file_type" else field.contents()
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, value, field.types[0], sub_type=field.types[-1] if array else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=None, help="a GGUF file (default: the embedded model's)")
    args = parser.parse_args()
    write_float32(args.source or Path(default_gguf_path()), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
