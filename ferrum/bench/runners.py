"""Who runs a workload: Ferrum's engine, or a peer (mlx-lm, transformers) on the same weights.

Every runner generates exactly ``gen_len`` greedy tokens per prompt (end of
sequence ignored) and reports :class:`~ferrum.bench.figures.Figures` from its
own timestamps, taken the same way on both sides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ferrum.bench.figures import Figures, stamp_tokens
from ferrum.engine import EngineConfig, RequestOutput
from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.sampling import SamplingParams


@dataclass(frozen=True)
class Timestamps:
    """One group's times (``time.perf_counter`` seconds), one entry per prompt: when it was handed over, when
    the side began to work on it (later, where it runs prompts one after another), and when each token came out."""

    submitted: list[float]
    began: list[float]
    tokens: list[list[float]]

    @classmethod
    def together(cls, sent: float, tokens: list[list[float]]) -> "Timestamps":
        """Prompts handed over and begun together at ``sent``."""
        return cls([sent] * len(tokens), [sent] * len(tokens), tokens)


class Runner:
    """Runs prompts to ``gen_len`` tokens each; subclasses say how, and which features they used."""

    name: str

    def features(self, prompts: Sequence[Sequence[int]], first_alone: bool) -> list[str]:
        """What this side used for these prompts (prefix reuse, batching), for the report."""
        return []

    def generate(self, prompts: Sequence[Sequence[int]], gen_len: int) -> Timestamps:
        raise NotImplementedError

    def run(self, prompts: Sequence[Sequence[int]], gen_len: int, first_alone: bool = False) -> Figures:
        """Time one run. ``first_alone`` runs the first prompt before the others (a prompt
        prefix they share is then computed once, as when requests arrive over time)."""
        start = time.perf_counter()
        groups = [prompts[:1], prompts[1:]] if first_alone and len(prompts) > 1 else [prompts]
        submitted: list[float] = []
        began: list[float] = []
        tokens: list[list[float]] = []
        for group in groups:
            times = self.generate(group, gen_len)
            submitted += times.submitted
            began += times.began
            tokens += times.tokens
        end = time.perf_counter()
        return Figures.from_timestamps(start, end, [len(p) for p in prompts], tokens, submitted, began)


class FerrumRunner(Runner):
    """Ferrum's engine: prompts submitted at once, stepped until every one is done."""

    name = "ferrum"

    def __init__(self, path: Path, backend: str | None, dtype: str | None, num_kv_blocks: int, concurrency: int,
                 progress=None):
        from ferrum.api import LLM

        config = EngineConfig(max_num_seqs=max(concurrency, 1), max_num_batched_tokens=max(2048, concurrency))
        self.llm = LLM.load(path, backend=backend, dtype=dtype, num_kv_blocks=num_kv_blocks, progress=progress,
                            engine_config=config)
        self.backend = self.llm.model.backend
        self.dtype = self.llm.model.dtype
        self.cached_tokens = 0  # prompt tokens served from the prefix cache in the last run
        self.preemptions = 0  # in the last run; nonzero means the KV pool was too small for the workload

    def run(self, prompts: Sequence[Sequence[int]], gen_len: int, first_alone: bool = False) -> Figures:
        self.llm.model.reset()  # no prefix-cache hits carried over from an earlier run
        self.cached_tokens = 0
        before = self.llm.engine.metrics().preemptions
        figures = super().run(prompts, gen_len, first_alone)
        self.preemptions = self.llm.engine.metrics().preemptions - before
        return figures

    def generate(self, prompts: Sequence[Sequence[int]], gen_len: int) -> Timestamps:
        engine = self.llm.engine
        params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
        finals: dict[str, RequestOutput] = {}
        token_times: dict[str, list[float]] = {}

        def keep(out: RequestOutput) -> None:
            stamp_tokens(token_times, out)
            if out.finished:
                finals[out.request_id] = out

        ids = [engine.add_request(prompt, params, on_output=keep) for prompt in prompts]
        while len(finals) < len(ids):
            engine.step()
        outs = [finals[i] for i in ids]
        self.cached_tokens += sum(o.metrics.num_cached_tokens for o in outs)
        arrivals = [o.metrics.arrival_time for o in outs]
        return Timestamps(arrivals, arrivals, [token_times[i] for i in ids])

    def features(self, prompts: Sequence[Sequence[int]], first_alone: bool) -> list[str]:
        engine = self.llm.engine
        used = ["continuous batching", f"chunked prefill, {engine.config.max_num_batched_tokens}-token budget per step",
                "prefix cache (whole blocks)"]
        return used + ["asynchronous stepping"] if engine.overlaps_steps else used


