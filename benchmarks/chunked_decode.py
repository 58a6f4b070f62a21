"""Decode ms/step (the process's CPU time, so that other work on the machine counts less; run it with one thread:
OMP_NUM_THREADS=1) of a small random Llama 4 with chunked local attention on, and with its chunks past the context
(every layer attending the whole context), on each backend named: what the KV mirrors save on chunked layers.

    python benchmarks/chunked_decode.py [--backends cpu,mlx,cuda] [--context 1000] [--steps 32] [--batch 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ferrum.model import DecoderOnlyLLM
from ferrum.random_checkpoint import write_random_checkpoint


def config(chunk: int, layers: int) -> dict:
    return dict(model_type="llama4_text", architectures=["Llama4ForCausalLM"], vocab_size=512, hidden_size=256,
                intermediate_size=384, intermediate_size_mlp=512, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=2, head_dim=32, num_local_experts=4, interleave_moe_layer_step=2,
                attention_chunk_size=chunk, floor_scale=8192, attn_scale=0.1, max_position_embeddings=16384,
                rope_theta=500000.0, rms_norm_eps=1e-5, use_qk_norm=True)


def ms_per_step(folder: Path, backend: str, context: int, steps: int, batch: int, repeats: int) -> float:
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", block_size=16,
                                           num_kv_blocks=batch * (context + steps + 32) // 16 + 16)
    rng = np.random.default_rng(0)
    best = float("inf")
    for r in range(repeats):
        ids = [(r, i) for i in range(batch)]
        for seq in ids:
            model.prefill(seq, rng.integers(2, 512, size=context).tolist())
        token = [3] * batch
        model.decode_batch([(seq, t, context) for seq, t in zip(ids, token)])  # warm
        start = time.process_time()
        for step in range(1, steps + 1):
            model.decode_batch([(seq, t, context + step) for seq, t in zip(ids, token)])
        best = min(best, (time.process_time() - start) / steps * 1e3)
        for seq in ids:
            model.release(seq)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="cpu,mlx,cuda")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: write_random_checkpoint(Path(tmp) / name, config(chunk, args.layers), dtype="float32",
                                                 expert_layout="transformers")
                   for name, chunk in (("chunked", args.chunk), ("unchunked", 1 << 14))}
        for backend in args.backends.split(","):
            figures = {name: ms_per_step(folder, backend, args.context, args.steps, args.batch, args.repeats)
                       for name, folder in folders.items()}
            print(f"{backend:5s} context {args.context} batch {args.batch}: "
                  + ", ".join(f"{name} {ms:.1f} ms/step" for name, ms in figures.items()), flush=True)


if __name__ == "__main__":
    main()
