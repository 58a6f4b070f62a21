"""Where a decode step's time goes: engine bookkeeping, issuing model ops, waiting
for the device, sampling, and each op's share.

Timers wrap the ops table and the executor for the duration of the profile.
On a lazy backend (MLX) an op's time is the Python time to *build* its part of
the graph; the device work shows up as the wait when the host reads the sampled
ids. With asynchronous stepping that read is of the step issued before, so the
wait is only the device time the host's own work (the next step's graph,
stops, detokenizing) did not cover.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ferrum.hookspec import OPTIONAL_OPS, REQUIRED_OPS
from ferrum.sampling import DeviceSample, SamplingParams

_NOT_MODEL_OPS = {"backend_info", "sample", "sample_on_device", "to_numpy"}


@dataclass(frozen=True)
class Profile:
    sequences: int  # decoded together in each step
    steps: int
    step_ms: float
    parts_ms: dict[str, float]  # per step: engine, ops issue, other model Python, sampling issue, device wait
    ops: list[tuple[str, float, float]]  # (op, calls per step, ms per step), slowest first

    def table(self) -> str:
        lines = [f"decode step of {self.sequences} sequence(s): {self.step_ms:.2f} ms (mean of {self.steps})"]
        for name, ms in self.parts_ms.items():
            lines.append(f"  {name:<34} {ms:8.2f} ms  {100 * ms / self.step_ms:5.1f}%")
        lines.append("  ops (calls/step, ms/step, share of the step):")
        for name, calls, ms in self.ops:
            lines.append(f"    {name:<24} {calls:6.0f} {ms:8.3f} ms  {100 * ms / self.step_ms:5.1f}%")
        return "\n".join(lines)


class _Timer:
    """Time and calls of one op. An op called from inside another timed op (a core fallback
    composing ops) is not counted again: each share is the outermost op's."""

    _depth = 0  # timed calls in progress, over every timer

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if _Timer._depth:
                return fn(*args, **kwargs)
            _Timer._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
                _Timer._depth -= 1

        return timed


@contextmanager
def _patched(target: Any, name: str, timer: _Timer, wrapper: Callable | None = None) -> Iterator[None]:
    own = name in vars(target)  # an instance attribute (ops table) or a method from the class
    original = getattr(target, name)
    setattr(target, name, (wrapper or timer.wrap)(original))
    try:
        yield
    finally:
        if own:
            setattr(target, name, original)
        else:
            delattr(target, name)


@contextmanager
def _timed_bound_ops(model: Any, timers: dict[str, _Timer]) -> Iterator[None]:
    """Time the ops the model bound at load (projections, embedding lookup), by which op each is."""
    ops = model.ops
    names = {id(getattr(ops, n)): n for n in timers} | {id(f): n for n, f in ops.fallback.items() if n in timers}
    bound = [(lin, "apply") for lin in model.projections()] + [(model, "embed_lookup")]
    bound += [(layer.mlp.experts, "apply") for layer in model.layers if hasattr(layer.mlp, "experts")]  # MoE
    originals = [getattr(obj, attr) for obj, attr in bound]
    for (obj, attr), fn in zip(bound, originals):
        setattr(obj, attr, timers[names[id(fn)]].wrap(fn))
    try:
        yield
    finally:
        for (obj, attr), fn in zip(bound, originals):
            setattr(obj, attr, fn)


def profile_decode(llm: Any, prompts: list[list[int]], steps: int = 16) -> Profile:
    """Profile ``steps`` decode steps of ``llm``'s engine running all ``prompts`` together."""
    engine, ops = llm.engine, llm.model.ops
    started: set[str] = set()
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    request_ids = [engine.add_request(p, params, on_output=lambda out: started.add(out.request_id)) for p in prompts]
    while len(started) < len(request_ids):
        engine.step()  # prefill, not profiled
    op_timers = {name: _Timer() for name in REQUIRED_OPS + OPTIONAL_OPS if name not in _NOT_MODEL_OPS}
    run_timer, wait_timer, sample_timer = _Timer(), _Timer(), _Timer()

    def timed_run(run: Callable) -> Callable:
        """The forward pass's whole time; unlike an op's, the ops inside it are timed too."""

        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                run_timer.seconds += time.perf_counter() - start

        return call

    def timed_reads(sample_on_device: Callable) -> Callable:
        """Time the issue of sampling; the wait for the device is timed when the host reads the ids."""

        def call(logits, batch):
            sample = sample_timer.wrap(sample_on_device)(logits, batch)
            return DeviceSample(sample.ids, wait_timer.wrap(sample.read))

        return call

    try:
        with ExitStack() as stack:
            stack.enter_context(_patched(engine.executor, "run", run_timer, timed_run))
            stack.enter_context(_patched(ops, "sample_on_device", sample_timer, timed_reads))
            stack.enter_context(_timed_bound_ops(llm.model, op_timers))
            for name, timer in op_timers.items():
                stack.enter_context(_patched(ops, name, timer))
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            total = time.perf_counter() - start
    finally:
        for request_id in request_ids:
            engine.abort(request_id)
    per_step = 1e3 / steps
    ops_ms = sum(t.seconds for t in op_timers.values())
    parts = {
        "engine (schedule, stops, detok)": (total - run_timer.seconds - wait_timer.seconds - sample_timer.seconds),
        "forward: ops issue (Python + eager)": ops_ms,
        "forward: other Python in model": run_timer.seconds - ops_ms,
        "sampling issue + blocking eval": sample_timer.seconds,
        "device wait (reading sampled ids)": wait_timer.seconds,
    }
    rows = sorted(
        ((name, t.calls / steps, t.seconds * per_step) for name, t in op_timers.items() if t.calls),
        key=lambda row: -row[2],
    )
    return Profile(len(prompts), steps, total * per_step, {k: v * per_step for k, v in parts.items()}, rows)
