#!/usr/bin/env bash
# On a CUDA machine: the torch backend's tests on the GPU, then its bench (float and 4-bit), in under
# 8 minutes. JSON lands in benchmarks/results/<date>-<machine>-cuda/. Uses the machine's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || FERRUM_SYSTEM_TORCH=1 bash scripts/setup.sh
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device for torch')"
out="benchmarks/results/$(date +%F)-$(uname -s | tr A-Z a-z)-$(uname -m)-cuda"
mkdir -p "$out"
# Tests that run on every available backend (cuda among them), plus the torch quantized ops on the GPU.
# tests/test_kv_mirror.py: decode over the per-sequence KV mirrors (ferrum/kv_mirror.py) against the oracle.
timeout 300 .venv/bin/python -m pytest -q -x tests/test_quant_torch.py tests/test_conformance.py \
  tests/test_parity.py tests/test_engine.py tests/test_quant.py tests/test_kv_mirror.py -k "cuda or torch or quant"
.venv/bin/python -m ferrum.testing cuda --dtype bfloat16
# Decode step time at 100 vs 1,000 tokens of context (target: <= 1.15x), batch 1 and 8.
timeout 90 .venv/bin/python benchmarks/context_growth.py --backend cuda --batch 1 8 --pairs 3 \
  | tee "$out/context-growth.txt"
bench() { name=$1; shift; echo "== $name: ferrum bench $*"; timeout 120 .venv/bin/ferrum bench "$@" --json "$out/$name.json"; }
bench cuda-decode-1 --preset llama-1b --backend cuda --workload decode-1 --gen-len 128 --profile
bench cuda-concurrent-32 --preset llama-1b --backend cuda --workload concurrent-32 --gen-len 64 --repeat 3
bench cuda-q4-decode-1 --preset llama-1b --quantize 4 --backend cuda --workload decode-1 --gen-len 128 --peer none
bench cuda-q4-concurrent-32 --preset llama-1b --quantize 4 --backend cuda --workload concurrent-32 --gen-len 64 \
  --repeat 1 --peer none
