#!/usr/bin/env bash
# Quantized weights: the default model's GGUF against llama.cpp on the same file, then the
# smollm2-135m shape in float32 / bfloat16 / 8-bit / 4-bit on every backend that runs here
# (against mlx-lm on the same quantized copy where mlx-lm runs it).
# JSON lands in benchmarks/results/<date>-<machine>/quant-*.json. Needs llama-cpp-python for
# the llama.cpp rows (pip install llama-cpp-python; it builds from source).
set -euo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results/$(date +%F)-$(uname -s | tr A-Z a-z)-$(uname -m)-$(nproc)core"
mkdir -p "$out"
bench() { name=$1; shift; echo "== $name: ferrum bench $*"; .venv/bin/ferrum bench "$@" --json "$out/quant-$name.json"; }
short=(--workload decode-1 --prompt-len 128 --gen-len 64)

gguf=$(.venv/bin/python -c "from ferrum.default_model import default_gguf_path; print(default_gguf_path())")
float_dir="$(.venv/bin/python -c 'from ferrum.sources import cache_root; print(cache_root())')/bench/default-model-float32"
[ -f "$float_dir/config.json" ] || .venv/bin/python -c "
import sys; from ferrum.gguf_import import convert_gguf
convert_gguf(sys.argv[1], sys.argv[2], dequantize_to='float32')" "$gguf" "$float_dir"

# The file users have: Q4_1 (+ Q8_0 embedding) on each backend vs llama.cpp on the same file.
bench gguf-torch --model "$gguf" --backend cuda "${short[@]}" --profile
bench gguf-mlx --model "$gguf" --backend mlx "${short[@]}"
bench gguf-cpu --model "$gguf" --backend cpu "${short[@]}"
# Ferrum's own float32 decode of the same model (the same values, dequantized), numpy and torch.
bench float32-cpu --model "$float_dir" --backend cpu "${short[@]}" --peer none
bench float32-torch --model "$float_dir" --backend cuda "${short[@]}" --peer none --dtype float32
bench bfloat16-torch --model "$float_dir" --backend cuda "${short[@]}" --peer none --dtype bfloat16

# The same shape quantized by `ferrum quantize`: the MLX backend against mlx-lm on the same folder
# (same compute dtype on both sides), then the torch backend alone (mlx-lm's CPU kernels in
# bfloat16 are no fair peer for it; transformers cannot load the folder).
for bits in 8 4; do
  bench "q$bits-mlx" --preset smollm2-135m --quantize "$bits" --backend mlx "${short[@]}" --gen-len 32
  bench "q$bits-concurrent-8-mlx" --preset smollm2-135m --quantize "$bits" --backend mlx \
    --workload concurrent-8 --prompt-len 32 --gen-len 8 --repeat 1
  bench "q$bits-torch" --preset smollm2-135m --quantize "$bits" --backend cuda "${short[@]}" --gen-len 32 --peer none
  bench "q$bits-concurrent-8-torch" --preset smollm2-135m --quantize "$bits" --backend cuda \
    --workload concurrent-8 --prompt-len 64 --gen-len 16 --repeat 1 --peer none
done
