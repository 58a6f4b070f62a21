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


def _steady(first: float, count: int, every: float) -> list[float]:
    """``count`` token times, the first at ``first``, then one each ``every`` seconds."""
    return [first + i * every for i in range(count)]


def test_figures_from_timestamps():
    tokens = [_steady(11.0, 5, 0.5), _steady(12.0, 9, 0.25)]  # both done at 13.0, the wall ends at 14.0
    f = Figures.from_timestamps(start=10.0, end=14.0, prompt_lens=[100, 300], token_times=tokens)
    assert f.ttft_s == pytest.approx(1.5) and f.generated_tokens == 14
    assert f.prefill_tok_s == pytest.approx(400 / 2.0)
    assert f.decode_tok_s == pytest.approx((2 + 8) / 2.0)  # the tokens after 12.0 only, over 12.0 -> 14.0
    assert f.throughput_tok_s == pytest.approx(14 / 4.0)
    slower = Figures.from_timestamps(10.0, 18.0, [100, 300], [_steady(13.0, 5, 1.0), _steady(14.0, 9, 0.5)])
    r = ratios(f, slower)
    assert r["throughput_tok_s"] == pytest.approx(2.0) and r["ttft_speedup"] == pytest.approx(3.5 / 1.5)
    # TTFT counts from each request's own submission (a request sent later waits less)
    late = Figures.from_timestamps(10.0, 14.0, [100, 300], tokens, submit_times=[10.0, 11.5])
    assert late.ttft_s == pytest.approx((1.0 + 0.5) / 2)
    assert late.prefill_tok_s == pytest.approx(400 / 1.5)  # 10 -> 11 and 11.5 -> 12: 1.5 s of waiting


def test_a_request_done_before_the_others_start_is_not_counted_as_their_decode_or_prefill():
    """shared-prefix: the first request runs alone, then the other seven together. Its tokens before the
    others' first tokens are not decode of that window, and its decoding is not the others' prefill."""
    alone = _steady(10.1, 32, 0.01)  # 10.1 -> 10.41
    together = [_steady(10.5, 32, 0.02) for _ in range(7)]  # submitted at 10.42, first tokens at 10.5
    f = Figures.from_timestamps(10.0, 11.12, [64] * 8, [alone, *together], submit_times=[10.0] + [10.42] * 7)
    assert f.decode_tok_s == pytest.approx(7 * 31 / 0.62)
    assert f.prefill_tok_s == pytest.approx(8 * 64 / (0.1 + 0.08))


def test_a_side_running_requests_one_after_another_prefills_and_decodes_at_its_own_rate():
    """llama.cpp's peer: every request handed over at once and run in turn. TTFT counts the queueing, prefill
    only the time it spent reaching each first token, decode the last request's (the only one left)."""
    tokens, began = [], []
    for i in range(4):
        began.append(10.0 + i)
        tokens.append(_steady(10.2 + i, 9, 0.1))  # 0.2 s to the first token, 8 more in 0.8 s
    f = Figures.from_timestamps(10.0, 14.0, [50] * 4, tokens, begin_times=began)
    assert f.ttft_s == pytest.approx((0.2 + 1.2 + 2.2 + 3.2) / 4)
    assert f.prefill_tok_s == pytest.approx(200 / 0.8)
    assert f.decode_tok_s == pytest.approx(8 / 0.8)


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
    # an input embedding apart from the LM head is looked up, a few rows a step: not streamed
    assert bandwidth_figures(10**9, 10.0, 1, None, lookup_bytes=2 * 10**8)["decode_weight_gb_s"] == pytest.approx(8.0)


def test_a_models_lookup_tables_are_its_untied_embedding(tmp_path):
    import ferrum
    from support import write_text_checkpoint

    folder = write_text_checkpoint(tmp_path / "untied")
    untied = ferrum.load(folder, backend="cpu", dtype="float32").model
    assert not untied.config.tie_word_embeddings
    assert untied.lookup_weight_bytes == untied.config.vocab_size * untied.config.hidden_size * 4
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.warns(UserWarning):  # the file's own lm_head is left unread
        tied = ferrum.load(folder, backend="cpu", dtype="float32").model
    assert tied.lookup_weight_bytes == 0  # the embedding is the LM head too: read whole every step


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


def test_a_workload_past_the_context_or_a_peer_that_cannot_read_the_weights_is_refused_before_timing():
    """Each side would stop at the context (Ferrum at 4 of 16 tokens, transformers going on), and transformers
    cannot read MLX's packing: refused with the reason, not timed into a wrong ratio or a library error."""
    from ferrum.errors import UnsupportedFeatureError

    past = BenchOptions(workload="decode-1", backend="cpu", preset="tiny", peer="none", repeat=1,
                        prompt_len=1020, gen_len=16)
    with pytest.raises(InvalidRequestError, match="context of 1024 tokens"):
        run_bench(past, log=lambda line: None)
    packed = BenchOptions(workload="decode-1", backend="cpu", preset="tiny", peer="transformers", repeat=1,
                          prompt_len=12, gen_len=2, quantize=8)
    with pytest.raises(UnsupportedFeatureError, match="transformers peer cannot read"):
        run_bench(packed, log=lambda line: None)


PRESET_RACE = """
import sys
from ferrum.bench.presets import preset_checkpoint
print(preset_checkpoint("tiny"))
"""


def test_presets_are_written_once_as_defined_and_quantized_copies_are_of_their_own_source(tmp_path, monkeypatch):
    """Three first runs at once all get the preset (two crashed on its shared staging folder); a changed
    definition is written anew (the old shape was benched); ``--quantize`` of two folders of one name (two
    training runs' ``checkpoint-100``) quantizes each (the second benched the first's copy)."""
    import os
    import subprocess
    import sys

    from ferrum.bench import presets
    from ferrum.bench.run import _checkpoint
    from ferrum.random_checkpoint import write_random_checkpoint

    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "cache"))
    env = {**os.environ, "FERRUM_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", PRESET_RACE], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outs]
    folder = presets.preset_checkpoint("tiny")
    assert {out.strip() for out, _ in outs} == {str(folder)}
    monkeypatch.setitem(presets.PRESETS, "tiny", {**presets.PRESETS["tiny"], "num_hidden_layers": 1})
    assert json.loads((presets.preset_checkpoint("tiny") / "config.json").read_text())["num_hidden_layers"] == 1

    sources = []
    for run, layers in (("runA", 1), ("runB", 2)):
        source = write_random_checkpoint(tmp_path / run / "checkpoint-100",
                                         {**presets.PRESETS["tiny"], "num_hidden_layers": layers})
        options = BenchOptions(workload="decode-1", backend="cpu", model=str(source), peer="none", quantize=8)
        sources.append(_checkpoint(options, lambda label: None)[1])
    assert sources[0] != sources[1]
    assert [json.loads((s / "config.json").read_text())["num_hidden_layers"] for s in sources] == [1, 2]
