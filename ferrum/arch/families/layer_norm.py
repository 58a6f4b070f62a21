"""LayerNorm and ungated-MLP families (Phi-2, StableLM, StarCoder2, Cohere, Nemotron, nanochat, ...)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from ferrum.arch.families._shared import (
    FULL, Family, LLAMA_NORMS, SLIDING, Sizes, _LAYER_NORM_ROPES, _LAYER_TYPES, _LLAMA_ROPES, _ROPE, _WINDOW, _core,
    _core_defaults, _keys, _layer_kinds, _rope_spec, _rotary_dim, _theta, read_rope,
)
from ferrum.arch.families.llama_like import _every_layer_window, _llama_like, _no_windows
from ferrum.arch.keys import (
    Key, KeyReader, boolean, one_of, optional_positive_int, optional_positive_number, positive_int, positive_number,
)
from ferrum.arch.rope import Rope
from ferrum.arch.spec import Architecture, LayerSpec


#: transformers' names of the ungated MLP's activations: the tanh approximation of GELU, or the exact one.
_GELU_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu"}
#: Phi-1 / 1.5 / 2's modules under Llama's names.
PHI_NAMES = {"self_attn.o_proj": "self_attn.dense", "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2",
             "norm": "final_layernorm"}


def _gelu_activation(r: KeyReader) -> str:
    return _GELU_ACTIVATIONS[r("hidden_act")]


def _phi(r: KeyReader, sizes: Sizes) -> Architecture:
    """Phi-1 / 1.5 / 2: one LayerNorm feeding attention and an ungated GELU MLP side by side (a parallel block),
    every projection and the LM head biased, rope on partial_rotary_factor (0.5) of each head; qk_layernorm
    adds a LayerNorm per head dimension to q and k."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms={"pre_attn": "input_layernorm"}, norm="layer", norm_bias=True, parallel=True,
        activation=_gelu_activation(r), attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head" if r("qk_layernorm") else None, qk_norm_names=("q_layernorm", "k_layernorm"),
        qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True, stored_names=PHI_NAMES,
    )


def _stablelm(r: KeyReader, sizes: Sizes) -> Architecture:
    """StableLM (3B 4E1T, 2 1.6B, 2 12B): Llama's blocks with biased LayerNorms, q/k/v biased by use_qkv_bias,
    rope on partial_rotary_factor (0.25) of each head; use_parallel_residual puts attention and the MLP side by
    side after the one norm; qk_layernorm adds a LayerNorm (no bias) per head to q and k."""
    if sizes.head_dim * sizes.num_heads != sizes.hidden_size:
        r.fail("head_dim", f"is {sizes.head_dim}, but StableLM splits hidden_size ({sizes.hidden_size}) among its "
                           f"{sizes.num_heads} heads; leave head_dim out")
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.25))
    r("hidden_act")
    parallel = r("use_parallel_residual")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms={"pre_attn": "input_layernorm"} if parallel else LLAMA_NORMS, norm="layer", norm_bias=True,
        parallel=parallel, attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=r("use_qkv_bias"),
        qk_norm="each_head" if r("qk_layernorm") else None, qk_norm_names=("q_layernorm", "k_layernorm"),
        qk_norm_split=True,
    )


def _starcoder2(r: KeyReader, sizes: Sizes) -> Architecture:
    """StarCoder2: Llama's blocks with biased LayerNorms, every projection biased by use_bias, an ungated GELU
    MLP (c_fc, c_proj), and sliding_window on every layer."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    bias = r("use_bias")
    return Architecture(
        layers=tuple(LayerSpec(w, rope, mlp="plain") for w in _every_layer_window(r, sizes)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, activation=_gelu_activation(r),
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        stored_names={"mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"},
    )


#: The ungated MLP's activations by transformers' names: GELU's, and the squared ReLU of Nemotron and Arcee.
_UNGATED_ACTIVATIONS = {**_GELU_ACTIVATIONS, "relu2": "relu2"}


def _ungated_key(default: str) -> Key:
    return Key("hidden_act", default=default, check=one_of(*_UNGATED_ACTIVATIONS), unsupported=True)


def _nemotron(r: KeyReader, sizes: Sizes) -> Architecture:
    """Nemotron (Nemotron-3, Minitron, Nemotron-Mini): Llama's blocks with LayerNorm1P (biased LayerNorms scaling by
    ``1 + w``), an ungated MLP (squared ReLU by default), rope on partial_rotary_factor (0.5) of each head,
    attention_bias on every attention projection and mlp_bias on the MLP."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, norm_offset=1.0,
        activation=_UNGATED_ACTIVATIONS[r("hidden_act")], attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qkv_bias=bias, o_bias=bias, mlp_bias=r("mlp_bias"),
    )


