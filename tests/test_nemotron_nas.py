"""Nemotron NAS (``nemotron-nas``: Llama-3.1-Nemotron-51B, Llama-3.3-Nemotron-Super-49B, Llama-3.1-Nemotron-Ultra-253B;
DeciLM remote code, which transformers lacks): a tiny random checkpoint built from mlx-lm's own model, each layer's
attention and FFN as its block_configs entry says (attention with its own key/value heads, skipped, or one linear
map; a gated MLP of its own width, skipped, or one linear map), saved under the release's names, against mlx-lm's
logits on every runnable backend, through the engine, and mlx-lm's conversions (float and 4-bit)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import AdapterError, ConfigError, UnsupportedFeatureError
from mlx_lm_release import MlxLmReference, fan_in, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    edited_checkpoint, float32_model, mlx_lm_converted, mlx_lm_logits, runnable_backends, scaled_error,
    small_pool_engine, staggered_greedy_workload,
)

pytest.importorskip("mlx_lm")
BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=14)]


def _attention(group: int) -> dict:
    return {"n_heads_in_group": group, "no_op": False, "replace_with_linear": False, "sparsify": None,
            "num_sink_tokens": None, "unshifted_sink": False, "use_prefill_window_in_sink_attention": False,
            "window_length": None}


def _ffn(mult: float) -> dict:
    return {"ffn_mult": mult, "no_op": False, "replace_with_linear": False, "sparsify": None}


SKIPPED = {"no_op": True, "replace_with_linear": False, "sparsify": None}
LINEAR = {"no_op": False, "replace_with_linear": True, "sparsify": None}
#: Six heads whose layers keep 3, 2, 1 and 6 key/value heads (the pool's 6, their least common multiple, repeats
#: each), MLPs 256 and 512 wide (ffn_mult 1 and 5 of hidden 96, rounded up to 256s), and every skipped and linear
#: sub-block: the FFN alone, linear attention, attention alone, a linear FFN.
BLOCKS = [
    {"attention": _attention(2), "ffn": _ffn(1.0)},
    {"attention": dict(SKIPPED), "ffn": _ffn(5.0)},
    {"attention": dict(LINEAR), "ffn": _ffn(1.0)},
    {"attention": _attention(3), "ffn": dict(SKIPPED)},
    {"attention": _attention(6), "ffn": dict(LINEAR)},
    {"attention": _attention(1), "ffn": _ffn(5.0)},
]
#: A release's config.json (Llama-3.3-Nemotron-Super-49B's keys, sizes shrunk): llama3 rope over a pretraining
#: context short enough that every frequency band of these 16-dim heads is scaled or blended.
CONFIG = {
    "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
    "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                 "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.0, "block_configs": BLOCKS, "bos_token_id": 0,
    "eos_token_id": [1, 2], "hidden_act": "silu", "hidden_size": 96, "initializer_range": 0.02,
    "intermediate_size": None, "max_position_embeddings": 128, "mlp_bias": False, "num_attention_heads": 6,
    "num_hidden_layers": len(BLOCKS), "num_key_value_heads": None, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 16, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    "vocab_size": VOCAB,
}
#: mlx-lm's names of the linear sub-blocks -> the release's (DeciLM's ``linear_attn`` / ``linear_mlp``), which
#: mlx-lm's sanitize does not map: the only names its model and the release do not share.
RELEASE_NAMES = {".self_attn.linear.": ".self_attn.linear_attn.", ".mlp.linear.": ".mlp.linear_mlp."}


def _mlx_lm_model(config: dict, seed: int = 0):
    """mlx-lm's nemotron-nas Model of ``config`` with random parameters: matrices of std 0.6 / sqrt(fan-in) (each
    sub-block's output about the residual's size, so every path counts), norms' weights around 1."""
    return random_mlx_lm_model(config, seed, fan_in(0.6))


def _release_name(name: str) -> str:
    for ours, theirs in RELEASE_NAMES.items():
        name = name.replace(ours, theirs)
    return name


