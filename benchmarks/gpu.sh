#!/usr/bin/env bash
# On a CUDA machine: the torch backend's tests on the GPU, then its benches, in under 8 minutes (each step is
# capped at what is left of them, so a slow step costs the ones after it, not the deadline). JSON and text land
# in benchmarks/results/<date>-<machine>-cuda/. Uses the machine's CUDA torch: through .venv (made by
# `FERRUM_SYSTEM_TORCH=1 scripts/setup.sh` when absent), or through the machine's python3 where Ferrum is already
# installed into it (an offline GPU box: `pip install --no-deps` of a Ferrum wheel). A failing step is reported and
# the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then py=.venv/bin/python
elif python3 -c "import ferrum_cuda, torch" 2>/dev/null; then py=python3
else FERRUM_SYSTEM_TORCH=1 bash scripts/setup.sh || exit; py=.venv/bin/python
fi
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device for torch')" || exit
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
out="benchmarks/results/$(date +%F)-$(uname -s | tr A-Z a-z)-$(uname -m)-cuda"
mkdir -p "$out"
deadline=$((SECONDS + 470))
cap() { local left=$((deadline - SECONDS)); echo $((left < $1 ? (left > 1 ? left : 1) : $1)); }
# Tests that run on every available backend (cuda among them), plus the torch quantized ops on the GPU.
# tests/test_kv_mirror.py: decode over the per-sequence KV mirrors (ferrum/kv_mirror.py) against a reference;
# tests/test_cuda_varlen.py: prefill items attended by FlashAttention 2's variable-length kernel;
# tests/test_structured*.py: a grammar's -inf entries scattered by CUDA's index_put_ (needs llguidance installed),
# also after a reasoning model's free thinking; tests/test_families.py has Ministral 3's query scaling on cuda;
# tests/test_gpt_oss.py, tests/test_sinks_ops.py: attention sinks and the biased, clamped experts of gpt-oss.
timeout "$(cap 180)" "$py" -m pytest -q tests/test_quant_torch.py tests/test_conformance.py tests/test_parity.py \
  tests/test_engine.py tests/test_quant.py tests/test_kv_mirror.py tests/test_async_stepping.py \
  tests/test_fusion.py tests/test_moe.py tests/test_cuda_varlen.py tests/test_families.py tests/test_structured.py \
  tests/test_structured_thinking.py tests/test_gpt_oss.py tests/test_sinks_ops.py \
  -k "cuda or torch or quant or book" || echo "tests: exit $?"
# A block whose CUDA graph capture fails runs eagerly (correct, slower) with a warning: counted, 0 expected.
timeout "$(cap 60)" "$py" -m ferrum.testing cuda --dtype bfloat16 2>&1 | tee "$out/conformance.txt" \
  || echo "conformance: exit $?"
echo "conformance: $(grep -c 'without CUDA graphs' "$out/conformance.txt") block(s) fell back to eager (0 expected)"
# Decode step time at 100 vs 1,000 tokens of context (target: <= 1.15x), batch 1 and 8, beside transformers' own.
timeout "$(cap 60)" "$py" benchmarks/context_growth.py --backend cuda --batch 1 8 --pairs 3 --peer \
  | tee "$out/context-growth.txt" || echo "context growth: exit $?"
bench() {
  local name=$1 limit=$2; shift 2; echo "== $name: ferrum bench $*"
  timeout "$(cap "$limit")" "$py" -m ferrum.cli bench "$@" --json "$out/$name.json" || echo "$name: exit $?"
}
bench cuda-smollm2-concurrent-8 60 --preset smollm2-135m --backend cuda --workload concurrent-8 --gen-len 64 --repeat 3
bench cuda-decode-1 90 --preset llama-1b --backend cuda --workload decode-1 --gen-len 128 --profile
# The same without CUDA graphs (ferrum_cuda/graphs.py): every op launched from Python.
FERRUM_CUDA_GRAPHS=0 bench cuda-eager-decode-1 60 --preset llama-1b --backend cuda --workload decode-1 \
  --gen-len 128 --profile
bench cuda-concurrent-32 75 --preset llama-1b --backend cuda --workload concurrent-32 --gen-len 64 --repeat 3
bench cuda-q4-decode-1 45 --preset llama-1b --quantize 4 --backend cuda --workload decode-1 --gen-len 128 --peer none
bench cuda-q4-concurrent-32 45 --preset llama-1b --quantize 4 --backend cuda --workload concurrent-32 --gen-len 64 \
  --repeat 1 --peer none
# gpt-oss-20b's design, smaller: sinks (written-out attention on torch) and 32 biased experts, 4 active.
bench cuda-gpt-oss-small-concurrent-8 60 --preset gpt-oss-small --backend cuda --workload concurrent-8 --gen-len 64 \
  --repeat 3
# A prompt longer than the 2048-token step budget prefills in chunks; the later chunk attends through the flash
# kernel (ferrum_cuda.ops: a lone item after cached keys), or with FERRUM_CUDA_VARLEN=0 through SDPA with a mask.
bench cuda-long-prompt 45 --preset llama-1b --backend cuda --workload decode-1 --prompt-len 3500 --gen-len 16 --repeat 3
FERRUM_CUDA_VARLEN=0 bench cuda-long-prompt-sdpa 45 --preset llama-1b --backend cuda --workload decode-1 \
  --prompt-len 3500 --gen-len 16 --repeat 3
