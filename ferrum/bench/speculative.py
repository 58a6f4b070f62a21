"""``ferrum bench --speculative {lookup,draft}``: the same requests decoded with and without speculation.

Two prompt sets: ``repeat`` asks the model to repeat a given text (drafts
pay: the output is in the prompt), ``free`` asks for new text (drafts mostly
fail, so the adaptive off-switch must keep the cost small). Each runs at
batch 1 and at ``--concurrency`` (default 8) requests, on one loaded model:
a plain engine and a speculative one share its executor and KV pool, one
after the other. Without a tokenizer the prompts are token ids: a random
text followed by its first half (``repeat``) or random tokens (``free``).

``--speculative draft`` uses ``--draft-model PATH``, or else a truncated
copy of the model (its first quarter of layers, same weights) cached next to
the bench checkpoints. On the MLX backend, batch-1 rows of ``draft`` also run
mlx-lm's speculative generation with the same draft model and draft count
(its peer; it cannot batch), the three runs interleaved per repeat.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ferrum.bench.figures import Figures, stamp_tokens
from ferrum.engine import Engine, EngineConfig, RequestOutput
from ferrum.errors import InvalidRequestError
from ferrum.sampling import SamplingParams
from ferrum.sources import cache_root
from ferrum.spec import SpeculativeConfig

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "the members agreed to fund the children's section, to extend the opening hours on weekends, and to "
    "replace the old heating system before winter. The chair thanked the volunteers who had collected "
    "signatures, and the next meeting was set for the first Monday of March."
)
TOPICS = ("a dragon who learns to cook", "the history of the bicycle", "a city under the sea",
          "why the sky is blue", "a robot that paints", "the rules of chess", "a trip to the mountains",
          "how bread is made")


def spec_prompts(kind: str, llm, count: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of the ``repeat`` or ``free`` kind (chat prompts when there is a tokenizer)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        if llm.tokenizer is not None:
            ask = (f"Repeat the following text exactly, word for word:\n\n{TEXT}" if kind == "repeat"
                   else f"Write a short essay about {TOPICS[i % len(TOPICS)]}.")
            prompts.append(llm.encode_prompt([{"role": "user", "content": ask}]))
        else:
            text = rng.integers(10, vocab_size, size=96).tolist()
            prompts.append(text + text[:48] if kind == "repeat" else text)
    return prompts


def truncated_copy(path: Path, num_layers: int) -> Path:
    """A draft model: ``path``'s first ``num_layers`` layers and its embeddings and head, cached."""
    from safetensors.torch import load_file, save_file

    target = cache_root() / "bench" / f"{path.name}-first{num_layers}"
    if (target / "model.safetensors").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    keep: dict = {}
    for shard in sorted(path.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            parts = name.split(".layers.")
            if len(parts) == 1 or int(parts[1].split(".")[0]) < num_layers:
                keep[name] = tensor
    save_file(keep, str(target / "model.safetensors"), metadata={"format": "pt"})
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (path / extra).exists():
            shutil.copy(path / extra, target / extra)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def _timed(engine: Engine, prompts: Sequence[Sequence[int]], gen_len: int) -> Figures:
    engine.model.reset()
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    finals: dict[str, RequestOutput] = {}
    token_times: dict[str, list[float]] = {}
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while len(finals) < len(ids):
        for out in engine.step():
            stamp_tokens(token_times, out)
            if out.finished:
                finals[out.request_id] = out
    end = time.perf_counter()
    return Figures.from_timestamps(start, end, [len(p) for p in prompts], [token_times[i] for i in ids])


class MlxLmSpeculative:
    """mlx-lm's ``speculative_generate_step`` (batch 1, greedy) with the same target and draft checkpoints."""

    def __init__(self, path: Path, draft_path: Path, dtype: str, num_draft_tokens: int):
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self.mx, self.num_draft_tokens = mx, num_draft_tokens
        self.model, _ = load_model(Path(path))
        self.draft, _ = load_model(Path(draft_path))
        for model in (self.model, self.draft):
            model.set_dtype(getattr(mx, dtype))

    def decode_tok_s(self, prompt: Sequence[int], gen_len: int) -> float:
        """Decode tokens per second after the first token, as Ferrum's figures count them."""
        from mlx_lm.generate import speculative_generate_step

        steps = speculative_generate_step(self.mx.array(list(prompt)), self.model, self.draft,
                                          num_draft_tokens=self.num_draft_tokens, max_tokens=gen_len,
                                          sampler=lambda logprobs: self.mx.argmax(logprobs, axis=-1))
        first = None
        count = 0
        for token, _, _ in steps:
            self.mx.eval(token)
            count += 1
            if first is None:
                first = time.perf_counter()
        return (count - 1) / (time.perf_counter() - first) if count > 1 else 0.0


def run_speculative(llm, method: str, draft_path: Path | None, gen_len: int, concurrency: int, repeat: int,
                    log: Callable[[str], None] = print) -> dict:
    """Decode speed with and without ``method`` on both prompt sets, at batch 1 and ``concurrency``."""
    from ferrum.model import DecoderOnlyLLM

    model = llm.model
    drafter = None
    if method == "draft":
        if draft_path is None:
            draft_path = truncated_copy(llm.path, max(1, model.config.num_layers // 4))
        drafter = DecoderOnlyLLM.from_pretrained(draft_path, backend=model.backend, dtype=model.dtype,
                                                 num_kv_blocks=model.kv.num_blocks, block_size=model.kv.block_size)
        log(f"draft model {draft_path} ({drafter.config.num_layers} layers)")
    spec_config = SpeculativeConfig(method=method)
    peer = None
    if method == "draft" and model.backend.name == "mlx":
        peer = MlxLmSpeculative(llm.path, draft_path, model.dtype, spec_config.num_speculative_tokens)
    batch = EngineConfig(max_num_seqs=max(concurrency, 1), max_num_batched_tokens=max(2048, concurrency))
    plain = Engine(llm.executor, llm.tokenizer, batch)
    spec = Engine(llm.executor, llm.tokenizer,
                  EngineConfig(batch.max_num_batched_tokens, batch.max_num_seqs, batch.enable_prefix_caching,
                               speculative=spec_config),
                  draft_model=drafter)
    rows = []
    for kind in ("repeat", "free"):
        for n in sorted({1, concurrency}):
            prompts = spec_prompts(kind, llm, n, model.config.vocab_size)
            needed = max(map(len, prompts)) + gen_len
            if needed > model.config.max_seq_len:
                raise InvalidRequestError(
                    f"the speculative bench's {kind} prompts and --gen-len {gen_len} need {needed} tokens of context "
                    f"but this model's context length is {model.config.max_seq_len}; bench a model with a longer one")
            _timed(plain, [p[:8] for p in prompts[:1]], 2)  # warm-up
            before = spec.metrics()
            base, fast, peer_tok_s = [], [], []
            for _ in range(repeat):  # interleaved, so drifting clocks and heat hit every side alike
                base.append(_timed(plain, prompts, gen_len))
                fast.append(_timed(spec, prompts, gen_len))
                if peer is not None and n == 1:
                    peer_tok_s.append(peer.decode_tok_s(prompts[0], gen_len))
            after = spec.metrics()
            drafted = after.spec_drafted_tokens - before.spec_drafted_tokens
            accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
            steps = after.spec_steps - before.spec_steps
            plain_tok_s = float(np.median([f.decode_tok_s for f in base]))
            spec_tok_s = float(np.median([f.decode_tok_s for f in fast]))
            rows.append({
                "prompts": kind, "concurrency": n, "plain_decode_tok_s": plain_tok_s,
                "spec_decode_tok_s": spec_tok_s, "speedup": spec_tok_s / plain_tok_s if plain_tok_s else None,
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "tokens_per_verify_step": 1 + accepted / steps if steps else 1.0,
                "drafted_tokens": drafted,
            })
            if peer_tok_s:  # the median of the interleaved pairs' ratios
                pairs = [f.decode_tok_s / m for f, m in zip(fast, peer_tok_s) if m]
                rows[-1].update(mlx_lm_spec_decode_tok_s=float(np.median(peer_tok_s)),
                                ferrum_vs_mlx_lm=float(np.median(pairs)) if pairs else None)
            log(f"{kind} x{n}: {plain_tok_s:.1f} -> {spec_tok_s:.1f} decode tok/s"
                + (f" (mlx-lm speculative {rows[-1]['mlx_lm_spec_decode_tok_s']:.1f})" if peer_tok_s else ""))
    return {"method": method, "gen_len": gen_len, "rows": rows}


def speculative_bench(options, workload, path: Path, progress, log: Callable[[str], None]) -> dict:
    """The report of ``ferrum bench --speculative``: the workload's gen-len and concurrency (8 if it has 1)."""
    from ferrum.api import LLM
    from ferrum.model import DEFAULT_BLOCK_SIZE

    if options.prompt_len is not None:
        raise InvalidRequestError("--prompt-len does not apply to --speculative, which runs its own two prompt sets "
                                  "(repeat a text, write an essay); leave it out")
    concurrency = options.concurrency or max(workload.concurrency, 8)
    blocks = concurrency * -(-(1024 + workload.gen_len) // DEFAULT_BLOCK_SIZE)  # prompts here are < 1024 tokens
    llm = LLM.load(path, backend=options.backend, dtype=options.dtype, num_kv_blocks=blocks, progress=progress)
    log(f"model {path} on {llm.model.backend.name} ({llm.model.backend.info.device}), {llm.model.dtype}")
    draft = Path(options.draft_model) if options.draft_model else None
    result = run_speculative(llm, options.speculative, draft, workload.gen_len, concurrency, options.repeat, log)
    return {"model": str(path), "backend": llm.model.backend.name, "device": llm.model.backend.info.device,
            "dtype": llm.model.dtype, "speculative": result}


def format_speculative(result: dict) -> str:
    header = ("prompts", "batch", "plain tok/s", f"{result['method']} tok/s", "speed-up", "accepted", "tok/step")
    rows = [header] + [
        (r["prompts"], str(r["concurrency"]), f"{r['plain_decode_tok_s']:.1f}", f"{r['spec_decode_tok_s']:.1f}",
         "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", f"{r['acceptance_rate']:.0%}",
         f"{r['tokens_per_verify_step']:.2f}")
        for r in result["rows"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    peers = [r for r in result["rows"] if r.get("mlx_lm_spec_decode_tok_s")]
    lines += [f"mlx-lm speculative ({r['prompts']} x1, same draft model): {r['mlx_lm_spec_decode_tok_s']:.1f} tok/s; "
              f"ferrum/mlx-lm {r['ferrum_vs_mlx_lm'] or 0:.2f}x (median of interleaved pairs)" for r in peers]
    lines.append("decode tok/s after each request's first token; accepted = accepted/drafted tokens; "
                 "tok/step = tokens a request emits per verification step")
    return "\n".join(lines)
