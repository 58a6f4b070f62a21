"""``ferrum bench``: one workload on Ferrum and on its peer, in the same process, on the same weights."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ferrum.bench.figures import Figures, median_figures, ratio_summary, ratios
from ferrum.bench.memory import bandwidth_figures, in_host_memory, measure_read_bandwidth
from ferrum.bench.presets import preset_checkpoint
from ferrum.bench.profile import Profile, profile_decode
from ferrum.bench.speculative import format_speculative, speculative_bench
from ferrum.bench.runners import FerrumRunner, Runner, make_peer, peer_for
from ferrum.bench.workloads import Workload, get_workload, make_prompts
from ferrum.backends import default_backend_name
from ferrum.config import ModelConfig
from ferrum.errors import InvalidRequestError
from ferrum.model import DEFAULT_BLOCK_SIZE, weight_shapes
from ferrum.quant import awq_gptq, quantize_checkpoint
from ferrum.sources import cache_lock, cache_root, gguf_checkpoint, resolve_model

ProgressFn = Callable[[int, int, str], None]
#: ``--peer`` values.
PEERS = ("auto", "llama.cpp", "mlx-lm", "transformers", "none")
#: Decode steps ``--profile`` times.
PROFILE_STEPS = 16
#: Makes a progress callback for a labelled phase ("preparing checkpoint", "loading weights").
ProgressFactory = Callable[[str], ProgressFn]


@dataclass
class BenchOptions:
    workload: str = "decode-1"
    backend: str | None = None
    model: str | None = None  # a checkpoint folder; else ``preset``
    preset: str = "qwen2-0.5b"
    dtype: str | None = None
    peer: str = "auto"  # one of PEERS
    repeat: int = 3
    prompt_len: int | None = None
    gen_len: int | None = None
    concurrency: int | None = None
    profile: bool = False
    quantize: int | None = None  # bits: bench a quantized copy of the model (mlx-community layout)
    group_size: int = 64
    speculative: str | None = None  # lookup | draft: decode with and without it (see ferrum.bench.speculative)
    draft_model: str | None = None  # with speculative="draft"; default: a truncated copy of the model

    def __post_init__(self) -> None:
        for name in ("repeat", "prompt_len", "gen_len", "concurrency"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"bench {name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.peer not in PEERS:  # checked before the model loads
            raise InvalidRequestError(f"bench peer {self.peer!r} is not one of {', '.join(PEERS)}")
        if self.draft_model is not None and self.speculative != "draft":
            raise InvalidRequestError("a draft model is used with speculative 'draft' only (--speculative draft)")


def _versions() -> dict[str, str]:
    """Versions of Ferrum and of the frameworks and peers that may have run."""
    found = {}
    for package in ("ferrum", "mlx", "mlx-lm", "torch", "transformers", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _measure(runners: list[Runner], prompts: list[list[int]], workload: Workload, repeat: int) -> list[list[Figures]]:
    """Each runner's figures over ``repeat`` rounds, the runners alternating inside every round.

    Each runs the whole workload once first (warm-up at full size: kernels, allocations,
    caches). The order flips each round, so a burst of load on a shared machine hits
    both sides of a pair alike instead of all of one side's runs.
    """
    first_alone = workload.shared_prefix_len > 0
    for runner in runners:
        runner.run(prompts, workload.gen_len, first_alone)
    runs: list[list[Figures]] = [[] for _ in runners]
    for round_ in range(repeat):
        order = range(len(runners)) if round_ % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            runs[i].append(runners[i].run(prompts, workload.gen_len, first_alone))
    return runs


def run_bench(
    options: BenchOptions, progress: ProgressFactory | None = None, log: Callable[[str], None] = print
) -> dict:
    """Run the workload; returns the report (also what ``--json`` writes)."""
    workload: Workload = get_workload(options.workload).with_overrides(
        options.prompt_len, options.gen_len, options.concurrency
    )
    def phase(label: str) -> ProgressFn | None:
        return progress(label) if progress is not None else None

    gguf_path, path = _checkpoint(options, phase)
    if options.speculative:
        return speculative_bench(options, workload, path, phase("loading weights"), log)
    config = ModelConfig.from_file(path)
    prompts = make_prompts(workload, config.vocab_size)
    longest_prompt = max(len(p) for p in prompts)
    if longest_prompt + workload.gen_len > config.max_seq_len:
        raise InvalidRequestError(
            f"a {longest_prompt}-token prompt and {workload.gen_len} tokens out pass this model's "
            f"context of {config.max_seq_len} tokens, where each side would stop early; shorten --prompt-len or "
            "--gen-len")
    # Room for every request at its full length (and the profile's steps): the benchmark measures
    # batching, not preemption.
    longest = max(workload.gen_len, PROFILE_STEPS + 2 if options.profile else 0)
    num_kv_blocks = sum(-(-(len(p) + longest) // DEFAULT_BLOCK_SIZE) for p in prompts)
    ferrum = FerrumRunner(path, options.backend, options.dtype, num_kv_blocks, workload.concurrency,
                          phase("loading weights"))
    backend = ferrum.backend
    shared = f", the first {workload.shared_prefix_len} shared" if workload.shared_prefix_len else ""
    log(f"workload {workload.name}: {workload.description} "
        f"(here: {workload.concurrency} x prompt<={workload.prompt_len}{shared}, {workload.gen_len} out)")
    log(f"model {path} on {backend.name} ({backend.info.device}), {ferrum.dtype}")
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "versions": _versions(),
        "workload": {**workload.__dict__},
        "model": str(path),
        "backend": backend.name,
        "device": backend.info.device,
        "dtype": ferrum.dtype,
    }
    packed = config.quantization is not None and not config.quantization.runs_as_float  # FP8 is read by transformers
    peer_name = peer_for(backend.name, options.peer, gguf=gguf_path is not None, quantized=packed)
    runners: list[Runner] = [ferrum]
    if peer_name:
        runners.append(make_peer(peer_name, path, ferrum.dtype, backend.info.device, gguf_path,
                                 context=longest_prompt + workload.gen_len + 8,
                                 prefill_tokens=ferrum.llm.engine.config.max_num_batched_tokens,
                                 mlx_packed=packed and config.quantization.mode not in awq_gptq.METHODS))
    runs = _measure(runners, prompts, workload, options.repeat)
    short = [r.name for r, side in zip(runners, runs)
             if any(f.generated_tokens != len(prompts) * workload.gen_len for f in side)]
    if short:
        log(f"warning: {' and '.join(short)} did not generate {workload.gen_len} tokens for every request; the "
            "ratios compare different work")
    first_alone = workload.shared_prefix_len > 0
    report["ferrum"] = median_figures(runs[0]).as_dict()
    report["preemptions"] = ferrum.preemptions
    report["features"] = {r.name: r.features(prompts, first_alone) for r in runners}
    if workload.shared_prefix_len:
        report["prefix_cache_hit_rate"] = ferrum.cached_tokens / sum(len(p) for p in prompts)
    model, moe = ferrum.llm.model, config.arch.moe
    weights = model.weight_bytes
    report["memory"] = bandwidth_figures(weights, report["ferrum"]["decode_tok_s"], workload.concurrency,
                                         measure_read_bandwidth() if in_host_memory(backend.info.device) else None,
                                         model.expert_weight_bytes, moe.top_k / moe.num_experts if moe else 1.0,
                                         model.lookup_weight_bytes)
    report["memory"]["params"] = sum(math.prod(s) for s in weight_shapes(config).values())
    report["memory"]["bits_per_param"] = 8 * weights / report["memory"]["params"]
    if peer_name:
        report["peer"] = {"name": peer_name, **median_figures(runs[1]).as_dict()}
        pairs = [ratios(f, p) for f, p in zip(*runs)]
        report["ratios"], report["ratio_ranges"] = ratio_summary(pairs)
        report["pairs"] = [{"ferrum": f.as_dict(), "peer": p.as_dict(), "ratios": r}
                           for f, p, r in zip(*runs, pairs)]
    if options.profile:
        profile: Profile = profile_decode(ferrum.llm, prompts, PROFILE_STEPS)
        report["profile"] = {"sequences": profile.sequences, "step_ms": profile.step_ms, "parts_ms": profile.parts_ms,
                             "ops": [{"op": n, "calls": c, "ms": ms} for n, c, ms in profile.ops]}
        report["profile_table"] = profile.table()
    return report


def _checkpoint(options: BenchOptions, phase: Callable[[str], ProgressFn | None]) -> tuple[Path | None, Path]:
    """The GGUF file (if the model is one) and the checkpoint folder Ferrum loads.

    A GGUF file is imported once into Ferrum's cache (kept packed); ``--quantize``
    benches a quantized copy of the folder, also cached.
    """
    if options.model and Path(options.model).suffix == ".gguf":
        if options.quantize:
            raise InvalidRequestError("--quantize applies to float checkpoints; a GGUF file is already quantized")
        return Path(options.model), gguf_checkpoint(options.model, phase("importing GGUF"))
    if options.model:
        path = resolve_model(options.model, phase("importing"))  # a folder, or a Hugging Face repo id
    else:
        peer = peer_for(options.backend or default_backend_name(), options.peer, quantized=bool(options.quantize))
        path = preset_checkpoint(options.preset, phase("preparing checkpoint"),
                                 expert_layout="transformers" if peer == "transformers" else "mlx-lm")
    if options.quantize:
        target = cache_root() / "bench" / f"{path.name}-{_stamp(path)}-q{options.quantize}g{options.group_size}"
        with cache_lock(target):
            if not (target / "config.json").exists():
                quantize_checkpoint(path, target, options.quantize, options.group_size, phase("quantizing"))
        path = target
    return None, path


def _stamp(folder: Path) -> str:
    """Which checkpoint ``folder`` is: its place and its files' sizes and times (two ``checkpoint-100`` folders of
    two runs, or one retrained, got one quantized copy)."""
    digest = hashlib.sha1(str(folder.resolve()).encode())
    for path in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:10]


def format_report(report: dict) -> str:
    if "speculative" in report:
        return format_speculative(report["speculative"])
    rows = [("", "ferrum") + ((report["peer"]["name"], "ratio") if "peer" in report else ())]
    labels = [("prefill_tok_s", "prefill tok/s", "prefill_tok_s"), ("decode_tok_s", "decode tok/s", "decode_tok_s"),
              ("throughput_tok_s", "throughput tok/s", "throughput_tok_s"), ("ttft_s", "TTFT ms", "ttft_speedup")]
    for key, label, ratio_key in labels:
        scale = 1e3 if key == "ttft_s" else 1.0
        row = (label, f"{report['ferrum'][key] * scale:.1f}")
        if "peer" in report:
            ratio, spread = report["ratios"][ratio_key], report["ratio_ranges"][ratio_key]
            row += (f"{report['peer'][key] * scale:.1f}",
                    "-" if ratio is None else f"{ratio:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if "peer" in report:
        lines.append(f"ratio: median of {len(report['pairs'])} alternating (ferrum, peer) pairs, range in "
                     "brackets; ferrum/peer for speeds, peer/ferrum for TTFT; above 1 means ferrum is faster")
        lines.append("figures: the run with the median throughput on each side; TTFT from each request's submission")
    for side, used in report.get("features", {}).items():
        lines.append(f"{side} used: {'; '.join(used) if used else '-'}")
    if report.get("preemptions"):
        lines.append(f"warning: ferrum preempted {report['preemptions']} request(s) for lack of KV blocks")
    if "prefix_cache_hit_rate" in report:
        lines.append(f"prefix cache hit rate: {report['prefix_cache_hit_rate']:.1%}")
    if "memory" in report:
        m = report["memory"]
        limit = ("(the device's own memory bandwidth is not measured)" if m["read_bandwidth_gb_s"] is None else
                 f"= {m['decode_bandwidth_fraction']:.0%} of the {m['read_bandwidth_gb_s']:.1f} GB/s measured "
                 "read bandwidth")
        lines.append(f"weights: {m['weight_bytes'] / 1e6:.1f} MB ({m['bits_per_param']:.2f} bits/param); decode "
                     f"streams {m['decode_weight_gb_s']:.2f} GB/s of weights {limit}")
    if "profile_table" in report:
        lines.append(report["profile_table"])
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    data = {k: v for k, v in report.items() if k != "profile_table"}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
