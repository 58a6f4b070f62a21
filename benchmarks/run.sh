#!/usr/bin/env bash
# Re-run the published benchmark set; JSON lands in benchmarks/results/<date>-<machine>/.
# Lengths are cut to fit a 2-core CPU box (MLX on the CPU is slow); on a Mac or a
# GPU drop the --prompt-len/--gen-len overrides to run the workloads at full size.
set -euo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results/$(date +%F)-$(uname -s | tr A-Z a-z)-$(uname -m)-$(nproc)core"
mkdir -p "$out"
bench() { name=$1; shift; echo "== $name: ferrum bench $*"; .venv/bin/ferrum bench "$@" --json "$out/$name.json"; }
bench mlx-decode-1 --preset smollm2-135m --backend mlx --workload decode-1 --prompt-len 128 --gen-len 32 --profile
bench mlx-concurrent-8 --preset smollm2-135m --backend mlx --workload concurrent-8 --prompt-len 32 --gen-len 16 --repeat 1 --profile
bench mlx-concurrent-32 --preset smollm2-135m --backend mlx --workload concurrent-32 --prompt-len 16 --gen-len 8 --repeat 1 --profile
bench mlx-shared-prefix --preset smollm2-135m --backend mlx --workload shared-prefix --prompt-len 64 --gen-len 8 --repeat 1
bench torch-decode-1 --preset qwen2-0.5b --backend cuda --workload decode-1 --profile
bench torch-concurrent-8 --preset qwen2-0.5b --backend cuda --workload concurrent-8 --prompt-len 128 --gen-len 32 --repeat 1 --profile
bench torch-concurrent-32 --preset qwen2-0.5b --backend cuda --workload concurrent-32 --prompt-len 64 --gen-len 16 --repeat 1 --profile
bench torch-shared-prefix --preset qwen2-0.5b --backend cuda --workload shared-prefix --prompt-len 256 --gen-len 8 --repeat 1
