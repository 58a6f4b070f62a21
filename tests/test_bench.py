"""``ferrum bench`` machinery on a tiny preset: workloads, figures, peers, JSON, profile.

No timing is asserted (machines are shared and noisy); only that every side
generated what it should and that the reported numbers are consistent.
"""

from __future__ import annotations

import json

import pytest

from ferrum.bench import BenchOptions, Figures, format_report, ratios, run_bench, write_json
from ferrum.bench.figures import ratio_summary
from ferrum.bench.workloads import get_workload, make_prompts
from ferrum.cli import main
from ferrum.errors import InvalidRequestError

from support import runnable_backends


@pytest.fixture(autouse=True)
def bench_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def test_figures_from_timestamps():
    f = Figures.from_timestamps(start=10.0, end=14.0, prompt_lens=[100, 300], first_token_times=[11.0, 12.0],
                                generated=[5, 9])
    assert f.ttft_s == pytest.approx(1.5)
    assert f.prefill_tok_s == pytest.approx(400 / 2.0)
    assert f.decode_tok_s == pytest.approx((14 - 2) / 2.0)
    assert f.throughput_tok_s == pytest.approx(14 / 4.0)
    slower = Figures.from_timestamps(10.0, 18.0, [100, 300], [13.0, 14.0], [5, 9])
    r = ratios(f, slower)
    assert r["throughput_tok_s"] == pytest.approx(2.0) and r["ttft_speedup"] == pytest.approx(3.5 / 1.5)
    # TTFT counts from each request's own submission (a request sent later waits less)
    late = Figures.from_timestamps(10.0, 14.0, [100, 300], [11.0, 12.0], [5, 9], submit_times=[10.0, 11.5])
    assert late.ttft_s == pytest.approx((1.0 + 0.5) / 2) and late.prefill_tok_s == f.prefill_tok_s


def test_ratio_summary_is_the_median_and_range_of_the_pairs():
    pairs = [{"decode_tok_s": 1.2, "ttft_speedup": None}, {"decode_tok_s": 0.9, "ttft_speedup": 2.0},
             {"decode_tok_s": 1.0, "ttft_speedup": 1.0}]
    medians, ranges = ratio_summary(pairs)
    assert medians == {"decode_tok_s": 1.0, "ttft_speedup": 1.5}
    assert ranges == {"decode_tok_s": [0.9, 1.2], "ttft_speedup": [1.0, 2.0]}


def test_workload_prompts_are_deterministic_and_shaped():
    shared = get_workload("shared-prefix").with_overrides(64, 4, 3)
    prompts = make_prompts(shared, vocab_size=500)
    assert prompts == make_prompts(shared, vocab_size=500)
    assert len(prompts) == 3 and all(len(p) == 64 for p in prompts)
    assert shared.shared_prefix_len == 48 and all(p[:48] == prompts[0][:48] for p in prompts)
    assert len({tuple(p[48:]) for p in prompts}) == 3
    mixed = make_prompts(get_workload("concurrent-8").with_overrides(40, 4, None), vocab_size=500)
    assert len(mixed) == 8 and all(10 <= len(p) <= 40 for p in mixed) and len({len(p) for p in mixed}) > 1
    with pytest.raises(InvalidRequestError, match="unknown workload"):
        get_workload("nope")


def test_bench_against_transformers_with_profile(tmp_path):
    options = BenchOptions(workload="concurrent-8", backend="cpu", preset="tiny", peer="transformers", repeat=1,
                           prompt_len=24, gen_len=5, concurrency=3, profile=True)
    report = run_bench(options, log=lambda line: None)
    for side in (report["ferrum"], report["peer"]):
        assert side["requests"] == 3 and side["generated_tokens"] == 15
    assert report["peer"]["name"] == "transformers" and report["preemptions"] == 0
    assert "asynchronous stepping" not in report["features"]["ferrum"]  # numpy computes as it is issued
    assert {"ferrum", "torch", "transformers"} <= set(report["versions"])
    assert report["ratios"]["throughput_tok_s"] == pytest.approx(
        report["ferrum"]["throughput_tok_s"] / report["peer"]["throughput_tok_s"]
    )
    linear = {row["op"]: row["calls"] for row in report["profile"]["ops"]}["linear"]
    # one forward per step for all 3 sequences: 2 layers x (fused qkv, o, fused gate-up, down) + lm_head
    assert report["profile"]["sequences"] == 3 and linear == 2 * 4 + 1
    table = format_report(report)
    assert "throughput tok/s" in table and "transformers" in table and "decode step of 3 sequence(s):" in table
    write_json(report, tmp_path / "out.json")
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["ferrum"] == report["ferrum"] and "profile_table" not in saved


