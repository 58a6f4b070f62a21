"""Dense rotary families shaped like Llama (Mistral, Qwen, Granite, GLM, ERNIE, OLMo, Phi-3, ...)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from ferrum.arch.families._shared import (
    FULL, Family, LLAMA_NORMS, POST_NORMS, SLIDING, Sizes, _LAYER_NORM_ROPES, _LAYER_TYPES, _LLAMA_ROPES, _ROPE,
    _SILU, _WINDOW, _core, _core_defaults, _keys, _layer_kinds, _layer_types, _per_kind_rope_specs, _rope_spec,
    _rotary_dim, _theta, read_rope,
)
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, one_of, optional_non_negative_int, optional_positive_int, optional_positive_number,
    positive_int, positive_number, required, size,
)
from ferrum.arch import gains, loop_gate
from ferrum.arch.rope import Rope
from ferrum.arch.heads import StoredHeads
from ferrum.arch.spec import Architecture, LayerSpec
from ferrum.recurrent.kv_conv import TAPS, KvConvSpec


def _llama_like(qkv_bias_default: bool, qk_norm: str | None, windows: Callable[[KeyReader, Sizes], list],
                rotated: Callable[[KeyReader, Sizes], list[bool]] | None = None, norms: dict[str, str] = LLAMA_NORMS):
    """``rotated``: which layers apply rope (SmolLM3's NoPE layers do not); every layer when None."""

    def build(r: KeyReader, sizes: Sizes) -> Architecture:
        key, spec = _rope_spec(r)
        rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
        r("hidden_act")
        r("partial_rotary_factor")
        attention_bias = r.get("attention_bias")
        attention_bias = qkv_bias_default if attention_bias is None else attention_bias
        ropes = [rope if on else Rope.unrotated(sizes.head_dim)
                 for on in (rotated(r, sizes) if rotated else [True] * sizes.num_layers)]
        return Architecture(
            layers=tuple(LayerSpec(w, layer_rope) for w, layer_rope in zip(windows(r, sizes), ropes)),
            norms=norms,
            attn_scale=1.0 / math.sqrt(sizes.head_dim),
            qk_norm=qk_norm,
            qkv_bias=attention_bias,
            # Llama's attention_bias also covers o_proj; Qwen2 biases q/k/v only.
            o_bias=attention_bias and not qkv_bias_default,
            mlp_bias=bool(r.get("mlp_bias")),
        )

    return build


def _no_windows(r: KeyReader, sizes: Sizes) -> list:
    return [None] * sizes.num_layers


def _every_layer_window(r: KeyReader, sizes: Sizes) -> list:
    return [r("sliding_window")] * sizes.num_layers


def _ministral_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' Ministral: layer_types, else every layer sliding when sliding_window is set."""
    every = SLIDING if r("sliding_window") else FULL
    window, types = _layer_kinds(r, sizes, lambda _: every)
    return [window if t == SLIDING else None for t in types]


#: transformers' Ministral 3 rope settings where a config gives none (rope_theta included: a top-level one is
#: not read then).
_MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                    "llama_4_scaling_beta": 0.1}


def _ministral3(r: KeyReader, sizes: Sizes) -> Architecture:
    """Mistral's blocks, YaRN, and Llama 4's attention scaling (:func:`_llama4_query_scaling`)."""
    return _llama4_query_scaling(r, _llama_like(False, None, _every_layer_window)(r, sizes))


def _llama4_query_scaling(r: KeyReader, arch: Architecture) -> Architecture:
    """``arch`` with Llama 4's attention scaling as Ministral 3 and Mistral 4 read it from their rope settings'
    llama_4_scaling_beta: queries multiplied by ``1 + beta * log(1 + floor(position /
    original_max_position_embeddings))`` (``query_scaling``); none where the settings give no beta."""
    key, spec = _rope_spec(r)
    beta = spec.get("llama_4_scaling_beta")
    if not beta:
        return arch
    if positive_number(beta):
        r.fail(key, f"field 'llama_4_scaling_beta' must be a positive number, got {beta!r}")
    original = spec.get("original_max_position_embeddings")  # transformers reads it from the rope settings
    if positive_int(original):
        r.fail(key, "field 'original_max_position_embeddings' must be a positive integer with llama_4_scaling_beta, "
                    f"got {original!r}")
    return replace(arch, query_scaling=(float(beta), int(original)))


def _qwen_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' Qwen2 / Qwen3: no window unless use_sliding_window; then layer_types, else the layers
    from max_window_layers on."""
    window = r("sliding_window") if r("use_sliding_window") else None
    types = _layer_types(r, sizes)
    if types is None:
        first = r("max_window_layers")
        if window is not None and first is None:
            r.fail("max_window_layers", "is null, but use_sliding_window needs the index of the first sliding layer")
        types = [SLIDING if window is not None and i >= first else FULL for i in range(sizes.num_layers)]
    return [window if t == SLIDING else None for t in types]


_QWEN_WINDOW = (
    Key("sliding_window", default=4096, check=optional_positive_int), *_LAYER_TYPES,
    Key("use_sliding_window", default=False, check=boolean),
    Key("max_window_layers", default=28, check=optional_non_negative_int),  # 0: every layer slides
)


def _smollm3_rotated(r: KeyReader, sizes: Sizes) -> list[bool]:
    """transformers' SmolLM3: ``no_rope_layers[i]`` is 1 where layer ``i`` applies rope (despite the name),
    else every ``no_rope_layer_interval``-th layer skips it."""
    flags = r("no_rope_layers")
    if flags is None:
        interval = r("no_rope_layer_interval")
        return [(i + 1) % interval != 0 for i in range(sizes.num_layers)]
    if not isinstance(flags, list) or len(flags) != sizes.num_layers or any(f not in (0, 1) for f in flags):
        r.fail("no_rope_layers", f"must list {sizes.num_layers} entries of 1 (rope) or 0 (none), got {flags!r}")
    return [bool(f) for f in flags]


def _smollm3_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' SmolLM3: the layers layer_types marks sliding (by default, the NoPE layers when
    use_sliding_window) attend through sliding_window; an explicit layer_types applies whatever
    use_sliding_window says."""
    window, types = r("sliding_window"), _layer_types(r, sizes)
    if types is None:
        slides = r("use_sliding_window") and window is not None
        types = [SLIDING if slides and not on else FULL for on in _smollm3_rotated(r, sizes)]
    if window is None and SLIDING in types:
        r.fail("sliding_window", "must be set when layer_types has sliding layers")
    return [window if t == SLIDING else None for t in types]


def _exaone4_kinds(r: KeyReader, sizes: Sizes) -> list[str]:
    """transformers' EXAONE 4: layer_types, else ``sliding_window_pattern``: a number ``n`` (every ``n``-th
    layer full, the rest sliding) or a string of ``L`` (sliding) and ``G`` (full) repeated over the layers.
    Without a sliding_window every layer is full."""
    window, types = r("sliding_window"), _layer_types(r, sizes)
    if window is None:
        return [FULL] * sizes.num_layers
    if types is not None:
        return types
    pattern = r("sliding_window_pattern")
    if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:
        return [SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(sizes.num_layers)]
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        return [SLIDING if (i + 1) % pattern else FULL for i in range(sizes.num_layers)]
    r.fail("sliding_window_pattern", f"must be a positive integer or a string of 'L' and 'G', got {pattern!r}")


def _exaone4_windows(r: KeyReader, sizes: Sizes) -> list:
    window = r("sliding_window")
    return [window if kind == SLIDING else None for kind in _exaone4_kinds(r, sizes)]


def _exaone4_rotated(r: KeyReader, sizes: Sizes) -> list[bool]:
    """With a sliding window, the full layers take no rope (NoPE); without one, every layer takes it."""
    return [kind == SLIDING or r("sliding_window") is None for kind in _exaone4_kinds(r, sizes)]


_EXAONE4 = (
    Key("sliding_window", default=4096, check=optional_positive_int), *_LAYER_TYPES,
    Key("sliding_window_pattern", default=4),
)


