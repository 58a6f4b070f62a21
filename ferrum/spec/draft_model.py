"""The draft-model drafter: a small model with the target's vocabulary proposes its greedy tokens.

It runs on the target's backend with its own paged KV pool, one sequence
per request. Each step it first catches up with the request's tokens, in passes
within the engine's token budget (after a rejection its KV is cut back to the
tokens both agree on, the same ``truncate_kv`` rollback as the target's), then
drafts one token per forward pass for every drafting request at once. Its
drafts are its argmax, so the verification rule stays exact (see
:mod:`ferrum.spec.verify`).
"""

from __future__ import annotations

from typing import Hashable, Sequence

from ferrum.errors import InvalidRequestError
from ferrum.model import DecoderOnlyLLM, ForwardItem
from ferrum.sampling import RequestSampler, SamplingParams, sample_batch


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftModelDrafter:
    """Greedy drafts from ``model`` for many requests, batched."""

    def __init__(self, model: DecoderOnlyLLM, vocab_size: int, token_budget: int):
        if model.config.vocab_size != vocab_size:
            raise InvalidRequestError(
                f"the draft model's vocabulary has {model.config.vocab_size} tokens but the target's has "
                f"{vocab_size}; use a draft model with the same tokenizer"
            )
        self.model, self.token_budget = model, token_budget
        self._held: dict[Hashable, list[int]] = {}  # tokens whose K/V the draft model holds, per request
        self._greedy = RequestSampler(SamplingParams(), ())

    def propose(self, wants: Sequence[tuple[Hashable, Sequence[int], int]]) -> dict[Hashable, list[int]]:
        """``(request id, its tokens, how many drafts)`` each; the drafts by request id."""
        model, limit = self.model, self.model.config.max_seq_len
        drafts: dict[Hashable, list[int]] = {}
        items = []
        for seq_id, tokens, count in wants:
            held = self._held.get(seq_id, [])
            common = min(_common_prefix(held, tokens), len(tokens) - 1)  # the last token is fed again
            if seq_id in model.kv:
                model.truncate_kv(seq_id, common)
            self._held[seq_id] = list(tokens[:common])
            count = min(count, limit - len(tokens))
            if count > 0:
                drafts[seq_id] = []
                items.append((ForwardItem(seq_id, list(tokens[common:]), common), count))
        try:
            self._catch_up([item for item, _ in items])
            items = [(ForwardItem(item.seq_id, item.q_tokens[-1:], item.pos_offset + len(item.q_tokens) - 1), count)
                     for item, count in items]
            while items:
                out = model.forward([item for item, _ in items])
                picks = sample_batch(model.ops, out.logits, [self._greedy] * len(items))
                following = []
                for (item, count), pick in zip(items, picks):
                    self._held[item.seq_id].extend(item.q_tokens)
                    drafts[item.seq_id].append(pick.token)
                    if len(drafts[item.seq_id]) < count:
                        position = item.pos_offset + len(item.q_tokens)
                        following.append((ForwardItem(item.seq_id, [pick.token], position), count))
                items = following
        except Exception:  # its pool is full, or an op failed: drafting is only a shortcut, so decode plainly
            for seq_id in list(self._held):  # and start the draft KV over next step
                self.forget(seq_id)
            return {}
        return drafts

    def _catch_up(self, items: list[ForwardItem]) -> None:
        """Feed each item's tokens but its last, at most ``token_budget`` in a pass, as the target's prefill is
        chunked: one pass over a long prompt's every token takes the memory the engine's budget is there to bound."""
        backlog = [(item.seq_id, item.q_tokens[:-1], item.pos_offset) for item in items if len(item.q_tokens) > 1]
        while backlog:
            room, batch, rest = self.token_budget, [], []
            for seq_id, tokens, start in backlog:
                take = min(len(tokens), room)
                if take:
                    batch.append(ForwardItem(seq_id, tokens[:take], start))
                    self._held[seq_id].extend(tokens[:take])
                    room -= take
                if take < len(tokens):
                    rest.append((seq_id, tokens[take:], start + take))
            self.model.forward(batch)
            backlog = rest

    def forget(self, seq_id: Hashable) -> None:
        """The request finished or was preempted: free its draft KV."""
        self._held.pop(seq_id, None)
        if seq_id in self.model.kv:
            self.model.release(seq_id)
