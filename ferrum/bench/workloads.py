"""Named workloads: how many requests, how long their prompts and outputs are."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ferrum.errors import InvalidRequestError


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    concurrency: int  # requests submitted together
    prompt_len: int  # longest prompt; mixed workloads draw lengths in [prompt_len / 4, prompt_len]
    gen_len: int  # tokens generated per request (end-of-sequence ignored)
    mixed_lengths: bool = False
    shared_prefix_len: int = 0  # leading tokens every prompt shares

    def with_overrides(self, prompt_len: int | None, gen_len: int | None, concurrency: int | None) -> "Workload":
        changed = replace(
            self,
            prompt_len=prompt_len or self.prompt_len,
            gen_len=gen_len or self.gen_len,
            concurrency=concurrency or self.concurrency,
        )
        if changed.shared_prefix_len:
            changed = replace(changed, shared_prefix_len=min(self.shared_prefix_len, changed.prompt_len * 3 // 4))
        return changed


WORKLOADS = {
    w.name: w
    for w in (
        Workload("decode-1", "one request: 512-token prompt, 256 tokens out", 1, 512, 256),
        Workload("concurrent-8", "8 requests at once, prompts of 128..512 tokens", 8, 512, 128, mixed_lengths=True),
        Workload("concurrent-32", "32 requests at once, prompts of 128..512 tokens", 32, 512, 128,
                 mixed_lengths=True),
        Workload("shared-prefix", "8 prompts sharing their first 384 of 512 tokens; one runs first, then 7 together",
                 8, 512, 64, shared_prefix_len=384),
    )
}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise InvalidRequestError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") from None


def make_prompts(workload: Workload, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Deterministic random token ids (ids 0..9 avoided: special tokens in real vocabularies)."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(10, vocab_size, size=workload.shared_prefix_len).tolist()
    prompts = []
    for _ in range(workload.concurrency):
        length = workload.prompt_len
        if workload.mixed_lengths:
            length = int(rng.integers(max(1, workload.prompt_len // 4), workload.prompt_len + 1))
        own = rng.integers(10, vocab_size, size=length - len(shared)).tolist()
        prompts.append(shared + own)
    return prompts
