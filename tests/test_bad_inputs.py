"""Table-driven bad inputs: one row per malformed checkpoint, tokenizer, load argument, sampling option or
CLI call; each must raise a ``ferrum.errors`` exception of the stated type whose message holds the stated
words (naming the file or field), quickly, with nothing left half-done."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import save_file

import ferrum
from ferrum.errors import ChatTemplateError, CheckpointError, ConfigError, FerrumError, InvalidRequestError
from support import runnable_backends, write_text_checkpoint

WEIGHTS = "model.safetensors"
BACKENDS = runnable_backends()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_text_checkpoint(tmp_path_factory.mktemp("bad") / "tiny")


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(pristine, folder)
    return folder


def edit_config(*dropped: str, **changes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        for key in dropped:
            del config[key]
        (folder / "config.json").write_text(json.dumps(config))

    return apply


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return apply


def truncate_weights(folder: Path) -> None:
    path = folder / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def sharded(weight_map: object) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / WEIGHTS).rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return apply


def index_to(target: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS), "numpy") as f:
            names = list(f.keys())
        sharded({name: target for name in names})(folder)

    return apply


def index_to_fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe.safetensors")
    index_to("pipe.safetensors")(folder)


def fifo(name: str) -> Callable[[Path], None]:
    """A named pipe in place of the checkpoint's file ``name``: reading it would block for ever."""
    def apply(folder: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)

    return apply


def retype_tensor(dtype) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / WEIGHTS))
        name = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
        if dtype == "nan":
            tensors[name] = tensors[name].copy()
            tensors[name][0, 0] = np.nan
        else:
            tensors[name] = tensors[name].astype(dtype)
        save_file(tensors, str(folder / WEIGHTS))

    return apply


def float8_tensor(folder: Path) -> None:
    """Store one tensor as F8_E4M3 (as FP8 checkpoints do), writing the file by hand: numpy has no float8."""
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / WEIGHTS))
    name = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
    header, blobs, offset = {}, [], 0
    for key, array in tensors.items():
        data = np.zeros(array.size, np.uint8).tobytes() if key == name else array.tobytes()
        dtype = "F8_E4M3" if key == name else {"float32": "F32", "float16": "F16"}[str(array.dtype)]
        header[key] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def tokenizer_config(**changes: Any) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))

    return apply


def chat_template(template: str) -> Callable[[Path], None]:
    return tokenizer_config(chat_template=template)


