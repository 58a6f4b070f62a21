"""Nemotron NAS as Llama-3.1-Nemotron-Ultra-253B-v1's config.json has it: layers whose attention and FFN are both
no_op, which mlx-lm's nemotron-nas builds as the identity (no tensors, no norm) and Ferrum skips
(``LayerSpec.identity``), their numbers kept as the checkpoint's; FFN-only entries with ffn_mult null, groups of 16
query heads, null top-level intermediate_size and num_key_value_heads. Against mlx-lm's float32 logits on every
runnable backend, through the engine, mlx-lm's conversions, ``ferrum quantize``'s output and an mlx-lm LoRA adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrum.arch.tensors import weight_shapes
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from mlx_lm_release import MlxLmReference, model_logits, parameters, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm,
    assert_forward_and_decode_match, float32_model, mlx_lm_converted, mlx_lm_logits, runnable_backends, scaled_error,
    small_pool_engine, staggered_greedy_workload,
)
from test_nemotron_nas import VOCAB, _mlx_lm_model

pytest.importorskip("mlx_lm")
BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=13)]


def _attention(group: int | None) -> dict:
    """The release's attention entry: every field it carries, null where skipped."""
    return {"n_heads_in_group": group, "no_op": group is None, "num_sink_tokens": None, "replace_with_linear": False,
            "sparsify": None, "unshifted_sink": False, "use_prefill_window_in_sink_attention": False,
            "window_length": None}


def _ffn(mult: float | None) -> dict:
    return {"ffn_mult": mult, "no_op": mult is None, "replace_with_linear": False, "sparsify": None}