#: GLM-4's four norms: Gemma's sandwich under its own names.
GLM4_NORMS = {
    "pre_attn": "input_layernorm", "post_attn": "post_self_attn_layernorm",
    "pre_mlp": "post_attention_layernorm", "post_mlp": "post_mlp_layernorm",
}


def _glm4(r: KeyReader, sizes: Sizes) -> Architecture:
    """GLM-4 (0414): a norm before and after each of attention and the MLP, q/k/v biases by attention_bias,
    gate and up in one matrix, and GPT-J's rope (adjacent dims paired) on partial_rotary_factor of each head."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    r("hidden_act")
    return Architecture(
        layers=tuple(LayerSpec(None, replace(rope, interleaved=True)) for _ in range(sizes.num_layers)),
        norms=GLM4_NORMS,
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qkv_bias=r("attention_bias"),
        fused_gate_up=True,
    )


def _glm(r: KeyReader, sizes: Sizes) -> Architecture:
    """GLM-4 (9B, 0520 and later ``-hf`` releases; transformers' Glm): GLM-4-0414's attention and MLP (q/k/v biased
    by attention_bias, gate and up in one matrix, GPT-J's rope on half of each head) with Llama's two norms."""
    return replace(_glm4(r, sizes), norms=LLAMA_NORMS)


def _hunyuan_dense(r: KeyReader, sizes: Sizes) -> Architecture:
    """Hunyuan (dense): Llama's blocks with per-head q/k norms (``query_layernorm``, ``key_layernorm``) applied
    once q and k are rotated. Its checkpoints' rope scaling is "dynamic" with an ``alpha``, which transformers
    reads as a fixed base, ``rope_theta * alpha ** (head_dim / (head_dim - 2))``."""
    arch = _llama_like(False, "head", _no_windows)(r, sizes)
    key, spec = _rope_spec(r)
    alpha = spec.get("alpha")
    if alpha is not None:
        if positive_number(alpha) or (spec.get("rope_type", spec.get("type")) or "default") != "dynamic":
            r.fail(key, f"field 'alpha' must be a positive number, with rope type 'dynamic'; got {alpha!r}")
        d = sizes.head_dim
        arch = replace(arch, layers=tuple(replace(layer, rope=replace(
            layer.rope, theta=layer.rope.theta * float(alpha) ** (d / (d - 2)), kind="default", factor=1.0))
            for layer in arch.layers))
    return replace(arch, qk_norm_names=("query_layernorm", "key_layernorm"), qk_norm_after_rope=True)


def _interleaved(arch: Architecture) -> Architecture:
    """``arch`` with GPT-J's rope on every layer: adjacent dims paired."""
    return replace(arch, layers=tuple(replace(layer, rope=replace(layer.rope, interleaved=True))
                                      for layer in arch.layers))


def _ernie4_5(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama's blocks, use_bias on every projection, and GPT-J's rope pairing adjacent dims (interleaved)."""
    bias = r("use_bias")
    return replace(_interleaved(_llama_like(False, None, _no_windows)(r, sizes)), qkv_bias=bias, o_bias=bias,
                   mlp_bias=bias)


def _helium(r: KeyReader, sizes: Sizes) -> Architecture:
    """Kyutai's Helium: Llama's blocks with GPT-J's rope (adjacent dims paired); attention_bias on q/k/v only
    (its o_proj never has one), mlp_bias on the MLP. Its o_proj maps hidden_size to hidden_size, so the heads
    must split hidden_size."""
    if sizes.head_dim * sizes.num_heads != sizes.hidden_size:
        r.fail("head_dim", f"is {sizes.head_dim}, but Helium's o_proj takes hidden_size ({sizes.hidden_size}) "
                           f"inputs, {sizes.num_heads} heads of hidden_size / num_attention_heads; transformers "
                           "cannot load such a checkpoint either")
    return replace(_interleaved(_llama_like(False, None, _no_windows)(r, sizes)), o_bias=False)


def _seed_oss(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama's blocks with attention_bias on q/k/v only (Qwen 2's) and attention_out_bias on o_proj."""
    return replace(_llama_like(True, None, _no_windows)(r, sizes), o_bias=r("attention_out_bias"))


def _granite(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama with four multipliers: on the embeddings, on what each block adds to the residual stream,
    as the attention scale (instead of 1/sqrt(head_dim)), and a divisor of the logits."""
    return _granite_multipliers(r, _llama_like(False, None, _no_windows)(r, sizes))


def _granite_multipliers(r: KeyReader, arch: Architecture) -> Architecture:
    return replace(
        arch,
        embed_scale=None if r("embedding_multiplier") == 1 else float(r("embedding_multiplier")),
        residual_scale=float(r("residual_multiplier")),
        attn_scale=float(r("attention_multiplier")),
        logit_scale=1.0 / float(r("logits_scaling")),
    )


_GRANITE = (
    Key("attention_bias", check=boolean), Key("mlp_bias", check=boolean),
    *(Key(name, default=1.0, check=positive_number)
      for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")),
)


_SMOLLM3 = (
    Key("sliding_window", check=optional_positive_int), *_LAYER_TYPES,
    Key("use_sliding_window", default=False, check=boolean),
    Key("no_rope_layers"),
    Key("no_rope_layer_interval", default=4, check=optional_positive_int),
    Key("attention_bias", check=boolean), Key("mlp_bias", check=boolean),
)


def _olmo3(r: KeyReader, sizes: Sizes) -> Architecture:
    """OLMo 2's blocks, three sliding layers to one full (unless layer_types says otherwise), and a rope per
    attention kind: the full layers' scaled (rope_scaling, e.g. YaRN), the sliding layers' plain."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if (i + 1) % 4 == 0 else SLIDING)
    r("hidden_act")
    specs = _per_kind_rope_specs(r, "OLMo 3")
    if specs is not None:
        full, sliding = (read_rope(r, sizes, spec, "rope_parameters", _LLAMA_ROPES, theta_default=500_000.0)
                         for spec in specs)
    else:  # transformers 4's spelling: rope_scaling scales the full layers only
        key, spec = _rope_spec(r)
        full = read_rope(r, sizes, spec, key, _LLAMA_ROPES, theta_default=500_000.0)
        sliding = read_rope(r, sizes, {}, key, ("default",), theta_default=500_000.0)
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(window, sliding) if t == SLIDING else LayerSpec(None, full) for t in types),
        norms=POST_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="projection",
        qkv_bias=bias, o_bias=bias,
    )


def _phi3(r: KeyReader, sizes: Sizes) -> Architecture:
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, ("default", "longrope"), rotary_dim=_rotary_dim(r, sizes, spec, 1.0))
    r("hidden_act")
    scale = 1.0 / math.sqrt(sizes.head_dim)
    return Architecture(
        layers=tuple(LayerSpec(w, rope) for w in _every_layer_window(r, sizes)),
        norms=LLAMA_NORMS,
        attn_scale=scale,
        fused_qkv=True,
        fused_gate_up=True,
    )


def _olmo(r: KeyReader, sizes: Sizes) -> Architecture:
    """OLMo (1): Llama's blocks with LayerNorms that have no weight or bias, at a fixed epsilon of 1e-5; q, k and v
    clipped by clip_qkv (OLMo 1.7: 7B 0424, 0724)."""
    return replace(_llama_like(False, None, _no_windows)(r, sizes), norm="layer", norm_params=False,
                   clip_qkv=r("clip_qkv"))


# ----------------------------------------------------- dense families of remote-code origin

def _aliases(names: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``derive`` reading a release's own spelling of keys (its remote-code config's; transformers' config class maps
    them the same way, its ``attribute_map``): ``names`` alias -> the key Ferrum reads, filled in where absent."""

    def derive(raw: dict[str, Any]) -> dict[str, Any]:
        return {**{ours: raw[alias] for alias, ours in names.items() if alias in raw and ours not in raw}, **raw}

    return derive


#: EXAONE 3 / 3.5's modules (its release's names, which transformers 5 keeps when it saves one) under Llama's.
EXAONE_NAMES = {"layers": "h", "embed_tokens": "wte", "norm": "ln_f", "input_layernorm": "ln_1",
                "post_attention_layernorm": "ln_2", "self_attn.q_proj": "attn.attention.q_proj",
                "self_attn.k_proj": "attn.attention.k_proj", "self_attn.v_proj": "attn.attention.v_proj",
                "self_attn.o_proj": "attn.attention.out_proj", "mlp.gate_proj": "mlp.c_fc_0",
                "mlp.up_proj": "mlp.c_fc_1", "mlp.down_proj": "mlp.c_proj"}


def _exaone(r: KeyReader, sizes: Sizes) -> Architecture:
    """EXAONE 3 / 3.5 (transformers runs it as Llama after renaming): Llama's blocks under ``transformer.h``."""
    return replace(_llama_like(False, None, _no_windows)(r, sizes), prefix="transformer.", stored_names=EXAONE_NAMES)


def _internlm3(r: KeyReader, sizes: Sizes) -> Architecture:
    """InternLM3: Llama's blocks; its qkv_bias and bias (o_proj and the MLP) must agree, as transformers requires."""
    if bool(r("attention_bias")) != bool(r("mlp_bias")):
        r.fail("qkv_bias", f"(attention_bias: {r('attention_bias')!r}) differs from bias (mlp_bias: "
                           f"{r('mlp_bias')!r}); transformers runs InternLM3 with one setting for both, and no "
                           "release differs", unsupported=True)
    return _llama_like(False, None, _no_windows)(r, sizes)


#: InternLM2 / 2.5's modules (remote code: q/k/v packed in ``wqkv`` grouped by key/value head) under Llama's.
INTERNLM2_NAMES = {"embed_tokens": "tok_embeddings", "input_layernorm": "attention_norm",
                   "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attention.wqkv",
                   "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
                   "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}


def _internlm2(r: KeyReader, sizes: Sizes) -> Architecture:
    """InternLM2 / 2.5 (remote code, mlx-lm's internlm2): Llama's blocks with q/k/v in one ``wqkv`` whose rows are
    grouped by key/value head (its queries, then its key, then its value), ``bias`` on wqkv and wo, the LM head
    ``output``."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    r("hidden_act")
    bias = r("bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias,
        fused_qkv=True, qkv_grouped=True, stored_names=INTERNLM2_NAMES,
        layouts=(("model.", "output.weight", {}),),
    )


#: Qwen (1)'s modules (its remote code's, which mlx-lm's conversion keeps) under Llama's: q/k/v in one ``c_attn``
#: (queries, then keys, then values), the MLP's gate ``w2`` and up ``w1``.
QWEN_NAMES = {"layers": "h", "embed_tokens": "wte", "norm": "ln_f", "input_layernorm": "ln_1",
              "post_attention_layernorm": "ln_2", "self_attn.qkv_proj": "attn.c_attn",
              "self_attn.o_proj": "attn.c_proj", "mlp.gate_proj": "mlp.w2", "mlp.up_proj": "mlp.w1",
              "mlp.down_proj": "mlp.c_proj"}


def _qwen_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    """Qwen's MLP is half intermediate_size wide (its remote code and mlx-lm's split it between w1 and w2)."""
    return replace(sizes, intermediate_size=sizes.intermediate_size // 2)


def _qwen(r: KeyReader, sizes: Sizes) -> Architecture:
    """Qwen (1) (Qwen-1.8B ... 72B; remote code, mlx-lm's qwen): Llama's multi-head blocks with q/k/v in one biased
    ``c_attn``, the rope base rotary_emb_base. Past seq_length its release scales the rope base (use_dynamic_ntk) and
    the queries (use_logn_attn), both exactly 1 within it: with either on, the context is capped at seq_length."""
    if r("kv_channels") != sizes.head_dim:
        r.fail("kv_channels", f"is {r('kv_channels')}, but the heads are hidden_size / num_attention_heads = "
                              f"{sizes.head_dim} wide; Qwen's c_proj reads hidden_size inputs, so the two must agree")
    rope = read_rope(r, sizes, {"rope_theta": r("rotary_emb_base")}, "rotary_emb_base", ("default",))
    scaled = [name for name in ("use_dynamic_ntk", "use_logn_attn") if r(name)]
    limit = None
    if scaled:
        if r("seq_length") is None:
            r.fail("seq_length", f"is needed with {' and '.join(scaled)}: the context past which they apply")
        one = len(scaled) == 1
        limit = (r("seq_length"), f"{' and '.join(scaled)} {'changes' if one else 'change'} Qwen's attention past "
                                  f"seq_length ({r('seq_length')} tokens), which Ferrum does not run; set "
                                  f"{'it' if one else 'them'} to false in config.json to run the rope unscaled to "
                                  "max_position_embeddings")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=True, fused_qkv=True,
        prefix="transformer.", stored_names=QWEN_NAMES, context_limit=limit,
    )


#: mlx-lm's defaults for what a Qwen config leaves out (the releases carry them all).
_QWEN = (
    *_core_defaults(hidden_size=2048, num_attention_heads=16, num_hidden_layers=24, intermediate_size=11008,
                    vocab_size=151936, max_position_embeddings=8192),
    Key("layer_norm_epsilon", default=1e-6, check=optional_positive_number),
    Key("kv_channels", default=128, check=positive_int),
    Key("rotary_emb_base", default=10000.0, check=positive_number),
    Key("rotary_pct", default=1.0, check=one_of(1, 1.0), unsupported=True),
    Key("seq_length", check=optional_positive_int),
    Key("use_dynamic_ntk", default=False, check=boolean),
    Key("use_logn_attn", default=False, check=boolean),
    # no release sets either: its remote code then biases c_proj and the MLP (mlx-lm the LM head too); its c_attn
    # is biased whatever no_bias says
    Key("no_bias", default=True, check=one_of(True), unsupported=True),
    Key("scale_attn_weights", default=True, check=one_of(True), unsupported=True),
    Key("use_cache_quantization", default=False,
        check=falsy("Ferrum keeps the KV cache in the compute dtype; set it to false"), unsupported=True),
)


def _telechat3(r: KeyReader, sizes: Sizes) -> Architecture:
    """TeleChat3 (dense; remote code, mlx-lm's telechat3): Llama's blocks. Its releases' rope "telechat3-yarn" is
    YaRN with an attention factor of ``0.07 * ln(factor) + 1`` in place of YaRN's 0.1 (vLLM's TeleChat3 rope; mlx-lm
    runs it as plain YaRN), read here as YaRN with that attention_factor."""
    key, spec = _rope_spec(r)
    if spec.get("rope_type", spec.get("type")) == "telechat3-yarn":
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            if spec.get(name) is not None:
                r.fail(key, f"sets {name!r} with rope type 'telechat3-yarn', whose attention factor is fixed (vLLM "
                            "ignores it, mlx-lm reads it); remove it, or say rope_type 'yarn' to have it read",
                       unsupported=True)
        factor = spec.get("factor")
        if positive_number(factor) or spec.get("original_max_position_embeddings") is None:
            r.fail(key, "with rope type 'telechat3-yarn' needs a positive 'factor' and the "
                        f"'original_max_position_embeddings' it scales, got {spec!r}")
        yarn = {**{k: v for k, v in spec.items() if k != "type"}, "rope_type": "yarn",
                "attention_factor": 0.07 * math.log(factor) + 1.0 if factor > 1 else 1.0}
        r = KeyReader({**r.raw, **{k: yarn for k in ("rope_scaling", "rope_parameters") if isinstance(
            r.raw.get(k), dict) and "telechat3-yarn" in (r.raw[k].get("type"), r.raw[k].get("rope_type"))}},
            r.keys, r.family, r.where)
    return _llama_like(False, None, _no_windows)(r, sizes)


#: Lille 130M's modules (its nanoGPT-style code's, which mlx-lm's conversion keeps) under Llama's: each block's norm
#: inside its attention and feed-forward, q/k/v in one ``qkv_proj``.
LILLE_NAMES = {"embed_tokens": "tok_embeddings", "input_layernorm": "attention.norm",
               "post_attention_layernorm": "feed_forward.norm", "self_attn.qkv_proj": "attention.qkv_proj",
               "self_attn.o_proj": "attention.out_proj", "mlp.gate_proj": "feed_forward.gate_proj",
               "mlp.up_proj": "feed_forward.up_proj", "mlp.down_proj": "feed_forward.down_proj"}
#: Lille's config keys for the sizes (nanoGPT's).
LILLE_CONFIG_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                      "max_position_embeddings": "block_size"}


def _lille_width(raw: dict[str, Any]) -> dict[str, Any]:
    """Lille's MLP width, which its config does not store: 8/3 of n_embd rounded to a multiple of 256 as mlx-lm's
    port computes it (its release's GGUF exporter rounds up instead: the two agree on the release's n_embd, 640)."""
    width = raw.get("n_embd")
    if isinstance(width, int) and not isinstance(width, bool) and width > 0:
        return {**raw, "intermediate_size": 256 * round(int(8 * width / 3) / 256)}
    return raw


def _lille_kv_heads(r: KeyReader, heads: int) -> int:
    kv_heads = r("n_kv_heads")
    if heads % kv_heads:
        r.fail("n_kv_heads", f"is {kv_heads}, but n_head ({heads}) must be a multiple of it")
    return kv_heads


def _lille(r: KeyReader, sizes: Sizes) -> Architecture:
    """Lille 130M (remote code, mlx-lm's lille-130m): Llama's blocks with q/k/v in one ``qkv_proj``, GPT-J's rope
    (adjacent dims paired, as mlx-lm's port turns them), the LM head the embedding."""
    if sizes.intermediate_size == 0:
        r.fail("n_embd", f"is {r('n_embd')}, which gives Lille's MLP no width (8/3 of it, rounded to 256s)")
    rope = read_rope(r, sizes, {"rope_theta": r("rope_theta")}, "rope_theta", ("default",))
    return Architecture(
        layers=tuple(LayerSpec(None, replace(rope, interleaved=True)) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), fused_qkv=True,
        prefix="transformer.", stored_names=LILLE_NAMES,
    )


_LILLE = (
    Key("n_embd", check=size(1 << 17)), Key("n_layer", check=size(1024)), Key("n_head", check=size(4096)),
    Key("n_kv_heads", check=size(4096)), Key("block_size", check=size(1 << 28)), Key("vocab_size", check=size(1 << 23)),
    Key("intermediate_size", check=optional_non_negative_int),  # derived (_lille_width)
    Key("layer_norm_eps", check=optional_positive_number),
    Key("rope_theta", default=10000.0, check=positive_number),
    Key("tie_word_embeddings", default=True, check=one_of(True), unsupported=True),  # its code always ties
)


def _nanbeige_passes(r: KeyReader) -> int:
    """How many times Nanbeige's layers run: num_loops, or one more than loop_loss_weights lists where it lists
    any (its checkpoints trained with a loss per extra pass, as mlx-lm reads them)."""
    weights = r("loop_loss_weights")
    if weights is not None and not isinstance(weights, list):
        r.fail("loop_loss_weights", f"must be a list (a weight per extra pass) or null, got {weights!r}")
    return len(weights) + 1 if weights else r("num_loops")


def _nanbeige(r: KeyReader, sizes: Sizes) -> Architecture:
    """Nanbeige 4.2 (remote code, mlx-lm's nanbeige): Llama's blocks run as a looped transformer, the stored layers
    ``passes`` times in turn (``Architecture.loops``: each pass its own KV, the stream normed by the final norm
    between passes); ``sizes`` counts the layers of every pass (:func:`_nanbeige_sizes`)."""
    passes = _nanbeige_passes(r)
    stored = sizes.num_layers // passes
    arch = _llama_like(False, None, _no_windows)(r, sizes)
    return replace(arch, loops=passes, aliases=tuple(
        (f"layers.{i}.", f"layers.{i % stored}.") for i in range(stored, sizes.num_layers)))


def _nanbeige_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    return replace(sizes, num_layers=sizes.num_layers * _nanbeige_passes(r))


_NANBEIGE = (
    Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean),
    Key("num_loops", default=1, check=size(64)),
    Key("loop_loss_weights"),
    Key("skip_loop_final_norm", default=False, check=falsy(
        "Ferrum norms the stream between Nanbeige's passes, as its releases do; set it to false"), unsupported=True),
    # what mlx-lm refuses too: features of its reference code without weights of their own
    *(Key(name, default=False, check=falsy("mlx-lm refuses it too; load a release without it"), unsupported=True)
      for name in ("enable_double_loop_split", "loop_share_kv", "enable_depth_attention")),
)


def _iquest_loop(r: KeyReader, sizes: Sizes) -> Architecture:
    """IQuest-Coder-V1-Loop (remote code, mlx-lm's iquestloopcoder): Llama's blocks run twice in turn, the stream
    going on un-normed; each second-pass layer attends its own keys and values within loop_window_size and its first
    pass's in full, mixing the two by its loop gate (:mod:`ferrum.arch.loop_gate`); ``sizes`` counts both passes'
    layers (:func:`_iquest_loop_sizes`)."""
    stored, window = sizes.num_layers // 2, r("loop_window_size")
    arch = _llama_like(False, None, _no_windows)(r, sizes)
    layers = arch.layers[:stored] + tuple(replace(layer, window=window, mixer="loop_attention", full_source=i)
                                          for i, layer in enumerate(arch.layers[:stored]))
    return replace(arch, layers=layers, loops=2, loop_norm=False, aliases=tuple(
        (f"layers.{i}.", f"layers.{i - stored}.") for i in range(stored, sizes.num_layers)), stored_names={
        f"layers.{i + stored}.{loop_gate.MODULE}": f"gate_projections.{i}" for i in range(stored)})


def _iquest_loop_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    return replace(sizes, num_layers=sizes.num_layers * 2)


#: AFM's modules (mlx-lm's afm7, which has no sanitize: its names are the checkpoints') under Llama's.
AFM_NAMES = {"embed_tokens": "embedding", "norm": "output_norm", "self_attn.o_proj": "self_attn.out_proj"}


def _afm_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """AFM's config keys under Ferrum's, and its MLP's width, ``int(hidden_dim * hidden_dim_scale_factor)`` as
    mlx-lm's MLP sizes it (the config stores none)."""
    raw = _aliases({"hidden_dim": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                    "num_kv_heads": "num_key_value_heads"})(raw)
    factor, hidden = raw.get("hidden_dim_scale_factor"), raw.get("hidden_size")
    factor = 3.25 if factor is None else factor
    if "intermediate_size" in raw or not isinstance(hidden, int) or not isinstance(factor, (int, float)):
        return raw  # the keys' checks say what is wrong
    return {**raw, "intermediate_size": int(hidden * factor)}


def _afm7(r: KeyReader, sizes: Sizes) -> Architecture:
    """Apple's on-device Foundation Model (mlx-lm's afm7): Llama's blocks with q/k/v fused, GPT-J's rope (adjacent
    dims paired), q/k RMSNorms (epsilon 1e-5) after it, keys and values on learned int8 grids (``kv_quant``), tied
    embeddings; its last num_kv_reuse_layers layers (``kv_reuse_layers.{j}``) project queries alone and attend the
    last regular layer's keys and values (``kv_source``)."""
    reused, total = r("num_kv_reuse_layers"), sizes.num_layers
    if reused is None:
        r.fail("num_kv_reuse_layers", "is missing: mlx-lm's afm7 needs it too; set it (0: every layer its own keys)")
    if reused >= total:
        r.fail("num_kv_reuse_layers", f"is {reused}, but the model needs a layer of its own keys and values before "
                                      f"them (num_layers is {total})")
    rope = replace(read_rope(r, sizes, {"rope_theta": r("rope_theta")}, "rope_theta", ("default",)), interleaved=True)
    regular = total - reused
    return Architecture(
        layers=tuple(LayerSpec(None, rope, kv_source=None if i < regular else regular - 1) for i in range(total)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), fused_qkv=True, qk_norm="head",
        qk_norm_after_rope=True, norm_eps={"qk": 1e-5}, kv_quant=True, stored_names=AFM_NAMES,
        layer_stems={i: f"kv_reuse_layers.{i - regular}" for i in range(regular, total)},
    )


def _cwm_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' CWM: layer_types, else every fourth layer full from the first on, the others sliding."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if i % 4 == 0 else SLIDING)
    return [window if t == SLIDING else None for t in types]


#: transformers' CWM rope settings where a config gives none (rope_theta included).
_CWM_ROPE = {"rope_type": "llama3", "rope_theta": 1_000_000.0, "factor": 16.0, "high_freq_factor": 4.0,
             "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


def _granite_swa(r: KeyReader, sizes: Sizes) -> Architecture:
    """Granite SWA: Granite's multipliers, sliding layers (every fourth full from the first on, unless layer_types
    says otherwise), each layer's rope base from layer_rope_theta (0: no rope), and a learned sink per query head
    (its output times ``sigmoid(logsumexp(scores) - sink)``: gpt-oss's sink, which joins the softmax)."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if i % 4 == 0 else SLIDING)
    arch = _granite(r, sizes)
    thetas = r("layer_rope_theta")
    if thetas is None:
        thetas = [arch.layers[0].rope.theta] * sizes.num_layers
    if not isinstance(thetas, list) or len(thetas) != sizes.num_layers or any(
            t != 0 and positive_number(t) for t in thetas):
        r.fail("layer_rope_theta", f"must list {sizes.num_layers} rope bases, positive or 0 (no rope), got {thetas!r}")
    ropes = [replace(spec.rope, theta=float(t)) if t else Rope.unrotated(sizes.head_dim)
             for spec, t in zip(arch.layers, thetas)]
    return replace(arch, sinks=True, layers=tuple(
        LayerSpec(window if t == SLIDING else None, rope) for t, rope in zip(types, ropes)))


#: HyperCLOVA X's Peri-LN: a norm before and after each of attention and the MLP.
HYPERCLOVAX_NORMS = {"pre_attn": "input_layernorm", "post_attn": "post_norm1",
                     "pre_mlp": "post_attention_layernorm", "post_mlp": "post_norm2"}


def _hyperclovax(r: KeyReader, sizes: Sizes) -> Architecture:
    """HyperCLOVA X SEED: Granite's multipliers (the logits multiplied by logits_scaling, not divided; the attention
    scale 1/sqrt(head_dim) unless attention_multiplier), with use_post_norm a norm after attention and after the MLP
    (its output then scaled by residual_multiplier: ``ferrum.arch.tensors`` folds the scale into those norms)."""
    arch = _llama_like(False, None, _no_windows)(r, sizes)
    scale = r("attention_multiplier")
    return replace(
        arch,
        norms=HYPERCLOVAX_NORMS if r("use_post_norm") else LLAMA_NORMS,
        embed_scale=None if r("embedding_multiplier") == 1 else float(r("embedding_multiplier")),
        residual_scale=float(r("residual_multiplier")),
        attn_scale=arch.attn_scale if scale is None else float(scale),
        logit_scale=float(r("logits_scaling")),
    )


def _minicpm_scalings(r: KeyReader, sizes: Sizes, arch: Architecture) -> Architecture:
    """MiniCPM's muP scalings: embeddings times scale_emb, what each block adds times ``scale_depth /
    sqrt(num_hidden_layers)`` (null: 1), the final hidden state divided by ``hidden_size / dim_model_base`` (null:
    1) before the LM head."""
    depth, base = r("scale_depth"), r("dim_model_base")
    return replace(
        arch,
        embed_scale=None if r("scale_emb") == 1 else float(r("scale_emb")),
        residual_scale=1.0 if depth is None else float(depth) / math.sqrt(sizes.num_layers),
        logit_scale=1.0 if base is None else float(base) / sizes.hidden_size,
    )


def _minicpm(r: KeyReader, sizes: Sizes) -> Architecture:
    """MiniCPM (1B, 2B; remote code, mlx-lm's minicpm): Llama's blocks with :func:`_minicpm_scalings`. The LM head
    reads the scaled-down state whether tied or not, as OpenBMB's code runs it (mlx-lm skips the scaling when tied)."""
    return _minicpm_scalings(r, sizes, _llama_like(False, None, _no_windows)(r, sizes))


#: OpenBMB's MiniCPM configs carry all three (its remote code has no defaults Ferrum could vouch for).
_MINICPM = tuple(Key(name, check=positive_number) for name in ("scale_emb", "scale_depth", "dim_model_base"))


def _bitnet(r: KeyReader, sizes: Sizes) -> Architecture:
    """BitNet b1.58: Llama's blocks with RMSNorms on attention's output and the MLP's hidden layer (sub-norms) and
    a gated squared-ReLU MLP; its ternary weights and per-token int8 inputs are the quantization section's
    (:mod:`ferrum.quant.bitnet`)."""
    return replace(_llama_like(False, None, _no_windows)(r, sizes), sub_norms=True, activation="relu2")


def _diffllama_head_dim(r: KeyReader) -> int:
    """Twice the stored heads' dims: the differential heads Ferrum attends (:mod:`ferrum.arch.differential`)."""
    stored = r.get("head_dim") or r("hidden_size") // r("num_attention_heads")
    return 2 * stored


def _diffllama(r: KeyReader, sizes: Sizes) -> Architecture:
    """DiffLlama: Llama's blocks with differential attention, run as attention over heads twice as wide whose first
    half rope turns; the stored heads are padded and the values paired at load (:mod:`ferrum.arch.differential`)."""
    stored = sizes.head_dim // 2
    if sizes.num_kv_heads % 2:
        r.fail("num_key_value_heads", f"is {sizes.num_kv_heads}; differential attention splits the values between "
                                      "two halves of the key/value heads, so it must be even")
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=stored)
    r("hidden_act")
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, heads=StoredHeads(head_dim=stored)) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(stored), qkv_bias=bias, o_bias=bias,
        mlp_bias=False, differential=True,
    )


def _plamo_kv_heads(r: KeyReader, heads: int) -> int:
    """PLaMo's key/value heads: ``ceil(heads / n_shared_head)``, tiled over the queries; mlx-lm tiles them
    n_shared_head times, which gives every query one only where n_shared_head divides the heads."""
    shared = r("n_shared_head")
    if heads % shared:
        r.fail("n_shared_head", f"({shared}) must divide num_attention_heads ({heads}): mlx-lm tiles the key/value "
                                "heads n_shared_head times over the queries")
    return heads // shared


def _plamo(r: KeyReader, sizes: Sizes) -> Architecture:
    """Preferred Networks' PLaMo (PLaMo-13B), as mlx-lm runs it: parallel blocks (attention and the SwiGLU MLP on one
    normed input, both added to the stream), key/value heads tiled over the queries (``tiled_kv_heads``), rope over
    whole heads (GPT-J's pairs where rope_traditional), an untied head; its layers under ``layers.layers``."""
    rope = Rope(theta=float(r("rope_theta")), head_dim=sizes.head_dim, rotary_dim=sizes.head_dim, kind="default",
                interleaved=bool(r("rope_traditional")))
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms={"pre_attn": "norm"}, parallel=True, attn_scale=1.0 / math.sqrt(sizes.head_dim), tiled_kv_heads=True,
        stored_names={"layers": "layers.layers"},
    )