class MlxLmRunner(Runner):
    """mlx-lm: ``generate_step`` for one request, its ``BatchGenerator`` for many.

    Given the same chances as Ferrum: the batch prefills every prompt together with
    Ferrum's token budget, and prompts that share a prefix with the request run
    before them start from a copy of that request's prompt cache (mlx-lm's own
    prefix reuse), as Ferrum's prefix cache does.
    """

    name = "mlx-lm"

    def __init__(self, path: Path, dtype: str, prefill_tokens: int = 2048):
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self.mx = mx
        self.model, _ = load_model(Path(path))
        self.model.set_dtype(getattr(mx, dtype))
        self.prefill_tokens = prefill_tokens
        self._earlier: tuple[list[int], list[Any]] | None = None  # the last single request's prompt and cache

    def _greedy(self, logprobs):
        return self.mx.argmax(logprobs, axis=-1)

    def features(self, prompts: Sequence[Sequence[int]], first_alone: bool) -> list[str]:
        used = ["generate_step" if len(prompts) == 1 else
                f"BatchGenerator, prefill batch {len(prompts)}, {self.prefill_tokens}-token prefill steps"]
        return used + (["prompt-cache copy of the first request's shared prefix"] if first_alone else [])

    def run(self, prompts: Sequence[Sequence[int]], gen_len: int, first_alone: bool = False) -> Figures:
        self._earlier = None
        return super().run(prompts, gen_len, first_alone)

    def _reused(self, prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[Any]] | None]:
        """Each prompt's tokens after the prefix it shares with the earlier request, and its cache."""
        import copy

        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        if self._earlier is None:
            return [list(p) for p in prompts], None
        earlier, cache = self._earlier
        rests, caches = [], []
        for prompt in prompts:
            shared = 0
            while shared < min(len(prompt) - 1, len(earlier)) and prompt[shared] == earlier[shared]:
                shared += 1
            own = make_prompt_cache(self.model)
            if shared:
                own = copy.deepcopy(cache)
                trim_prompt_cache(own, own[0].offset - shared)
            rests.append(list(prompt[shared:]))
            caches.append(own)
        return rests, caches

    def generate(self, prompts: Sequence[Sequence[int]], gen_len: int) -> Timestamps:
        from mlx_lm.generate import BatchGenerator, generate_step
        from mlx_lm.models.cache import make_prompt_cache

        if len(prompts) == 1:
            times: list[float] = []
            cache = make_prompt_cache(self.model)
            sent = time.perf_counter()
            for _ in generate_step(self.mx.array(prompts[0]), self.model, max_tokens=gen_len, sampler=self._greedy,
                                   prompt_cache=cache, prefill_step_size=self.prefill_tokens):
                times.append(time.perf_counter())
            self._earlier = (list(prompts[0]), cache)
            return Timestamps.together(sent, [times])
        generator = BatchGenerator(self.model, max_tokens=gen_len, sampler=self._greedy,
                                   completion_batch_size=max(32, len(prompts)), prefill_batch_size=len(prompts),
                                   prefill_step_size=self.prefill_tokens)
        rests, caches = self._reused(prompts)
        sent = time.perf_counter()
        uids = generator.insert(rests, [gen_len] * len(prompts), caches=caches)
        token_times: dict[int, list[float]] = {uid: [] for uid in uids}
        done = 0
        while done < len(uids):
            responses = generator.next_generated()
            now = time.perf_counter()
            for r in responses:
                token_times[r.uid].append(now)
                done += r.finish_reason is not None
        generator.close()
        return Timestamps.together(sent, [token_times[u] for u in uids])


class TransformersRunner(Runner):
    """Hugging Face transformers ``generate`` (greedy, left-padded batch) on the given torch device."""

    name = "transformers"

    def __init__(self, path: Path, dtype: str, device: str):
        import torch
        import transformers

        self.torch = torch
        self.device = device
        self.model, loading = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True,  # never unpickle a .bin from a model folder
            output_loading_info=True,
        )
        if loading["missing_keys"]:  # transformers would run them as freshly initialized weights
            missing = sorted(loading["missing_keys"])
            raise CheckpointError(f"transformers cannot read {len(missing)} weight(s) of {path} (e.g. {missing[0]}): "
                                  "it does not read this checkpoint's layout; bench with --peer none or another peer")
        self.model.to(device).eval()

    def generate(self, prompts: Sequence[Sequence[int]], gen_len: int) -> Timestamps:
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        steps: list[float] = []

        class StepClock(BaseStreamer):
            """Timestamps each generated step (the first ``put`` is the prompt)."""

            def __init__(self) -> None:
                self.calls = 0

            def put(self, value) -> None:
                self.calls += 1
                if self.calls > 1:
                    steps.append(time.perf_counter())

            def end(self) -> None:
                pass

        sent = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=gen_len,
                min_new_tokens=gen_len, do_sample=False, pad_token_id=0, streamer=StepClock(),
            )
        return Timestamps.together(sent, [steps[: out.shape[1] - width] for _ in prompts])

    def features(self, prompts: Sequence[Sequence[int]], first_alone: bool) -> list[str]:
        return ["generate, one left-padded batch", "no prefix reuse (generate has none across calls)"]


