"""The ``ferrum`` command: backends table, generate and chat."""

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


def test_generate_applies_a_models_chat_template_unless_told_not_to(checkpoint, tmp_path, capsys):
    """As mlx-lm's and llama.cpp's command lines do: a model with a chat template chats; --no-chat feeds the text
    raw; a model without one gets the text raw."""
    import shutil

    import ferrum

    llm = ferrum.load(checkpoint, backend="cpu")
    assert llm.tokenizer.chat_template is not None
    run = ["generate", "--backend", "cpu", "--max-tokens", "6", "--ignore-eos", "hello"]
    assert main([*run[:1], "--model", str(checkpoint), *run[1:]]) == 0
    assert capsys.readouterr().out == llm.generate("hello", chat=True, max_tokens=6, ignore_eos=True) + "\n"
    bare = shutil.copytree(checkpoint, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert main([*run[:1], "--model", str(bare), *run[1:]]) == 0
    assert capsys.readouterr().out == llm.generate("hello", max_tokens=6, ignore_eos=True) + "\n"


@pytest.mark.parametrize("argv, words", [
    (["serve", "--port", "99999"], "a port is a number from 0 to 65535"),  # a traceback once the model had loaded
    (["serve", "--port", "-1"], "a port is a number from 0 to 65535"),
    (["serve", "--shutdown-timeout", "inf"], "must be 0 to 86400 seconds"),  # killed the shutdown timer
    (["serve", "--shutdown-timeout", "nan"], "must be 0 to 86400 seconds"),  # behaved as 0
])
def test_serve_arguments_out_of_range_are_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "host.invalid"])
def test_serve_refuses_a_port_in_use_or_a_bad_host_before_loading(checkpoint, capsys, monkeypatch, host):
    """The socket is bound first: a port in use (or a host that does not resolve) is one error line at once,
    not a banner and uvicorn's error after the model loaded."""
    import socket

    import ferrum.serve.server as server

    monkeypatch.setattr(server, "load_for_serving", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint), "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert ("cannot listen on" if host == "127.0.0.1" else "does not resolve") in err and "serving" not in err, err


def test_mistakes_are_refused_before_the_slow_work(checkpoint, capsys, monkeypatch, tmp_path):
    """Sampling options, bench options and an output path are checked before a model loads or a bench runs."""
    import ferrum

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model before refusing the arguments")

    monkeypatch.setattr(ferrum, "load", no_load)
    for argv, words in [
        (["generate", "--model", str(checkpoint), "--top-p", "2", "hi"], "top_p"),
        (["bench", "--peer", "bogus"], "bench peer 'bogus'"),
        (["bench", "--draft-model", str(checkpoint)], "speculative 'draft' only"),
        (["bench", "--json", str(tmp_path / "missing" / "x.json")], "not a file in an existing folder"),
        (["serve", "--served-model-name", ""], "must not be empty"),
        (["generate", "--speculative", "draft", "hi"], "--speculative draft needs --draft-model PATH"),
        (["generate", "--speculative", "lookup", "--draft-model", str(checkpoint), "hi"],
         "--draft-model drafts with --speculative draft, not lookup"),
        (["generate", "--adapter", str(checkpoint / "config.json"), "hi"], "is not a folder"),
        (["chat", "--num-speculative-tokens", "2"], "needs --speculative lookup, or --draft-model"),
        (["serve", "--speculative", "draft"], "--speculative draft needs --draft-model PATH"),
        (["serve", "--speculative", "lookup", "--num-speculative-tokens", "0"], "must be an integer >= 1"),
    ]:
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", None)
    assert main(["generate", "--model", str(checkpoint), "-"]) == 2
    assert "standard input is closed" in capsys.readouterr().err


def test_debug_is_taken_after_the_subcommand_too(checkpoint, capsys):
    """Where the one-line errors' hint makes people put it."""
    from ferrum.errors import FerrumError

    with pytest.raises(FerrumError, match="no backend named 'nope'"):  # raised, not one line: --debug took
        main(["generate", "--model", str(checkpoint), "--backend", "nope", "hi", "--debug"])
    assert main(["generate", "--model", str(checkpoint), "--backend", "nope", "hi"]) == 2


def test_a_reader_that_goes_away_ends_generate_quietly(checkpoint):
    """``ferrum generate ... | head -c 1``: no "BrokenPipeError" line."""
    command = (f"{sys.executable} -m ferrum.cli generate --model {checkpoint} --backend cpu --max-tokens 200 "
               "--ignore-eos --no-chat hello | head -c 1")
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    assert "Error" not in done.stderr, done.stderr