#: Talkie's modules (its release's names, which mlx-lm keeps) under Llama's; its gains' tensors under Ferrum's
#: (:mod:`ferrum.arch.gains`).
TALKIE_NAMES = {
    "embed_tokens": "embed", "layers": "blocks", "self_attn.q_proj": "attn.attn_query",
    "self_attn.k_proj": "attn.attn_key", "self_attn.v_proj": "attn.attn_value", "self_attn.o_proj": "attn.attn_resid",
    "mlp.gate_proj": "mlp.mlp_gate", "mlp.up_proj": "mlp.mlp_linear", "mlp.down_proj": "mlp.mlp_resid",
    gains.HEADS: "attn.head_gain.head_g", gains.ATTN: "attn_gain.a_g", gains.MLP: "mlp_gain.a_g",
    gains.SKIP: "embed_skip.a_g",
}


def _talkie(r: KeyReader, sizes: Sizes) -> Architecture:
    """Talkie (remote code; mlx-lm's talkie): Llama's gated MLP in pre-norm blocks whose RMSNorms have no weight (the
    token embeddings normed too, before the first block), rope turning the other way (frequencies negated, as
    nanochat's) with q and k normed once rotated, then each query head weighed by a learned gain; learned scalars on
    attention's and the MLP's outputs, on the normed embeddings each block adds after its MLP, and on the logits
    (:mod:`ferrum.arch.gains`); an untied LM head stored bare (``lm_head``, no ``.weight``). As many key/value heads
    as query heads."""
    if sizes.num_kv_heads != sizes.num_heads:
        r.fail("num_key_value_heads", f"is {sizes.num_kv_heads}, but Talkie's attention has as many key/value heads "
                                      f"as query heads ({sizes.num_heads}); remove the key", unsupported=True)
    key, spec = _rope_spec(r)
    rope = replace(read_rope(r, sizes, spec, key, ("default",)), negated=True)
    r("hidden_act")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm_params=False, embed_norm=True, attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="each_head", qk_norm_after_rope=True, qk_norm_params=False,
        gains=True, embed_skip=True, head_gain="lm_head_gain.w_g",
        stored_names=TALKIE_NAMES, layouts=(("model.", "lm_head", {}),),
    )


