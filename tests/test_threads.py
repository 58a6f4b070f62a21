"""MLX models driven from several threads, and interpreter exit with a stepping thread alive.

Each case runs in a child process: what went wrong here was a segfault or an abort at exit,
which would take pytest down with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from support import write_text_checkpoint

pytest.importorskip("mlx.core")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("threads"))


def run_child(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=timeout
    )


TWO_THREADS = """
    import sys, threading
    import numpy as np
    import ferrum
    from ferrum.model import DecoderOnlyLLM
    from ferrum.sampling import SamplingParams

    folder = sys.argv[1]
    prompt = [5, 9, 14, 3, 7, 21, 2, 30] * 6
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def generate(llm):
        ids = [llm.engine.add_request(prompt[: 10 + i], params) for i in range(4)]
        finals = {}
        while llm.engine.has_unfinished():
            for out in llm.engine.step():
                if out.finished:
                    finals[out.request_id] = out.token_ids
        return [finals[i] for i in ids]

    model = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", block_size=4)
    alone_logits = model.prefill("alone", prompt)
    model.release("alone")
    alone_tokens = generate(ferrum.load(folder, backend="mlx"))

    stop, seen = threading.Event(), []

    def background():
        llm = ferrum.load(folder, backend="mlx")
        while not stop.is_set():
            seen.append(generate(llm))

    thread = threading.Thread(target=background)
    thread.start()
    worst = 0.0
    for i in range(40):
        worst = max(worst, float(np.abs(model.prefill(i, prompt) - alone_logits).max()))
        model.release(i)
    stop.set()
    thread.join()
    assert worst == 0.0, f"main thread's logits moved by {worst}"
    assert seen and all(tokens == alone_tokens for tokens in seen), "background thread's tokens changed"
    print("ok", len(seen), flush=True)
"""


def test_two_threads_run_mlx_models_at_once(checkpoint):
    """An engine stepping on one thread while another thread runs a second model: each thread's
    lazily built KV writes are evaluated by that thread alone (MLX keeps a stream per thread), so
    neither crashes nor changes the other's numbers."""
    child = run_child(TWO_THREADS, str(checkpoint))
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.startswith("ok"), child.stdout


ASYNC_EXIT = """
    import asyncio, sys
    import ferrum
    from ferrum.engine import AsyncEngine, Engine
    from ferrum.sampling import SamplingParams

    folder, shut_down = sys.argv[1], sys.argv[2] == "shutdown"
    llm = ferrum.load(folder, backend="mlx")
    engine = AsyncEngine(Engine(llm.executor, llm.tokenizer))

    async def main():
        return await engine.generate([5, 9, 14], SamplingParams(max_tokens=6, ignore_eos=True))

    out = asyncio.run(main())
    if shut_down:
        engine.shutdown()
    print("generated", len(out.token_ids))
"""


@pytest.mark.parametrize("ending", ["shutdown", "left-running"])
def test_exit_after_an_async_engine_on_mlx_is_clean(checkpoint, ending):
    """MLX (0.32, CPU) aborts at exit while a thread that evaluated MLX work is alive or still
    unwinding; the stepping thread is ended and waited for before the interpreter finalizes."""
    child = run_child(ASYNC_EXIT, str(checkpoint), ending)
    assert child.stdout.strip() == "generated 6", child.stderr[-3000:]
    assert child.returncode == 0, child.stderr[-3000:]
    assert "terminate called" not in child.stderr


THREADS_THEN_EXIT = """
    import sys, threading
    import ferrum

    llm = ferrum.load(sys.argv[1], backend="mlx")
    outs = []
    threads = [threading.Thread(target=lambda i=i: outs.append(llm.run([[5, 9, 14 + i]], max_tokens=4)))
               for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("generated", len(outs))
"""


def test_exit_after_user_threads_ran_an_mlx_model_is_clean(checkpoint):
    """Threads of the caller's that ran a model (compiled blocks traced there) and ended: the interpreter's
    exit right after must not abort. Each such thread's MLX streams are synchronized and destroyed as it
    ends; without that, 5 of 12 runs of a one-thread script aborted. Three runs of three threads."""
    for _ in range(3):
        child = run_child(THREADS_THEN_EXIT, str(checkpoint))
        assert child.stdout.strip() == "generated 3", child.stderr[-3000:]
        assert child.returncode == 0 and "terminate called" not in child.stderr, child.stderr[-3000:]