def test_memory_line_compares_with_host_bandwidth_only_where_the_weights_live_there():
    from ferrum.bench.memory import bandwidth_figures, in_host_memory

    assert in_host_memory("cpu") and in_host_memory("metal")
    assert not in_host_memory("cuda:0") and not in_host_memory("gpu:0")

    base = {"ferrum": Figures(1, 8, 8, 0.5, 0.1, 80.0, 20.0, 16.0).as_dict()}
    host = {**base, "memory": {**bandwidth_figures(10**9, 20.0, 1, 40e9), "bits_per_param": 16.0}}
    assert "20.00 GB/s of weights = 50% of the 40.0 GB/s measured read bandwidth" in format_report(host)
    gpu = {**base, "memory": {**bandwidth_figures(10**9, 400.0, 1, None), "bits_per_param": 16.0}}
    assert gpu["memory"]["decode_bandwidth_fraction"] is None
    assert "400.00 GB/s of weights (the device's own memory bandwidth is not measured)" in format_report(gpu)


def test_memory_line_counts_the_experts_a_decode_step_reads():
    from ferrum.bench.memory import bandwidth_figures

    # 1 GB of weights, 0.8 GB of it in 32 experts with 4 chosen per token: a lone sequence reads 0.2 + 0.1 GB.
    alone = bandwidth_figures(10**9, 10.0, 1, None, expert_bytes=8 * 10**8, experts_chosen=4 / 32)
    assert alone["decode_weight_gb_s"] == pytest.approx(3.0)
    # Eight sequences (10 steps/s at 80 tok/s) choose 1 - (28/32)^8 of the experts in expectation.
    eight = bandwidth_figures(10**9, 80.0, 8, None, expert_bytes=8 * 10**8, experts_chosen=4 / 32)
    assert eight["decode_weight_gb_s"] == pytest.approx(10 * (0.2 + 0.8 * (1 - (28 / 32) ** 8)))
    assert bandwidth_figures(10**9, 10.0, 1, None)["decode_weight_gb_s"] == pytest.approx(10.0)  # dense


@pytest.mark.skipif("mlx" not in runnable_backends(), reason="mlx is not installed")
def test_bench_pairs_runs_and_gives_mlx_lm_its_prefix_reuse():
    options = BenchOptions(workload="shared-prefix", backend="mlx", preset="tiny", repeat=3, prompt_len=40,
                           gen_len=3, concurrency=3, profile=True)
    report = run_bench(options, log=lambda line: None)
    assert len(report["pairs"]) == 3 and report["peer"]["generated_tokens"] == report["ferrum"]["generated_tokens"] == 9
    for key, (low, high) in report["ratio_ranges"].items():
        assert low <= report["ratios"][key] <= high
    assert any("prefix" in f for f in report["features"]["mlx-lm"])
    assert any("prefix cache" in f for f in report["features"]["ferrum"])
    assert "asynchronous stepping" in report["features"]["ferrum"]  # MLX computes apart from the host thread
    assert report["profile"]["sequences"] == 3  # the pool has room for the profile's steps at --gen-len 3
    assert "median of 3 alternating (ferrum, peer) pairs" in format_report(report)


@pytest.mark.skipif("mlx" not in runnable_backends(), reason="mlx is not installed")
def test_bench_against_mlx_lm_batched_and_single():
    for concurrency in (1, 2):
        options = BenchOptions(workload="concurrent-8", backend="mlx", preset="tiny", repeat=1, prompt_len=20,
                               gen_len=4, concurrency=concurrency)
        report = run_bench(options, log=lambda line: None)
        assert report["peer"]["name"] == "mlx-lm"
        assert report["peer"]["generated_tokens"] == report["ferrum"]["generated_tokens"] == 4 * concurrency


def test_shared_prefix_reports_cache_hits():
    options = BenchOptions(workload="shared-prefix", backend="cpu", preset="tiny", peer="none", repeat=1,
                           prompt_len=64, gen_len=3, concurrency=4)
    report = run_bench(options, log=lambda line: None)
    assert "peer" not in report
    # the first request computes the 48 shared tokens (3 blocks of 16); the other three reuse them
    assert report["prefix_cache_hit_rate"] == pytest.approx(3 * 48 / (4 * 64))


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--preset", "tiny", "--backend", "cpu", "--peer", "none", "--repeat", "1",
                 "--prompt-len", "12", "--gen-len", "3", "--json", str(out)])
    assert code == 0
    assert "decode tok/s" in capsys.readouterr().out
    assert json.loads(out.read_text())["workload"]["gen_len"] == 3