#: Spark 2.5's modules under Llama's: q, k and v in one matrix (``q_k_v_proj``, rows in that order), the per-head
#: output gate ``g_proj``, ``out_proj``; some mlx-lm conversions name the embedding ``embed_tokens`` (a layout).
SPARK2_5_NAMES = {"embed_tokens": "embedding", "self_attn.qkv_proj": "self_attn.q_k_v_proj",
                  "self_attn.gate_proj": "self_attn.g_proj", "self_attn.o_proj": "self_attn.out_proj"}


def _spark2_5(r: KeyReader, sizes: Sizes) -> Architecture:
    """Spark 2.5 (remote code; mlx-lm's spark2_5): Llama's blocks with an exact-GELU gated MLP, q/k/v fused, each
    head's output times the sigmoid of its own gate (``g_proj``, one row per head), three sliding layers to one full
    unless layer_types says otherwise, and a rope per attention kind from rope_parameters (its base, 10000 where an
    entry gives none, as mlx-lm reads it, and its partial_rotary_factor; a top-level rope_theta is not read)."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if i % 4 == 3 else SLIDING)
    specs = _per_kind_rope_specs(r, "Spark 2.5")
    if specs is None:
        r.fail("rope_parameters", f"must hold one entry per attention kind ({FULL!r}, {SLIDING!r}) for Spark 2.5")
    ropes = {}
    for kind, spec in zip((FULL, SLIDING), specs):
        if kind not in types:
            continue
        if not spec:
            r.fail("rope_parameters", f"has no entry for {kind!r}, which layer_types uses")
        ropes[kind] = read_rope(r, sizes, spec, "rope_parameters", ("default",),
                                rotary_dim=_rotary_dim(r, sizes, spec, 1.0))
    r("hidden_act")
    return Architecture(
        layers=tuple(LayerSpec(window if kind == SLIDING else None, ropes[kind]) for kind in types),
        norms=LLAMA_NORMS, activation="gelu", attn_scale=1.0 / math.sqrt(sizes.head_dim), fused_qkv=True,
        attn_output_gate=True, attn_gate_stored=True, attn_gate_per_head=True, mlp_bias=r("mlp_bias"),
        stored_names=SPARK2_5_NAMES, layouts=(("model.", "lm_head.weight", {"embed_tokens": "embed_tokens"}),),
    )


def _baichuan_m1_kinds(r: KeyReader, layers: int) -> list[bool]:
    """Whether each layer slides (its index in sliding_window_layers)."""
    listed = r("sliding_window_layers")
    if not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers
                                               for i in listed):
        r.fail("sliding_window_layers", f"must list layer indices below num_hidden_layers ({layers}), got {listed!r}")
    return [i in listed for i in range(layers)]


def _baichuan_m1_layer_kv(r: KeyReader) -> tuple[int, int]:
    """The full and the sliding layers' key/value heads (num_swa_key_value_heads, where set, the sliding ones')."""
    full = r("num_key_value_heads")
    return full, r("num_swa_key_value_heads") or full


def _baichuan_m1_kv_heads(r: KeyReader, heads: int) -> int:
    """The most key/value heads of any layer; fewer are repeated at load (``StoredHeads.kv_heads``), so each
    kind's must divide them and the query heads."""
    full, sliding = _baichuan_m1_layer_kv(r)
    kinds = _baichuan_m1_kinds(r, r("num_hidden_layers"))
    most = max(sliding if slides else full for slides in kinds)
    for key, kv in (("num_key_value_heads", full), ("num_swa_key_value_heads", sliding)):
        if heads % kv or most % kv:
            r.fail(key, f"gives {kv} key/value heads; num_attention_heads ({heads}) and every layer's key/value heads "
                        f"({most}) must be multiples of it")
    return most