def test_backends_verbose_without_loading_is_refused_not_ignored(capsys):
    assert main(["backends", "--verbose", "--no-load"]) == 2
    assert "--verbose lists each backend's ops, which needs loading it" in capsys.readouterr().err


def _chat(checkpoint, monkeypatch, capsys, lines: str, *options: str) -> tuple[int, str, str]:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", "--model", str(checkpoint), "--backend", "cpu", *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_keeps_the_conversation_and_forgets_it_on_reset(checkpoint, monkeypatch, capsys):
    """Each line a user turn answered in the light of the earlier ones, as the Python API answers the same
    messages; /reset starts over; the end of input ends the session."""
    import ferrum

    llm = ferrum.load(checkpoint, backend="cpu")
    options = dict(max_tokens=5, ignore_eos=True)
    system = [{"role": "system", "content": "be brief"}]
    first = [*system, {"role": "user", "content": "hello"}]
    reply = llm.generate(first, chat=True, **options)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "and again"}]
    code, out, err = _chat(checkpoint, monkeypatch, capsys, "hello\n\n  and again \n/reset\nand again\n",
                           "--max-tokens", "5", "--ignore-eos", "--system", "be brief")
    assert code == 0
    fresh = llm.generate([*system, {"role": "user", "content": "and again"}], chat=True, **options)
    assert out == f"{reply}\n{llm.generate(second, chat=True, **options)}\n{fresh}\n"
    assert "conversation forgotten" in err


def test_chat_outliving_the_context_says_so_and_goes_on(checkpoint, monkeypatch, capsys):
    """A turn that no longer fits is an error line and is not kept; the session goes on, and /quit ends it."""
    import ferrum

    llm = ferrum.load(checkpoint, backend="cpu")
    long = " ".join(["word"] * llm.model.config.max_seq_len)
    options = dict(max_tokens=3, ignore_eos=True)
    first = [{"role": "user", "content": "hello"}]
    reply = llm.generate(first, chat=True, **options)
    after = llm.generate([*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "again"}],
                         chat=True, **options)
    code, out, err = _chat(checkpoint, monkeypatch, capsys, f"hello\n{long}\nagain\n/quit\nnever read\n",
                           "--max-tokens", "3", "--ignore-eos")
    assert code == 0
    assert out == f"{reply}\n{after}\n"
    assert "context length" in err and "/reset starts over" in err


