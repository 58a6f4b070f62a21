"""Stop strings, and other markers, over streamed text, including ones that span token boundaries."""

from __future__ import annotations

from typing import Sequence


def cut_marker(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may be the start of ``marker``, cut by a token boundary
    (0 if none): what a stream holds back until the next piece decides it."""
    return next((keep for keep in range(min(len(marker) - 1, len(text)), 0, -1) if marker.startswith(text[-keep:])), 0)


#: The most characters of stop-string prefixes a filter indexes (a few thousand short stop strings, or one of
#: ~4,000 characters); past that it holds back as many characters as the longest stop string has, less one.
PREFIX_INDEX_LIMIT = 1 << 23


class StopStringFilter:
    """Holds back just enough streamed text to never emit part of a stop string.

    ``feed`` returns the text that is safe to show; once a stop string appears,
    ``matched`` names it and the text before it is the last thing returned. Only
    an ending that may begin a stop string is held back (a 200-character stop
    string otherwise delayed every piece of a stream by 199 characters).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.matched: str | None = None
        indexed = sum(len(s) * (len(s) - 1) // 2 for s in self.stops) <= PREFIX_INDEX_LIMIT
        self._prefixes = {s[:k] for s in self.stops for k in range(1, len(s))} if indexed else None
        self._firsts = {s[0] for s in self.stops}

    def _undecided(self) -> int:
        """How many characters at the end of the pending text may be the start of a stop string."""
        tail = self._pending[max(len(self._pending) - self._hold, 0):] if self._hold else ""
        if self._prefixes is None:
            return len(tail)
        starts = (i for i, char in enumerate(tail) if char in self._firsts)  # the earliest is the longest
        return next((len(tail) - i for i in starts if tail[i:] in self._prefixes), 0)

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> str:
        if self.stopped or not text:
            return ""
        if not self.stops:
            return text
        self._pending += text
        hits = [(i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda hit: hit[0])
            out, self._pending = self._pending[:cut], ""
            return out
        safe = len(self._pending) - self._undecided()
        if safe <= 0:
            return ""
        out, self._pending = self._pending[:safe], self._pending[safe:]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
