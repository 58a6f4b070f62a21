"""``ferrum`` command line: list backends, generate text, chat, bench, quantize, serve."""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from ferrum import backends
from ferrum.errors import ContextLengthExceededError, FerrumError, InvalidRequestError
from ferrum.recurrent.snapshots import DEFAULT_BUDGET


_unended_progress_line = False  # a progress line on stderr waits for its end (an error must start a line)


def _progress_printer(label: str):
    """A load-progress callback drawing one updating line on stderr."""
    started = time.perf_counter()

    def show(done: int, total: int, name: str) -> None:
        global _unended_progress_line
        if not sys.stderr.isatty() and done not in (1, total):
            return
        width = 30
        filled = width * done // max(total, 1)
        elapsed = time.perf_counter() - started
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:5.1f}s")
        if done == total:
            sys.stderr.write("\n")
        _unended_progress_line = done != total
        sys.stderr.flush()

    return show


def _error_line(text: str) -> None:
    """``ferrum: error: ...`` on a line of its own, after a load's progress line it cut short."""
    global _unended_progress_line
    if _unended_progress_line:
        sys.stderr.write("\n")
        _unended_progress_line = False
    print(f"ferrum: error: {text}", file=sys.stderr)


def cmd_backends(args: argparse.Namespace) -> int:
    from ferrum.capabilities import ExecutorCapabilities

    if args.verbose and args.no_load:
        raise InvalidRequestError("--verbose lists each backend's ops, which needs loading it; drop --no-load")
    rows = [("backend", "available", "device", "order", "notes")]
    flags: list[str] = []
    for rank, entry in enumerate(backends.available(), start=1):
        p = entry.probe
        rows.append((entry.name, "yes" if p.available else "no", p.device or "-", str(rank), p.reason or ""))
        if p.available and not args.no_load:
            try:
                backend = backends.load_backend(entry.name)
                caps = ExecutorCapabilities.from_backend(backend)
            except FerrumError as exc:
                flags.append(f"  {entry.name}: failed to load: {exc}")
                continue
            flags.append(
                f"  {entry.name}: device={caps.devices[0]} dtypes={','.join(caps.dtypes)} "
                f"paged_attention={caps.paged_attention} native_unified_batch={caps.native_unified_batch} "
                f"sliding_window={caps.sliding_window} device_sampling={caps.device_sampling} "
                f"async_stepping={caps.async_stepping} "
                f"attention={'+'.join(caps.attention_mechanisms)} quantized={caps.quantization_summary()}"
            )
            if backend.info.note:
                flags.append(f"    note: {backend.info.note}")
            if args.verbose:
                flags.extend(_op_sources(backend))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if flags:
        print("\ncapabilities:")
        print("\n".join(flags))
    return 0


def _op_sources(backend: backends.Backend) -> list[str]:
    """One line per hook: whether the plugin implements it or the core's reference composition runs, and the
    spec's arguments a native implementation does not take (the features, such as ``moe_route``'s ``routing``,
    that the core handles for it or refuses)."""
    from ferrum import hookspec

    declared = backend.info.api_version if backend.info.api_version is not None else "undeclared"
    lines = [f"    plugin API {declared} (this Ferrum speaks {hookspec.API_VERSION}); ops:"]
    for op in hookspec.REQUIRED_OPS + hookspec.OPTIONAL_OPS:
        source = "core fallback"
        if op in backend.ops.native:
            spec_args = inspect.signature(getattr(hookspec, op)).parameters
            missing = [arg for arg in spec_args if not backend.ops.accepts(op, arg)]
            source = f"native, without {', '.join(missing)}" if missing else "native"
        lines.append(f"      {op:<26} {source}")
    return lines