def open_llama_cpp(gguf_path: Path, context: int, threads: int, logits_all: bool = False) -> Any:
    """A ``llama_cpp.Llama`` on llama.cpp's plain CPU kernels.

    Its AMX weight repacking (an "extra buffer type") dies with SIGILL where the
    CPU advertises AMX but the sandbox does not grant it, and the Python API has
    no switch for it, so the default model parameters are patched while loading.
    """
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffer_types
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=context, n_batch=512, n_threads=threads,
                               logits_all=logits_all, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


class LlamaCppRunner(Runner):
    """llama.cpp through ``llama-cpp-python`` on the original GGUF file, one request at a time
    (its high-level API decodes a single sequence), greedy, every core."""

    name = "llama.cpp"

    def __init__(self, gguf_path: Path, context: int):
        import os

        try:
            self.llm = open_llama_cpp(gguf_path, context, os.cpu_count() or 1)
        except ImportError as exc:
            raise UnsupportedFeatureError(
                "the llama.cpp peer needs llama-cpp-python (pip install llama-cpp-python; it builds from "
                "source in about 10 minutes), or pass --peer none"
            ) from exc

    def features(self, prompts: Sequence[Sequence[int]], first_alone: bool) -> list[str]:
        return ["one request at a time", "prefix reuse: the previous prompt's matching KV"]

    def run(self, prompts: Sequence[Sequence[int]], gen_len: int, first_alone: bool = False) -> Figures:
        self.llm.reset()  # no prefix carried over from an earlier run, as for Ferrum
        return super().run(prompts, gen_len, first_alone)

    def generate(self, prompts: Sequence[Sequence[int]], gen_len: int) -> Timestamps:
        """The prompts are handed over together, as to Ferrum, and run one after another."""
        sent, began, tokens = time.perf_counter(), [], []
        for prompt in prompts:
            began.append(time.perf_counter())
            times: list[float] = []
            for _ in self.llm.generate(list(prompt), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                       repeat_penalty=1.0, reset=True):
                times.append(time.perf_counter())
                if len(times) == gen_len:
                    break
            tokens.append(times)
        return Timestamps([sent] * len(prompts), began, tokens)


def peer_for(backend_name: str, requested: str, gguf: bool = False, quantized: bool = False) -> str | None:
    """The peer a backend is compared with: llama.cpp on a GGUF file, mlx-lm for MLX and for
    mlx-community quantized checkpoints (transformers cannot load them), transformers otherwise."""
    if requested == "none":
        return None
    if requested != "auto":
        return requested
    if gguf:
        return "llama.cpp"
    return "mlx-lm" if backend_name == "mlx" or quantized else "transformers"


def make_peer(name: str, path: Path, dtype: str, device: str, gguf_path: Path | None = None,
              context: int = 4096, prefill_tokens: int = 2048, mlx_packed: bool = False) -> Runner:
    """The peer runner ``name``; ``mlx_packed``: the checkpoint's weights are in MLX's packing."""
    if name == "transformers" and mlx_packed:
        raise UnsupportedFeatureError(
            "the transformers peer cannot read this checkpoint's quantized weights (MLX's packing, or a GGUF file's "
            "kept packed); bench against mlx-lm (--peer mlx-lm), llama.cpp on a GGUF file, or --peer none")
    if name == "llama.cpp":
        if gguf_path is None:
            raise UnsupportedFeatureError("the llama.cpp peer runs GGUF files: pass --model FILE.gguf")
        return LlamaCppRunner(gguf_path, context)
    if name == "mlx-lm":
        return MlxLmRunner(path, dtype, prefill_tokens)
    if name == "transformers":
        return TransformersRunner(path, dtype, "cpu" if device in ("cpu", "metal") else device)
    raise UnsupportedFeatureError(f"unknown peer {name!r}; use llama.cpp, mlx-lm, transformers or none")
