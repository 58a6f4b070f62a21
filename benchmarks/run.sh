#!/usr/bin/env bash
# Re-run the published benchmark set; JSON lands in benchmarks/results/<date>-<machine>/.
# Every row alternates Ferrum and its peer for --repeat rounds (median ratio of the pairs, with range).
# Lengths are cut to fit a 2-core CPU box; on a Mac or a GPU drop the --prompt-len/--gen-len overrides
# to run the workloads at full size.
set -euo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results/$(date +%F)-$(uname -s | tr A-Z a-z)-$(uname -m)-$(nproc)core"
mkdir -p "$out"
bench() { name=$1; shift; echo "== $name: ferrum bench $*"; .venv/bin/ferrum bench "$@" --json "$out/$name.json"; }
# The issue's step-rate targets: MLX on the tiny preset, one and eight requests, vs mlx-lm.
bench mlx-tiny-decode-1 --preset tiny --backend mlx --workload decode-1 --gen-len 128 --repeat 3 --profile
bench mlx-tiny-concurrent-8 --preset tiny --backend mlx --workload concurrent-8 --gen-len 64 --repeat 3 --profile
# A real model's shape on MLX vs mlx-lm.
bench mlx-decode-1 --preset smollm2-135m --backend mlx --workload decode-1 --prompt-len 128 --gen-len 32 --repeat 3 --profile
bench mlx-concurrent-8 --preset smollm2-135m --backend mlx --workload concurrent-8 --prompt-len 32 --gen-len 16 --repeat 3
bench mlx-concurrent-32 --preset smollm2-135m --backend mlx --workload concurrent-32 --prompt-len 16 --gen-len 8 --repeat 3
bench mlx-shared-prefix --preset smollm2-135m --backend mlx --workload shared-prefix --prompt-len 64 --gen-len 8 --repeat 3
# torch (the cuda plugin; on a CPU box it runs on the CPU) vs transformers.
bench torch-decode-1 --preset qwen2-0.5b --backend cuda --workload decode-1 --prompt-len 256 --gen-len 64 --repeat 3 --profile
bench torch-concurrent-8 --preset qwen2-0.5b --backend cuda --workload concurrent-8 --prompt-len 128 --gen-len 32 --repeat 3 --profile
bench torch-concurrent-32 --preset qwen2-0.5b --backend cuda --workload concurrent-32 --prompt-len 64 --gen-len 16 --repeat 3 --profile
bench torch-shared-prefix --preset qwen2-0.5b --backend cuda --workload shared-prefix --prompt-len 256 --gen-len 8 --repeat 3
# numpy, float32, vs transformers (bandwidth share printed with the figures).
bench numpy-decode-1 --preset smollm2-135m --backend cpu --dtype float32 --workload decode-1 --prompt-len 64 --gen-len 32 --repeat 3 --profile
# numpy vs llama.cpp on the same float32 weights: the default model dequantized into a float32 GGUF
# (benchmarks/float32_gguf.py), where llama-cpp-python is installed.
if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  f32="$(.venv/bin/python -c 'from ferrum.sources import cache_root; print(cache_root())')/bench/default-model-float32.gguf"
  [ -f "$f32" ] || .venv/bin/python benchmarks/float32_gguf.py "$f32"
  bench numpy-float32-gguf-vs-llamacpp --model "$f32" --backend cpu --workload decode-1 --prompt-len 64 --gen-len 32 --repeat 5
fi
