"""How speculative decoding is turned on: which drafter, how many tokens, when to give up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferrum.errors import InvalidRequestError

METHODS = ("lookup", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Engine-wide speculative decoding (``EngineConfig(speculative=...)``).

    ``method``: ``"lookup"`` proposes the continuation of an earlier
    occurrence of the request's last n-gram (prompt lookup, no second model);
    ``"draft"`` runs a small draft model with the same vocabulary (given to
    the :class:`~ferrum.engine.Engine` as ``draft_model``).

    Drafting pauses for a request whose acceptance rate over its last
    ``window`` drafted tokens falls below ``min_acceptance``, for a number of
    steps that doubles each time it happens again (the adaptive off-switch),
    so unfavourable text runs at plain decoding speed.
    """

    method: str = "lookup"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3  # longest n-gram matched
    prompt_lookup_min: int = 2  # shortest n-gram matched (single tokens recur by chance too often)
    min_acceptance: float = 0.5
    window: int = 16
    max_pause_steps: int = 256

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(
                f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_min", "window", "max_pause_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"speculative {name} must be an integer >= 1, got {value!r}")
        lookup_max = self.prompt_lookup_max
        if not isinstance(lookup_max, int) or isinstance(lookup_max, bool) or lookup_max < self.prompt_lookup_min:
            raise InvalidRequestError(
                f"prompt_lookup_max ({lookup_max!r}) must be an integer >= prompt_lookup_min "
                f"({self.prompt_lookup_min})"
            )
        accept = self.min_acceptance
        if not isinstance(accept, (int, float)) or isinstance(accept, bool) or not 0.0 <= accept <= 1.0:
            raise InvalidRequestError(f"min_acceptance must be a number in [0, 1], got {accept!r}")


def resolve(speculative: Any, configured: SpeculativeConfig | None, with_draft_model: bool) -> SpeculativeConfig | None:
    """The speculative decoding ``ferrum.load`` runs: ``speculative`` (a method's name, or a config), else the
    ``engine_config``'s, else draft-model drafting where a draft model is given; checked before any weights load.
    A draft model drafts with method "draft" only (loaded for another method, it would sit unused)."""
    if isinstance(speculative, str):
        speculative = SpeculativeConfig(method=speculative)
    elif speculative is None:
        speculative = configured or (SpeculativeConfig(method="draft") if with_draft_model else None)
    elif not isinstance(speculative, SpeculativeConfig):
        raise InvalidRequestError(f"speculative must be one of {', '.join(METHODS)} or a SpeculativeConfig, got "
                                  f"{speculative!r}")
    if with_draft_model:
        require_draft_method(speculative)
    elif speculative is not None and speculative.method == "draft":
        raise InvalidRequestError("speculative method 'draft' needs a draft model: pass draft_model=PATH (a small "
                                  "model with the same tokenizer), or use speculative='lookup'")
    return speculative


def require_draft_method(speculative: SpeculativeConfig | None) -> None:
    """A draft model drafts with method "draft" only: given for another, or for none, it would sit unused."""
    if speculative is None or speculative.method != "draft":
        raise InvalidRequestError(f"a draft model drafts with speculative method 'draft' only, not "
                                  f"{getattr(speculative, 'method', None)!r}; leave the draft model out, or use "
                                  "speculative='draft' (SpeculativeConfig('draft'))")
