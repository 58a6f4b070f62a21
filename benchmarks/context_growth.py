"""Decode step time at 100 vs 1,000 tokens of context on the ``tiny`` preset (issue 12's target:
at most 1.15x), measured as interleaved pairs so load on a shared machine hits both sides.

    .venv/bin/python benchmarks/context_growth.py --backend mlx --batch 1 8 --pairs 7

Each measurement prefills ``batch`` random prompts of the given length, runs 3 steps to warm
up, then times 16 decode steps one by one and keeps their median (the preset's 1,024
positions leave room for no more). On a CPU with other work running, set
``OMP_NUM_THREADS=1``: a tiny model's ops are too small for threads, and a contended thread
pool adds tens of milliseconds to a step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ferrum.api import LLM
from ferrum.bench.presets import preset_checkpoint
from ferrum.engine import EngineConfig
from ferrum.sampling import SamplingParams

STEPS, WARM = 16, 3


def step_ms(llm: LLM, context: int, batch: int, rng: np.random.Generator) -> float:
    engine = llm.engine
    started: set[str] = set()
    params = SamplingParams(max_tokens=STEPS + WARM + 2, ignore_eos=True)
    ids = [engine.add_request(rng.integers(10, 500, size=context).tolist(), params,
                              on_output=lambda out: started.add(out.request_id)) for _ in range(batch)]
    while len(started) < len(ids):
        engine.step()
    for _ in range(WARM):
        engine.step()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in ids:
        engine.abort(request_id)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for batch in args.batch:
        llm = LLM.load(preset_checkpoint("tiny"), backend=args.backend, num_kv_blocks=66 * batch + 8,
                       engine_config=EngineConfig(max_num_seqs=batch))
        step_ms(llm, 100, batch, rng), step_ms(llm, 1000, batch, rng)  # warm-up
        pairs = []
        for i in range(args.pairs):
            order = (100, 1000) if i % 2 == 0 else (1000, 100)
            got = {context: step_ms(llm, context, batch, rng) for context in order}
            pairs.append((got[100], got[1000]))
        ratios = sorted(long / short for short, long in pairs)
        print(f"{args.backend} batch {batch}: step {statistics.median(p[0] for p in pairs):.2f} ms at 100 tokens, "
              f"{statistics.median(p[1] for p in pairs):.2f} ms at 1000; growth {statistics.median(ratios):.2f}x "
              f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}, {len(ratios)} pairs)")


if __name__ == "__main__":
    main()
