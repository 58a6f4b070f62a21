"""The ``ferrum`` command: backends table and generate."""

from __future__ import annotations

import json

import subprocess
import sys

import pytest

from ferrum.cli import main

from support import write_text_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("cli_ckpt"))


def test_backends_lists_builtin_plugins_with_flags(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in ("cpu", "mlx", "cuda"):
        assert name in lines
    assert lines["cpu"].split()[1] == "yes"
    assert "cpu: device=cpu dtypes=float32 paged_attention=" in out


def test_generate_prints_text_and_stats(checkpoint, capsys):
    code = main(["generate", "--model", str(checkpoint), "--backend", "cpu", "--max-tokens", "5", "hello"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "backend=cpu" in captured.err and "loading weights" in captured.err


def test_generate_json_schema_from_a_file(checkpoint, capsys, tmp_path):
    schema = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    code = main(["generate", "--model", str(checkpoint), "--backend", "cpu", "--max-tokens", "40",
                 "--json-schema", f"@{tmp_path / 'schema.json'}", "hello"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["k"] in ("x", "y")


def test_errors_are_reported_not_raised(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--backend", "nope", "hi"]) == 2
    assert "no backend named 'nope'" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint / "missing"), "--backend", "cpu", "hi"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "ferrum.cli", "backends", "--no-load"], capture_output=True, text=True)
    assert done.returncode == 0 and "cpu" in done.stdout


def test_generate_sampling_options_match_the_python_api(checkpoint, capsys):
    import ferrum

    options = ["--temperature", "0.8", "--seed", "3", "--top-k", "40", "--min-p", "0.02",
               "--repetition-penalty", "1.2", "--frequency-penalty", "0.3", "--ignore-eos"]
    code = main(["generate", "--model", str(checkpoint), "--backend", "cpu", "--max-tokens", "12", "--no-chat",
                 *options, "hello"])
    assert code == 0
    captured = capsys.readouterr()
    expected = ferrum.load(checkpoint, backend="cpu").generate(
        "hello", max_tokens=12, temperature=0.8, seed=3, top_k=40, min_p=0.02, repetition_penalty=1.2,
        frequency_penalty=0.3, ignore_eos=True,
    )
    assert captured.out == expected + "\n"
    assert "12 tokens (length); time to first token" in captured.err


def test_generate_reads_the_prompt_from_stdin_given_a_dash(checkpoint, capsys, monkeypatch):
    import io

    import ferrum

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\nsecond line"))
    assert main(["generate", "--model", str(checkpoint), "--backend", "cpu", "--max-tokens", "6", "--no-chat",
                 "--ignore-eos", "-"]) == 0
    expected = ferrum.load(checkpoint, backend="cpu").generate("hello world\nsecond line", max_tokens=6,
                                                               ignore_eos=True)
    assert capsys.readouterr().out == expected + "\n"