def _baichuan_m1(r: KeyReader, sizes: Sizes) -> Architecture:
    """Baichuan-M1 (remote code, mlx-lm's baichuan_m1): Llama's blocks whose attention (q/k/v fused in ``W_pack``,
    heads of hidden_size / num_attention_heads) convolves its raw keys and values along the sequence over two taps
    per key/value head before rope (mixer "conv_attention", :mod:`ferrum.recurrent.kv_conv`); the layers of
    sliding_window_layers slide, with key/value heads of their own (num_swa_key_value_heads; the fewer of either
    kind repeated at load); the LM head's rows (each token's) normed at load (NormHead), as mlx-lm's sanitize does."""
    heads, head = sizes.num_heads, sizes.head_dim
    swa_heads = r("num_swa_attention_heads")
    if swa_heads and swa_heads != heads:
        r.fail("num_swa_attention_heads", f"is {swa_heads}, beside num_attention_heads {heads}: sliding layers with "
                                          "heads of other widths are not supported", unsupported=True)
    kinds = _baichuan_m1_kinds(r, sizes.num_layers)
    full_kv, sliding_kv = _baichuan_m1_layer_kv(r)
    rope = Rope(theta=float(r("rope_theta")), head_dim=head, rotary_dim=head, kind="default")
    window = r("sliding_window")

    def layer(slides: bool) -> LayerSpec:
        kv = sliding_kv if slides else full_kv
        return LayerSpec(window if slides else None, rope, mixer="conv_attention",
                         heads=StoredHeads(kv_heads=None if kv == sizes.num_kv_heads else kv))

    return Architecture(
        layers=tuple(layer(slides) for slides in kinds),
        norms=LLAMA_NORMS, attn_scale=head ** -0.5, fused_qkv=True, head_normed=True, head_norm_axis=1,
        kv_conv=KvConvSpec(sizes.num_kv_heads, head, r("conv_window")),
        stored_names={"self_attn.qkv_proj": "self_attn.W_pack", TAPS[0]: "self_attn.conv_k",
                      TAPS[1]: "self_attn.conv_v"},
    )