def _as_released(tensors: dict) -> None:
    """``tensors`` (mlx-lm's names) renamed in place to the release's."""
    for name in list(tensors):
        tensors[_release_name(name)] = tensors.pop(name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(release folder, mlx-lm-named folder, mlx-lm's logits over TOKENS, its model)``: one random model saved
    under mlx-lm's names (the source of mlx-lm's conversions; mlx-lm's load of it is the model: write_release) and
    under the release's."""
    model, root = _mlx_lm_model(CONFIG), tmp_path_factory.mktemp("nemotron_nas")
    want = write_release(root / "mlx_lm", model, CONFIG, TOKENS)
    return edited_checkpoint(root / "mlx_lm", root / "release", tensors=_as_released), root / "mlx_lm", want, model


def test_the_checkpoint_is_what_mlx_lm_reads(built):
    """The release's folder differs from mlx-lm's (whose load is the model in memory: write_release) only by the
    linear sub-blocks' names, which mlx-lm refuses."""
    from safetensors import safe_open

    release, ours, _, _ = built
    with safe_open(release / "model.safetensors", "np") as a, safe_open(ours / "model.safetensors", "np") as b:
        assert sorted(a.keys()) == sorted(_release_name(n) for n in b.keys()) != sorted(b.keys())
    with pytest.raises(ValueError, match="linear_attn|linear_mlp"):
        mlx_lm_logits(release, TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["release", "mlx_lm"])
def test_logits_match_mlx_lm(built, backend, layout):
    """One forward pass, then a prefill and token-by-token decode, within 1e-4 of mlx-lm's float32 logits."""
    folder = built[0] if layout == "release" else built[1]
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, built[2])


def test_profilers_see_the_linear_sub_blocks_projection(built):
    """Each mixer kind lists its projections (MixerKind.projections): the linear sub-block's one map is among the
    model's, the skipped one adds none, attention its q/k/v and output."""
    model = float32_model(built[0])
    listed = {id(p) for p in model.projections()}
    assert id(model.layers[2].o) in listed and model.layers[1].mixer.projections(model.layers[1]) == []
    assert {id(p) for p in model.layers[0].mixer.projections(model.layers[0])} <= listed
    assert len(model.layers[0].mixer.projections(model.layers[0])) >= 2


def test_each_layer_is_read_as_its_entry_says(built):
    config = ModelConfig.from_file(built[0])
    assert (config.num_kv_heads, config.head_dim, config.intermediate_size) == (6, 16, 512)
    layers = config.arch.layers
    assert [(s.mixer, s.mlp) for s in layers] == [("attention", "dense"), ("none", "dense"), ("linear", "dense"),
                                                 ("attention", "none"), ("attention", "linear"),
                                                 ("attention", "dense")]
    assert [s.heads.kv_heads for s in layers] == [3, None, None, 2, 1, None]
    assert [s.intermediate_size for s in layers] == [256, None, 256, None, None, None]
    assert config.arch.kv_layers == (0, None, None, 1, 2, 3)
    assert layers[0].rope.kind == "llama3" and layers[0].rope.original_max == 16


def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(built):
    release, _, _, model = built
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(release, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB, count=6))


def test_each_new_part_changes_mlx_lm_s_logits(built):
    """Controls that the parity above can fail: mlx-lm's logits move where the rope is unscaled, where a skipped
    sub-block runs (as the layer's neighbour's entry), where a linear one is skipped, and where a layer keeps all its
    key/value heads (another group size, its repeats then distinct heads)."""
    want = built[2]
    changes = [{"rope_scaling": None}]
    for layer, part, entry in ((1, "attention", _attention(2)), (3, "ffn", _ffn(1.0)), (2, "attention", SKIPPED),
                               (4, "ffn", SKIPPED), (0, "attention", _attention(1))):
        blocks = json.loads(json.dumps(BLOCKS))
        blocks[layer][part] = entry
        changes.append({"block_configs": blocks})
    for change in changes:
        assert scaled_error(model_logits(_mlx_lm_model({**CONFIG, **change}), TOKENS), want) > 1e-2, change


