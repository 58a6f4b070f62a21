#!/usr/bin/env bash
# On a CUDA machine: the torch backend's tests on the GPU, then its benches, in under 8 minutes (each step is
# capped at what is left of them, so a slow step costs the ones after it, not the deadline). JSON and text land
# in benchmarks/results/<date>-<machine>-cuda/. Uses the machine's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || FERRUM_SYSTEM_TORCH=1 bash scripts/setup.sh
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device for torch')"
out="benchmarks/results/$(date +%F)-$(uname -s | tr A-Z a-z)-$(uname -m)-cuda"
mkdir -p "$out"
deadline=$((SECONDS + 470))
cap() { local left=$((deadline - SECONDS)); echo $((left < $1 ? (left > 1 ? left : 1) : $1)); }
# Tests that run on every available backend (cuda among them), plus the torch quantized ops on the GPU.
# tests/test_kv_mirror.py: decode over the per-sequence KV mirrors (ferrum/kv_mirror.py) against a reference.
timeout "$(cap 180)" .venv/bin/python -m pytest -q -x tests/test_quant_torch.py tests/test_conformance.py \
  tests/test_parity.py tests/test_engine.py tests/test_quant.py tests/test_kv_mirror.py -k "cuda or torch or quant or book"
timeout "$(cap 60)" .venv/bin/python -m ferrum.testing cuda --dtype bfloat16
# Decode step time at 100 vs 1,000 tokens of context (target: <= 1.15x), batch 1 and 8, beside transformers' own.
timeout "$(cap 60)" .venv/bin/python benchmarks/context_growth.py --backend cuda --batch 1 8 --pairs 3 --peer \
  | tee "$out/context-growth.txt" || echo "context growth: exit $?"
bench() {
  local name=$1 limit=$2; shift 2; echo "== $name: ferrum bench $*"
  timeout "$(cap "$limit")" .venv/bin/ferrum bench "$@" --json "$out/$name.json" || echo "$name: exit $?"
}
bench cuda-smollm2-concurrent-8 60 --preset smollm2-135m --backend cuda --workload concurrent-8 --gen-len 64 --repeat 3
bench cuda-decode-1 60 --preset llama-1b --backend cuda --workload decode-1 --gen-len 128 --profile
bench cuda-concurrent-32 75 --preset llama-1b --backend cuda --workload concurrent-32 --gen-len 64 --repeat 3
# The elementwise ops fused by torch.compile (ferrum_cuda.ops.COMPILED): the conformance kit against the oracle,
# then the same decode as above (compiling is part of its warm-up).
FERRUM_TORCH_COMPILE=1 timeout "$(cap 90)" .venv/bin/python -m ferrum.testing cuda --dtype bfloat16 \
  || echo "torch.compile'd ops, conformance: exit $?"
FERRUM_TORCH_COMPILE=1 bench cuda-compiled-decode-1 90 --preset llama-1b --backend cuda --workload decode-1 \
  --gen-len 128 --profile
bench cuda-q4-decode-1 45 --preset llama-1b --quantize 4 --backend cuda --workload decode-1 --gen-len 128 --peer none
bench cuda-q4-concurrent-32 45 --preset llama-1b --quantize 4 --backend cuda --workload concurrent-32 --gen-len 64 \
  --repeat 1 --peer none
