"""``AsyncEngine``: the engine for asyncio applications serving many users.

One background thread steps the engine while any request is unfinished, so
every user's request shares the same batched forward passes; each request's
outputs are handed to the event loop that submitted it. Cancelling the task
that consumes a stream (or leaving it early) aborts the request. A request
that failed raises its error in the consumer. The thread holds the engine
only weakly between steps, so an ``LLM`` dropped without :meth:`shutdown`
frees its model, KV pool and thread.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Mapping, Sequence

from ferrum.engine.engine import Engine
from ferrum.engine.request import FinishReason, RequestOutput
from ferrum.errors import ExecutorStateError, RequestFailedError
from ferrum.sampling import SamplingParams

#: How often an idle stepping thread checks whether its engine is still wanted.
_IDLE_CHECK_S = 1.0

#: The longest interpreter exit waits for one stepping thread to end.
_EXIT_WAIT_S = 5.0

#: Where structured outputs' grammars compile for :meth:`AsyncEngine.submit_off_loop`.
_compiling = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ferrum-grammar")


class RequestStream:
    """Where one request's outputs (or the error that ended it) arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._sealed = False
        self.ended = False  # its final output was put

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the stepping thread; raises RuntimeError when the consumer's loop is closed."""
        if not self._sealed:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def seal(self) -> None:
        """Drop every later output (the request is being failed; its abort output must not arrive first)."""
        self._sealed = True

    def fail(self, error: BaseException) -> None:
        self._sealed = True
        self._loop.call_soon_threadsafe(self._queue.put_nowait, error)

    async def get(self) -> RequestOutput:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finish_reason is FinishReason.ERROR and item.error is not None:
            raise item.error
        return item


class RequestHandle:
    """A submitted request: iterate it for its outputs; leaving early (or :meth:`abort`) cancels it."""

    def __init__(self, engine: "AsyncEngine", request_id: str, stream: RequestStream):
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                try:
                    out = await self._stream.get()
                except RequestFailedError:
                    self.finished = True  # the engine already ended it
                    raise
                self.finished = out.finished
                yield out
        finally:
            self.abort()

    def abort(self) -> None:
        """Cancel the request unless it finished; frees its KV blocks before the next step. Idempotent."""
        if self.finished:
            self.engine.forget(self.request_id, self._stream)
        else:
            self.finished = True
            self.engine.abort(self.request_id, self._stream)


