"""Decode step time at 100 vs 1,000 tokens of context on the ``tiny`` preset (issue 12's target:
at most 1.15x), measured as interleaved pairs so load on a shared machine hits both sides.

    .venv/bin/python benchmarks/context_growth.py --backend mlx --batch 1 8 --pairs 7

Each measurement prefills ``batch`` random prompts of the given length, runs 3 steps to warm
up, then times 16 decode steps one by one and keeps their median (the preset's 1,024
positions leave room for no more). ``--peer`` measures the same on the peer's own decode loop
(mlx-lm's model and KV cache for mlx, transformers' for the torch backend), in the same pairs:
what attention over a contiguous cache costs on this device, which Ferrum's growth is to be
read against. On a CPU with other work running, set ``OMP_NUM_THREADS=1``: a tiny model's ops
are too small for threads, and a contended thread pool adds tens of milliseconds to a step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ferrum.api import LLM
from ferrum.bench.presets import preset_checkpoint
from ferrum.engine import EngineConfig
from ferrum.sampling import SamplingParams

STEPS, WARM = 16, 3
StepTimer = Callable[[int, np.random.Generator], float]  # (context, rng) -> median step ms


def _median_ms(step: Callable[[], None]) -> float:
    for _ in range(WARM):
        step()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ferrum_timer(path: Path, backend: str, batch: int) -> StepTimer:
    llm = LLM.load(path, backend=backend, num_kv_blocks=66 * batch + 8, engine_config=EngineConfig(max_num_seqs=batch))

    def step_ms(context: int, rng: np.random.Generator) -> float:
        engine = llm.engine
        started: set[str] = set()
        params = SamplingParams(max_tokens=STEPS + WARM + 2, ignore_eos=True)
        ids = [engine.add_request(rng.integers(10, 500, size=context).tolist(), params,
                                  on_output=lambda out: started.add(out.request_id)) for _ in range(batch)]
        while len(started) < len(ids):
            engine.step()
        ms = _median_ms(engine.step)
        for request_id in ids:
            engine.abort(request_id)
        return ms

    return step_ms


def mlx_lm_timer(path: Path, batch: int) -> StepTimer:
    """mlx-lm's model called with its own KV cache, greedy, one token per sequence per step."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(path)

    def step_ms(context: int, rng: np.random.Generator) -> float:
        cache = make_prompt_cache(model)
        state = {"y": model(mx.array(rng.integers(10, 500, size=(batch, context))), cache=cache)[:, -1].argmax(-1)}

        def step() -> None:
            state["y"] = model(state["y"][:, None], cache=cache)[:, -1].argmax(-1)
            mx.eval(state["y"])

        return _median_ms(step)

    return step_ms


def transformers_timer(path: Path, batch: int) -> StepTimer:
    """transformers' model called with its own ``DynamicCache``, greedy, one token per sequence per step."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where Ferrum's torch backend runs
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()

    @torch.inference_mode()
    def step_ms(context: int, rng: np.random.Generator) -> float:
        prompt = torch.from_numpy(rng.integers(10, 500, size=(batch, context))).to(device)
        out = model(prompt, use_cache=True)
        state = {"y": out.logits[:, -1].argmax(-1), "past": out.past_key_values}

        def step() -> None:
            out = model(state["y"][:, None], past_key_values=state["past"], use_cache=True)
            state["y"], state["past"] = out.logits[:, -1].argmax(-1), out.past_key_values
            state["y"].tolist()  # waits for the device, as Ferrum's step does for its sampled ids

        return _median_ms(step)

    return step_ms


def report(name: str, pairs: list[tuple[float, float]]) -> str:
    ratios = sorted(long / short for short, long in pairs)
    return (f"{name}: step {statistics.median(p[0] for p in pairs):.2f} ms at 100 tokens, "
            f"{statistics.median(p[1] for p in pairs):.2f} ms at 1000; growth {statistics.median(ratios):.2f}x "
            f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}, {len(ratios)} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--peer", action="store_true", help="also time the peer's decode loop (mlx-lm or transformers)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    path = preset_checkpoint("tiny")
    for batch in args.batch:
        sides = {f"{args.backend} batch {batch}": ferrum_timer(path, args.backend, batch)}
        if args.peer:
            peer = ("mlx-lm", mlx_lm_timer) if args.backend == "mlx" else ("transformers", transformers_timer)
            sides[f"{peer[0]} batch {batch}"] = peer[1](path, batch)
        for timer in sides.values():  # warm-up
            timer(100, rng), timer(1000, rng)
        pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for i in range(args.pairs):
            for name, timer in sides.items():
                order = (100, 1000) if i % 2 == 0 else (1000, 100)
                got = {context: timer(context, rng) for context in order}
                pairs[name].append((got[100], got[1000]))
        for name, measured in pairs.items():
            print(report(name, measured), flush=True)


if __name__ == "__main__":
    main()
