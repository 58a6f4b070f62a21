"""RWKV-7 "Goose" (flash-linear-attention's remote code, as mlx-lm's ``rwkv7`` runs it): no attention, each stored
layer a time mix and a channel mix, run as two of Ferrum's (:mod:`ferrum.recurrent.rwkv7`)."""

from __future__ import annotations

from dataclasses import replace

from ferrum.arch.families._shared import Family, Sizes, _keys, _without_nulls
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, one_of, optional_positive_int, optional_positive_number, size,
)
from ferrum.arch.rope import Rope
from ferrum.arch.spec import Architecture, LayerSpec
from ferrum.arch.sublayers import SubLayers
from ferrum.recurrent.rwkv7 import CHANNEL_MODULE, FLOAT32, MODULE, Rwkv7ChannelSpec, Rwkv7Spec

#: Each stored layer is Ferrum's time mix then its channel mix, whose modules keep their own names.
RWKV7_SUBLAYERS = SubLayers(2, (), later=((CHANNEL_MODULE, 1), (f"{CHANNEL_MODULE}_norm", 1)),
                            lora_refusal="an RWKV-7 time mix and channel mix, not attention and an MLP: Ferrum adapts "
                                         "neither's projections (receptance, key, value, output and the LoRA decay "
                                         "and gates are a recurrent mixer's)")
#: The release's names (mlx-lm's conversions keep them): the embeddings, and the first layer's norm of them.
RWKV7_STORED = {"embed_tokens": "embeddings", "embed_norm": "layers.0.pre_norm"}


def _rwkv7(r: KeyReader, sizes: Sizes) -> Architecture:
    """RWKV-7: the embeddings LayerNormed (the first layer's ``pre_norm``), then per layer ``attn_norm`` and the time
    mix, ``ffn_norm`` and the channel mix, each added to the stream; LayerNorms with biases throughout."""
    hidden, head_dim = sizes.hidden_size, r("head_dim")
    if hidden % head_dim:
        r.fail("head_dim", f"is {head_dim}, which does not divide hidden_size ({hidden})")
    heads = hidden // head_dim
    if r("num_heads") not in (None, heads):
        r.fail("num_heads", f"is {r('num_heads')}, but RWKV-7 runs hidden_size / head_dim ({heads}) heads")
    spec = Rwkv7Spec(heads, head_dim, r("decay_low_rank_dim"), r("a_low_rank_dim"), r("v_low_rank_dim"),
                     r("gate_low_rank_dim"))
    unrotated = Rope.unrotated(sizes.head_dim)
    layers = []
    for i in range(sizes.num_layers // 2):
        layers += [LayerSpec(None, unrotated, mixer="rwkv7_first" if i == 0 else "rwkv7", mlp="none",
                             norms=(("pre_attn", f"{MODULE}_norm"),)),
                   LayerSpec(None, unrotated, mixer="rwkv7_channel", mlp="none",
                             norms=(("pre_attn", f"{CHANNEL_MODULE}_norm"),))]
    return Architecture(
        layers=tuple(layers), norms={"pre_attn": f"{MODULE}_norm"}, norm="layer", norm_bias=True, embed_norm=True,
        rwkv7=spec, rwkv7_first=replace(spec, first=True),
        rwkv7_channel=Rwkv7ChannelSpec(hidden, sizes.intermediate_size),
        keep_float32=FLOAT32, stored_names=RWKV7_STORED, sublayers=RWKV7_SUBLAYERS,
    )


def _two_per_layer(r: KeyReader, sizes: Sizes) -> Sizes:
    """Ferrum runs each stored layer as two."""
    return replace(sizes, num_layers=2 * sizes.num_layers)


_RWKV7 = (
    Key("hidden_size", check=size(1 << 17)),
    Key("num_hidden_layers", check=size(1024)),
    Key("vocab_size", check=size(1 << 23)),
    Key("intermediate_size", check=size(1 << 20)),
    Key("head_dim", default=64, check=size(4096)),
    Key("num_heads", check=optional_positive_int),
    Key("norm_eps", check=optional_positive_number),
    *(Key(f"{name}_low_rank_dim", check=size(1 << 16)) for name in ("decay", "a", "v", "gate")),
    Key("tie_word_embeddings", default=False, check=boolean),
    # no attention: one nominal head, no positions to bound the context (Ferrum's cap)
    Key("num_attention_heads", default=1, check=one_of(1)),
    Key("max_position_embeddings", default=1 << 20, check=size(1 << 28)),
    Key("hidden_act", default="sqrelu", check=one_of("sqrelu"), unsupported=True),
    Key("norm_first", default=True, check=one_of(True), unsupported=True),  # mlx-lm norms the embeddings always
    Key("norm_bias", default=True, check=one_of(True), unsupported=True),  # mlx-lm's LayerNorms have biases
    Key("attn", check=falsy("Ferrum runs RWKV-7 without attention layers (mlx-lm runs none)"), unsupported=True),
)

TABLE: dict[str, Family] = {
    "rwkv7": Family(  # RWKV-7 Goose (fla-hub/rwkv7-*): time mix (generalized delta rule) and channel mix per layer
        _keys(_RWKV7), _rwkv7, eps_default=1e-5, eps_key="norm_eps", derive=_without_nulls, sizes=_two_per_layer,
    ),
}