def stray_copy_of_a_tensor(folder: Path) -> None:
    """The model split in two files without an index, one tensor in both (a stale export left beside them)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    names, both = sorted(tensors), "model.layers.0.input_layernorm.weight"
    for part, chosen in (("a-model", names[: len(names) // 2]), ("shard-2", names[len(names) // 2:])):
        save_file({n: tensors[n] for n in [*chosen, both]}, str(folder / f"{part}.safetensors"))


def stray_copy_the_index_leaves_out(folder: Path) -> None:
    """:func:`stray_copy_of_a_tensor` with an index naming every tensor but the one in both files."""
    stray_copy_of_a_tensor(folder)
    from safetensors import safe_open

    weight_map = {}
    for part in ("a-model", "shard-2"):
        with safe_open(str(folder / f"{part}.safetensors"), "np") as handle:
            weight_map.update({n: f"{part}.safetensors" for n in handle.keys()})
    del weight_map["model.layers.0.input_layernorm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


LOAD_ROWS = [
    # (id, corrupt the folder, exception, words the message must hold)
    ("config-not-utf8", write("config.json", b"\xff\xfe{}"), ConfigError, ["config.json", "UTF-8"]),
    ("config-deeply-nested", write("config.json", b"[" * 200_000), ConfigError, ["config.json", "JSON"]),
    ("config-a-list", write("config.json", b"[1, 2]"), ConfigError, ["config.json", "object"]),
    ("config-empty", write("config.json", b""), ConfigError, ["config.json"]),
    ("config-hidden-as-string", edit_config(hidden_size="64"), ConfigError, ["hidden_size"]),
    ("config-negative-heads", edit_config(num_attention_heads=-4), ConfigError, ["num_attention_heads"]),
    ("config-model-type-unknown", edit_config(model_type="gpt9"), FerrumError, ["gpt9"]),
    ("config-more-layers-than-weights", edit_config(num_hidden_layers=40), CheckpointError,
     ["num_hidden_layers=40", "2 layers"]),
    ("config-absurd-layers", edit_config(num_hidden_layers=10**9), FerrumError, ["num_hidden_layers"]),
    ("config-hidden-size-mismatch", edit_config(hidden_size=128), FerrumError, ["shape"]),
    ("weights-empty", write(WEIGHTS, b""), CheckpointError, [WEIGHTS, "truncated"]),
    ("weights-truncated", truncate_weights, CheckpointError, [WEIGHTS]),
    ("weights-garbage", write(WEIGHTS, os.urandom(4096)), CheckpointError, [WEIGHTS, "safetensors"]),
    ("weights-pytorch-pickle-only", lambda f: (f / WEIGHTS).rename(f / "pytorch_model.bin"), CheckpointError,
     ["no *.safetensors", "pytorch_model.bin", "pickle", "save_pretrained"]),
    ("index-outside-folder", index_to("../elsewhere.safetensors"), CheckpointError, ["outside the checkpoint"]),
    ("index-absolute-path", index_to("/etc/passwd"), CheckpointError, ["outside the checkpoint"]),
    ("index-missing-shard", index_to("nope.safetensors"), CheckpointError, ["nope.safetensors", "not in the folder"]),
    ("index-fifo", index_to_fifo, CheckpointError, ["pipe.safetensors", "not a regular file"]),
    *((f"fifo-{name}", fifo(name), error, [name, "not a regular file"]) for name, error in (
        ("model.safetensors.index.json", CheckpointError), ("tokenizer.json", ConfigError),
        ("tokenizer_config.json", ConfigError), ("generation_config.json", ConfigError),
        ("chat_template.jinja", ConfigError))),
    ("index-not-json", write("model.safetensors.index.json", b"{oops"), CheckpointError, ["index.json", "malformed"]),
    ("index-map-not-object", sharded(["a", "b"]), CheckpointError, ["weight_map"]),
    ("weights-int32", retype_tensor(np.int32), CheckpointError, ["up_proj", "int32", "float tensor is expected"]),
    ("weights-bool", retype_tensor(np.bool_), CheckpointError, ["up_proj", "BOOL"]),
    ("weights-float8", float8_tensor, CheckpointError, ["up_proj", "F8_E4M3"]),
    ("weights-nan", retype_tensor("nan"), CheckpointError, ["up_proj", "NaN"]),
    ("rope-parameters-not-an-object", edit_config(rope_parameters=[1]), ConfigError, ["rope_parameters", "object"]),
    ("rope-scaling-disagrees-with-rope-parameters", edit_config(rope_scaling={"rope_type": "linear", "factor": 2.0}),
     ConfigError, ["rope_scaling", "rope_parameters", "disagree"]),
    ("tokenizer-garbage", write("tokenizer.json", b"{not a tokenizer"), ConfigError, ["tokenizer.json"]),
    ("tokenizer-config-not-json", write("tokenizer_config.json", b"\x00\x01"), ConfigError,
     ["tokenizer_config.json"]),
    ("generation-config-bad-eos", write("generation_config.json", b'{"eos_token_id": "x"}'), ConfigError,
     ["generation_config.json", "eos_token_id"]),
    ("chat-template-not-a-string", chat_template(42), ConfigError, ["chat_template"]),  # type: ignore[arg-type]
    *((f"tokenizer-config-{name}-{value!r}", tokenizer_config(**{name: value}), ConfigError,
       ["tokenizer_config.json", name, "must be the token's text"])
      for name, value in (("eos_token", 5), ("eos_token", {"content": 5}), ("bos_token", ["<s>"]),
                          ("pad_token", 1.5))),
    *((f"config-model-type-{value!r}", edit_config(model_type=value), ConfigError, ["model_type must be a string"])
      for value in (["llama"], {"name": "llama"}, 7)),
    ("config-model-type-missing", edit_config("model_type"), ConfigError, ["config.json", "no model_type"]),
    ("config-eos-a-string", edit_config(eos_token_id="1"), ConfigError, ["config.json", "eos_token_id"]),
    ("weights-a-tensor-in-two-files", stray_copy_of_a_tensor, CheckpointError,
     ["model.layers.0.input_layernorm.weight", "a-model.safetensors", "shard-2.safetensors", "index"]),
    ("weights-a-tensor-in-two-files-the-index-leaves-out", stray_copy_the_index_leaves_out, CheckpointError,
     ["model.layers.0.input_layernorm.weight", "model.safetensors.index.json does not name it"]),
]


@pytest.mark.parametrize("corrupt, error, words", [r[1:] for r in LOAD_ROWS], ids=[r[0] for r in LOAD_ROWS])
def test_malformed_checkpoints(ckpt, corrupt, error, words):
    corrupt(ckpt)
    started = time.perf_counter()
    with pytest.raises(error) as caught:
        ferrum.load(ckpt, backend="cpu")
    assert time.perf_counter() - started < 10
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def add_tensors(folder: Path, extra: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / WEIGHTS))
    save_file({**tensors, **extra}, str(folder / WEIGHTS))


def test_rope_scaling_that_repeats_rope_parameters_loads(ckpt, pristine_llm):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "default"  # as transformers 5 saves it
    edit_config(rope_scaling={"type": "default"})(ckpt)
    assert ferrum.load(ckpt, backend="cpu").generate([5, 6, 7], max_tokens=4) == pristine_llm.generate(
        [5, 6, 7], max_tokens=4)


def test_tensors_the_model_does_not_use_are_named(ckpt):
    """A misnamed model_type (Qwen 3's q/k norms under "qwen2") or biases config.json does not turn on
    would load and run wrong without a word."""
    extra = {f"model.layers.{i}.self_attn.q_norm.weight": np.ones(16, np.float32) for i in range(2)}
    # a vision tower beside the text model (Qwen2-VL's release layout) is not the text model's: not named
    towers = {"visual.blocks.0.attn.qkv.weight": np.ones((4, 4), np.float32),
              "model.vision_tower.patch_embed.weight": np.ones(4, np.float32)}
    add_tensors(ckpt, {**extra, **towers, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    with pytest.warns(UserWarning, match="3 tensor") as caught:
        ferrum.load(ckpt, backend="cpu")
    message = str(caught[0].message)
    assert "model.layers.0.self_attn.o_proj.bias" in message and "model.layers.1.self_attn.q_norm.weight" in message
    assert "visual" not in message and "vision_tower" not in message


def test_the_cli_says_so_in_one_line(ckpt, tmp_path):
    add_tensors(ckpt, {"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    done = subprocess.run([sys.executable, "-m", "ferrum.cli", "generate", "hi", "--model", str(ckpt), "--backend",
                           "cpu", "--max-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "o_proj.bias" in line]
    assert len(warned) == 1 and warned[0].startswith("ferrum: warning:"), done.stderr


def test_tensors_left_by_design_are_not_reported(ckpt, recwarn):
    """Rotary inverse frequencies are recomputed; a tied model's LM head copy is its embedding."""
    add_tensors(ckpt, {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    config = json.loads((ckpt / "config.json").read_text())
    add_tensors(ckpt, {"lm_head.weight": np.zeros((config["vocab_size"], 64), np.float32),
                       "lm_head.scales": np.ones((config["vocab_size"], 1), np.float32)})
    edit_config(tie_word_embeddings=True)(ckpt)
    ferrum.load(ckpt, backend="cpu")
    assert not [w for w in recwarn if "not used" in str(w.message)]


def test_a_tied_model_whose_file_holds_another_head_says_which_it_runs(ckpt):
    """mlx-lm ties, transformers 5 runs the stored head: a copy equal to the embedding passes silently, a
    different one is named (it was silently left out)."""
    from safetensors.numpy import load_file

    embed = load_file(str(ckpt / WEIGHTS))["model.embed_tokens.weight"]
    edit_config(tie_word_embeddings=True)(ckpt)
    add_tensors(ckpt, {"lm_head.weight": embed.copy()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ferrum.load(ckpt, backend="cpu")
    add_tensors(ckpt, {"lm_head.weight": embed[::-1].copy()})
    with pytest.warns(UserWarning, match="ties the LM head to the embedding.*the embedding is used"):
        ferrum.load(ckpt, backend="cpu")


CALL_ROWS = [
    ("template-raises", chat_template("{{ raise_exception('no system messages') }}"),
     lambda llm: llm.generate([{"role": "user", "content": "hi"}], max_tokens=2),
     InvalidRequestError, ["chat template", "no system messages"]),
    ("template-syntax-error", chat_template("{% for %}"),
     lambda llm: llm.generate([{"role": "user", "content": "hi"}], max_tokens=2),
     ConfigError, ["chat template", "compile"]),
    ("template-type-error", chat_template("{{ messages + 1 }}"),
     lambda llm: llm.generate([{"role": "user", "content": "hi"}], max_tokens=2),
     InvalidRequestError, ["chat template"]),
    *((f"template-empty-{template!r}", chat_template(template),  # none, as transformers reads an empty one
       lambda llm: llm.generate([{"role": "user", "content": "hi"}], max_tokens=2),
       ConfigError, ["has no chat template"]) for template in ("", " \n")),
    # templates building values too large for memory (each grew past 20 GB before the kernel killed the process)
    *((f"template-builds-{name}", chat_template(template),
       lambda llm: llm.generate([{"role": "user", "content": "hi"}], max_tokens=2),
       ChatTemplateError, ["chat template", "past the limit"]) for name, template in [
        ("a-product", "{{ 'x' * 10**9 }}"),
        ("by-doubling", "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s|length }}"),
        ("a-sum", "{% set ns = namespace(s=['x']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                  "{% endfor %}{{ ns.s|length }}"),
        ("through-a-filter", "{{ 'x'|center(10**9) }}"),
        ("through-a-method", "{{ 'x'.ljust(10**9) }}"),
        ("in-a-macro", "{% macro grow(s, n) %}{{ grow(s ~ s, n - 1) if n else s|length }}{% endmacro %}"
                       "{{ grow('x', 40) }}"),
        ("as-output", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"),
        ("an-integer-power", "{% set x = (2 ** 60000000) ** 60000000 %}{{ x > 0 }}"),
        ("an-integer-product", "{% set ns = namespace(x=2 ** 500000) %}{% for i in range(40) %}"
                               "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 0 }}"),
        ("by-joining", "{% set s = 'x' * 60000000 %}{{ ([s] * 1000) | join }}"),
        ("by-joining-with-a-separator", "{{ ('x' * 60000000).join(['a'] * 1000) }}"),
        ("a-format-width", "{{ '%1000000000d' % 1 }}"),
        ("a-format-width-argument", "{{ '%*d' % (1000000000, 1) }}"),
        ("a-json-indent", "{{ [messages, messages] | tojson(indent=1000000000) }}"),
    ]),
]


def test_templates_may_use_large_numbers_and_long_texts_within_the_limit(ckpt):
    """The sandbox's limit bounds sizes, not numbers a template formats or compares (a Unix time, a big count)."""
    chat_template("{{ '%d' | format(1700000000) }} {{ 10 ** 30 }} {{ '%5d' % 7 }} {{ ('ab' * 1000) | length }} "
                  "{{ 'x'.center(20) }}{{ messages[0]['content'] }}")(ckpt)
    llm = ferrum.load(ckpt, backend="cpu")
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == f"1700000000 {10 ** 30}     7 2000 {'x'.center(20)}hi"


@pytest.mark.parametrize("corrupt, call, error, words", [r[1:] for r in CALL_ROWS], ids=[r[0] for r in CALL_ROWS])
def test_bad_templates_fail_the_call_not_the_load(ckpt, corrupt, call, error, words):
    corrupt(ckpt)
    llm = ferrum.load(ckpt, backend="cpu")
    with pytest.raises(error) as caught:
        call(llm)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert llm.generate("hello", max_tokens=2)  # still usable


LOAD_ARG_ROWS = [
    ("kv-blocks-zero", dict(num_kv_blocks=0), InvalidRequestError, ["num_kv_blocks"]),
    ("kv-blocks-absurd", dict(num_kv_blocks=10**12), InvalidRequestError, ["GiB", "num_kv_blocks"]),
    ("max-seq-len-negative", dict(max_seq_len=-5), InvalidRequestError, ["max_seq_len"]),
    ("max-seq-len-fractional", dict(max_seq_len=20.5), InvalidRequestError, ["max_seq_len", "integer"]),
    ("dtype-not-a-name", dict(dtype=np.float32), InvalidRequestError, ["dtype", "'float32'"]),
    ("backend-unknown", dict(backend="quantum"), FerrumError, ["quantum"]),
    ("dtype-unknown", dict(dtype="float7"), FerrumError, ["float7"]),
]


@pytest.mark.parametrize("kwargs, error, words", [r[1:] for r in LOAD_ARG_ROWS], ids=[r[0] for r in LOAD_ARG_ROWS])
def test_bad_load_arguments(pristine, kwargs, error, words):
    kwargs = {"backend": "cpu", **kwargs}
    started = time.perf_counter()
    with pytest.raises(error) as caught:
        ferrum.load(pristine, **kwargs)
    assert time.perf_counter() - started < 10
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_a_pool_that_fits_in_ram_only_without_its_decode_mirrors_is_refused():
    """Decoding keeps contiguous copies of the KV (up to the pool's size again): a pool of 60% of RAM
    would end in swapping or the OOM killer once many sequences decode, so it fails at once."""
    from ferrum.limits import check_kv_pool, physical_memory_bytes

    ram = physical_memory_bytes()
    if ram is None:
        pytest.skip("this OS does not say how much RAM it has")
    per_block = 16 * 4096
    check_kv_pool(int(0.4 * ram) // per_block, 16, 4096, "cpu")  # 80% of RAM with its mirrors
    with pytest.raises(InvalidRequestError, match="as much again"):
        check_kv_pool(int(0.6 * ram) // per_block, 16, 4096, "cpu")


SAMPLING_ROWS = [
    ("temperature-nan", dict(temperature=float("nan")), ["temperature"]),
    ("temperature-inf", dict(temperature=float("inf")), ["temperature"]),
    ("temperature-past-float32", dict(temperature=1e39), ["temperature", "3.4e38"]),
    ("top-p-zero", dict(top_p=0.0), ["top_p"]),
    ("top-k-float", dict(top_k=2.5), ["top_k"]),
    ("max-tokens-bool", dict(max_tokens=True), ["max_tokens"]),
    ("max-tokens-zero", dict(max_tokens=0), ["max_tokens"]),
    ("seed-negative", dict(seed=-3), ["seed"]),
    ("seed-string", dict(seed="7"), ["seed"]),
    ("penalty-nan", dict(presence_penalty=float("nan")), ["presence_penalty"]),
    ("repetition-zero", dict(repetition_penalty=0.0), ["repetition_penalty"]),
    ("bias-key-string", dict(logit_bias={"five": 1.0}), ["logit_bias"]),
    ("bias-value-inf", dict(logit_bias={5: float("inf")}), ["logit_bias"]),
    ("stop-empty", dict(stop=[""]), ["stop"]),
    ("stop-not-strings", dict(stop=[3]), ["stop"]),
    ("stop-ids-string", dict(stop_token_ids="12"), ["stop_token_ids"]),
    ("stop-ids-negative", dict(stop_token_ids=[-1]), ["stop token"]),
    ("logprobs-negative", dict(logprobs=-1), ["logprobs"]),
    ("logprobs-over-the-cap", dict(logprobs=21), ["logprobs=21", "at most 20", "max_logprobs"]),
    ("logprobs-huge", dict(logprobs=10**9), ["logprobs=1000000000", "at most 20"]),
    ("ignore-eos-string", dict(ignore_eos="yes"), ["ignore_eos"]),
    ("unknown-option", dict(temprature=0.5), ["temprature"]),
]


@pytest.mark.parametrize("options, words", [r[1:] for r in SAMPLING_ROWS], ids=[r[0] for r in SAMPLING_ROWS])
def test_bad_sampling_options(pristine_llm, options, words):
    with pytest.raises(InvalidRequestError) as caught:
        pristine_llm.generate("hello", **options)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert not pristine_llm.engine.has_unfinished()


REQUEST_ROWS = [
    ("prompt-empty-ids", [], {}, ["empty"]),
    ("prompt-id-out-of-vocab", [5, 10**6], {}, ["vocabulary"]),
    ("prompt-id-negative", [5, -1], {}, ["vocabulary"]),
    ("bias-out-of-vocab", [5], {"logit_bias": {10**6: 1.0}}, ["logit_bias", "vocabulary"]),
    ("stop-id-out-of-vocab", [5], {"stop_token_ids": [10**6]}, ["stop_token_ids", "vocabulary"]),
    ("prompt-over-context", [5] * 300, {}, ["context length"]),
    # refused by its length before it is encoded (12 MB took 30 s and 1.4 GB to encode first)
    ("text-far-over-context", "hello world " * 1_000_000, {}, ["12000000 characters", "context length of 256"]),
    ("messages-missing-content", [{"role": "user"}], {}, ["content"]),
    ("prompt-none", None, {}, ["a prompt is", "NoneType"]),
    ("prompt-a-number", 5, {}, ["a prompt is", "int"]),
    ("prompt-bool-ids", [True, 5], {}, ["a prompt is"]),
    ("prompt-float-ids", [5, 6.0], {}, ["a prompt is"]),
]


@pytest.mark.parametrize("prompt, options, words", [r[1:] for r in REQUEST_ROWS], ids=[r[0] for r in REQUEST_ROWS])
def test_bad_requests(pristine_llm, prompt, options, words):
    with pytest.raises(InvalidRequestError) as caught:
        pristine_llm.run([prompt], max_tokens=3, **options)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert not pristine_llm.engine.has_unfinished()
    assert pristine_llm.model.kv.num_used_blocks == 0


def test_max_logprobs_none_allows_the_whole_vocabulary_and_no_more(pristine):
    from ferrum.engine import EngineConfig

    llm = ferrum.load(pristine, backend="cpu", engine_config=EngineConfig(max_logprobs=None))
    vocab = llm.model.config.vocab_size
    pick = llm.run([[5, 9]], max_tokens=1, logprobs=vocab)[0].logprobs[0]
    assert len(pick.top_logprobs) == vocab and len({t for t, _ in pick.top_logprobs}) == vocab
    assert abs(sum(np.exp([lp for _, lp in pick.top_logprobs])) - 1.0) < 1e-3  # the whole distribution
    with pytest.raises(InvalidRequestError, match=f"at most {vocab}$"):
        llm.run([[5, 9]], max_tokens=1, logprobs=vocab + 1)
    with pytest.raises(InvalidRequestError, match="max_logprobs"):
        EngineConfig(max_logprobs=-1)


def test_numpy_token_ids_are_a_prompt(pristine_llm):
    params = dict(max_tokens=3, ignore_eos=True)
    assert (pristine_llm.run([np.array([5, 9, 12])], **params)[0].token_ids
            == pristine_llm.run([[5, 9, 12]], **params)[0].token_ids)


@pytest.fixture(scope="module")
def pristine_llm(pristine):
    return ferrum.load(pristine, backend="cpu")


CLI_ROWS = [
    ("generate-missing-model", ["generate", "hi", "--model", "/nonexistent/folder"], ["no checkpoint folder"]),
    ("generate-bad-temperature", ["generate", "hi", "--temperature", "-1", "--model", "{ckpt}"], ["temperature"]),
    ("generate-max-tokens-zero", ["generate", "hi", "--max-tokens", "0", "--model", "{ckpt}"], ["max_tokens"]),
    ("generate-bad-backend", ["generate", "hi", "--backend", "nope", "--model", "{ckpt}"], ["nope"]),
    ("bench-zero-repeat", ["bench", "--repeat", "0", "--model", "{ckpt}", "--peer", "none"], ["repeat"]),
    ("bench-negative-concurrency", ["bench", "--concurrency", "-2", "--model", "{ckpt}", "--peer", "none"],
     ["concurrency"]),
    ("quantize-bad-bits", ["quantize", "{ckpt}", "{tmp}/out", "--bits", "7"], ["bits"]),
    ("serve-negative-queue", ["serve", "{ckpt}", "--max-queue", "-1"], ["max-queue"]),
    ("generate-max-tokens-not-a-number", ["generate", "hi", "--max-tokens", "abc"], ["--max-tokens", "abc"]),
    ("bench-unknown-workload", ["bench", "--workload", "nope"], ["nope"]),
    ("bench-speculative-prompt-len", ["bench", "--speculative", "lookup", "--prompt-len", "4", "--model", "{ckpt}",
                                      "--peer", "none"], ["--prompt-len", "--speculative"]),
    ("bench-speculative-short-context", ["bench", "--speculative", "lookup", "--gen-len", "2", "--model", "{ckpt}",
                                         "--peer", "none"], ["context length", "longer"]),
    ("no-command", [], ["command"]),
]


@pytest.mark.parametrize("argv, words", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_failures_are_one_line(pristine, tmp_path, argv, words):
    argv = [a.format(ckpt=pristine, tmp=tmp_path) for a in argv]
    env = {**os.environ, "FERRUM_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "ferrum.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("ferrum"), done.stderr  # one line, no usage dump
    assert all(word in done.stderr for word in words), done.stderr


GGUF_ROWS = [
    # (id, GGUFWriter method to replace, what it writes instead, words)
    ("block-count-string", "add_block_count", lambda w, n: w.add_string(f"{w.arch}.block_count", "one"),
     ["block_count", "non-negative integer"]),
    ("context-length-negative", "add_context_length", lambda w, n: w.add_int32(f"{w.arch}.context_length", -5),
     ["context_length", "non-negative integer"]),
    ("rope-base-string", "add_rope_freq_base", lambda w, f: w.add_string(f"{w.arch}.rope.freq_base", "lots"),
     ["rope.freq_base", "finite number"]),
    ("rope-base-nan", "add_rope_freq_base", lambda w, f: w.add_float32(f"{w.arch}.rope.freq_base", float("nan")),
     ["rope.freq_base", "finite number"]),
    ("tokens-not-strings", "add_token_list", lambda w, t: w.add_array("tokenizer.ggml.tokens", list(range(len(t)))),
     ["tokenizer.ggml.tokens", "list of strings"]),
]


@pytest.mark.parametrize("method, replacement, words", [r[1:] for r in GGUF_ROWS], ids=[r[0] for r in GGUF_ROWS])
def test_malformed_gguf_metadata_is_named_and_nothing_is_written(tmp_path, monkeypatch, method, replacement, words):
    gguf = pytest.importorskip("gguf")
    from test_gguf_import import write_tiny_gguf

    from ferrum.gguf_import import convert_gguf

    monkeypatch.setattr(gguf.GGUFWriter, method, replacement)
    write_tiny_gguf(tmp_path / "bad.gguf")
    monkeypatch.undo()
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as caught:
        convert_gguf(tmp_path / "bad.gguf", out)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert not out.exists() or not any(out.iterdir())


def test_gguf_garbage_and_truncation(tmp_path):
    pytest.importorskip("gguf")
    from test_gguf_import import write_tiny_gguf

    from ferrum.gguf_import import convert_gguf

    (tmp_path / "garbage.gguf").write_bytes(os.urandom(2048))
    write_tiny_gguf(tmp_path / "whole.gguf")
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    for name in ("garbage.gguf", "cut.gguf"):
        with pytest.raises(CheckpointError, match=name):
            convert_gguf(tmp_path / name, tmp_path / f"out-{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_fail_the_request_in_a_line_and_leave_the_others(ckpt, backend):
    """Finite weights that overflow to NaN: the request ends in an error that says so, instead of returning a
    meaningless token until max_tokens; the engine goes on (a request on the unbroken model is fine)."""
    import warnings

    from safetensors.numpy import load_file

    from ferrum.errors import RequestFailedError

    good = ferrum.load(ckpt, backend=backend).generate("hello", max_tokens=3, ignore_eos=True)
    tensors = load_file(str(ckpt / WEIGHTS))
    tensors["model.layers.0.post_attention_layernorm.weight"] = np.full_like(
        tensors["model.layers.0.post_attention_layernorm.weight"], 1e38)
    save_file(tensors, str(ckpt / WEIGHTS))
    broken = ferrum.load(ckpt, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow warnings: the error below is the signal
        for logprobs in (0, 1):
            with pytest.raises(RequestFailedError, match="logits hold NaN"):
                broken.generate("hello", max_tokens=3, logprobs=logprobs)
    assert not broken.engine.has_unfinished() and broken.model.kv.num_used_blocks == 0
    assert good


def test_a_tokenizer_larger_than_the_embedding_is_named_at_load(ckpt):
    """Text holding a token past the embedding fails at the request, blaming the prompt: the mismatch is said
    when the checkpoint loads."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    rows = ferrum.load(ckpt, backend="cpu").model.config.vocab_size
    tok = HFTokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.add_tokens([AddedToken(f"extra{i}", normalized=False) for i in range(rows + 5 - tok.get_vocab_size())])
    tok.save(str(ckpt / "tokenizer.json"))
    with pytest.warns(UserWarning, match=f"tokenizer has {rows + 5} tokens but the model's embedding has {rows} rows"):
        ferrum.load(ckpt, backend="cpu")


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_model_path_is_refused_not_read_as_the_working_directory(pristine, path, monkeypatch):
    monkeypatch.chdir(pristine)  # a checkpoint folder: Path("") would load it
    with pytest.raises(InvalidRequestError, match="the model path is empty"):
        ferrum.load(path, backend="cpu")