class AsyncEngine:
    """Thread-backed asyncio front end of an :class:`Engine`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        #: The streams of unfinished requests (those ``shutdown`` aborts and a failed step fails), by id.
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        #: Why it stopped by itself (an interrupt in its stepping thread); None while it runs or once shut down.
        self.broken: str | None = None
        self._thread: threading.Thread | None = None
        weakref.finalize(self, self._wake.set)  # a dropped engine lets its thread notice at once
        _live_engines.add(self)

    def submit(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        lora: str | None = None,
    ) -> RequestHandle:
        """Queue a request now (bad input raises here, before anything is awaited); iterate the handle.

        ``lora`` names a LoRA adapter loaded on the model (see :meth:`Engine.add_request`)."""
        return self._queue(self._open(), prompt_token_ids, params, request_id, metadata, lora)

    async def submit_off_loop(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        lora: str | None = None,
    ) -> RequestHandle:
        """:meth:`submit` for a server's event loop: a structured output's grammar (``json_schema``, ``grammar``)
        compiles in a worker thread, so other requests' streams go on meanwhile (a few ms for most schemas,
        seconds for one of thousands of properties). Cancelled while it compiles, the request is aborted."""
        stream = self._open()
        if params is None or not params.structured:
            return self._queue(stream, prompt_token_ids, params, request_id, metadata, lora)
        queued = _compiling.submit(self._queue, stream, prompt_token_ids, params, request_id, metadata, lora)
        try:
            return await asyncio.wrap_future(queued)
        except asyncio.CancelledError:
            queued.add_done_callback(lambda done: done.exception() is None and done.result().abort())
            raise

    def _open(self) -> RequestStream:
        if self._closed:
            raise ExecutorStateError(self._closed_reason())
        return RequestStream(asyncio.get_running_loop())

    def _closed_reason(self) -> str:
        if self.broken is None:
            return "this AsyncEngine was shut down"
        return f"this AsyncEngine stopped: {self.broken} in its stepping thread; start another (LLM.async_engine does)"

    def _queue(self, stream: RequestStream, prompt_token_ids: Sequence[int], params: SamplingParams | None,
               request_id: str | None, metadata: Mapping[str, Any] | None, lora: str | None) -> RequestHandle:
        """Add the request and route its outputs to ``stream``; thread-safe."""
        with self._lock:
            if self._closed:  # shut down while the grammar compiled
                raise ExecutorStateError(self._closed_reason())
            request_id = self.engine.add_request(prompt_token_ids, params, request_id,
                                                 on_output=lambda out: self._deliver(stream, out),
                                                 metadata=metadata, lora=lora)
            if not stream.ended:
                self._streams[request_id] = stream
            self._start()
        return RequestHandle(self, request_id, stream)

    async def stream(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as they are produced."""
        async for out in self.submit(prompt_token_ids, params, request_id, metadata, lora):
            yield out

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None, lora: str | None = None,
    ) -> RequestOutput:
        """Submit a request and wait for its final output."""
        out = None
        async for out in self.stream(prompt_token_ids, params, request_id, metadata, lora):
            pass
        return out

    def abort(self, request_id: str, stream: RequestStream | None = None) -> None:
        """Cancel the request (``stream``: only while that stream is still the id's: a finished request's id
        may have been taken again)."""
        with self._lock:
            if stream is not None and self._streams.get(request_id, stream) is not stream:
                return
            self._streams.pop(request_id, None)
        self.engine.abort(request_id)
        self._wake.set()

    def forget(self, request_id: str, stream: RequestStream | None = None) -> None:
        """Stop routing outputs of a finished request (``stream``: only that one's, as in :meth:`abort`)."""
        with self._lock:
            if stream is None or self._streams.get(request_id) is stream:
                self._streams.pop(request_id, None)

    def _deliver(self, stream: RequestStream, out: RequestOutput) -> None:
        """An output for ``stream``; a final one ends its routing, so a handle never read holds nothing here. So does
        one its consumer cannot take (its event loop closed): the engine then fails the request, and that final
        output reaches no callback."""
        try:
            stream.put(out)
        except BaseException:
            self._end(stream, out.request_id)
            raise
        if out.finished:
            self._end(stream, out.request_id)

    def _end(self, stream: RequestStream, request_id: str) -> None:
        stream.ended = True
        with self._lock:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]

    def shutdown(self) -> None:
        """Stop stepping; unfinished requests are aborted (their consumers see an ``abort`` finish)."""
        self._stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            _wait_until_torn_down(self._thread)

    def _stop(self) -> None:
        """Close, abort what is unfinished and let the thread end after its current step."""
        self._closed = True
        with self._lock:
            pending = list(self._streams)
        for request_id in pending:
            self.engine.abort(request_id)
        self._wake.set()

    # ------------------------------------------------------------ thread
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=_step_while_wanted, args=(weakref.ref(self), self._wake), name="ferrum-engine", daemon=True
            )
            self._thread.start()
            _stepping_threads.add(self._thread)
        self._wake.set()

    def _step_until_idle(self) -> bool:
        """Step while requests are unfinished; False when the thread should end."""
        while self.engine.has_unfinished():
            try:
                self.engine.step()
            except Exception as error:  # a step-level failure: end the requests it held, keep serving
                self._fail_all(error)
            except BaseException as error:  # KeyboardInterrupt/SystemExit in an op: stop, then tell everyone
                # closed first: a request submitted as its consumers hear of the failure is refused, not left
                # queued for a thread that has ended (it waited for good)
                self.broken, self._closed = type(error).__name__, True
                self._fail_all(error)
                self.engine.apply_pending()  # aborts queued while the step held the lock: free their KV now
                return False
        return not self._closed

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
        failure = RequestFailedError(f"the engine step failed: {type(error).__name__}: {error}")
        failure.__cause__ = error
        for request_id, stream in streams:
            stream.seal()
            self.engine.abort(request_id)  # KV freed before the consumer hears of the failure
            try:
                stream.fail(failure)
            except RuntimeError:  # that consumer's event loop is gone
                pass


def _step_while_wanted(ref: "weakref.ref[AsyncEngine]", wake: threading.Event) -> None:
    """The stepping thread: holds the AsyncEngine only while stepping, so it can be collected when idle."""
    while True:
        wake.wait(_IDLE_CHECK_S)
        engine = ref()
        if engine is None:
            return
        wake.clear()
        keep_going = engine._step_until_idle()
        del engine
        if not keep_going:
            return


# ------------------------------------------------------------- interpreter exit
# A backend may keep per-thread native state that its own exit-time destructors also tear down: MLX
# (0.32, CPU) aborts the process ("terminate called without an active exception") when it exits while
# a thread that evaluated MLX work is still alive or still unwinding. So every stepping thread is
# ended, and waited for until the OS has removed it, before the interpreter finalizes.
_live_engines: "weakref.WeakSet[AsyncEngine]" = weakref.WeakSet()
_stepping_threads: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def _wait_until_torn_down(thread: threading.Thread, timeout: float = _EXIT_WAIT_S) -> None:
    """Wait until the OS thread behind a joined ``thread`` is gone: ``join`` returns once its Python
    state is released, before its native thread-local destructors have run. Linux lists live threads
    in ``/proc/self/task``; elsewhere there is nothing to poll and this returns at once."""
    task = f"/proc/self/task/{thread.native_id}"
    deadline = time.monotonic() + timeout
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.001)


@atexit.register
def _end_stepping_threads() -> None:
    """Stop every engine, then wait (a bounded time: a step may be long) for each stepping thread."""
    for engine in list(_live_engines):
        engine._stop()
    for thread in list(_stepping_threads):  # including those whose engine was collected and ended alone
        thread.join(_EXIT_WAIT_S)
        _wait_until_torn_down(thread)