def _json_schema_arg(text: str) -> dict:
    """``--json-schema``: a JSON object inline, or ``@path`` to a file holding one."""
    import json

    try:
        source = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
        schema = json.loads(source)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a JSON schema ({exc})") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError("a JSON schema is a JSON object")
    return schema


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line, checked before the slow load."""
    sampling = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos, json_schema=getattr(args, "json_schema", None),
    )
    import ferrum

    ferrum.SamplingParams(**sampling)
    return sampling


def _speculative(args: argparse.Namespace) -> Any:
    """``--speculative`` / ``--draft-model`` / ``--num-speculative-tokens`` as ``ferrum.load`` takes them, checked
    before the slow load; None when speculative decoding is off."""
    from ferrum.spec import SpeculativeConfig, resolve_speculative

    if args.speculative is None and args.draft_model is None:
        if args.num_speculative_tokens is not None:
            raise InvalidRequestError("--num-speculative-tokens needs --speculative lookup, or --draft-model PATH")
        return None
    if args.speculative == "draft" and args.draft_model is None:
        raise InvalidRequestError("--speculative draft needs --draft-model PATH (a small model with the same "
                                  "tokenizer); or use --speculative lookup, which needs none")
    if args.speculative == "lookup" and args.draft_model is not None:
        raise InvalidRequestError("--draft-model drafts with --speculative draft, not lookup; leave one of them out")
    method = args.speculative or "draft"
    knobs = {} if args.num_speculative_tokens is None else {"num_speculative_tokens": args.num_speculative_tokens}
    with_draft_model = args.draft_model is not None
    return resolve_speculative(SpeculativeConfig(method=method, **knobs), None, with_draft_model=with_draft_model)


def _load(args: argparse.Namespace) -> Any:
    """``--model`` (default: the embedded model) loaded with the command's options, announced on stderr; with
    ``--adapter``, the adapter every prompt runs with is loaded as ``"adapter"``."""
    import ferrum

    speculative = _speculative(args)
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise InvalidRequestError(f"--adapter {args.adapter} is not a folder; give the adapter's folder (its "
                                  "adapter_config.json and weights, as PEFT or mlx-lm save them)")
    model_path = args.model
    if model_path is None:
        from ferrum.default_model import default_model_path

        model_path = default_model_path(progress=_progress_printer("preparing default model"))
    llm = ferrum.load(
        model_path,
        backend=args.backend,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        progress=_progress_printer("loading weights"),
        speculative=speculative,
        draft_model=args.draft_model,
    )
    if llm.tokenizer is None:
        raise InvalidRequestError(f"{llm.path} has no tokenizer (tokenizer.json, tokenizer.model, tokenizer.jsonl or "
                                  "tiktoken ranks), and the command line reads and writes text; "
                                  "add the model's tokenizer.json (and tokenizer_config.json) to the folder")
    if args.chat_template is not None:
        llm.use_chat_template(args.chat_template)
    if args.adapter is not None:
        llm.load_adapter(_ADAPTER, args.adapter)
    info = llm.model.backend.info
    print(f"[ferrum] backend={llm.model.backend.name} device={info.device} dtype={llm.model.dtype}", file=sys.stderr)
    return llm


_ADAPTER = "adapter"


def _lora(args: argparse.Namespace) -> str | None:
    """The loaded ``--adapter``'s name, which every prompt runs with (None: the base model)."""
    return None if args.adapter is None else _ADAPTER


def _chat_template_arg(text: str) -> str:
    """``--chat-template``: the template itself, or a file's Jinja text (as vLLM takes either)."""
    if "{{" in text or "{%" in text:  # before any file lookup: a template is no path (and too long a name for one)
        return text
    try:
        return Path(text).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a file nor a Jinja template")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc}")


def _harmony(llm: Any, chat: bool) -> Any:
    """gpt-oss: a chat reply's messages are read by their markers (which it decodes with: see SamplingParams)."""
    from ferrum.serve.harmony import HarmonyThinking

    return HarmonyThinking() if chat and llm.tokenizer is not None and llm.tokenizer.writes_harmony else None


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt == "-" and sys.stdin is None:
        raise InvalidRequestError("the prompt is - but standard input is closed; pass the prompt as an argument")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt  # read before the slow load fails late
    sampling = _sampling(args)
    llm = _load(args)
    # as mlx-lm's and llama.cpp's command lines: through the chat template where the model has one
    has_template = llm.tokenizer.chat_template is not None
    chat = has_template if args.chat is None else args.chat
    params = llm.sampling_params(**sampling)
    final, _ = _write_reply(llm.stream_outputs(prompt, params, chat=chat, lora=_lora(args)), _harmony(llm, chat))
    m = final.metrics
    decode_rate = f", {1 / m.tpot:.1f} tok/s decode" if m.tpot else ""
    drafts = (f"; {m.num_accepted_tokens} of {m.num_drafted_tokens} drafted tokens accepted"
              if llm.engine.config.speculative is not None else "")
    print(
        f"[ferrum] {m.num_generated_tokens} tokens ({final.finish_reason.value}); "
        f"time to first token {m.ttft * 1e3:.0f} ms{decode_rate}{drafts}",
        file=sys.stderr,
    )
    return 0