def test_chat_needs_a_chat_template(checkpoint, tmp_path, monkeypatch, capsys):
    import shutil

    bare = shutil.copytree(checkpoint, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = _chat(bare, monkeypatch, capsys, "hello\n")
    assert code == 2 and "no chat template" in err and "--chat-template FILE" in err
    (bare / "tokenizer.json").unlink()  # the command line has no way to take token ids: not the way out it names
    code, _, err = _chat(bare, monkeypatch, capsys, "hello\n")
    assert code == 2 and "has no tokenizer (tokenizer.json" in err and "pass token ids" not in err
    assert main(["generate", "--model", str(bare), "--backend", "cpu", "hello"]) == 2
    assert "add the model's tokenizer.json" in capsys.readouterr().err


def test_a_load_that_fails_part_way_ends_its_progress_line_before_the_error(checkpoint, tmp_path, capsys):
    """The error line started where the progress bar stopped (``... 1/21   0.0sferrum: error: ...``)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    name = next(n for n in sorted(weights) if n.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name][:, :5]  # a shape config.json does not imply: refused as that tensor loads
    save_file(weights, broken / "model.safetensors")
    assert main(["generate", "--model", str(broken), "--backend", "cpu", "hi"]) == 2
    err = capsys.readouterr().err
    assert "loading weights" in err and "\nferrum: error: " in err and "sferrum" not in err


def test_serve_announces_the_port_the_system_chose():
    """``--port 0`` (allowed, as uvicorn's): the banner names the port listened on, not 0."""
    from ferrum.serve.server import _address, _bound_socket

    sock = _bound_socket("127.0.0.1", 0)
    try:
        address = _address(sock)
        assert address == f"http://127.0.0.1:{sock.getsockname()[1]}" and not address.endswith(":0")
    finally:
        sock.close()


def test_a_chat_template_from_the_command_line(checkpoint, tmp_path, monkeypatch, capsys):
    """``--chat-template`` takes a file or the Jinja text (as vLLM's does): a model without a template chats
    through it; text that is neither, or a template that does not compile, is refused before generating."""
    import shutil

    import ferrum

    bare = shutil.copytree(checkpoint, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    # longer than a file name may be (a path lookup of it raised "File name too long")
    template = ("{# " + "a comment " * 40 + "#}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    (tmp_path / "t.jinja").write_text(template)
    llm = ferrum.load(bare, backend="cpu")
    llm.use_chat_template(template)
    expected = llm.generate("hello", chat=True, max_tokens=5, ignore_eos=True)
    run = ["generate", "--model", str(bare), "--backend", "cpu", "--max-tokens", "5", "--ignore-eos", "hello"]
    for given in (str(tmp_path / "t.jinja"), template):
        assert main([*run, "--chat-template", given]) == 0
        assert capsys.readouterr().out == expected + "\n"
    code, out, _ = _chat(bare, monkeypatch, capsys, "hello\n", "--max-tokens", "5", "--ignore-eos",
                         "--chat-template", template)
    assert code == 0 and out == expected + "\n"
    with pytest.raises(SystemExit):
        main([*run, "--chat-template", str(tmp_path / "missing.jinja")])
    assert "neither a file nor a Jinja template" in capsys.readouterr().err
    assert main([*run, "--chat-template", "{% for m in messages %}"]) == 2
    assert "does not compile" in capsys.readouterr().err


def test_speculative_decoding_from_the_command_line_keeps_greedy_output(checkpoint, tmp_path, capsys):
    """``--speculative lookup`` and ``--draft-model`` (as vLLM's and mlx-lm's command lines take them) run the
    model's greedy tokens, and the stats line says how many drafts were accepted."""
    import ferrum

    prompt = "abc abc abc abc abc abc"
    expected = ferrum.load(checkpoint, backend="cpu").generate(prompt, max_tokens=16, ignore_eos=True)
    run = ["generate", "--model", str(checkpoint), "--backend", "cpu", "--max-tokens", "16", "--ignore-eos",
           "--no-chat"]
    for options in (["--speculative", "lookup", "--num-speculative-tokens", "3"], ["--draft-model", str(checkpoint)]):
        assert main([*run, *options, prompt]) == 0, options
        captured = capsys.readouterr()
        assert captured.out == expected + "\n", options
        drafted = captured.err.split("; ")[-1]
        assert drafted.endswith("drafted tokens accepted\n"), captured.err
        accepted, _, total = drafted.split()[:3]
        assert 0 < int(total) and 0 <= int(accepted) <= int(total), drafted
    assert main([*run, "--draft-model", str(checkpoint), "--num-speculative-tokens", "0", prompt]) == 2
    assert "num_speculative_tokens must be an integer >= 1" in capsys.readouterr().err


def test_an_adapter_from_the_command_line_runs_every_prompt(checkpoint, tmp_path, capsys):
    """``--adapter PATH`` (mlx-lm's ``--adapter-path``) gives what ``lora=`` gives through the Python API."""
    import numpy as np
    from safetensors.numpy import save_file

    import ferrum

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    rng = np.random.default_rng(0)
    outputs = {"q_proj": 64, "v_proj": 32}  # 4 heads of 16; 2 KV heads
    save_file({f"model.layers.{i}.self_attn.{proj}.lora_{ab}": rng.normal(0, 0.5, shape).astype(np.float32)
               for i in range(2) for proj, width in outputs.items()
               for ab, shape in (("a", (64, 4)), ("b", (4, width)))},
              adapter / "adapters.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"num_layers": 2}))
    llm = ferrum.load(checkpoint, backend="cpu")
    llm.load_adapter("x", adapter)
    expected = llm.generate("hello", max_tokens=12, ignore_eos=True, lora="x")
    assert expected != llm.generate("hello", max_tokens=12, ignore_eos=True)  # the adapter changes the reply
    for flag in ("--adapter", "--adapter-path"):
        assert main(["generate", "--model", str(checkpoint), "--backend", "cpu", "--max-tokens", "12", "--ignore-eos",
                     "--no-chat", flag, str(adapter), "hello"]) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_serve_takes_the_model_as_generate_does_too(checkpoint, monkeypatch, tmp_path):
    """``ferrum serve --model PATH`` (as generate and chat take it, and vLLM's serve) names the model served;
    two different models named are refused."""
    import ferrum.serve

    served = []
    monkeypatch.setattr(ferrum.serve, "serve", lambda options, progress=None: served.append(options.model))
    assert main(["serve", "--model", str(checkpoint)]) == 0
    assert main(["serve", str(checkpoint), "--model", str(checkpoint)]) == 0
    assert served == [str(checkpoint)] * 2
    assert main(["serve", str(checkpoint), "--model", str(tmp_path)]) == 2
