"""Multi-LoRA throughput: N concurrent requests spread over K adapters vs the same requests with none.

Random-weight checkpoint of a preset's shape (``ferrum.bench.presets``) and
random PEFT-format adapters (every q/k/v/o/gate/up/down projection of every
layer), written once under a temporary folder. Both runs go through one
:class:`ferrum.engine.Engine` (continuous batching, greedy, end of sequence
ignored): a warm-up, then ``--repeat`` runs of each, alternated; the medians are reported. The
issue's target is a ratio of at least 0.8.

    python benchmarks/lora_bench.py --backend cuda --preset smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ferrum.bench.presets import preset_checkpoint
from ferrum.engine import Engine, EngineConfig
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from ferrum.sampling import SamplingParams

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(folder: Path, model: DecoderOnlyLLM, rank: int, seed: int) -> Path:
    """A random PEFT LoRA adapter of every projection of every layer."""
    from ferrum.adapters.files import projection_shape

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(model.config.num_layers):
        for proj, part in MODULES.items():
            n_in, n_out = projection_shape(model.config, layer, proj)
            key = f"base_model.model.model.layers.{layer}.{part}.{proj}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) * 0.02).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, rank)) * 0.02).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}))
    return folder


def run_once(engine: Engine, prompts: list[list[int]], loras: list[str | None], gen_len: int) -> float:
    """Generated tokens per second for all requests submitted at once."""
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    start = time.perf_counter()
    for prompt, lora in zip(prompts, loras):
        engine.add_request(prompt, params, lora=lora)
    generated = sum(len(o.token_ids) for o in engine.run_until_done() if o.finished)
    return generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    model = DecoderOnlyLLM.from_pretrained(preset_checkpoint(args.preset), backend=args.backend, dtype=args.dtype,
                                           num_kv_blocks=args.requests * -(-(args.prompt_len + args.gen_len) // 16) + 8)
    # Prefix caching off: every run recomputes its prompts, so the repeats measure the same work.
    engine = Engine(LlmExecutor(model), None, EngineConfig(enable_prefix_caching=False))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.adapters):
            model.adapters.load(f"lora{i}", write_adapter(Path(tmp) / f"lora{i}", model, args.rank, i))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, model.config.vocab_size, args.prompt_len).tolist() for _ in range(args.requests)]
    cases = {"base": [None] * args.requests,
             "lora": [f"lora{i % args.adapters}" for i in range(args.requests)]}
    for loras in cases.values():
        run_once(engine, prompts, loras, args.gen_len)  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):  # alternated, so a busy machine slows both alike
        for name, loras in cases.items():
            runs[name].append(run_once(engine, prompts, loras, args.gen_len))
    figures = {name: statistics.median(values) for name, values in runs.items()}
    ratio = figures["lora"] / figures["base"]
    caps = LlmExecutor(model).capabilities()
    print(f"backend {model.backend.name} ({model.backend.info.device}, {model.dtype}), preset {args.preset}, "
          f"native lora_apply: {caps.native_lora}")
    print(f"{args.requests} requests x {args.prompt_len}+{args.gen_len} tokens, {args.adapters} adapters of rank "
          f"{args.rank} on every projection")
    print(f"no adapter: {figures['base']:.1f} tok/s   with adapters: {figures['lora']:.1f} tok/s   "
          f"ratio {ratio:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