#: Eight of the release's 162 entries, each kind it has: attention in groups of 8 and 16 query heads (2 and 1
#: key/value heads of 16), both halves skipped (layers 1 and 6), attention skipped before FFNs of the release's
#: multipliers (39.0 of hidden 128: 3328 wide).
BLOCKS = [
    {"attention": _attention(8), "ffn": _ffn(2.625)},
    {"attention": _attention(None), "ffn": _ffn(None)},
    {"attention": _attention(None), "ffn": _ffn(39.0)},
    {"attention": _attention(None), "ffn": _ffn(1.95)},
    {"attention": _attention(16), "ffn": _ffn(1.95)},
    {"attention": _attention(16), "ffn": _ffn(2.4375)},
    {"attention": _attention(None), "ffn": _ffn(None)},
    {"attention": _attention(16), "ffn": _ffn(3.4125)},
]
IDENTITY = (1, 6)
#: The release's config.json, sizes shrunk (hidden 16384 -> 128, heads 128 -> 16, vocabulary -> 97), its llama3 rope
#: over a pretraining context short enough that every band of these 8-dim heads is scaled or blended; torch_dtype
#: float32 (the release's bfloat16 would make mlx-lm's conversion bfloat16).
CONFIG = {
    "architectures": ["DeciLMForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                 "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
    "block_configs": BLOCKS, "bos_token_id": 0, "eos_token_id": [1, 2], "hidden_act": "silu", "hidden_size": 128,
    "initializer_range": 0.02, "intermediate_size": None, "max_position_embeddings": 128, "mlp_bias": False,
    "model_type": "nemotron-nas", "num_attention_heads": 16, "num_hidden_layers": len(BLOCKS),
    "num_key_value_heads": None, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 16, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.45.1", "use_cache": True, "vocab_size": VOCAB,
}


def _release(folder, config: dict, seed: int = 0):
    """mlx-lm's random model of ``config`` written to ``folder`` (the release's names are mlx-lm's here: no linear
    sub-blocks) and proven to be what mlx-lm loads from it: the model and its logits over TOKENS."""
    model = _mlx_lm_model(config, seed)
    return model, write_release(folder, model, config, TOKENS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(folder, mlx-lm's parameters, mlx-lm's logits over TOKENS, its model)``."""
    folder = tmp_path_factory.mktemp("nemotron_ultra") / "release"
    model, want = _release(folder, CONFIG)
    return folder, parameters(model), want, model


def test_the_checkpoint_is_what_mlx_lm_reads_and_skipped_layers_store_nothing(built):
    folder, params, want, _ = built
    assert scaled_error(mlx_lm_logits(folder, TOKENS), want) < 1e-6
    assert {int(n.split(".")[2]) for n in params if n.startswith("model.layers.")} == set(range(8)) - set(IDENTITY)
    config = ModelConfig.from_file(folder)
    assert {int(n.split(".")[2]) for n in weight_shapes(config) if ".layers." in n} == set(range(8)) - set(IDENTITY)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_mlx_lm(built, backend):
    """One forward pass, then a prefill and token-by-token decode, within 1e-4 of mlx-lm's float32 logits."""
    assert_forward_and_decode_match(float32_model(built[0], backend, block_size=4), TOKENS, built[2])


def test_each_layer_is_read_as_its_entry_says(built):
    config = ModelConfig.from_file(built[0])
    layers = config.arch.layers
    assert [i for i, spec in enumerate(layers) if spec.identity] == list(IDENTITY)
    assert all(layers[i].norms == () for i in IDENTITY)
    assert (config.num_kv_heads, config.head_dim, config.intermediate_size) == (2, 8, 3328)
    assert config.arch.kv_layers == (0, None, None, None, 1, 2, None, 3)
    assert [s.heads.kv_heads for s in layers] == [None, None, None, None, 1, 1, None, 1]


def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(built):
    folder = built[0]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(built[3]),
                                      staggered_greedy_workload(VOCAB, count=6))


@pytest.mark.parametrize("layer, part, entry", [(1, "ffn", _ffn(1.95)), (6, "attention", _attention(8))])
def test_a_skipped_layer_that_ran_would_move_mlx_lm_s_logits(built, layer, part, entry):
    """Control: the same weights, with one of the identity layers given a half of its own (fresh tensors beside
    the others), move mlx-lm's logits, so the identity layers sit where skipping them matters."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    blocks = json.loads(json.dumps(BLOCKS))
    blocks[layer][part] = entry
    model = _mlx_lm_model({**CONFIG, "block_configs": blocks}, seed=5)
    fresh = parameters(model)
    kept = {**fresh, **built[1]}
    model.update(tree_unflatten([(n, mx.array(v.astype(np.float32))) for n, v in kept.items()]))
    assert set(fresh) - set(built[1]) and scaled_error(model_logits(model, TOKENS), built[2]) > 1e-2


def test_identity_layers_first_and_last_run_as_mlx_lm(tmp_path):
    """The first layer skipped (the next reads the embeddings as the first block does) and the last (the final
    norm reads what the layer before left)."""
    blocks = [BLOCKS[1], BLOCKS[0], BLOCKS[2], BLOCKS[4], BLOCKS[1]]
    config = {**CONFIG, "block_configs": blocks, "num_hidden_layers": len(blocks)}
    _, want = _release(tmp_path / "release", config, seed=2)
    assert_forward_and_decode_match(float32_model(tmp_path / "release", block_size=4), TOKENS, want)


def test_a_model_of_identity_layers_alone_is_refused():
    blocks = [BLOCKS[1], BLOCKS[6]]
    with pytest.raises(ConfigError, match="no block to run"):
        ModelConfig.from_dict({**CONFIG, "block_configs": blocks, "num_hidden_layers": 2})


@pytest.mark.slow  # mlx-lm converts and quantizes: a few seconds
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(built, bits, tmp_path, monkeypatch):
    """mlx-lm's convert (its tokenizer read from tokenizer.json alone, as in test_nemotron_nas)."""
    import mlx_lm.utils
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", lambda path, *args, **kwargs: PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json")))
    tensors, want = mlx_lm_converted(built[0], tmp_path / "mlx", TOKENS, bits, group=32)
    assert not any(f".layers.{i}." in name for name in tensors for i in IDENTITY)
    assert any(name.endswith(".mlp.down_proj.scales") for name in tensors) == (bits is not None)
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.slow  # quantizes, then mlx-lm loads it: a few seconds
def test_ferrum_quantize_keeps_the_stored_layer_numbers(built, tmp_path):
    """``ferrum quantize``'s output loads in mlx-lm (which reads each tensor by its layer's number) with the logits
    Ferrum gives it."""
    from ferrum.quant.convert import quantize_checkpoint

    dst = quantize_checkpoint(built[0], tmp_path / "q", bits=8, group_size=32)
    want = mlx_lm_logits(dst, TOKENS)
    assert scaled_error(want, built[2]) < 2e-2  # packed, yet the model's
    for backend in BACKENDS:
        assert scaled_error(float32_model(dst, backend).forward_verify("q", TOKENS), want) <= 2e-3, backend


def test_an_mlx_lm_adapter_names_the_stored_layers(built, tmp_path):
    """mlx-lm's LoRA on the last four layers (num_layers counts the identity layers, as mlx-lm's model.layers holds
    them): every backend's logits with the adapter are mlx-lm's, which the adapter moves."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
    from mlx_lm.utils import load_model

    from ferrum.model import ForwardItem

    folder, _, base, _ = built
    settings = {"fine_tune_type": "lora", "num_layers": 4,
                "lora_parameters": {"rank": 4, "scale": 3.0, "dropout": 0.0}}
    model = load_model(folder)[0]
    linear_to_lora_layers(model, settings["num_layers"], settings["lora_parameters"])
    rng = np.random.default_rng(3)
    factors = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.2)
               for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
    assert {int(k.split(".")[2]) for k in factors} == {4, 5, 7}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"), factors)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    want = model_logits(load_adapters(load_model(folder)[0], str(adapter)), TOKENS)
    assert scaled_error(want, base) > 1e-2
    for backend in BACKENDS:
        ours = float32_model(folder, backend, block_size=4)
        ours.adapters.load("a", adapter)
        out = ours.forward([ForwardItem("s", TOKENS, 0, True, adapter="a")], all_logits=True)
        assert scaled_error(ours.ops.to_numpy(out.logits), want) <= 1e-4, backend