def _baichuan_m1_context(raw: dict[str, Any]) -> dict[str, Any]:
    """The context where max_position_embeddings is left out: model_max_length (mlx-lm bounds neither)."""
    if raw.get("max_position_embeddings") is None and raw.get("model_max_length") is not None:
        return {**raw, "max_position_embeddings": raw["model_max_length"]}
    return raw


TABLE: dict[str, Family] = {
    "baichuan_m1": Family(  # Baichuan-M1: convolved keys and values, sliding layers with key/value heads of their own
        _keys((
            Key("hidden_size", check=size(1 << 17)),
            Key("intermediate_size", check=size(1 << 20)),
            Key("num_hidden_layers", check=size(1024)),
            Key("num_attention_heads", check=size(4096)),
            Key("num_key_value_heads", check=size(4096)),
            Key("vocab_size", check=size(1 << 23)),
            Key("rms_norm_eps", check=required(positive_number)),
            Key("rope_theta", check=required(positive_number)),
            Key("sliding_window", check=required(positive_int)),
            Key("sliding_window_layers", check=required(lambda value: None)),
            Key("conv_window", check=required(one_of(2)), unsupported=True),  # mlx-lm's port asserts 2
            Key("num_swa_attention_heads", check=optional_positive_int),
            Key("num_swa_key_value_heads", check=optional_positive_int),
            # no positions bound it in mlx-lm: model_max_length where set (_baichuan_m1_context), else 32768
            Key("max_position_embeddings", default=32768, check=size(1 << 28)),
            Key("tie_word_embeddings", default=False, check=falsy(
                "mlx-lm runs Baichuan-M1 with its own lm_head whatever this says; store one and set it false")),
            Key("hidden_act", default="silu", check=one_of("silu"), unsupported=True),
        )),
        _baichuan_m1,
        head_dim=lambda r: r("hidden_size") // r("num_attention_heads"),
        kv_heads=_baichuan_m1_kv_heads,
        derive=_baichuan_m1_context,
    ),
    "plamo": Family(  # Preferred Networks' PLaMo-13B: parallel blocks, key/value heads tiled over the queries
        _keys((
            Key("hidden_size", check=size(1 << 17)),
            Key("intermediate_size", check=size(1 << 20)),
            Key("num_hidden_layers", check=size(1024)),
            Key("num_attention_heads", check=size(4096)),
            Key("vocab_size", check=size(1 << 23)),
            Key("rms_norm_eps", check=positive_number),
            Key("n_shared_head", default=8, check=positive_int),
            Key("rope_theta", default=10000.0, check=positive_number),
            Key("rope_traditional", default=False, check=boolean),
            # no positions bound it in mlx-lm: the release's 4096 where a config leaves it out
            Key("max_position_embeddings", default=4096, check=size(1 << 28)),
            Key("tie_word_embeddings", default=False, check=falsy(
                "mlx-lm runs PLaMo with its own lm_head whatever this says; store one and set it false")),
        )),
        _plamo,
        kv_heads=_plamo_kv_heads,
    ),
    "llama": Family(
        _keys(_core(False), _core_defaults(vocab_size=32000, max_position_embeddings=2048), _ROPE, _SILU,
              (Key("attention_bias", check=boolean), Key("mlp_bias", check=boolean))),
        _llama_like(False, None, _no_windows),
    ),
    "mistral": Family(
        _keys(_core(False), _core_defaults(vocab_size=32000, max_position_embeddings=131072), _ROPE, _SILU,
              (Key("sliding_window", default=4096, check=optional_positive_int),)),
        _llama_like(False, None, _every_layer_window),
    ),
    "olmo3": Family(
        _keys(_core(False), _ROPE[:3], _SILU, _LAYER_TYPES, (
            Key("sliding_window", default=4096, check=optional_positive_int),
            Key("attention_bias", default=False, check=boolean),
        )),
        _olmo3,
        eps_default=1e-5,
    ),
    "ministral": Family(  # Ministral 8B (2410)
        _keys(_core(False), _ROPE, _SILU, _LAYER_TYPES,
              (Key("sliding_window", default=4096, check=optional_positive_int),)),
        _llama_like(False, None, _ministral_windows),
    ),
    "ministral3": Family(  # Ministral 3 (3B / 8B / 14B), Devstral 2: the text model of a Mistral3 wrapper
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, _WINDOW,
              (Key("rope_parameters", default=_MINISTRAL3_ROPE),)),
        _ministral3,
        eps_default=1e-5,
    ),
    "qwen2": Family(  # transformers' Qwen2 always biases q/k/v and never o; it ignores attention_bias
        _keys(_core(False), _ROPE, _SILU, _QWEN_WINDOW),
        _llama_like(True, None, _qwen_windows),
    ),
    "qwen3": Family(
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, _QWEN_WINDOW,
              (Key("attention_bias", check=boolean),)),
        _llama_like(False, "head", _qwen_windows),
    ),
    "granite": Family(
        _keys(_core(False), _ROPE, _SILU, _GRANITE),
        _granite,
    ),
    "smollm3": Family(
        _keys(_core(True), _ROPE, _theta(2_000_000.0), _SILU, _SMOLLM3),
        _llama_like(False, None, _smollm3_windows, _smollm3_rotated),
    ),
    "glm4": Family(  # GLM-4-0414
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, (
            Key("partial_rotary_factor", check=optional_positive_number),  # in place of _ROPE's refusal
            Key("attention_bias", default=True, check=boolean),
        )),
        _glm4,
        eps_default=1.5625e-07,
    ),
    "glm": Family(  # GLM-4 9B chat (-hf), GLM-Edge
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, (
            Key("partial_rotary_factor", check=optional_positive_number),  # in place of _ROPE's refusal
            Key("attention_bias", default=True, check=boolean),
        )),
        _glm,
        eps_default=1.5625e-07,
    ),
    "helium": Family(  # Kyutai's Helium 1
        _keys(_core(False, head_dim_default=128), _ROPE, _theta(100_000.0), _SILU, (
            Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean))),
        _helium,
        eps_default=1e-8,
    ),
    "hunyuan_v1_dense": Family(  # Tencent's Hunyuan 0.5B-7B
        _keys(_core(False), _ROPE, _SILU, (Key("attention_bias", default=False, check=boolean),)),
        _hunyuan_dense,
        eps_default=1e-5,
    ),
    "ernie4_5": Family(  # Baidu's ERNIE 4.5 (dense)
        _keys(_core(True, head_dim_default=128), _ROPE, _theta(500_000.0), _SILU,
              (Key("use_bias", default=False, check=boolean),)),
        _ernie4_5,
        eps_default=1e-5,
    ),
    "seed_oss": Family(  # ByteDance's Seed-OSS
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, (
            Key("attention_bias", default=True, check=boolean), Key("attention_out_bias", default=False, check=boolean),
            Key("mlp_bias", default=False, check=boolean))),
        _seed_oss,
    ),
    "exaone4": Family(  # EXAONE 4: OLMo 2's norms after attention and MLP, Qwen 3's q/k norms, NoPE full layers
        _keys(_core(False), _ROPE, _SILU, _EXAONE4),
        _llama_like(False, "head", _exaone4_windows, _exaone4_rotated, norms=POST_NORMS),
        eps_default=1e-5,
    ),
    "olmo": Family(  # OLMo 1 (1B, 7B)
        _keys(_core(False, eps_key=None), _ROPE, _SILU, (
            Key("attention_bias", check=boolean),
            Key("clip_qkv", check=optional_positive_number),
        )),
        _olmo,
        eps_default=1e-5,
        eps_key=None,
    ),
    "olmo2": Family(  # transformers' OLMo 2: attention_bias covers q/k/v and o, like Llama's
        _keys(_core(False), _ROPE, _SILU, (Key("attention_bias", check=boolean),)),
        _llama_like(False, "projection", _no_windows, norms=POST_NORMS),
        eps_default=1e-5,
    ),
    "phi3": Family(
        _keys(_core(False), _ROPE[:3], _SILU, _WINDOW, (
            Key("partial_rotary_factor", check=optional_positive_number),
            Key("original_max_position_embeddings", default=4096, check=optional_positive_int),
        )),
        _phi3,
        eps_default=1e-5,
    ),
    "exaone": Family(  # EXAONE 3 / 3.5: Llama's blocks under the release's names and config keys
        _keys(_core(False), _ROPE, _theta(500_000.0), _SILU,
              (Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean))),
        _exaone,
        eps_default=1e-5,
        derive=_aliases({"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps",
                         "activation_function": "hidden_act"}),
    ),
    "internlm3": Family(  # InternLM3: Llama's blocks; the release's qkv_bias / bias are attention_bias / mlp_bias
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU,
              (Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean))),
        _internlm3,
        eps_default=1e-5,
        derive=_aliases({"qkv_bias": "attention_bias", "bias": "mlp_bias"}),
    ),
    "internlm2": Family(  # InternLM2 / 2.5 (remote code): packed, grouped wqkv
        _keys(_core(False), _ROPE, _SILU, (Key("bias", default=True, check=boolean),)),
        _internlm2,
    ),
    "iquestcoder": Family(  # IQuest-Coder-V1 (not its Loop variants): Llama's blocks
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, (
            Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean),
            Key("clip_qkv", check=falsy("transformers' IQuestCoder refuses it too; load a release without it"),
                unsupported=True),
            Key("use_sliding_window", default=False, check=falsy(
                "transformers' IQuestCoder refuses it too; set it to false"), unsupported=True),
        )),
        _llama_like(False, None, _no_windows),
        eps_default=1e-5,
    ),
    "iquestloopcoder": Family(  # IQuest-Coder-V1-Loop (remote code, mlx-lm's iquestloopcoder): two gated passes
        _keys(_core(False), _core_defaults(max_position_embeddings=131072), _ROPE, _theta(500000.0), _SILU, (
            Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean),
            Key("loop_num", default=2, check=one_of(2), unsupported=True),  # mlx-lm asserts it
            Key("loop_window_size", default=64, check=size(1 << 28)),
        )),
        _iquest_loop,
        eps_default=1e-5,
        sizes=_iquest_loop_sizes,
    ),
    "afm7": Family(  # Apple's on-device Foundation Model (mlx-lm's afm7; no transformers code)
        _keys(_core(True), _core_defaults(max_position_embeddings=4096), (
            Key("num_kv_reuse_layers", check=optional_non_negative_int),
            Key("rope_theta", default=50000.0, check=positive_number),
            Key("hidden_dim_scale_factor", default=3.25, check=positive_number),
            Key("tie_word_embeddings", default=True, check=one_of(True), unsupported=True),  # its head is the embedding
            Key("head_dim", check=lambda v: None if v is None else "is not read: AFM's heads are hidden_dim / "
                "num_heads wide (mlx-lm's afm7); remove the key"),
        )),
        _afm7,
        eps_default=1e-5,
        derive=_afm_keys,
    ),
    # XVERSE-7B / 13B / 65B (remote code; mlx-lm runs them as llama): Llama's blocks under XverseConfig's defaults
    "xverse": Family(
        _keys(_core(False), _core_defaults(vocab_size=100278, max_position_embeddings=8192), _ROPE, _SILU, (
            Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean),
            Key("num_experts", unsupported=True, check=lambda v: None if not v else (
                f"is {v!r}: XVERSE-MoE's experts are not supported (mlx-lm's llama, which runs xverse, has none "
                "either); use a dense XVERSE release")),
        )),
        _llama_like(False, None, _no_windows),
    ),
    # Xiaomi's MiMo-7B (remote code; mlx-lm's mimo): Qwen 2's blocks; its multi-token prediction layers
    # (model.mtp_layers.*) are not run, as mlx-lm drops them
    "mimo": Family(
        _keys(_core(False), _ROPE, _SILU, _QWEN_WINDOW),
        _llama_like(True, None, _qwen_windows),
        unloaded=r"(^|\.)mtp_layers\.",
    ),
    "cwm": Family(  # Meta's Code World Model: Llama's blocks, three sliding layers to one full
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, _LAYER_TYPES, (
            Key("rope_parameters", default=_CWM_ROPE),
            Key("sliding_window", default=8192, check=optional_positive_int),
            Key("mlp_bias", default=False, check=boolean),
        )),
        _llama_like(False, None, _cwm_windows),
        eps_default=1e-5,
    ),
    "hyperclovax": Family(  # NAVER's HyperCLOVA X SEED (Think 14B): Granite's multipliers, Peri-LN
        _keys(_core(False), _ROPE, _SILU, (
            Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean),
            *(Key(name, default=1.0, check=positive_number)
              for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling")),
            Key("attention_multiplier", check=optional_positive_number),  # null: 1 / sqrt(head_dim)
            Key("use_post_norm", default=True, check=boolean),
        )),
        _hyperclovax,
    ),
    "granite_swa": Family(  # IBM's Granite SWA: Granite's multipliers, sliding layers, per-layer rope, sinks
        _keys(_core(True), _ROPE, _SILU, _GRANITE, _LAYER_TYPES, (
            Key("sliding_window", default=128, check=optional_positive_int),
            Key("layer_rope_theta"),
        )),
        _granite_swa,
        eps_default=1e-5,
    ),
    "minicpm": Family(  # OpenBMB's MiniCPM 1B / 2B (remote code): Llama's blocks with muP scalings
        _keys(_core(True), _ROPE, _SILU, _MINICPM),
        _minicpm,
    ),
    "bitnet": Family(  # microsoft/bitnet-b1.58-2B-4T (packed ternary) and -bf16 (master weights)
        _keys(_core(False), _core_defaults(vocab_size=128256, max_position_embeddings=2048, num_key_value_heads=5),
              _ROPE, _theta(500_000.0), (
                  Key("hidden_act", default="relu2", check=one_of("relu2"), unsupported=True),
                  Key("attention_bias", default=False, check=boolean),
              )),
        _bitnet,
        eps_default=1e-5,
    ),
    "qwen": Family(  # Qwen (1): Qwen-1.8B / 7B / 14B / 72B and their chats (remote code, mlx-lm's qwen)
        _keys(_core(False, eps_key="layer_norm_epsilon"), _QWEN, _SILU),
        _qwen,
        eps_key="layer_norm_epsilon",
        sizes=_qwen_sizes,
    ),
    "telechat3": Family(  # TeleChat3 (dense: 36B; remote code, mlx-lm's telechat3): Llama's blocks
        _keys(_core(False), _ROPE, _SILU,
              (Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean))),
        _telechat3,
    ),
    "lille-130m": Family(  # Lille 130M (remote code, mlx-lm's lille-130m): nanoGPT's keys over Llama's blocks
        _keys(_LILLE),
        _lille,
        eps_default=1e-5,
        eps_key="layer_norm_eps",
        names=LILLE_CONFIG_NAMES,
        kv_heads=_lille_kv_heads,
        unloaded=r"\.rotary_emb\.",  # its rope's cached cos / sin, which mlx-lm's sanitize drops too
        derive=_lille_width,
    ),
    "nanbeige": Family(  # Nanbeige 4.2 (remote code, mlx-lm's nanbeige): Llama's blocks, looped
        _keys(_core(False), _ROPE, _theta(10000.0), _SILU, _NANBEIGE),
        _nanbeige,
        eps_default=1e-5,
        sizes=_nanbeige_sizes,
    ),
    "talkie": Family(  # Talkie (remote code; mlx-lm's talkie): ModelArgs' defaults, its 13B's sizes
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40, vocab_size=65540,
            max_position_embeddings=2048,
        ), _ROPE, _theta(1_000_000.0), _SILU, (
            Key("tie_word_embeddings", default=False, check=falsy(
                "Talkie's LM head is its own (lm_head); remove the key"), unsupported=True),
        )),
        _talkie,
        eps_default=1.1920928955078125e-07,  # float32's machine epsilon: F.rms_norm's default, as mlx-lm runs it
        unloaded=r"rotary|(?:cos|sin)$",  # rope buffers, which mlx-lm's sanitize drops
    ),
    "spark2_5": Family(  # Spark 2.5 (remote code; mlx-lm's spark2_5)
        _keys(_core(True), _core_defaults(max_position_embeddings=8192), _LAYER_TYPES, (
            Key("rope_parameters"), Key("rope_scaling"),
            Key("partial_rotary_factor", check=one_of(None, 1, 1.0), unsupported=True),  # rope_parameters' entries'
            Key("sliding_window", check=optional_positive_int),
            Key("hidden_act", default="gelu", check=one_of("gelu"), unsupported=True),
            Key("gate_attn_act_mode", default="sigmoid", check=one_of("sigmoid"), unsupported=True),
            Key("headwise_attn_output_gate", default=True, check=one_of(True), unsupported=True),
            Key("attention_bias", default=False, check=falsy(
                "Ferrum runs Spark 2.5's attention without biases; load a release without them"), unsupported=True),
            Key("mlp_bias", default=False, check=boolean),
        )),
        _spark2_5,
    ),
    "diffllama": Family(  # DiffLlama (the differential transformer on Llama's blocks)
        _keys(_core(False), _core_defaults(vocab_size=32000, max_position_embeddings=2048), _ROPE, _SILU, (
            Key("attention_bias", default=False, check=boolean),
            Key("attention_dropout", default=0.0, check=one_of(0, 0.0), unsupported=True),
            Key("lambda_std_dev"),  # the initialisation's spread only
        )),
        _diffllama,
        eps_default=1e-5,
        head_dim=_diffllama_head_dim,
    ),
}
