"""Wall time of each engine step while eight prompts (the concurrent-8 workload) prefill together on the
torch backend, synchronized after every step; ``--profile`` adds torch.profiler's top ops of one more run.

    python benchmarks/prefill_steps.py [--preset smollm2-135m] [--profile]

``FERRUM_CUDA_VARLEN=0`` in the environment gives the SDPA-per-call attention for comparison.
"""

from __future__ import annotations

import argparse
import time

import torch

from ferrum.api import LLM
from ferrum.bench.presets import preset_checkpoint
from ferrum.bench.workloads import get_workload, make_prompts
from ferrum.engine import EngineConfig
from ferrum.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    llm = LLM.load(preset_checkpoint(args.preset), backend="cuda", dtype="bfloat16" if on_gpu else "float32",
                   num_kv_blocks=1024, engine_config=EngineConfig(max_num_seqs=8, max_num_batched_tokens=2048))
    prompts = make_prompts(get_workload("concurrent-8"), llm.model.config.vocab_size)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    print(f"{len(prompts)} prompts, {sum(map(len, prompts))} tokens")

    def prefill() -> list[float]:
        """Step times (seconds) to each prompt's first token and one more, from an empty prefix cache."""
        llm.model.reset()
        for prompt in prompts:
            llm.engine.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        times = []
        while llm.engine.has_unfinished():
            start = time.perf_counter()
            llm.engine.step()
            sync()
            times.append(time.perf_counter() - start)
        return times

    for _ in range(3):  # warm-up: CUDA graphs, allocator, kernels chosen
        prefill()
    for _ in range(args.runs):
        times = prefill()
        print("steps ms", [round(t * 1e3, 2) for t in times], "total ms", round(sum(times) * 1e3, 2))
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
        with torch.profiler.profile(activities=activities) as prof:
            prefill()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