def _arcee(r: KeyReader, sizes: Sizes) -> Architecture:
    """Arcee AFM: Llama's blocks with Nemotron's ungated MLP (up_proj, down_proj; squared ReLU by default)."""
    arch = _llama_like(False, None, _no_windows)(r, sizes)
    return replace(arch, layers=tuple(replace(layer, mlp="plain") for layer in arch.layers),
                   activation=_UNGATED_ACTIVATIONS[r("hidden_act")])


#: nanochat's modules under Llama's names: transformers' (fc1, fc2), and mlx-lm's (nanochat's own: the decoder under
#: ``transformer.``, ``wte``, ``h.N.attn.c_q``..., ``mlp.c_fc`` / ``c_proj``).
NANOCHAT_NAMES = {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}
NANOCHAT_MLX_LM_NAMES = {"embed_tokens": "wte", "layers": "h", "self_attn.q_proj": "attn.c_q",
                         "self_attn.k_proj": "attn.c_k", "self_attn.v_proj": "attn.c_v",
                         "self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
#: mlx-lm's nanochat norms with this epsilon, whatever config.json says (transformers' default is 1e-6); the configs
#: of its conversions, written for its ModelArgs, give none. Ferrum takes it for checkpoints in mlx-lm's layout whose
#: config gives no rms_norm_eps.
NANOCHAT_MLX_LM_EPS = 1e-5


def _nanochat(r: KeyReader, sizes: Sizes) -> Architecture:
    """Karpathy's nanochat (transformers' NanoChatForCausalLM): Llama's pre-norm blocks with RMSNorms that have no
    weight, the embeddings normed too before the first block, rope turning the other way (rotate_half as
    ``cat(x2, -x1)``: frequencies negated) and q and k RMS-normed (no weight either) once rotated, an ungated MLP
    (fc1, fc2; squared ReLU by default), attention_bias on q/k/v and o, the logits soft-capped
    (final_logit_softcapping, 15), an untied LM head. mlx-lm's conversions keep nanochat's own names, and norm
    with 1e-5 (:data:`NANOCHAT_MLX_LM_EPS`) where a config gives no rms_norm_eps."""
    key, spec = _rope_spec(r)
    rope = replace(read_rope(r, sizes, spec, key, _LLAMA_ROPES), negated=True)
    bias = r("attention_bias")
    mlx_lm_eps = None if r.get("rms_norm_eps") is not None else NANOCHAT_MLX_LM_EPS
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm_params=False, embed_norm=True,
        activation=_UNGATED_ACTIVATIONS[r("hidden_act")], attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head", qk_norm_after_rope=True, qk_norm_params=False,
        qkv_bias=bias, o_bias=bias, final_softcap=r("final_logit_softcapping"),
        stored_names=NANOCHAT_NAMES,
        layouts=(("transformer.", "lm_head.weight", NANOCHAT_MLX_LM_NAMES, mlx_lm_eps),),
    )


