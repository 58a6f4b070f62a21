"""The engine's side of speculative decoding: who drafts how many tokens this step, and the counts."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Hashable, Sequence

from ferrum.errors import InvalidRequestError
from ferrum.spec.adaptive import DraftGate
from ferrum.spec.config import SpeculativeConfig
from ferrum.spec.draft_model import DraftModelDrafter
from ferrum.spec.lookup import propose_lookup

if TYPE_CHECKING:
    from ferrum.engine.request import Request
    from ferrum.model import DecoderOnlyLLM


class Speculator:
    """Proposes drafts for decoding requests (the scheduler fits them into the step) and records results."""

    def __init__(self, config: SpeculativeConfig, vocab_size: int, draft_model: "DecoderOnlyLLM | None",
                 token_budget: int):
        """``token_budget``: the engine's tokens per pass, which the draft model's passes keep to as well."""
        if config.method == "draft" and draft_model is None:
            raise InvalidRequestError(
                "speculative method 'draft' needs a draft model: ferrum.load(..., draft_model=PATH) "
                "or Engine(..., draft_model=model)"
            )
        self.config = config
        self.drafter = DraftModelDrafter(draft_model, vocab_size, token_budget) if config.method == "draft" else None
        self._gates: dict[Hashable, DraftGate] = {}

    def _room(self, request: "Request") -> int:
        """Drafts worth verifying: one token fewer than the request may still emit."""
        left = min(request.params.max_tokens - len(request.output_token_ids),
                   request.max_total_tokens - request.num_tokens)
        return min(self.config.num_speculative_tokens, left - 1)

    def propose(self, requests: Sequence["Request"]) -> dict[Hashable, list[int]]:
        """Draft tokens by request id, for those whose gate is open; others decode plainly."""
        cfg = self.config
        wants = []
        for request in requests:
            if request.sampler.matcher is not None:
                continue  # a grammar decides each next token on the host: nothing to draft ahead of it
            count = self._room(request)
            gate = self._gates.get(request.request_id)
            if gate is None:
                gate = self._gates[request.request_id] = DraftGate(cfg.min_acceptance, cfg.window, cfg.max_pause_steps)
            if count > 0 and gate.open():
                wants.append((request.request_id, request.all_token_ids(), count))
        if self.drafter is not None:
            return self.drafter.propose(wants)  # which falls back to no drafts itself
        drafts = {}
        for request_id, tokens, count in wants:
            try:
                drafts[request_id] = propose_lookup(tokens, count, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
            except Exception as error:  # drafting is a shortcut: a request it fails on decodes plainly
                warnings.warn(f"drafting for request {request_id!r} failed ({type(error).__name__}: {error}); it "
                              "decodes without drafts this step", RuntimeWarning, stacklevel=2)
        return drafts

    def verified(self, request: "Request", drafted: int, accepted: int) -> None:
        """One verification step of ``request`` ended; count it and feed the off-switch."""
        metrics = request.metrics
        metrics.num_drafted_tokens += drafted
        metrics.num_accepted_tokens += accepted
        metrics.num_spec_steps += 1
        gate = self._gates.get(request.request_id)
        if gate is not None:
            gate.record(drafted, accepted)

    def preempted(self, request: "Request") -> None:
        """The scheduler freed ``request``'s KV to recompute it later: free its draft KV too (its gate stays,
        its acceptance history is still its own); the drafter catches up again when it decodes."""
        if self.drafter is not None:
            self.drafter.forget(request.request_id)

    def forget(self, request: "Request") -> None:
        """The request finished: drop its gate and its draft KV."""
        self._gates.pop(request.request_id, None)
        if self.drafter is not None:
            self.drafter.forget(request.request_id)
