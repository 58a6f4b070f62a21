"""The one map from a layer's stored attention heads to the model's (ferrum.arch.heads): a packed matrix moves as its
float form does, in whole groups or refused by name, and the stored shapes are what the map reads."""

from dataclasses import replace

import numpy as np
import pytest

from ferrum.arch.heads import StoredHeads, layout
from ferrum.arch.tensors import attention_as_loaded, check_padded_groups
from ferrum.config import ModelConfig
from ferrum.errors import UnsupportedFeatureError
from ferrum.quant.affine import dequantize, quantize

#: Eight query heads of 64 dims over four key/value heads.
LLAMA = {"model_type": "llama", "hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 4,
         "head_dim": 64, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 64, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 128}
#: One layer's stored heads of each kind, and o_proj's stored inputs.
KINDS = {"fewer_queries": (StoredHeads(query_heads=4), 4 * 64),
         "zero_groups": (StoredHeads(query_heads=4, kv_heads=2, fewer_kv="zero"), 4 * 64),
         "narrower": (StoredHeads(head_dim=32), 8 * 32),
         "repeated": (StoredHeads(kv_heads=1), 8 * 64)}


def _config(stored: StoredHeads, **arch):
    config = ModelConfig.from_dict(LLAMA)
    layers = tuple(replace(spec, heads=stored) for spec in config.arch.layers)
    return replace(config, arch=replace(config.arch, layers=layers, **arch))


def _dense(tensor):
    return tensor if isinstance(tensor, np.ndarray) else dequantize(tensor)


@pytest.mark.parametrize("kind", KINDS)
def test_a_packed_o_proj_loads_as_its_float_form(kind):
    stored, inputs = KINDS[kind]
    config = _config(stored)
    packed = quantize(np.random.default_rng(0).standard_normal((128, inputs)).astype(np.float32), 4, 32)
    name = "model.layers.0.self_attn.o_proj.weight"
    (_, got), = attention_as_loaded(config, config.arch.layers[0], name, packed)
    (_, want), = attention_as_loaded(config, config.arch.layers[0], name, dequantize(packed))
    assert _dense(got).shape == (128, 8 * 64)
    np.testing.assert_array_equal(_dense(got), want)
    assert np.count_nonzero(np.abs(want).sum(0)) == inputs  # each stored input lands once, the rest are zeros


def test_the_map_puts_each_stored_head_where_the_model_reads_it():
    """Fewer queries: each key/value head's own, then zeros; repeated key/value heads; tiled queries regrouped."""
    config = _config(StoredHeads(query_heads=4, kv_heads=2))
    shape = layout(config, config.arch.layers[0])
    heads = shape.order("q").reshape(8, 64)[:, 0] // 64
    assert heads.tolist() == [0, -1, 1, -1, 2, -1, 3, -1]
    assert (shape.order("k").reshape(4, 64)[:, 0] // 64).tolist() == [0, 0, 1, 1]
    plamo = _config(StoredHeads(), tiled_kv_heads=True)
    tiled = layout(plamo, plamo.arch.layers[0])
    assert (tiled.order("q").reshape(8, 64)[:, 0] // 64).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_a_group_that_spans_a_padded_head_is_refused_by_name():
    config = _config(StoredHeads(head_dim=16))
    with pytest.raises(UnsupportedFeatureError, match=r"o_proj\.weight: this layer's heads of 16 inputs .* group size "
                                                      r"32 does not divide 16 and 64; no group size"):
        check_padded_groups(config, "model.layers.0.self_attn.o_proj.weight", 4, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_stored_shapes_are_what_the_map_reads(kind):
    from ferrum.arch.tensors import weight_shapes

    stored, inputs = KINDS[kind]
    config = _config(stored)
    shapes = weight_shapes(config)
    rng = np.random.default_rng(1)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        (_, got), = attention_as_loaded(config, config.arch.layers[0], name, rng.standard_normal(shapes[name]))
        assert got.shape == {"q_proj": (512, 128), "o_proj": (128, 512)}.get(proj, (256, 128)), proj
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (128, inputs)