_CHAT_HELP = "/reset forgets the conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply"


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation at the terminal: each line is a user turn, answered as it streams, the history kept (and
    its KV reused by the prefix cache). Lines come from standard input, so a script can pipe a conversation."""
    sampling = _sampling(args)
    llm = _load(args)
    if llm.tokenizer.chat_template is None:
        raise InvalidRequestError("this model has no chat template, so it cannot hold a conversation; give one with "
                                  "--chat-template FILE, or use `ferrum generate --no-chat`")
    params = llm.sampling_params(**sampling)
    system = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"[ferrum] {_CHAT_HELP}", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(f"\n[ferrum] {_CHAT_HELP}", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text in ("/reset", "/help"):
            if text == "/reset":
                history.clear()
            print(f"[ferrum] {'conversation forgotten' if text == '/reset' else _CHAT_HELP}", file=sys.stderr)
            continue
        turn = [*history, {"role": "user", "content": text}]
        try:
            replies = llm.stream_outputs(system + turn, params, chat=True, lora=_lora(args))
            final, answer = _write_reply(replies, _harmony(llm, True))
        except KeyboardInterrupt:
            print("\n[ferrum] reply stopped; that turn is not kept", file=sys.stderr)
            continue
        except ContextLengthExceededError as exc:  # the conversation outgrew the context: the session goes on
            print(f"ferrum: error: {exc}" + ("; /reset starts over" if history else ""), file=sys.stderr)
            continue
        except FerrumError as exc:  # e.g. text that is not valid Unicode: that turn is refused, the session goes on
            print(f"ferrum: error: {exc}", file=sys.stderr)
            continue
        if final.finish_reason.value == "length":
            print(f"[ferrum] the reply reached --max-tokens ({params.max_tokens}) or the context", file=sys.stderr)
        history = [*turn, {"role": "assistant", "content": answer}]
    return 0


def _write_reply(outputs: Iterable[Any], harmony: Any = None) -> tuple[Any, str]:
    """Print a reply as it streams; its last output and its answer. A harmony reply (gpt-oss) prints its thinking
    to stderr and its answer to stdout (``ferrum.serve.harmony``), as a server returns them apart."""
    final, answer = None, ""
    for final in outputs:
        if harmony is None:
            sys.stdout.write(final.new_text)
            answer = final.text or ""
        else:
            thought, whole = harmony.delta(0, final.text or "", final.finished)
            sys.stderr.write(thought)
            sys.stderr.flush()
            sys.stdout.write(whole[len(answer):])
            answer = whole
        sys.stdout.flush()
    sys.stdout.write("\n")
    return final, answer


def cmd_bench(args: argparse.Namespace) -> int:
    from ferrum.bench import BenchOptions, format_report, run_bench, write_json

    options = BenchOptions(
        workload=args.workload, backend=args.backend, model=args.model, preset=args.preset, dtype=args.dtype,
        peer=args.peer, repeat=args.repeat, prompt_len=args.prompt_len, gen_len=args.gen_len,
        concurrency=args.concurrency, profile=args.profile, quantize=args.quantize, group_size=args.group_size,
        speculative=args.speculative, draft_model=args.draft_model,
    )
    if args.json and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
        raise InvalidRequestError(f"--json {args.json}: not a file in an existing folder; the figures go there")
    report = run_bench(options, progress=_progress_printer,
                       log=lambda line: print(f"[ferrum bench] {line}", file=sys.stderr))
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ferrum.config import ModelConfig
    from ferrum.model import weight_shapes
    from ferrum.quant.convert import quantize_checkpoint

    started = time.perf_counter()
    from ferrum.sources import resolve_model

    dst = quantize_checkpoint(
        resolve_model(args.src), args.dst, bits=args.bits, group_size=args.group_size, force=args.force,
        progress=_progress_printer(f"quantizing to {args.bits}-bit, group size {args.group_size}"),
    )
    files = sorted(dst.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    params = sum(math.prod(shape) for shape in weight_shapes(ModelConfig.from_file(dst)).values())
    print(
        f"wrote {dst}: {size / 2**20:.1f} MiB in {len(files)} file(s), {8 * size / params:.2f} bits per weight "
        f"over {params:,} parameters, {time.perf_counter() - started:.1f}s"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ferrum.serve import ServeOptions, serve
    except ImportError as exc:
        raise FerrumError(f"ferrum serve needs the serve extra ({exc.name} is missing): pip install 'ferrum[serve]'")

    if args.max_queue < 0:
        raise InvalidRequestError(f"--max-queue must be >= 0, got {args.max_queue}")
    if any(not name.strip() for name in args.served_model_name or ()):
        raise InvalidRequestError("--served-model-name must not be empty; clients send it as 'model'")
    speculative = _speculative(args)
    if args.model is not None and args.model_option is not None and args.model != args.model_option:
        raise InvalidRequestError(f"two models were named: {args.model!r} and --model {args.model_option!r}; "
                                  "name one")
    serve(
        ServeOptions(
            model=args.model or args.model_option, backend=args.backend, dtype=args.dtype, host=args.host,
            port=args.port,
            served_model_names=tuple(args.served_model_name or ()), max_num_seqs=args.max_num_seqs,
            max_queue=args.max_queue, max_seq_len=args.max_seq_len, num_kv_blocks=args.num_kv_blocks,
            api_key=args.api_key or os.environ.get("FERRUM_API_KEY"), shutdown_timeout=args.shutdown_timeout,
            adapters=tuple(_name_and_path(spec) for spec in args.lora or ()),
            log_level=args.log_level, reasoning_parser=args.reasoning_parser, chat_template=args.chat_template,
            speculative=speculative, draft_model=args.draft_model,
            prefix_state_bytes=args.prefix_state_cache_mb << 20,
        ),
        progress=_progress_printer("loading"),
    )
    return 0


def _name_and_path(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise InvalidRequestError(f"--lora takes NAME=PATH, got {spec!r}")
    return name, path


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line, like every other failure (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ferrum", description="Run decoder-only LLMs on pluggable backends.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="list backend plugins, whether they run here, and their capabilities")
    p.add_argument("--no-load", action="store_true", help="only probe; do not load backends to show capabilities")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also list, per op, whether the plugin implements it natively or runs the core's fallback")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", help="the prompt text; - reads it from standard input")
    _add_generation_options(p, max_tokens=128)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", dest="json_schema", action="store_const", const=True,
                       help="constrain the output to a JSON object")
    shape.add_argument("--json-schema", dest="json_schema", type=_json_schema_arg, metavar="SCHEMA",
                       help="constrain the output to a JSON schema (inline JSON, or @FILE)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template (the default where the model has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt as raw text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="hold a conversation at the terminal (through the model's chat template)")
    _add_generation_options(p, max_tokens=1024)
    p.add_argument("--system", help="a system message that opens the conversation")
    p.set_defaults(func=cmd_chat)

    from ferrum.bench.presets import PRESETS
    from ferrum.bench.workloads import WORKLOADS

    p = sub.add_parser("bench", help="time a workload on ferrum and on a peer (mlx-lm / transformers / llama.cpp), "
                                     "same weights")
    p.add_argument("--workload", default="decode-1", choices=sorted(WORKLOADS), help="what to time (default decode-1)")
    p.add_argument("--backend", help="backend name; default: best available")
    p.add_argument("--model", help="checkpoint folder, .gguf file or Hugging Face repo id "
                                   "(default: a random-weight --preset)")
    p.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS),
                   help="shape of the random checkpoint (default qwen2-0.5b)")
    p.add_argument("--quantize", type=int, choices=(2, 3, 4, 5, 6, 8),
                   help="bench a quantized copy (mlx-community layout, cached) of the model at these bits")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128), help="with --quantize")
    p.add_argument("--dtype", help="compute dtype for both sides")
    p.add_argument("--peer", default="auto",
                   help="auto (llama.cpp for a .gguf, mlx-lm for mlx and quantized models, else transformers), "
                        "llama.cpp, mlx-lm, transformers, none")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed rounds; Ferrum and the peer alternate, the median ratio of the pairs is reported")
    p.add_argument("--prompt-len", type=int, help="override the workload's (longest) prompt length")
    p.add_argument("--gen-len", type=int, help="override the tokens generated per request")
    p.add_argument("--concurrency", type=int, help="override the number of requests")
    p.add_argument("--profile", action="store_true", help="also break a decode step down by where its time goes")
    p.add_argument("--speculative", choices=("lookup", "draft"),
                   help="decode repeat-the-text and free-text prompts with and without speculative decoding")
    p.add_argument("--draft-model", help="with --speculative draft: the draft checkpoint "
                                         "(default: a truncated copy of the model)")
    p.add_argument("--json", help="write the figures to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quantize",
                       help="write a float (or FP8) checkpoint as an mlx-community quantized one (mlx-lm loads it)")
    p.add_argument("src", help="float or FP8 Hugging Face checkpoint folder (safetensors) or repo id")
    p.add_argument("dst", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight: 2, 3, 4, 5, 6 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="weights per scale and bias: 32, 64 or 128 (default 64)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists and is not empty")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="?", help="checkpoint folder, .gguf file or Hugging Face repo id "
                                            "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model", dest="model_option", metavar="MODEL",
                   help="the same, as generate and chat take it (vLLM's serve takes both)")
    p.add_argument("--backend", help="backend name (see `ferrum backends`); default: best available")
    p.add_argument("--dtype", help="compute dtype, e.g. float32, bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on, 0-65535 (default 8000)")
    p.add_argument("--served-model-name", action="append",
                   help="name clients use in 'model' (repeatable; default: the MODEL argument, or "
                        "SmolLM2-135M-Instruct for the embedded model)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoding at once (default 64)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond --max-num-seqs before new ones get 429 (default 256)")
    p.add_argument("--max-seq-len", type=int, help="cap the context length (KV memory)")
    p.add_argument("--num-kv-blocks", type=int, help="KV cache size in blocks of 16 tokens")
    p.add_argument("--prefix-state-cache-mb", type=_mebibytes, default=DEFAULT_BUDGET >> 20, metavar="MB",
                   help="hybrid models (Qwen3.5, Qwen3-Next, Granite 4.0-H): memory for the recurrent states their "
                        f"prefix cache keeps; 0 turns their prefix caching off (default {DEFAULT_BUDGET >> 20})")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
                                     "(or set FERRUM_API_KEY)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="load a LoRA adapter (PEFT or mlx-lm folder) that clients select with model=NAME (repeatable)")
    p.add_argument("--shutdown-timeout", type=_grace_seconds, default=10.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM before they are aborted")
    p.add_argument("--reasoning-parser", metavar="NAME",
                   help="return a reasoning model's <think>...</think> apart from its answer, as reasoning_content: "
                        "deepseek_r1 or qwen3 (vLLM's names; both read the same tags); gpt-oss's harmony replies "
                        "are always read apart (openai_gptoss is accepted)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    _add_chat_template_option(p)
    _add_speculative_options(p)
    p.set_defaults(func=cmd_serve)
    for command in sub.choices.values():  # where the error messages' hint makes people put it, too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks instead of one-line errors")
    return parser


def _add_generation_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """The model and sampling options ``generate`` and ``chat`` share."""
    p.add_argument("--model", help="checkpoint folder, .gguf file or Hugging Face repo id "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--backend", help="backend name (see `ferrum backends`); default: best available")
    p.add_argument("--dtype", help="compute dtype, e.g. float32, bfloat16")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"per reply (default {max_tokens})")
    p.add_argument("--max-seq-len", type=int, default=None, help="cap the context length (KV memory)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--adapter", "--adapter-path", metavar="PATH",
                   help="a LoRA adapter (PEFT or mlx-lm folder) every prompt runs with")
    _add_chat_template_option(p)
    _add_speculative_options(p)


def _add_speculative_options(p: argparse.ArgumentParser) -> None:
    """Speculative decoding, as ``ferrum.load`` takes it (``generate``, ``chat``, ``serve``)."""
    p.add_argument("--speculative", choices=("lookup", "draft"),
                   help="speculative decoding: lookup drafts from the prompt's own n-grams (no second model); draft "
                        "runs --draft-model")
    p.add_argument("--draft-model", metavar="PATH",
                   help="a small model with the same tokenizer that drafts tokens (implies --speculative draft)")
    p.add_argument("--num-speculative-tokens", type=int, metavar="N",
                   help="tokens drafted per step (default 4)")


def _add_chat_template_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", type=_chat_template_arg, metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template (a file, or the text) to use instead of the model's")


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return int(text)


def _mebibytes(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"a whole number of MiB (0 or more), got {text!r}")
    return int(text)


def _grace_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= 86400:  # NaN fails too; far past a day, threading.Timer overflows
        raise argparse.ArgumentTypeError(f"must be 0 to 86400 seconds, got {text!r}")
    return seconds


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Ferrum's own warnings as the CLI's other messages read; others keep Python's form (--debug: all)."""
    if category is UserWarning and filename.startswith(_PACKAGE_DIR):
        return f"ferrum: warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_python_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = _python_warning


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except FerrumError as exc:
        if args.debug:
            raise
        _error_line(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`ferrum generate ... | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's flush
        return 141
    except Exception as exc:  # a bug or an environment problem: one line unless --debug
        if args.debug:
            raise
        _error_line(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
