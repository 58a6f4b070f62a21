"""One HTTP request's choices run as engine requests, their outputs merged into one stream.

``n`` choices of one prompt share its prefix blocks: the first choice of
each distinct prompt is submitted at once, the others right after its first
output, when its prompt blocks are computed and in the prefix cache. Leaving
the event stream early (a client disconnect cancels the task iterating it)
aborts every unfinished choice, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping

from ferrum.engine import AsyncEngine, RequestHandle, RequestOutput
from ferrum.sampling import SamplingParams


@dataclass(frozen=True)
class ChoiceSpec:
    """What choice ``index`` runs."""

    index: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    lora: str | None = None  # a resident LoRA adapter, named by the request's ``model``
    metadata: Mapping[str, Any] | None = None  # the engine request's (ferrum.metadata)


Event = tuple[int, RequestOutput]


class Generation:
    """The engine requests behind one API request."""

    def __init__(
        self, engine: AsyncEngine, specs: list[ChoiceSpec], on_end: Callable[[RequestOutput | None], None]
    ):
        self._engine = engine
        self._specs = specs
        self._on_end = on_end  # a finished output, or None for a choice that was abandoned
        self._handles: dict[int, RequestHandle] = {}
        self._followers: dict[int, list[ChoiceSpec]] = {}
        self._ended: set[int] = set()

    async def start(self) -> None:
        """Submit the first choice of each distinct prompt; bad input raises here, before any response (and
        every choice is ended, so ``on_end`` runs once for each whatever happens)."""
        leaders: dict[tuple[int, ...], int] = {}
        try:
            for spec in self._specs:
                leader = leaders.get(spec.prompt_ids)
                if leader is None:
                    leaders[spec.prompt_ids] = spec.index
                    self._followers[spec.index] = []
                    self._handles[spec.index] = await self._submit(spec)
                else:
                    self._followers[leader].append(spec)
        except BaseException:
            self.abort()
            raise

    async def _submit(self, spec: ChoiceSpec) -> RequestHandle:
        return await self._engine.submit_off_loop(spec.prompt_ids, spec.params, metadata=spec.metadata,
                                                  lora=spec.lora)

    async def events(self) -> AsyncIterator[Event]:
        """``(choice index, output)`` as outputs arrive, until every choice has finished."""
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        tasks: list[asyncio.Task] = []

        async def pump(index: int, handle: RequestHandle) -> None:
            try:
                async for out in handle:
                    for spec in self._followers.pop(index, ()):
                        follower = await self._submit(spec)
                        self._handles[spec.index] = follower
                        tasks.append(asyncio.create_task(pump(spec.index, follower)))
                    queue.put_nowait((index, out))
            except Exception as error:  # surfaced to the consumer, which ends every choice
                queue.put_nowait((index, error))

        tasks.extend(asyncio.create_task(pump(i, h)) for i, h in list(self._handles.items()))
        remaining = len(self._specs)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                    self._ended.add(index)
                    self._on_end(item)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            self.abort()

    def abort(self) -> None:
        """Cancel every unfinished choice, submitted or not (idempotent)."""
        for handle in self._handles.values():
            handle.abort()
        for spec in self._specs:
            if spec.index not in self._ended:
                self._ended.add(spec.index)
                self._on_end(None)
        self._followers.clear()
