"""The adaptive off-switch: stop drafting for a request while its drafts are mostly rejected.

Verifying k drafts costs a wider forward pass; on text the drafter cannot
predict that cost buys nothing. Every ``window`` drafted tokens the gate
checks the acceptance rate; below ``min_acceptance`` it pauses drafting for
a number of steps that doubles on every consecutive bad window (up to
``max_pause``), and a good window resets the pause.
"""

from __future__ import annotations

#: Steps the first bad window pauses drafting for.
_FIRST_PAUSE = 8


class DraftGate:
    """Per-request: whether to draft this step, from the acceptance seen so far."""

    def __init__(self, min_acceptance: float, window: int, max_pause: int):
        self.min_acceptance, self.window, self.max_pause = min_acceptance, window, max_pause
        self.drafted = self.accepted = 0
        self.pause = 0  # steps left without drafting
        self.next_pause = min(_FIRST_PAUSE, max_pause)

    def open(self) -> bool:
        """Whether to draft this step (a closed gate counts down one step)."""
        if self.pause:
            self.pause -= 1
            return False
        return True

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if self.drafted < self.window:
            return
        if self.accepted < self.min_acceptance * self.drafted:
            self.pause = self.next_pause
            self.next_pause = min(2 * self.next_pause, self.max_pause)
        else:
            self.next_pause = min(_FIRST_PAUSE, self.max_pause)
        self.drafted = self.accepted = 0