#: Apertus's two norms, under its names.
APERTUS_NORMS = {"pre_attn": "attention_layernorm", "pre_mlp": "feedforward_layernorm"}
#: transformers' Apertus rope where a config gives none (rope_theta included: a top-level one is not read then).
_APERTUS_ROPE = {"rope_type": "llama3", "rope_theta": 12_000_000.0, "factor": 8.0,
                 "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _apertus(r: KeyReader, sizes: Sizes) -> Architecture:
    """Swiss AI's Apertus: Llama's blocks under its own norm names, per-head q/k RMSNorms before rope (Qwen 3's),
    attention_bias on every attention projection, and an ungated MLP (up_proj, down_proj; never biased, whatever
    mlp_bias says, as transformers builds it) whose xIELU activation learns its slopes per layer."""
    arch = _llama_like(False, "head", _no_windows, norms=APERTUS_NORMS)(r, sizes)
    return replace(arch, layers=tuple(replace(layer, mlp="plain") for layer in arch.layers),
                   activation=_APERTUS_ACTIVATIONS[r("hidden_act")], mlp_bias=False)


def _apertus1p5(r: KeyReader, sizes: Sizes) -> Architecture:
    """Apertus 1.5's text model (``apertus1p5_text``, its ``apertus1p5`` wrapper's): Apertus's blocks over a vocabulary
    extended with image and audio tokens, its untied LM head pruned to the first output_vocab_size of them
    (``Architecture.head_rows``: those tokens are read, never predicted)."""
    arch, rows = _apertus(r, sizes), r("output_vocab_size")
    if rows is None or rows == sizes.vocab_size:
        return arch
    if rows > sizes.vocab_size:
        r.fail("output_vocab_size", f"({rows}) exceeds vocab_size ({sizes.vocab_size}); the LM head keeps at most "
                                    "the vocabulary's rows")
    if sizes.tie_word_embeddings:
        r.fail("output_vocab_size", f"({rows}) prunes an LM head tied to the {sizes.vocab_size}-row embedding; untie "
                                    "it (tie_word_embeddings false), as Apertus 1.5's releases do", unsupported=True)
    return replace(arch, head_rows=rows)


#: Apertus's activations: xIELU, or another ungated one transformers' ApertusMLP takes by name.
_APERTUS_ACTIVATIONS = {"xielu": "xielu", **_UNGATED_ACTIVATIONS}


def _cohere_blocks(r: KeyReader, sizes: Sizes, ropes: list[Rope], windows: list,
                   interleaved: bool = True) -> Architecture:
    """Command R's blocks: one LayerNorm without a bias feeding attention and the MLP side by side, GPT-J's rope
    (adjacent dims paired; not ``interleaved``: each dim with the one half a head on), attention_bias on every
    attention projection, logits scaled by logit_scale (null: unscaled); with use_qk_norm (Command R+) q and k
    LayerNormed head by head, with a weight per head."""
    r("hidden_act")
    bias, scale = r("attention_bias"), r("logit_scale")
    return Architecture(
        layers=tuple(LayerSpec(w, replace(rope, interleaved=interleaved)) for w, rope in zip(windows, ropes)),
        norms={"pre_attn": "input_layernorm"}, norm="layer", parallel=True, attn_scale=1.0 / math.sqrt(sizes.head_dim),
        logit_scale=1.0 if scale is None else float(scale), qkv_bias=bias, o_bias=bias,
        qk_norm="each_head" if r.get("use_qk_norm") else None,
    )


def _cohere(r: KeyReader, sizes: Sizes) -> Architecture:
    """Command R (v01, 08-2024), Command R+."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    return _cohere_blocks(r, sizes, [rope] * sizes.num_layers, [None] * sizes.num_layers)


def _split_heads(r: KeyReader, sizes: Sizes, family: str) -> None:
    """Refuses a head_dim other than hidden_size's share of each head: Cohere 2's config class sets it so."""
    if sizes.head_dim * sizes.num_heads != sizes.hidden_size:
        r.fail("head_dim", f"is {sizes.head_dim}, but {family} splits hidden_size ({sizes.hidden_size}) among its "
                           f"{sizes.num_heads} heads; leave head_dim out")


def _cohere2(r: KeyReader, sizes: Sizes) -> Architecture:
    """Command R7B, Command A: Command R's blocks, three sliding layers with rope to one full layer without (NoPE),
    unless layer_types says otherwise. Its heads split hidden_size: transformers ignores a head_dim."""
    _split_heads(r, sizes, "Cohere 2")
    pattern = r("sliding_window_pattern")
    window, types = _layer_kinds(r, sizes, lambda i: SLIDING if (i + 1) % pattern else FULL)
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    return _cohere_blocks(r, sizes, [rope if t == SLIDING else Rope.unrotated(sizes.head_dim) for t in types],
                          [window if t == SLIDING else None for t in types])


def _cohere_compass(r: KeyReader, sizes: Sizes) -> Architecture:
    """Cohere Compass's text decoder (North-Micro-Vision's): Command R7B's parallel blocks, every layer full unless
    layer_types says otherwise, rope turning halves (Qwen 3's rotate_half), not adjacent pairs, with settings per
    attention kind in rope_parameters, where null leaves that kind unrotated (NoPE); logit_scale null: unscaled.
    A kind's mrope_section rotates text alone as its plain rope (the same position on every axis)."""
    _split_heads(r, sizes, "Cohere Compass")
    window, types = _layer_kinds(r, sizes, lambda i: FULL)
    params = r("rope_parameters")
    ropes = {}
    for kind in dict.fromkeys(types):
        if not isinstance(params, dict) or kind not in params:
            r.fail("rope_parameters", f"must hold an entry for each attention kind its layers use ({kind!r}: rope "
                                      f"settings, or null for none), got {params!r}")
        spec = params[kind]
        if spec is not None and not isinstance(spec, dict):
            r.fail("rope_parameters", f"entry {kind!r} must be an object or null, got {spec!r}")
        ropes[kind] = Rope.unrotated(sizes.head_dim) if spec is None else read_rope(
            r, sizes, spec, "rope_parameters", ("default", "linear"))
    return _cohere_blocks(r, sizes, [ropes[t] for t in types], [window if t == SLIDING else None for t in types],
                          interleaved=False)


#: The keys of Command R's attention and MLP.
_COHERE_BLOCK = (
    Key("hidden_act", default="silu", check=one_of("silu"), unsupported=True),
    Key("attention_bias", default=False, check=boolean),
)
_COHERE = (
    *_COHERE_BLOCK,
    Key("logit_scale", default=0.0625, check=positive_number),
    Key("use_qk_norm", default=False, check=boolean),
)


#: Persimmon's (and Fuyu's language model's) modules under Llama's names.
PERSIMMON_NAMES = {"self_attn.qkv_proj": "self_attn.query_key_value", "self_attn.o_proj": "self_attn.dense",
                   "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h", "norm": "final_layernorm"}


def _persimmon(r: KeyReader, sizes: Sizes) -> Architecture:
    """Adept's Persimmon: Llama's pre-norm blocks with biased LayerNorms, q/k/v in one matrix grouped by head
    (GPT-NeoX's), q and k LayerNormed per head (qk_layernorm) before rope on partial_rotary_factor (0.5) of each
    head, an ungated squared-ReLU MLP, every projection biased."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, activation=_UNGATED_ACTIVATIONS[r("hidden_act")],
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="head" if r("qk_layernorm") else None,
        qk_norm_names=("q_layernorm", "k_layernorm"), qkv_bias=True, o_bias=True, mlp_bias=True, fused_qkv=True,
        qkv_grouped=True, stored_names=PERSIMMON_NAMES,
    )


def _gelu_key(default: str, name: str = "hidden_act") -> Key:
    return Key(name, default=default, check=one_of(*_GELU_ACTIVATIONS), unsupported=True)


def _layer_norm_family(build: Callable[[KeyReader, Sizes], Architecture], tie_default: bool,
                       *groups: tuple[Key, ...], eps_key: str = "layer_norm_eps") -> Family:
    """A LayerNorm family: the core keys with the epsilon (1e-5 unless set) under ``eps_key``, the rope's."""
    return Family(_keys(_core(tie_default, eps_key=eps_key), _ROPE[:3], *groups), build, eps_default=1e-5,
                  eps_key=eps_key)


def _jais2(r: KeyReader, sizes: Sizes) -> Architecture:
    """Jais 2: Llama's blocks with biased LayerNorms, attention_bias on every attention projection and an ungated
    MLP (up_proj, down_proj; squared ReLU) biased by mlp_bias."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, activation=_UNGATED_ACTIVATIONS[r("hidden_act")],
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias, mlp_bias=r("mlp_bias"),
    )


TABLE: dict[str, Family] = {
    "phi": _layer_norm_family(_phi, False, (  # Phi-1, Phi-1.5, Phi-2
        _gelu_key("gelu_new"),
        Key("partial_rotary_factor", check=optional_positive_number),
        Key("qk_layernorm", default=False, check=boolean),
    )),
    "stablelm": _layer_norm_family(_stablelm, False, (
        Key("hidden_act", default="silu", check=one_of("silu"), unsupported=True),
        Key("partial_rotary_factor", check=optional_positive_number),
        Key("use_qkv_bias", default=False, check=boolean),
        Key("use_parallel_residual", default=False, check=boolean),
        Key("qk_layernorm", default=False, check=boolean),  # StableLM 2 12B: a LayerNorm per head on q and k
    )),
    "cohere": _layer_norm_family(_cohere, True, _COHERE, _theta(500_000.0)),  # Command R, Command R+
    "cohere2": _layer_norm_family(_cohere2, True, _COHERE, _LAYER_TYPES, (  # Command R7B, Command A
        Key("sliding_window", default=4096, check=optional_positive_int),
        Key("sliding_window_pattern", default=4, check=positive_int),
    )),
    # Cohere's North-Micro-Vision (the "cohere_compass" wrapper's text_config: ferrum.config.TEXT_WRAPPERS)
    "cohere_compass_text": _layer_norm_family(_cohere_compass, True, _COHERE_BLOCK, _LAYER_TYPES, (
        Key("logit_scale", check=optional_positive_number),
        Key("sliding_window", default=4096, check=optional_positive_int),
    )),
    "persimmon": _layer_norm_family(_persimmon, False, (  # Adept's Persimmon 8B (Fuyu's language model)
        _ungated_key("relu2"),
        Key("partial_rotary_factor", check=optional_positive_number),
        Key("qk_layernorm", default=True, check=boolean),
    )),
    "starcoder2": _layer_norm_family(_starcoder2, True, _core_defaults(num_key_value_heads=2), _WINDOW, (
        _gelu_key("gelu_pytorch_tanh"),
        Key("use_bias", default=True, check=boolean),
    ), eps_key="norm_epsilon"),
    "nemotron": _layer_norm_family(_nemotron, False, _core_defaults(vocab_size=256_000, max_position_embeddings=4096), (
        _ungated_key("relu2"),
        Key("partial_rotary_factor", check=optional_positive_number),
        Key("attention_bias", default=False, check=boolean),
        Key("mlp_bias", default=False, check=boolean),
    ), eps_key="norm_eps"),
    "apertus": Family(  # Swiss AI's Apertus 8B / 70B
        _keys(_core(False), _core_defaults(vocab_size=131_072, max_position_embeddings=65_536), _ROPE, (
            Key("rope_parameters", default=_APERTUS_ROPE),
            Key("hidden_act", default="xielu", check=one_of(*_APERTUS_ACTIVATIONS), unsupported=True),
            Key("attention_bias", default=False, check=boolean),
        )),
        _apertus,
        eps_default=1e-5,
    ),
    "apertus1p5_text": Family(  # Swiss AI's Apertus 1.5 (its apertus1p5 wrapper's text model): Apertus's blocks
        _keys(_core(False), _core_defaults(vocab_size=266_752, max_position_embeddings=65_536), _ROPE, (
            Key("rope_parameters", default=_APERTUS_ROPE),
            Key("hidden_act", default="xielu", check=one_of(*_APERTUS_ACTIVATIONS), unsupported=True),
            Key("attention_bias", default=False, check=boolean),
            Key("output_vocab_size", check=optional_positive_int),
        )),
        _apertus1p5,
        eps_default=1e-5,
    ),
    "nanochat": Family(  # Karpathy's nanochat (transformers' port; mlx-lm's conversions under nanochat's own names)
        _keys(_core(False), _core_defaults(  # NanoChatConfig's (mlx-lm's conversions give every size)
            hidden_size=768, intermediate_size=8192, num_hidden_layers=12, num_attention_heads=6, vocab_size=50304,
            max_position_embeddings=2048,
        ), _ROPE, (
            _ungated_key("relu2"),
            Key("attention_bias", default=False, check=boolean),
            Key("final_logit_softcapping", default=15.0, check=optional_positive_number),
        )),
        _nanochat,
    ),
    "arcee": Family(  # Arcee AFM-4.5B
        _keys(_core(False), _core_defaults(vocab_size=32000, max_position_embeddings=4096), _ROPE, (
            _ungated_key("relu2"),
            Key("attention_bias", default=False, check=boolean),
            Key("mlp_bias", default=False, check=boolean),
        )),
        _arcee,
        eps_default=1e-5,
    ),
    "jais2": _layer_norm_family(_jais2, False, (  # Inception's Jais 2
        _ungated_key("relu2"),
        Key("attention_bias", default=True, check=boolean),
        Key("mlp_bias", default=True, check=boolean),
    )),
}
