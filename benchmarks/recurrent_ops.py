"""Decode ms/step and prefill ms of a small random Qwen3.5 (Gated DeltaNet on 3 of every 4 layers) or RWKV-7 (its
``wkv7`` in every time mix) with each backend's own recurrent ops against the core's host fallback
(``ferrum.reference_ops``), alternating the two in one process so that load on a shared machine hits both; the ratio
is the median of the pairs' (fallback / own).

    python benchmarks/recurrent_ops.py [--model qwen3_5|rwkv7] [--backends mlx,cuda] [--batch 1 8] [--context 512]

Times are the process's CPU time (every thread, so MLX's evaluation thread counts; other work on the machine counts
less than in wall time).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ferrum.model import DecoderOnlyLLM
from ferrum.random_checkpoint import write_random_checkpoint

#: hidden 256, 4 layers (3 Gated DeltaNet, 1 gated attention); the rope as mlx-lm reads it too.
QWEN3_5 = dict(architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", hidden_size=256,
              intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              vocab_size=4096, max_position_embeddings=4096, linear_conv_kernel_dim=4, linear_key_head_dim=64,
              linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=4,
              tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1e7,
                                                              partial_rotary_factor=0.25, mrope_section=[3, 3, 2]))
#: hidden 256, 4 layers (each a time mix of 4 heads of 64 and a channel mix), a release's low ranks.
RWKV7 = dict(architectures=["RWKV7ForCausalLM"], model_type="rwkv7", hidden_size=256, intermediate_size=1024,
             num_hidden_layers=4, head_dim=64, decay_low_rank_dim=64, a_low_rank_dim=64, v_low_rank_dim=32,
             gate_low_rank_dim=128, vocab_size=4096, max_position_embeddings=4096, norm_eps=1e-5, norm_bias=True,
             norm_first=True, hidden_act="sqrelu", attn=None, tie_word_embeddings=False)
#: Each model's config and the recurrent ops it calls.
MODELS = {"qwen3_5": (QWEN3_5, ("causal_conv1d", "gated_delta_rule", "sigmoid_mul")), "rwkv7": (RWKV7, ("wkv7",))}


def use(model: DecoderOnlyLLM, own: bool, natives: dict) -> None:
    """The model's ops table with the backend's own recurrent ops, or the core's fallback in their place."""
    for name in natives:
        setattr(model.ops, name, natives[name] if own else model.ops.fallback[name])


def timed_round(model: DecoderOnlyLLM, batch: int, context: int, steps: int, tag: int) -> tuple[float, float]:
    """(prefill ms per sequence, decode ms per step) of ``batch`` sequences."""
    rng = np.random.default_rng(tag)
    ids = [(tag, i) for i in range(batch)]
    start = time.process_time()
    for seq in ids:
        model.prefill(seq, rng.integers(2, 4096, size=context).tolist())
    prefill = (time.process_time() - start) / batch * 1e3
    token = [3] * batch
    model.decode_batch([(seq, t, context) for seq, t in zip(ids, token)])  # warm
    start = time.process_time()
    for step in range(1, steps + 1):
        model.decode_batch([(seq, t, context + step) for seq, t in zip(ids, token)])
    decode = (time.process_time() - start) / steps * 1e3
    for seq in ids:
        model.release(seq)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=MODELS, default="qwen3_5")
    parser.add_argument("--backends", default="mlx,cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config, ops = MODELS[args.model]
        folder = write_random_checkpoint(Path(tmp) / args.model, config, dtype="float32", std=0.05)
        for backend in args.backends.split(","):
            model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", block_size=16,
                                                   num_kv_blocks=max(args.batch) * (args.context + args.steps + 32)
                                                   // 16 + 16)
            natives = {name: getattr(model.ops, name) for name in ops}
            assert set(ops) <= model.ops.native, f"{backend} runs the recurrent ops through the fallback"
            for batch in args.batch:
                runs: dict[bool, list] = {True: [], False: []}
                for pair in range(args.pairs + 1):  # the first pair warms both up
                    for own in (True, False) if pair % 2 else (False, True):
                        use(model, own, natives)
                        figures = timed_round(model, batch, args.context, args.steps, pair)
                        if pair:
                            runs[own].append(figures)
                use(model, True, natives)
                for what, i in (("prefill ms/seq", 0), ("decode ms/step", 1)):
                    own = statistics.median(r[i] for r in runs[True])
                    host = statistics.median(r[i] for r in runs[False])
                    ratios = sorted(h[i] / o[i] for h, o in zip(runs[False], runs[True]))
                    print(f"{backend} batch {batch} {what}: own {own:.2f}, fallback {host:.2f}, "
                          f"own {statistics.median(ratios):.2f}x faster ({ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