@pytest.mark.slow  # mlx-lm converts and quantizes: a few seconds
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(built, bits, tmp_path, monkeypatch):
    """mlx-lm's convert, its tokenizer read from tokenizer.json alone: transformers 5.24's AutoTokenizer reads the
    model's config too, through its generic class for a model type it lacks, which fails on a llama3 rope."""
    import mlx_lm.utils
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", lambda path, *args, **kwargs: PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json")))
    tensors, want = mlx_lm_converted(built[1], tmp_path / "mlx", TOKENS, bits, group=32)
    assert any(name.endswith(".self_attn.linear.scales") for name in tensors) == (bits is not None)
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.parametrize("layer, part, change, error, what", [
    (0, "attention", {"window_length": 8}, UnsupportedFeatureError, "window_length"),
    (0, "attention", {"n_heads_in_group": 4}, ConfigError, "n_heads_in_group"),
    (1, "ffn", {"ffn_mult": None}, ConfigError, "ffn_mult"),
    (1, "ffn", {"moe": {}}, ConfigError, "fields mlx-lm reads"),
    (1, "ffn", {"ffn_mult": 1e-9}, ConfigError, r"entry 1's ffn.ffn_mult 1e-09 gives an MLP 0 wide .*\(0 after\)"),
    (1, "ffn", {"ffn_mult": 1e300}, ConfigError, r"ffn_mult 1e\+300 gives an MLP 6.4e\+301 wide"),
])
def test_unsupported_variants_are_refused_by_name(layer, part, change, error, what):
    blocks = json.loads(json.dumps(BLOCKS))
    blocks[layer][part].update(change)
    with pytest.raises(error, match=f"block_configs.*{what}"):
        ModelConfig.from_dict({**CONFIG, "block_configs": blocks})


@pytest.mark.parametrize("key, value, error", [("attention_bias", True, UnsupportedFeatureError),
                                               ("hidden_act", "relu", UnsupportedFeatureError),
                                               ("head_dim", 32, UnsupportedFeatureError),
                                               ("block_configs", BLOCKS[:3], ConfigError)])
def test_unsupported_keys_are_refused_by_name(key, value, error):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, key: value})


def test_a_model_without_attention_runs_without_a_pool_layer(tmp_path):
    """Every layer's attention skipped or linear: no KV pool layer at all, and still mlx-lm's logits."""
    blocks = [{"attention": dict(SKIPPED), "ffn": _ffn(1.0)}, {"attention": dict(LINEAR), "ffn": _ffn(1.0)}]
    config = {**CONFIG, "block_configs": blocks, "num_hidden_layers": 2}
    want = write_release(tmp_path / "mlx_lm", _mlx_lm_model(config, seed=1), config, TOKENS)
    folder = edited_checkpoint(tmp_path / "mlx_lm", tmp_path / "release", tensors=_as_released)
    loaded = float32_model(folder)
    assert loaded.config.arch.kv_pool_layers == 0
    assert_forward_and_decode_match(loaded, TOKENS, want)



@pytest.mark.parametrize("layer, module, why", [
    (1, "self_attn.q_proj", "layer 1's attention is skipped"),
    (2, "self_attn.o_proj", "layer 2's attention is a linear map"),
    (3, "mlp.gate_proj", "layer 3's MLP is skipped"),
    (4, "mlp.down_proj", "layer 4's MLP is a linear map"),
])
def test_lora_on_a_skipped_or_linear_sub_block_is_refused_by_name(built, tmp_path, layer, module, why):
    """A LoRA adapter naming a projection of a sub-block that has none (skipped, or one linear map) is refused with
    what that sub-block is, not run as if it adapted nothing (nor refused as a mixture of experts)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    name = f"base_model.model.model.layers.{layer}.{module}"
    save_file({f"{name}.lora_A.weight": rng.standard_normal((4, 96)).astype(np.float32),
               f"{name}.lora_B.weight": rng.standard_normal((96, 4)).astype(np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=4, lora_alpha=8, target_modules=[module.rsplit(".", 1)[1]], bias="none")))
    model = float32_model(built[0])
    with pytest.raises(AdapterError, match=f"{why}.*: it has no {module.rsplit('.', 1)[1]} to adapt"):
        model.adapters.load("a", tmp_path)
    assert len(model.adapters) == 0
