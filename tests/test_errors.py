"""Bad checkpoints and bad requests get clear errors and change no state."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ferrum.errors import (
    CheckpointError,
    ConfigError,
    ContextLengthExceededError,
    FerrumError,
    InvalidRequestError,
    KVCacheExhaustedError,
    MissingTensorError,
    PositionMismatchError,
    UnknownSequenceError,
    UnsupportedFeatureError,
)
from ferrum.model import DecoderOnlyLLM, ForwardItem

from support import write_arch_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("err_ckpt")
    write_arch_checkpoint(folder, "llama")
    return folder


def copy(checkpoint, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dest)
    return dest


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_config_problems_are_named(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    edit_config(folder, hidden_size=None)
    with pytest.raises(ConfigError, match="'hidden_size'"):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu")
    edit_config(folder, hidden_size=96, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="multiple of"):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu")
    edit_config(folder, num_key_value_heads=2, model_type="rwkv")
    with pytest.raises(UnsupportedFeatureError, match="rwkv"):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid UTF-8 JSON"):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu")
    with pytest.raises(ConfigError, match="no config.json"):
        DecoderOnlyLLM.from_pretrained(tmp_path / "nowhere", backend="cpu")


def test_an_unsupported_model_type_lists_the_supported_ones_sorted():
    """The list does not follow how the family table is split into modules by kind."""
    from ferrum.arch.families import FAMILIES
    from ferrum.config import ModelConfig

    with pytest.raises(UnsupportedFeatureError, match="rwkv") as caught:
        ModelConfig.from_dict({"model_type": "rwkv"})
    listed = str(caught.value).split("Ferrum runs ", 1)[1].split(", ")
    assert listed == sorted(FAMILIES)


def test_a_model_type_in_two_kinds_tables_is_refused():
    from types import SimpleNamespace

    from ferrum.arch.families import FAMILIES, _merged

    one = SimpleNamespace(__name__="one", TABLE={"llama": FAMILIES["llama"]})
    other = SimpleNamespace(__name__="other", TABLE={"mistral": FAMILIES["mistral"], "llama": FAMILIES["mistral"]})
    assert _merged(one) == {"llama": FAMILIES["llama"]}
    with pytest.raises(FerrumError, match="'llama' is in both one and other"):
        _merged(one, other)


@pytest.mark.parametrize("model_type, key", [
    ("minimax", "layer_types"), ("minimax", "attn_type_list"), ("recurrent_gemma", "block_types"),
    ("zamba2", "layers_block_type"), ("qwen3_next", "layer_types"), ("lfm2", "layer_types"),
    ("granitemoehybrid", "layer_types"), ("gemma3_text", "layer_types"), ("lara_mini", "layer_types")])
@pytest.mark.parametrize("entry", [["linear_attention"], {"kind": "attention"}, True], ids=["list", "object", "bool"])
def test_a_layer_kind_list_of_lists_or_objects_is_refused_by_name(model_type, key, entry):
    """A list entry cannot be looked up in a table of kinds (unhashable): the check must refuse it, naming the key."""
    import transformers

    from ferrum.config import ModelConfig

    raw = transformers.AutoConfig.for_model(model_type).to_dict()
    ModelConfig.from_dict(raw)
    with pytest.raises(ConfigError, match=repr(key)):
        ModelConfig.from_dict({**raw, key: [entry] * raw["num_hidden_layers"]})


@pytest.mark.parametrize("text_config", ["gemma3_text", ["hidden_size", 64], 7, True])
def test_a_wrappers_text_config_that_is_no_object_is_refused_by_name(text_config):
    """It read as the wrapper's config written flat: the decoder's defaults (a 2304-wide Gemma 3), silently."""
    from ferrum.config import ModelConfig

    with pytest.raises(ConfigError, match="'text_config' must be an object"):
        ModelConfig.from_dict({"model_type": "gemma3", "text_config": text_config})


@pytest.mark.parametrize("value", [[], 0, {}])
def test_a_falsy_layer_kind_list_is_refused_not_read_as_absent(value):
    """Granite 4.0-H's layer_types given but empty is no list of its layers (it read as absent: all Mamba)."""
    import transformers

    from ferrum.config import ModelConfig

    raw = transformers.AutoConfig.for_model("granitemoehybrid").to_dict()
    with pytest.raises(ConfigError, match="'layer_types'"):
        ModelConfig.from_dict({**raw, "layer_types": value, "layers_block_type": None})


def test_missing_and_misshapen_tensors_are_named(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), dtype=np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj\.weight has shape \(3, 3\)"):
        DecoderOnlyLLM.from_pretrained(folder, backend="cpu")


def test_sharded_checkpoint_with_a_missing_shard(checkpoint, tmp_path):
    from support import transformers_config  # noqa: F401  (transformers is importable)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=shards[-1].name):
        DecoderOnlyLLM.from_pretrained(tmp_path, backend="cpu")


def test_bad_requests_change_nothing(checkpoint):
    model = DecoderOnlyLLM.from_pretrained(checkpoint, backend="cpu", max_seq_len=20, num_kv_blocks=8, block_size=4)
    model.prefill("ok", [1, 2, 3, 4, 5])
    reference = model.forward_verify("probe", [7, 8])
    model.release("probe")
    free = model.kv.num_free_blocks
    cases = [
        (InvalidRequestError, lambda: model.prefill("new", [])),
        (InvalidRequestError, lambda: model.prefill("new", [1, 97])),
        (InvalidRequestError, lambda: model.prefill("new", [-1])),
        (InvalidRequestError, lambda: model.prefill("ok", [1])),
        (UnknownSequenceError, lambda: model.decode("ghost", 1, 0)),
        (PositionMismatchError, lambda: model.decode("ok", 1, 4)),
        (ContextLengthExceededError, lambda: model.prefill("long", list(range(21)))),
        (InvalidRequestError, lambda: model.unified_forward([ForwardItem("ok", [1], 5), ForwardItem("ok", [2], 6)])),
        # the second item is bad, so the first must not run either
        (PositionMismatchError, lambda: model.unified_forward([ForwardItem("n2", [1, 2], 0), ForwardItem("ok", [3], 9)])),
    ]
    for error, call in cases:
        with pytest.raises(error) as caught:
            call()
        assert isinstance(caught.value, FerrumError)
    assert model.kv.sequences() == ["ok"] and model.kv.length("ok") == 5
    assert model.kv.num_free_blocks == free
    np.testing.assert_allclose(model.forward_verify("probe", [7, 8]), reference, atol=1e-6)


def test_kv_exhaustion_is_atomic_and_spares_other_sequences(checkpoint):
    model = DecoderOnlyLLM.from_pretrained(checkpoint, backend="cpu", num_kv_blocks=4, block_size=4)
    model.prefill("a", [1, 2, 3, 4, 5])  # 2 blocks
    with pytest.raises(KVCacheExhaustedError, match="free KV blocks"):
        model.unified_forward([ForwardItem("b", [1, 2, 3, 4], 0), ForwardItem("c", [5, 6, 7, 8, 9], 0)])
    assert model.kv.sequences() == ["a"] and model.kv.num_free_blocks == 2
    after_failure = model.decode("a", 6, 5)
    untouched = DecoderOnlyLLM.from_pretrained(checkpoint, backend="cpu", num_kv_blocks=4, block_size=4)
    untouched.prefill("a", [1, 2, 3, 4, 5])
    np.testing.assert_allclose(after_failure, untouched.decode("a", 6, 5), atol=1e-6)
