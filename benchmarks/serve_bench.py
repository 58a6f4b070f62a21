"""N concurrent streaming chat clients against ``ferrum serve`` and ``mlx_lm.server``, same model, same run.

Both servers run at once (an idle server costs nothing) and the rounds
alternate, Ferrum then mlx-lm, per concurrency level and repeat, so a load
burst on a shared machine hits both sides alike. Reported per side: requests
per second, output tokens per second (from each response's usage, else its
content chunks), and time to first content token p50/p99. The ratio column
is Ferrum over mlx-lm (higher is better for throughput, lower for TTFT).

    .venv/bin/python benchmarks/serve_bench.py                      # the embedded default model
    .venv/bin/python benchmarks/serve_bench.py --model PATH --concurrency 8 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx2 as httpx

TOPICS = ["the ocean", "volcanoes", "a city at night", "bread", "chess", "the moon", "rivers", "winter",
          "bicycles", "music", "trees", "the desert", "clocks", "bees", "mountains", "rain"]


@dataclass
class Round:
    server: str
    concurrency: int
    requests_per_s: float
    output_tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    wall_s: float
    failed: int  # requests the server refused or dropped (counted, not timed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, command: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name} exited while starting; see {log}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"{name} did not start in 300 s; see {log}")


async def one_client(
    client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int
) -> tuple[float, int] | None:
    """(TTFT, output tokens) of one streamed request, or None when the server failed it."""
    try:
        return await _stream_one(client, url, model, i, max_tokens)
    except httpx.HTTPError:
        return None


async def _stream_one(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int) -> tuple[float, int]:
    body = {
        "model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}."}],
    }
    started, ttft, chunks, usage = time.perf_counter(), None, 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
    return (ttft if ttft is not None else time.perf_counter() - started), (usage if usage is not None else chunks)


async def run_round(name: str, url: str, model: str, concurrency: int, max_tokens: int) -> Round:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one_client(client, url, model, i, max_tokens) for i in range(concurrency)))
        wall = time.perf_counter() - started
    results = [r for r in outcomes if r is not None]
    ttfts = sorted(r[0] * 1000 for r in results) or [float("nan")]
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return Round(name, concurrency, len(results) / wall, sum(r[1] for r in results) / wall,
                 statistics.median(ttfts), p99, wall, len(outcomes) - len(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder both servers load (default: the embedded model's import)")
    parser.add_argument("--backend", help="Ferrum backend (default: best for the model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="rounds per side and level; the best is reported")
    parser.add_argument("--json", help="write the rounds here")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from ferrum.default_model import default_model_path

        model = str(default_model_path())
    logs = Path("benchmarks/results")
    logs.mkdir(parents=True, exist_ok=True)
    ferrum_port, mlx_port = _free_port(), _free_port()
    top = str(max(args.concurrency))
    ferrum_cmd = [sys.executable, "-m", "ferrum.cli", "serve", model, "--port", str(ferrum_port),
                  "--served-model-name", model, "--max-num-seqs", top, "--log-level", "warning"]
    if args.backend:
        ferrum_cmd += ["--backend", args.backend]
    mlx_cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(mlx_port),
               "--decode-concurrency", top, "--log-level", "WARNING"]
    servers = {
        "ferrum": start("ferrum serve", ferrum_cmd, ferrum_port, logs / "serve-ferrum.log"),
        "mlx_lm.server": start("mlx_lm.server", mlx_cmd, mlx_port, logs / "serve-mlx-lm.log"),
    }
    urls = {"ferrum": f"http://127.0.0.1:{ferrum_port}", "mlx_lm.server": f"http://127.0.0.1:{mlx_port}"}
    rounds: list[Round] = []
    try:
        for name, url in urls.items():  # warm-up: first requests compile / allocate
            asyncio.run(run_round(name, url, model, 2, 8))
        for level in args.concurrency:
            for _ in range(args.repeat):
                for name, url in urls.items():
                    rounds.append(asyncio.run(run_round(name, url, model, level, args.max_tokens)))
                    print(f"  {name:14s} c={level:3d} {rounds[-1].output_tok_per_s:8.1f} tok/s "
                          f"failed={rounds[-1].failed}", file=sys.stderr)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    print(f"model {model}, {args.max_tokens} tokens per request, greedy, best of {args.repeat}")
    print(f"{'clients':>7}  {'server':14s} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'failed':>6}")
    for level in args.concurrency:
        best = {}
        for name in urls:
            mine = [r for r in rounds if r.server == name and r.concurrency == level]
            best[name] = max(mine, key=lambda r: r.output_tok_per_s)
            r = best[name]
            print(f"{level:7d}  {name:14s} {r.requests_per_s:7.2f} {r.output_tok_per_s:10.1f} "
                  f"{r.ttft_p50_ms:7.0f}ms {r.ttft_p99_ms:7.0f}ms {r.failed:6d}")
        f, m = best["ferrum"], best["mlx_lm.server"]
        print(f"{level:7d}  {'ratio':14s} {f.requests_per_s / m.requests_per_s:7.2f} "
              f"{f.output_tok_per_s / m.output_tok_per_s:10.2f} {f.ttft_p50_ms / m.ttft_p50_ms:9.2f} "
              f"{f.ttft_p99_ms / m.ttft_p99_ms:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rounds], indent=2))


if __name__ == "__main__":
    main()
