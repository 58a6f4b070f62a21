"""The sparse MLP of a MoE family, read from ``config.json`` through the family's key table."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, one_of, optional_non_negative_int, optional_positive_int,
    optional_positive_number, positive_int, positive_number, required,
)
from ferrum.arch.spec import Architecture
from ferrum.moe.activation import ClampedSwiGLU, ExpertActivation, Gelu, GeluTanhGLU, SquaredReLU
from ferrum.moe.routing import CORRECTION_BIAS, GROUPED_RULES, GroupRule

#: model_type -> (checkpoint module of the sparse MLP, expert matrix names as (gate, up, down)).
LAYOUT = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_next": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_5_moe_text": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "granitemoe": ("block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),  # stacked only (STACKED)
    "gpt_oss": ("mlp", ("gate_proj", "up_proj", "down_proj")),  # its own layouts (ferrum.moe.gpt_oss)
    "qwen3_vl_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),  # its own layouts (ferrum.moe.fused_gate_up)
    "glm4_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "phimoe": ("block_sparse_moe", ("w1", "w3", "w2")),
    "granitemoeshared": ("block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),  # stacked only (STACKED)
    "deepseek_v2": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe_lite": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "dots1": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "hunyuan_v1_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "ernie4_5_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "exaone_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "llama4_text": ("feed_forward", ("gate_proj", "up_proj", "down_proj")),  # its own layouts (fused_gate_up)
    "minimax_m2": ("block_sparse_moe", ("w1", "w3", "w2")),
    "minimax": ("block_sparse_moe", ("w1", "w3", "w2")),
    # transformers' text model: fused under mlp; the release's block_sparse_moe.experts.{e}.w1 / w3 / w2 are renamed
    # to these (the family's own layout) and read per expert
    "minimax_m3_vl_text": ("mlp", ("w1", "w3", "w2")),
    "flex_olmo": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "solar_open": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mellum": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "hy_v3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mistral4": ("mlp", ("gate_proj", "up_proj", "down_proj")),  # its own layouts (ferrum.moe.fused_gate_up)
    "dbrx": ("ffn", ("w1", "v1", "w2")),  # mlx-lm's per-expert names; its own layout too (ferrum.moe.dbrx)
    "lfm2_moe": ("feed_forward", ("w1", "w3", "w2")),
    "kimi_linear": ("block_sparse_moe", ("w1", "w3", "w2")),
    "kimi_k3": ("block_sparse_moe", ("w1", "w3", "w2")),
    "afmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "sarvam_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "sarvam_mla": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mimo_v2_flash": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "cohere2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "jamba": ("feed_forward", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v32": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "glm_moe_dsa": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "axk1": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "axk2": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "kolibri1": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "flint": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "laguna": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "granitemoe_swa": ("block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),  # fused (ferrum.moe.fused_gate_up)
    "lara_mini": ("mlp", ("gate_proj", "up_proj", "down_proj")),  # fused (ferrum.moe.fused_gate_up)
    "jetmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),  # stacked only (STACKED)
    "hy_v4": ("mlp", ("gate_proj", "up_proj", "down_proj")),  # fused (ferrum.moe.fused_gate_up)
    "bailing_hybrid": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "aria_text": ("mlp", ("gate_proj", "up_proj", "down_proj")),  # its own layout (ferrum.moe.fused_gate_up.ARIA)
    "dots3_note_text": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "bailing_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "Klear": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "step3p5": ("moe", ("gate_proj", "up_proj", "down_proj")),  # stacked (STACKED)
    "hunyuan": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "phixtral": ("moe", (None, "fc1", "fc2")),  # each expert under moe.mlp.{e} (MoeSpec.experts_module)
}
#: model_type -> the stacked ``[E, out, in]`` tensors its Hugging Face checkpoints hold instead of one per expert,
#: as (gate, up, down) names in the sparse MLP module; gate and up named alike are one tensor, gate rows first.
STACKED = {"granitemoe": ("input_linear", "input_linear", "output_linear"),
           "granitemoeshared": ("input_linear", "input_linear", "output_linear"),
           "jetmoe": ("input_linear", "input_linear", "output_linear"),
           "step3p5": ("gate_proj", "up_proj", "down_proj")}
#: model_type -> the router's module in the sparse MLP module, where it is not ``gate``.
ROUTER = {"granitemoe": "router.layer", "granitemoeshared": "router.layer", "gpt_oss": "router",
          "hunyuan_v1_moe": "gate.wg", "llama4_text": "router", "dbrx": "router.layer", "jamba": "router",
          "granitemoe_swa": "router", "jetmoe": "router.layer", "hunyuan": "gate.wg"}
#: model_type -> the module of the sparse MLP module mlx-lm stacks the experts in, where it is not ``switch_mlp``.
MLX_LM_STACK = {"dots1": "experts", "llama4_text": "experts", "afmoe": "experts", "Klear": "experts"}


def _layer_list(value: object) -> str | None:
    if value is None or (isinstance(value, list) and all(isinstance(i, int) and i >= 0 for i in value)):
        return None
    return f"must list layer indices, got {value!r}"


def _layer_enum(value: object) -> str | None:
    if value is None or (isinstance(value, str) and all(i.strip().isdigit() for i in value.strip().split(","))):
        return None
    return f"must list layer indices separated by commas (\"1,2,3\"), got {value!r}"


def _limits(value: object) -> str | None:
    if value is None or (isinstance(value, list) and all(v is None or _non_negative_number(v) is None
                                                         for v in value)):
        return None
    return f"must list a non-negative number (0 or null: no clamp) per layer, got {value!r}"


def _non_negative_number(value: object) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
        return None
    return f"must be a non-negative number, got {value!r}"


def _non_negative_int(value: object) -> str | None:
    return "must be a non-negative integer, got None" if value is None else optional_non_negative_int(value)


def _dbrx_norm(value: object) -> str | None:
    return None if value is None or value == 1 else (
        f"is {value!r}; Ferrum divides DBRX's routing weights by their sum (1) or leaves them as they are (null)")


def _dbrx_activation(value: object) -> str | None:
    if value is None or (isinstance(value, dict) and value.get("name", "silu") == "silu"):
        return None
    return f"is {value!r}; DBRX's experts run SwiGLU ({{'name': 'silu'}}, transformers' default)"


#: The expert count's spellings transformers reads, first wins: Mixtral and Qwen3-MoE map ``num_experts`` onto
#: ``num_local_experts``; Qwen2-MoE reads ``num_experts`` only (a ``num_local_experts`` there leaves its 60).
_COUNT_NAMES = {"mixtral": ("num_local_experts", "num_experts"), "minimax": ("num_local_experts", "num_experts"),
                "qwen2_moe": ("num_experts",),
                "qwen3_next": ("num_experts",), "qwen3_5_moe_text": ("num_experts",),
                "qwen3_moe": ("num_local_experts", "num_experts"), "olmoe": ("num_experts",),
                "granitemoe": ("num_local_experts",), "gpt_oss": ("num_local_experts",),
                "qwen3_vl_moe": ("num_local_experts", "num_experts"),
                "glm4_moe": ("n_routed_experts", "num_local_experts"),  # the latter its attribute_map's alias
                "deepseek_v3": ("n_routed_experts", "num_local_experts"), "phimoe": ("num_local_experts",),
                "granitemoeshared": ("num_local_experts",), "deepseek_v2": ("n_routed_experts", "num_experts"),
                "glm4_moe_lite": ("n_routed_experts", "num_local_experts"),
                "dots1": ("n_routed_experts", "num_local_experts"),
                "hunyuan_v1_moe": ("num_local_experts", "num_experts"),  # the former its attribute_map's alias
                "ernie4_5_moe": ("num_experts", "moe_num_experts"),  # the former its attribute_map's alias
                "exaone_moe": ("num_experts",),
                "llama4_text": ("num_local_experts",),
                "minimax_m2": ("num_experts", "num_local_experts"),  # the former its attribute_map's alias
                "minimax_m3_vl_text": ("num_experts", "num_local_experts"),  # the former its attribute_map's alias
                "flex_olmo": ("num_local_experts", "num_experts"),  # the former its attribute_map's alias
                "solar_open": ("num_local_experts", "n_routed_experts"),  # the former its attribute_map's alias
                "mellum": ("num_local_experts", "num_experts"),  # the latter its attribute_map's alias
                "hy_v3": ("num_local_experts", "num_experts"),  # the former its attribute_map's alias
                "mistral4": ("n_routed_experts", "num_local_experts"),  # the latter its attribute_map's alias
                "dbrx": ("ffn_config.moe_num_experts",), "lfm2_moe": ("num_experts",),
                "kimi_linear": ("num_experts", "num_local_experts"), "afmoe": ("num_experts",),
                "kimi_k3": ("num_experts",),
                # their releases' num_experts is read as n_routed_experts (ferrum.arch.families.latent.SARVAM_ALIASES)
                "sarvam_moe": ("n_routed_experts",), "sarvam_mla": ("n_routed_experts",),
                "mimo_v2_flash": ("n_routed_experts", "num_local_experts"), "cohere2_moe": ("num_experts",),
                "jamba": ("num_experts", "num_local_experts"),  # the latter its attribute_map's alias
                # DeepSeek-V3.2's and GLM-5's configs re-route a num_experts to n_routed_experts
                "deepseek_v32": ("num_experts", "n_routed_experts", "num_local_experts"),
                "glm_moe_dsa": ("num_experts", "n_routed_experts", "num_local_experts"),
                "axk1": ("n_routed_experts", "num_local_experts"), "flint": ("num_experts",),
                "axk2": ("n_routed_experts", "num_local_experts"),
                "kolibri1": ("num_local_experts", "num_experts"),  # the latter its attribute_map's alias
                "laguna": ("num_experts",), "granitemoe_swa": ("num_local_experts",), "lara_mini": ("num_experts",),
                "jetmoe": ("num_local_experts",), "aria_text": ("moe_num_experts",),
                "hy_v4": ("n_routed_experts", "num_local_experts"),  # the latter its attribute_map's alias
                "bailing_hybrid": ("num_experts", "num_local_experts"),  # the latter its attribute_map's alias
                "dots3_note_text": ("n_routed_experts", "num_local_experts"),  # the latter its attribute_map's alias
                "bailing_moe": ("num_experts",), "deepseek": ("n_routed_experts",), "Klear": ("num_experts",),
                "step3p5": ("moe_num_experts",), "hunyuan": ("num_experts",),
                "phixtral": ("num_local_experts",)}
#: Families whose expert count may be 0 (or null): no sparse MLP at all, as mlx-lm runs Kimi K3's.
_MAYBE_DENSE = ("kimi_k3",)
_COUNT = {family: tuple(Key(name, check=optional_non_negative_int if family in _MAYBE_DENSE else optional_positive_int)
                        for name in names)
          for family, names in _COUNT_NAMES.items()}
_QWEN = (
    Key("moe_intermediate_size", check=positive_int),
    Key("norm_topk_prob", default=False, check=boolean),
    Key("decoder_sparse_step", default=1, check=positive_int),
    Key("mlp_only_layers", default=[], check=_layer_list),
)


def _grouped_sigmoid_keys(family: str, moe_size: int, scale: float, n_group: int, topk_group: int,
                          dense: int | None, top_k: int | None = 8, normalize: bool = True,
                          shared: int | None = 1) -> tuple[Key, ...]:
    """DeepSeek-V3's routing keys (GLM-4.5's too), with a family's transformers defaults; ``dense`` is
    first_k_dense_replace's default, None where the family lists its layers' kinds instead (``mlp_layer_types``);
    a ``top_k`` or ``shared`` of None: the config must say (dots1's have no default); a ``shared`` of 0: none unless
    the config counts some (Kimi K3's)."""
    layers = (Key("first_k_dense_replace", default=dense, check=_non_negative_int),) if dense is not None else (
        Key("mlp_layer_types", check=_mlp_layer_types),
        Key("first_k_dense_replace", check=optional_non_negative_int))
    return (*_COUNT[family], Key("num_experts_per_tok", default=top_k, check=positive_int),
            Key("moe_intermediate_size", default=moe_size, check=positive_int),
            Key("norm_topk_prob", default=normalize, check=boolean),
            Key("n_shared_experts", default=shared, check=_non_negative_int if shared == 0 else positive_int),
            Key("routed_scaling_factor", default=scale, check=positive_number),
            Key("n_group", default=n_group, check=positive_int),
            Key("topk_group", default=topk_group, check=positive_int), *layers)


def _mlp_layer_types(value: object) -> str | None:
    if value is None or (isinstance(value, list) and all(kind in ("dense", "sparse") for kind in value)):
        return None
    return f"must list 'dense' or 'sparse' per layer, got {value!r}"


def _listed_sparse(r: KeyReader, layers: int, default: list[bool]) -> list[bool]:
    """Which layers are sparse as mlp_layer_types lists them ("dense" or "sparse", one per layer); ``default``
    where it lists none."""
    kinds = r("mlp_layer_types")
    if kinds is None:
        return default
    if len(kinds) != layers:
        r.fail("mlp_layer_types", f"lists {len(kinds)} layers, but the model has {layers} (num_hidden_layers)")
    return [kind == "sparse" for kind in kinds]


def _sparse_layers(r: KeyReader, layers: int) -> list[bool]:
    """Which layers are sparse: from first_k_dense_replace on, or as mlp_layer_types lists them (GLM-4.7-Flash's
    transformers config, whose default is every layer but the first). transformers ignores first_k_dense_replace
    there, mlx-lm and the model's own code read it: a config where the two disagree is refused."""
    if "mlp_layer_types" not in r.keys:
        return [i >= r("first_k_dense_replace") for i in range(layers)]
    sparse = _listed_sparse(r, layers, [i > 0 for i in range(layers)])
    first = r("first_k_dense_replace")
    if first is not None and sparse != [i >= first for i in range(layers)]:
        r.fail("first_k_dense_replace", f"is {first}, but mlp_layer_types makes layers "
                                        f"{[i for i, s in enumerate(sparse) if not s]} dense (transformers reads "
                                        "mlp_layer_types, other runtimes first_k_dense_replace); make them agree")
    return sparse


def _first_dense_or_listed(r: KeyReader, layers: int) -> list[bool]:
    """Which layers are sparse as mlp_layer_types lists them, else those from first_k_dense_replace on (every
    moe_layer_freq-th, where the family reads it: A.X-K1), as DeepSeek-V3.2's, GLM-5's and A.X-K1's transformers
    configs derive it; a config giving both must make them agree (other runtimes read first_k_dense_replace)."""
    first, freq = r("first_k_dense_replace"), r.get("moe_layer_freq") or 1
    derived = [i >= first and i % freq == 0 for i in range(layers)]
    sparse = _listed_sparse(r, layers, derived)
    if sparse != derived and "first_k_dense_replace" in r.raw:
        r.fail("first_k_dense_replace", f"is {first}, but mlp_layer_types makes layers "
                                        f"{[i for i, s in enumerate(sparse) if not s]} dense (transformers reads "
                                        "mlp_layer_types, other runtimes first_k_dense_replace); make them agree")
    return sparse


#: DeepSeek's own code makes layer i sparse where i % moe_layer_freq == 0 too; transformers reads every layer from
#: first_k_dense_replace on as sparse, and every release sets 1.
_MOE_LAYER_FREQ = Key("moe_layer_freq", default=1, unsupported=True, check=one_of(1))
#: DeepSeek-V2's routing keys, with transformers' DeepseekV2Config defaults (num_experts_per_tok has none).
_DEEPSEEK_V2 = (
    *_COUNT["deepseek_v2"], Key("num_experts_per_tok", check=positive_int),
    Key("moe_intermediate_size", default=1407, check=positive_int),
    Key("n_shared_experts", default=2, check=positive_int),
    Key("routed_scaling_factor", default=1.0, check=positive_number),
    Key("topk_method", default="greedy", unsupported=True, check=one_of("greedy", "group_limited_greedy")),
    Key("n_group", check=optional_positive_int), Key("topk_group", check=optional_positive_int),
    Key("first_k_dense_replace", default=0, check=_non_negative_int), _MOE_LAYER_FREQ,
    # transformers' DeepseekV2 ignores these two; DeepSeek's code divides the top-k weights by their sum
    # (instead of scaling them) under norm_topk_prob and runs softmax scoring only: no release sets either
    Key("norm_topk_prob", default=False, unsupported=True, check=falsy(
        "transformers ignores it and DeepSeek's code normalizes the top-k weights instead of scaling them; set it "
        "to false to run the model as transformers does")),
    Key("scoring_func", default="softmax", unsupported=True, check=one_of("softmax")),
)


def _per_layer_ints(value: object) -> str | None:
    values = value if isinstance(value, list) and value else [value]
    if value is None or not any(map(positive_int, values)):
        return None
    return f"must be a positive integer or a list of one per layer, got {value!r}"


def _one_per_layer(r: KeyReader, name: str) -> int | None:
    """The one value of a key Hunyuan's configs give as a number or as a list of one per layer; a list that
    differs between layers is refused (one MoeSpec serves every sparse layer)."""
    value = r(name)
    if not isinstance(value, list):
        return value
    if len(value) != r("num_hidden_layers"):
        r.fail(name, f"lists {len(value)} values, but the model has {r('num_hidden_layers')} layers")
    if len(set(value)) > 1:
        r.fail(name, f"is {value!r}, a different value per layer, which Ferrum does not support", unsupported=True)
    return value[0]


def _hunyuan_top_k(r: KeyReader) -> int:
    """transformers maps num_experts_per_tok onto moe_topk (the alias wins where both are given)."""
    return r("num_experts_per_tok") or _one_per_layer(r, "moe_topk")


def _hunyuan_extras(r: KeyReader) -> dict:
    """Hunyuan-A13B's sparse MLP as transformers runs it: a float32 router ``gate.wg`` whose softmax top-k weights
    are renormalized, experts of intermediate_size, and one ungated ``shared_mlp`` of intermediate_size. Its
    configs also carry the keys of Tencent's own code, which transformers ignores: refused where they ask for
    another layout than that."""
    inter = r("intermediate_size")
    if _one_per_layer(r, "moe_intermediate_size") not in (None, inter):
        r.fail("moe_intermediate_size", f"is {r('moe_intermediate_size')!r}, but transformers sizes Hunyuan's experts "
                                        f"by intermediate_size ({inter}) and ignores it; make the two agree",
               unsupported=True)
    if _one_per_layer(r, "num_shared_expert") != 1:
        r.fail("num_shared_expert", f"is {r('num_shared_expert')!r}, but transformers runs one shared MLP of "
                                    "intermediate_size and ignores it", unsupported=True)
    return dict(shared_expert_size=inter, shared_module="shared_mlp", shared_gate=None, router_float32=True)


def _layer_index(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return f"must be a layer index (an integer; -1: the last layer), got {value!r}"


def _ernie_top_k(r: KeyReader) -> int:
    """transformers maps num_experts_per_tok onto moe_k (the alias wins where both are given)."""
    return r("num_experts_per_tok") or r("moe_k")


#: The largest moe_norm_min ERNIE 4.5 runs with: a floor below the probabilities' float32 resolution changes nothing.
_NORM_FLOOR = 1e-6


def _ernie(r: KeyReader, module: str, names: tuple[str, str, str], count: int, top_k: int,
           layers: int) -> tuple[MoeSpec, list[bool]]:
    """ERNIE 4.5's sparse MLP as transformers runs it (``Ernie4_5_MoeSparseMoeBlock``): a float32 router ``gate``
    whose softmax probabilities, plus ``gate.moe_statics.e_score_correction_bias`` (``[1, E]``, float32), choose
    the top-k, weighed by their uncorrected probabilities divided by their sum, clamped to at least moe_norm_min
    (the experts the bias chose need not be the most probable, so their sum can be small: Ferrum runs the
    releases' negligible floor, refusing a larger one, which would change the weights); unbiased
    experts of moe_intermediate_size, and an ungated ``shared_experts`` MLP of moe_num_shared_experts times that
    (none where 0), biased by use_bias as the dense MLPs are. Layer i is sparse where moe_layer_start_index <= i <=
    moe_layer_end_index (-1: the last layer) and (i + 1) % moe_layer_interval == 0."""
    if r("moe_norm_min") > _NORM_FLOOR:
        r.fail("moe_norm_min", f"({r('moe_norm_min')}) would clamp the chosen experts' probabilities' sum where it is "
                               f"small; Ferrum divides by the sum as it is (floors up to {_NORM_FLOOR:g}, as the "
                               "releases' 1e-12)", unsupported=True)
    size, shared = r("moe_intermediate_size"), r("moe_num_shared_experts")
    spec = MoeSpec(module, names, count, top_k, size, True, size * shared or None, shared_module="shared_experts",
                   shared_gate=None, routing="softmax_corrected", router_float32=True,
                   correction_bias="moe_statics.e_score_correction_bias", correction_bias_rows=True,
                   correction_bias_droppable=True)
    start, end, step = r("moe_layer_start_index"), r("moe_layer_end_index"), r("moe_layer_interval")
    end = layers - 1 if end == -1 else end
    return spec, [start <= i <= end and (i + 1) % step == 0 for i in range(layers)]


def _bools(value: object) -> str | None:
    if value is None or (isinstance(value, list) and all(isinstance(v, bool) for v in value)):
        return None
    return f"must list true or false per layer, got {value!r}"


def _exaone_moe_sparse(r: KeyReader, layers: int) -> list[bool]:
    """transformers' EXAONE MoE: mlp_layer_types, else the layers from first_k_dense_replace on. LG's configs also
    list ``is_moe_layer``, which transformers ignores (TensorRT-LLM and mlx-lm read it): refused where it
    disagrees."""
    sparse = _listed_sparse(r, layers, [i >= r("first_k_dense_replace") for i in range(layers)])
    listed = r("is_moe_layer")
    if listed is not None and listed != sparse:
        r.fail("is_moe_layer", f"is {listed!r}, but transformers makes layers {[i for i, s in enumerate(sparse) if s]} "
                               "sparse (by mlp_layer_types, else first_k_dense_replace) and ignores it; make them "
                               "agree")
    return sparse


#: Per family: the MoE keys (transformers' defaults) that change the math.
KEYS: dict[str, tuple[Key, ...]] = {
    "mixtral": (*_COUNT["mixtral"], Key("num_experts_per_tok", default=2, check=positive_int)),
    "minimax": (*_COUNT["minimax"], Key("num_experts_per_tok", default=2, check=positive_int)),
    "qwen2_moe": (*_COUNT["qwen2_moe"], Key("num_experts_per_tok", default=4, check=positive_int), *_QWEN,
                  Key("shared_expert_intermediate_size", check=positive_int),
                  Key("qkv_bias", default=True, check=boolean)),
    "qwen3_moe": (*_COUNT["qwen3_moe"], Key("num_experts_per_tok", default=8, check=positive_int), *_QWEN),
    # Qwen3-Next and Qwen3.5-MoE: Qwen2-MoE's sigmoid-gated shared expert (Qwen3.5-MoE: every layer sparse, its
    # top-k weights always renormalized)
    "qwen3_next": (*_COUNT["qwen3_next"], Key("num_experts_per_tok", default=10, check=positive_int), *_QWEN,
                   Key("norm_topk_prob", default=True, check=boolean),
                   Key("shared_expert_intermediate_size", default=512, check=positive_int)),
    "qwen3_5_moe_text": (*_COUNT["qwen3_5_moe_text"], Key("num_experts_per_tok", default=8, check=positive_int),
                         Key("moe_intermediate_size", default=512, check=positive_int),
                         Key("shared_expert_intermediate_size", default=512, check=positive_int)),
    "qwen3_vl_moe": (*_COUNT["qwen3_vl_moe"], Key("num_experts_per_tok", default=4, check=positive_int), *_QWEN),
    "olmoe": (*_COUNT["olmoe"], Key("num_experts_per_tok", default=8, check=positive_int),
              Key("norm_topk_prob", default=False, check=boolean)),
    "flex_olmo": (*_COUNT["flex_olmo"], Key("num_experts_per_tok", default=5, check=positive_int),
                  Key("norm_topk_prob", default=False, check=boolean)),
    "granitemoe": (*_COUNT["granitemoe"], Key("num_experts_per_tok", default=2, check=positive_int)),
    "jetmoe": (*_COUNT["jetmoe"], Key("num_experts_per_tok", default=2, check=positive_int)),
    "granitemoeshared": (*_COUNT["granitemoeshared"], Key("num_experts_per_tok", default=2, check=positive_int),
                         Key("shared_intermediate_size", default=0, check=optional_non_negative_int)),
    "granitemoe_swa": (*_COUNT["granitemoe_swa"], Key("num_experts_per_tok", default=2, check=positive_int),
                       Key("shared_intermediate_size", default=0, check=optional_non_negative_int)),
    # Lara Mini (LaraMiniConfig's defaults): Flint's sparse block (an ungated shared expert) on every layer, routed by
    # a float32 softmax
    "lara_mini": (*_COUNT["lara_mini"], Key("num_experts_per_tok", default=4, check=positive_int),
                  Key("moe_intermediate_size", default=512, check=positive_int),
                  Key("shared_expert_intermediate_size", default=512, check=positive_int),
                  Key("norm_topk_prob", default=True, check=boolean)),
    "gpt_oss": (*_COUNT["gpt_oss"], Key("num_experts_per_tok", default=4, check=positive_int),
                Key("swiglu_alpha", default=1.702, check=positive_number),
                Key("swiglu_limit", default=7.0, check=positive_number)),
    # DeepSeek-V3's routing, with transformers' Glm4MoeConfig and DeepseekV3Config defaults
    "glm4_moe": _grouped_sigmoid_keys("glm4_moe", moe_size=1408, scale=1.0, n_group=1, topk_group=1, dense=1),
    "deepseek_v3": (*_grouped_sigmoid_keys("deepseek_v3", moe_size=2048, scale=2.5, n_group=8, topk_group=4,
                                           dense=3), _MOE_LAYER_FREQ),
    "deepseek_v2": _DEEPSEEK_V2,
    # Kimi Linear: DeepSeek-V3's routing under KimiLinearConfig's defaults (its release's spellings read as these,
    # ferrum.arch.families.hybrid._kimi_linear_keys), its dense layers by mlp_layer_types
    "kimi_linear": _grouped_sigmoid_keys("kimi_linear", moe_size=1024, scale=2.446, n_group=1, topk_group=1,
                                         dense=None),
    # Kimi K3: Kimi Linear's keys under mlx-lm's kimi_k3 TextArgs defaults (16 experts a token, no scaling, no shared
    # expert unless the config counts one)
    "kimi_k3": _grouped_sigmoid_keys("kimi_k3", moe_size=1024, scale=1.0, n_group=1, topk_group=1, dense=None,
                                     top_k=16, shared=0),
    # GLM-4.7-Flash: GLM-4.5's routing under Glm4MoeLiteConfig's defaults, its dense layers by mlp_layer_types
    "glm4_moe_lite": _grouped_sigmoid_keys("glm4_moe_lite", moe_size=1536, scale=1.8, n_group=1, topk_group=1,
                                           dense=None, top_k=4),
    # dots.llm1: DeepSeek-V3's routing under Dots1Config's defaults, which leave the expert counts to the config
    "dots1": _grouped_sigmoid_keys("dots1", moe_size=1408, scale=1.0, n_group=1, topk_group=1, dense=0, top_k=None,
                                   normalize=False, shared=None),
    # Hunyuan-A13B: moe_topk (num_experts_per_tok its alias); the others are its own code's, which transformers
    # ignores (see _hunyuan_extras)
    "hunyuan_v1_moe": (*_COUNT["hunyuan_v1_moe"], Key("num_experts_per_tok", check=optional_positive_int),
                       Key("moe_topk", default=1, check=_per_layer_ints),
                       Key("moe_intermediate_size", check=_per_layer_ints),
                       Key("num_shared_expert", default=1, check=_per_layer_ints),
                       Key("use_mixed_mlp_moe", default=True, unsupported=True, check=lambda v: None if v in (
                           None, True) else f"is {v!r}, but transformers always adds the shared MLP (shared_mlp)")),
    # ERNIE 4.5: moe_k (num_experts_per_tok its alias), layers from moe_layer_start_index to moe_layer_end_index
    # every moe_layer_interval; mlx-lm reads moe_gate_act, which transformers ignores (softmax)
    "ernie4_5_moe": (*_COUNT["ernie4_5_moe"], Key("num_experts_per_tok", check=optional_positive_int),
                     Key("moe_k", default=6, check=positive_int),
                     Key("moe_intermediate_size", default=1536, check=positive_int),
                     Key("moe_num_shared_experts", default=2, check=_non_negative_int),
                     Key("moe_layer_start_index", default=1, check=_layer_index),
                     Key("moe_layer_end_index", default=-1, check=_layer_index),
                     Key("moe_layer_interval", default=1, check=positive_int),
                     Key("moe_norm_min", default=1e-12, check=_non_negative_number),
                     Key("moe_gate_act", default="softmax", unsupported=True, check=lambda v: None if v in (
                         None, "softmax") else f"is {v!r}, but transformers routes ERNIE 4.5 by softmax whatever it "
                                               "says")),
    # Solar Open: DeepSeek-V3's routing under SolarOpenConfig's defaults, every layer sparse; transformers ignores
    # first_k_dense_replace, which mlx-lm (its glm4_moe) reads
    "solar_open": (*_grouped_sigmoid_keys("solar_open", moe_size=1280, scale=1.0, n_group=1, topk_group=1, dense=0),
                   Key("first_k_dense_replace", default=0, unsupported=True, check=falsy(
                       "transformers' Solar Open makes every layer sparse and ignores it; set it to 0"))),
    # Mellum: Qwen3-MoE's softmax routing (the router in the compute dtype), no shared expert, its dense layers by
    # mlp_layer_types (Qwen's decoder_sparse_step and mlp_only_layers it does not read)
    "mellum": (*_COUNT["mellum"], Key("num_experts_per_tok", default=8, check=positive_int),
               Key("moe_intermediate_size", default=896, check=positive_int),
               Key("norm_topk_prob", default=True, check=boolean),
               Key("mlp_layer_types", check=_mlp_layer_types)),
    # Hy3 (HYV3Config's defaults): sigmoid routing with a correction bias, always renormalized, scaled by
    # router_scaling_factor; num_shared_experts shared experts; its dense layers by mlp_layer_types
    "hy_v3": (*_COUNT["hy_v3"], Key("num_experts_per_tok", default=8, check=positive_int),
              Key("moe_intermediate_size", default=1536, check=positive_int),
              Key("num_shared_experts", default=1, check=_non_negative_int),
              Key("router_scaling_factor", default=2.826, check=positive_number),
              Key("mlp_layer_types", check=_mlp_layer_types),
              # it only sets where a bfloat16 model sums the routed and shared outputs (in float32 or not)
              Key("enable_moe_fp32_combine", default=True, check=boolean)),
    # EXAONE MoE (K-EXAONE): DeepSeek-V3's routing under ExaoneMoeConfig's defaults, num_shared_experts shared
    # experts, its dense layers by mlp_layer_types or first_k_dense_replace
    "exaone_moe": (*_COUNT["exaone_moe"], Key("num_experts_per_tok", default=8, check=positive_int),
                   Key("moe_intermediate_size", default=1024, check=positive_int),
                   Key("norm_topk_prob", default=True, check=boolean),
                   Key("num_shared_experts", default=1, check=positive_int),
                   Key("routed_scaling_factor", default=2.5, check=positive_number),
                   Key("n_group", default=1, check=positive_int), Key("topk_group", default=1, check=positive_int),
                   Key("mlp_layer_types", check=_mlp_layer_types),
                   Key("first_k_dense_replace", default=1, check=_non_negative_int),
                   Key("is_moe_layer", check=_bools),
                   # mlx-lm reads these two; transformers runs only DeepSeek-V3's sigmoid "noaux_tc"
                   Key("scoring_func", default="sigmoid", unsupported=True, check=one_of("sigmoid")),
                   Key("topk_method", default="noaux_tc", unsupported=True, check=one_of("noaux_tc"))),
    # Sarvam-30B: DeepSeek-V3's routing under SarvamMoEConfig's defaults (GLM-4.5's, but for these)
    "sarvam_moe": _grouped_sigmoid_keys("sarvam_moe", moe_size=1024, scale=2.5, n_group=1, topk_group=1, dense=1,
                                        top_k=6),
    # Sarvam-105B: DeepSeek-V3's routing under SarvamMLAConfig's defaults
    "sarvam_mla": (*_grouped_sigmoid_keys("sarvam_mla", moe_size=2048, scale=2.5, n_group=1, topk_group=1, dense=1),
                   _MOE_LAYER_FREQ),
    # Mistral 4 (Mistral Small 4): DeepSeek-V3's grouping over softmax probabilities, uncorrected, under
    # Mistral4Config's defaults
    "mistral4": _grouped_sigmoid_keys("mistral4", moe_size=2048, scale=1.0, n_group=1, topk_group=1, dense=0,
                                      top_k=4),
    # DeepSeek-V3.2, GLM-5 and A.X-K1: DeepSeek-V3's routing under their config classes' defaults, their dense layers
    # by mlp_layer_types, else first_k_dense_replace (and A.X-K1's moe_layer_freq, which transformers reads for it)
    "deepseek_v32": (*_grouped_sigmoid_keys("deepseek_v32", moe_size=2048, scale=2.5, n_group=8, topk_group=4,
                                            dense=None),
                     Key("first_k_dense_replace", default=3, check=_non_negative_int), _MOE_LAYER_FREQ),
    "glm_moe_dsa": (*_grouped_sigmoid_keys("glm_moe_dsa", moe_size=2048, scale=2.5, n_group=1, topk_group=1,
                                           dense=None),
                    Key("first_k_dense_replace", default=3, check=_non_negative_int), _MOE_LAYER_FREQ),
    # Hy4: GLM-4.7-Flash's routing under HYV4Config's defaults, its dense layers by mlp_layer_types
    "hy_v4": _grouped_sigmoid_keys("hy_v4", moe_size=768, scale=2.827, n_group=1, topk_group=1, dense=None),
    # Ling 3 (BailingHybridConfig's defaults): DeepSeek-V3's routing, its dense layers by mlp_layer_types, else
    # first_k_dense_replace; its release's spellings read as these (ferrum.arch.families.hybrid._bailing_hybrid_keys)
    "bailing_hybrid": (*_grouped_sigmoid_keys("bailing_hybrid", moe_size=768, scale=2.5, n_group=8, topk_group=4,
                                              dense=None),
                       Key("first_k_dense_replace", default=2, check=_non_negative_int)),
    "axk1": (*_grouped_sigmoid_keys("axk1", moe_size=2048, scale=2.5, n_group=8, topk_group=4, dense=None),
             Key("first_k_dense_replace", default=1, check=_non_negative_int),
             Key("moe_layer_freq", default=1, check=positive_int)),
    # A.X-K2: DeepSeek-V3's routing under AXK2Config's defaults, ungrouped (n_group and topk_group null, read as one
    # group: ferrum.arch.families.latent._axk2_config) or grouped, the dropped groups masked with 0 (its rule,
    # NOAUX_TC_ZERO_MASKED), its dense layers as A.X-K1's
    "axk2": (*_grouped_sigmoid_keys("axk2", moe_size=512, scale=2.5, n_group=1, topk_group=1, dense=None),
             Key("n_group", default=1, check=optional_positive_int),
             Key("topk_group", default=1, check=optional_positive_int),
             Key("first_k_dense_replace", default=1, check=_non_negative_int),
             Key("moe_layer_freq", default=1, check=positive_int)),
    # Step 3.5 (mlx-lm's ModelArgs defaults): sigmoid routing chosen with a bias, scaled, a shared expert on every
    # sparse layer; the release's own keys mlx-lm ignores are refused where they ask for another model
    "step3p5": (*_COUNT["step3p5"], Key("moe_top_k", default=8, check=positive_int),
                Key("moe_intermediate_size", default=1280, check=positive_int),
                Key("share_expert_dim", default=1280, check=positive_int),
                Key("moe_layers_enum", check=_layer_enum),
                Key("moe_router_scaling_factor", default=3.0, check=positive_number),
                Key("norm_expert_weight", default=True, check=boolean),
                Key("swiglu_limits", check=_limits), Key("swiglu_limits_shared", check=_limits),
                Key("moe_router_activation", default="sigmoid", unsupported=True, check=one_of("sigmoid")),
                Key("use_moe_router_bias", default=True, unsupported=True, check=one_of(True)),
                Key("moe_every_n_layer", default=1, unsupported=True, check=one_of(1))),
    # Kolibri-1 (Kolibri1Config's defaults): sigmoid weights chosen by the logits plus a correction bias, a shared
    # expert of its own width, every layer sparse
    "kolibri1": (*_COUNT["kolibri1"], Key("num_experts_per_tok", default=6, check=positive_int),
                 Key("moe_intermediate_size", default=512, check=positive_int),
                 Key("shared_expert_intermediate_size", default=512, check=positive_int),
                 Key("norm_topk_prob", default=False, check=boolean)),
    # Llama 4 (Scout, Maverick): one expert a token, on the layers moe_layers (else interleave_moe_layer_step) lists;
    # none on MobileLLM-R1's (0 experts, 0 a token, a step of 0 and moe_layers [])
    "llama4_text": (Key("num_local_experts", check=optional_non_negative_int),
                    Key("num_experts_per_tok", default=1, unsupported=True, check=lambda v: (
                        None if v in (0, 1) else f"is {v!r}; Ferrum runs Llama 4's routing with one expert a token, as "
                                                 "every release routes")),
                    Key("interleave_moe_layer_step", default=1, check=_non_negative_int),
                    Key("moe_layers", check=_layer_list)),
    # MiniMax-M2: the keys of MiniMax's own code (and mlx-lm's) that transformers ignores, as transformers runs them
    "minimax_m2": (*_COUNT["minimax_m2"], Key("num_experts_per_tok", default=8, check=positive_int),
                   Key("scoring_func", default="sigmoid", unsupported=True, check=lambda v: None if v in (
                       None, "sigmoid") else f"is {v!r}, but transformers' MiniMax-M2 routes by sigmoid scores"),
                   Key("use_routing_bias", default=True, unsupported=True, check=lambda v: None if v in (
                       None, True) else f"is {v!r}, but transformers always adds e_score_correction_bias to choose"),
                   Key("shared_intermediate_size", default=0, unsupported=True, check=falsy(
                       "transformers' MiniMax-M2 has no shared expert; set it to 0"))),
    # DBRX's ffn_config (lifted: ferrum.arch.families.lift_nested): transformers divides the top-k softmax weights by
    # their moe_normalize_expert_weights-norm (1: their sum; null: left as they are); mlx-lm always by their sum
    "dbrx": (*_COUNT["dbrx"], Key("ffn_config.moe_top_k", default=1, check=positive_int),
             Key("ffn_config.moe_normalize_expert_weights", default=1.0, unsupported=True, check=_dbrx_norm),
             Key("ffn_config.ffn_act_fn", default={"name": "silu"}, unsupported=True, check=_dbrx_activation)),
    # LFM2-MoE (Lfm2MoeConfig's defaults): sigmoid scores chosen with expert_bias (use_expert_bias), dense first layers
    "lfm2_moe": (*_COUNT["lfm2_moe"], Key("num_experts_per_tok", default=4, check=positive_int),
                 Key("moe_intermediate_size", default=1792, check=positive_int),
                 Key("norm_topk_prob", default=True, check=boolean),
                 Key("use_expert_bias", default=True, check=boolean),
                 Key("routed_scaling_factor", default=1.0, check=positive_number),
                 Key("num_dense_layers", default=2, check=_non_negative_int)),
    # Arcee Trinity (AfmoeConfig's defaults): sigmoid scores chosen with expert_bias, always renormalized, scaled by
    # route_scale, shared experts, dense first layers; its releases also carry the keys of Arcee's own code (and
    # mlx-lm's), which transformers ignores: refused where they ask for another rule
    "afmoe": (*_COUNT["afmoe"], Key("num_experts_per_tok", default=6, check=positive_int),
              Key("moe_intermediate_size", default=1408, check=positive_int),
              Key("num_shared_experts", default=2, check=_non_negative_int),
              Key("route_scale", default=1.0, check=positive_number),
              Key("num_dense_layers", default=1, check=_non_negative_int),
              Key("score_func", default="sigmoid", unsupported=True, check=lambda v: None if v in (
                  None, "sigmoid") else f"is {v!r}, but transformers' AFMoE routes by sigmoid scores whatever it says"),
              Key("route_norm", default=True, unsupported=True, check=lambda v: None if v in (None, True) else (
                  f"is {v!r}, but transformers' AFMoE always renormalizes the chosen experts' weights")),
              *(Key(name, default=1, unsupported=True, check=lambda v, name=name: None if v in (None, 1) else (
                  f"is {v!r}; transformers' AFMoE routes over all experts in one group (it ignores {name}), as every "
                  "Trinity release sets it: set it to 1")) for name in ("n_group", "topk_group"))),
    # MiMo-V2-Flash (MiMoV2FlashConfig's defaults): DeepSeek-V3's routing without a shared expert; its release also
    # carries the keys of Xiaomi's own code (and mlx-lm's), which transformers ignores: refused where they ask for more
    "mimo_v2_flash": (*_COUNT["mimo_v2_flash"], Key("num_experts_per_tok", default=8, check=positive_int),
                      Key("moe_intermediate_size", default=2048, check=positive_int),
                      Key("norm_topk_prob", default=True, check=boolean),
                      Key("routed_scaling_factor", default=1.0, check=optional_positive_number),
                      Key("n_group", default=1, check=positive_int), Key("topk_group", default=1, check=positive_int),
                      Key("mlp_layer_types", check=_mlp_layer_types),
                      Key("moe_layer_freq", check=lambda v: None if v is None or (isinstance(v, list) and set(v) <= {
                          0, 1}) else f"must list 0 (dense) or 1 (sparse) per layer, got {v!r}"),
                      Key("n_shared_experts", unsupported=True, check=falsy(
                          "transformers' MiMo-V2-Flash has no shared expert; set it to null")),
                      Key("scoring_func", default="sigmoid", unsupported=True, check=one_of("sigmoid")),
                      Key("topk_method", default="noaux_tc", unsupported=True, check=one_of("noaux_tc"))),
    # Command A MoE (Cohere2MoeConfig's defaults): experts of intermediate_size, shared experts averaged or summed in
    "cohere2_moe": (*_COUNT["cohere2_moe"], Key("num_experts_per_tok", default=2, check=positive_int),
                    Key("num_shared_experts", default=0, check=_non_negative_int),
                    Key("shared_expert_combination_strategy", default="average", check=one_of("average", "sum")),
                    Key("expert_selection_fn", default="softmax", check=one_of("softmax", "sigmoid")),
                    Key("norm_topk_prob", default=True, check=boolean),
                    Key("mlp_layer_types", check=_mlp_layer_types),
                    Key("first_k_dense_replace", default=0, check=_non_negative_int)),
    # transformers' sparsemixer always picks two experts, whatever num_experts_per_tok says
    "phimoe": (*_COUNT["phimoe"], Key("num_experts_per_tok", default=2, unsupported=True, check=lambda v: None if v == 2
                                      else f"is {v!r}; Phi-3.5-MoE's sparsemixer routing always picks 2 experts"),
               Key("router_jitter_noise", default=0.01, check=_non_negative_number)),
    # Nemotron 3 Nano: its MoE blocks ('E') where the block list has them, under NemotronHConfig's defaults
    # (n_shared_experts and moe_shared_expert_overlap it ignores: every MoE block has one shared expert)
    "nemotron_h": (Key("n_routed_experts", default=8, check=positive_int),
                   Key("num_experts_per_tok", default=2, check=positive_int),
                   Key("moe_intermediate_size", default=7688, check=positive_int),
                   Key("moe_shared_expert_intermediate_size", default=7688, check=positive_int),
                   Key("norm_topk_prob", default=True, check=boolean),
                   Key("routed_scaling_factor", default=1.0, check=positive_number),
                   Key("n_group", default=1, check=positive_int), Key("topk_group", default=1, check=positive_int),
                   Key("moe_latent_size", unsupported=True, check=falsy(
                       "its experts read a latent projection of the stream (Nemotron 3 Super), which Ferrum does not "
                       "run yet; Ferrum runs Nemotron 3 Nano's experts, which read the stream itself"))),
    # Gemma 4 26B-A4B: its MoE block where enable_moe_block (ferrum.arch.families.gemma's Gemma 4 keys) says;
    # transformers has no default for these three
    "gemma4_text": (Key("num_experts", check=optional_positive_int), Key("top_k_experts", check=optional_positive_int),
                    Key("moe_intermediate_size", check=optional_positive_int)),
    # Jamba: experts of intermediate_size on every expert_layer_period-th layer from expert_layer_offset
    "jamba": (*_COUNT["jamba"], Key("num_experts_per_tok", default=2, check=positive_int),
              Key("expert_layer_period", default=2, check=positive_int),
              Key("expert_layer_offset", default=1, check=_non_negative_int)),
    # Flint (FlintConfig's defaults): Qwen's sparse layers (its first two dense), sigmoid routing, an ungated shared
    # expert
    "flint": (*_COUNT["flint"], Key("num_experts_per_tok", default=6, check=positive_int),
              Key("moe_intermediate_size", default=512, check=positive_int),
              Key("norm_topk_prob", default=True, check=boolean),
              Key("decoder_sparse_step", default=1, check=positive_int),
              Key("mlp_only_layers", default=[0, 1], check=_layer_list),
              Key("shared_expert_intermediate_size", default=1024, check=positive_int)),
    # Laguna (LagunaConfig's defaults): sigmoid scores chosen with a correction bias, always renormalized, scaled,
    # beside an ungated shared expert, the first layer dense; mlx-lm's moe_router_score_func, which transformers
    # ignores, refused where it asks for another rule
    # MiniMax-M3 (MiniMaxM3VLTextConfig's defaults): sigmoid routing with a correction bias, renormalized, scaled,
    # beside one shared expert; the release's keys transformers ignores refused where they ask for another rule
    "minimax_m3_vl_text": (*_COUNT["minimax_m3_vl_text"], Key("num_experts_per_tok", default=4, check=positive_int),
                           Key("shared_intermediate_size", default=3072, check=positive_int),
                           Key("routed_scaling_factor", default=2.0, check=positive_number),
                           Key("swiglu_alpha", default=1.702, check=positive_number),
                           Key("swiglu_limit", default=7.0, check=positive_number),
                           Key("mlp_layer_types", check=_mlp_layer_types),
                           Key("n_shared_experts", default=1, unsupported=True, check=one_of(None, 1)),
                           Key("scoring_func", default="sigmoid", unsupported=True, check=one_of(None, "sigmoid")),
                           Key("use_routing_bias", default=True, unsupported=True, check=one_of(None, True))),
    "laguna": (*_COUNT["laguna"], Key("num_experts_per_tok", default=8, check=positive_int),
               Key("moe_intermediate_size", default=512, check=positive_int),
               Key("shared_expert_intermediate_size", default=512, check=positive_int),
               Key("moe_routed_scaling_factor", default=1.0, check=positive_number),
               Key("moe_router_logit_softcapping", default=0.0, check=_non_negative_number),
               Key("mlp_layer_types", check=_mlp_layer_types),
               Key("moe_apply_router_weight_on_input", default=False, unsupported=True, check=falsy(
                   "transformers' Laguna refuses it too; set it to false")),
               Key("moe_router_score_func", default="sigmoid", unsupported=True, check=lambda v: None if v in (
                   None, "sigmoid") else f"is {v!r}, but transformers' Laguna routes by sigmoid scores whatever it "
                                         "says")),
    # Aria (AriaTextConfig's defaults): moe_topk of moe_num_experts experts, moe_num_shared_experts shared ones, all of
    # intermediate_size; the remote code's moe_intermediate_size, which transformers ignores, must agree
    "aria_text": (*_COUNT["aria_text"], Key("moe_topk", default=2, check=positive_int),
                  Key("moe_num_shared_experts", default=2, check=_non_negative_int),
                  Key("moe_intermediate_size", check=optional_positive_int)),
    # Dots 3: DeepSeek-V3's routing under Dots3NoteTextConfig's defaults, its dense layers by mlp_layer_types (derived
    # from the release's first_k_dense_replace and moe_layer_freq: ferrum.arch.families.latent._dots3_config), shared
    # experts of shared_experts_intermediate_size
    "dots3_note_text": (*_grouped_sigmoid_keys("dots3_note_text", moe_size=1536, scale=1.0, n_group=1, topk_group=1,
                                               dense=None),
                        Key("shared_experts_intermediate_size", default=1536, check=positive_int)),
    # Ling / Ring v1 and 2.0 (mlx-lm's bailing_moe ModelArgs: no defaults for the sizes, routing by softmax unless
    # score_function says, grouped and corrected where 2.0's configs say); moe_router_enable_routed_scaling is read
    # by mlx-lm and its release's code but never consulted (the weights are always scaled)
    "bailing_moe": (*_COUNT["bailing_moe"], Key("num_experts_per_tok", check=positive_int),
                    Key("moe_intermediate_size", check=positive_int), Key("norm_topk_prob", check=boolean),
                    Key("num_shared_experts", check=_non_negative_int),
                    Key("moe_shared_expert_intermediate_size", check=optional_positive_int),
                    Key("moe_router_enable_shared_expert", default=True, check=boolean),
                    Key("first_k_dense_replace", check=_non_negative_int),
                    Key("score_function", default="softmax", check=one_of("softmax", "sigmoid")),
                    Key("moe_router_enable_expert_bias", default=False, check=boolean),
                    Key("moe_router_enable_routed_scaling", default=True, check=boolean),
                    Key("routed_scaling_factor", default=1.0, check=positive_number),
                    Key("n_group", default=1, check=positive_int), Key("topk_group", default=4, check=positive_int)),
    # DeepSeek-MoE (v1; no transformers class: mlx-lm's deepseek and DeepSeek's remote code, under mlx-lm's defaults,
    # which leave the expert counts to the config)
    "deepseek": (*_COUNT["deepseek"], Key("num_experts_per_tok", check=positive_int),
                 Key("moe_intermediate_size", default=1407, check=positive_int),
                 Key("n_shared_experts", check=optional_positive_int),
                 Key("first_k_dense_replace", default=0, check=_non_negative_int),
                 Key("moe_layer_freq", default=1, check=positive_int),
                 # the release's keys of DeepSeek's code, which mlx-lm ignores: refused where they ask for more
                 Key("norm_topk_prob", default=False, unsupported=True, check=falsy(
                     "mlx-lm weighs the experts by their top-k probabilities as they are (DeepSeek's code would "
                     "renormalize them; no release does); set it to false")),
                 Key("scoring_func", default="softmax", unsupported=True, check=one_of(None, "softmax"))),
    # Kwai's Klear (no transformers class: mlx-lm's Klear, whose ModelArgs has no defaults)
    "Klear": (*_COUNT["Klear"], Key("num_experts_per_tok", check=positive_int),
              Key("moe_intermediate_size", check=positive_int), Key("n_shared_experts", check=positive_int),
              Key("norm_topk_prob", check=required(boolean)), Key("decoder_sparse_step", check=positive_int),
              Key("mlp_only_layers", check=required(_layer_list))),
    # Hunyuan-Large's and Hunyuan-7B's remote-code config (no transformers class: mlx-lm's hunyuan, whose ModelArgs
    # has no defaults for these); num_experts 1 makes every layer dense
    "hunyuan": (*_COUNT["hunyuan"], Key("moe_topk", check=required(_per_layer_ints)),
                Key("moe_intermediate_size", check=_per_layer_ints),
                Key("num_shared_expert", check=required(_per_layer_ints)),
                Key("use_mixed_mlp_moe", check=required(boolean))),
    # Phixtral (mlx-lm's ModelArgs defaults)
    "phixtral": (*_COUNT["phixtral"], Key("num_experts_per_tok", default=2, check=positive_int)),
}
#: transformers' expert count where a config gives none (dots1 has none: its configs must say).
_DEFAULT_COUNT = {"mixtral": 8, "minimax": 8, "qwen2_moe": 60, "qwen3_moe": 128, "olmoe": 64, "granitemoe": 8,
                  "gpt_oss": 128, "qwen3_next": 512, "qwen3_5_moe_text": 256,
                  "qwen3_vl_moe": 60, "glm4_moe": 128, "deepseek_v3": 256, "phimoe": 16,
                  "granitemoeshared": 8, "deepseek_v2": 64, "glm4_moe_lite": 64, "hunyuan_v1_moe": 1,
                  "ernie4_5_moe": 64, "exaone_moe": 64,
                  "llama4_text": 16, "minimax_m2": 256, "flex_olmo": 7, "solar_open": 128,
                  "mellum": 64, "hy_v3": 192, "mistral4": 128, "dbrx": 4, "lfm2_moe": 32, "kimi_linear": 256,
                  "afmoe": 64, "sarvam_moe": 128, "sarvam_mla": 128, "mimo_v2_flash": 256,
                  "cohere2_moe": 8,
                  "jamba": 16, "deepseek_v32": 256, "glm_moe_dsa": 256, "axk1": 192, "kolibri1": 384, "flint": 256,
                  "laguna": 256, "minimax_m3_vl_text": 128, "axk2": 128, "granitemoe_swa": 8, "lara_mini": 128,
                  "jetmoe": 8, "hy_v4": 256, "bailing_hybrid": 512, "aria_text": 8, "dots3_note_text": 256,
                  "step3p5": 288, "phixtral": 4}
#: Families whose every layer is sparse, with experts of ``intermediate_size``; Mixtral always renormalizes the
#: top-k probabilities (GraniteMoE's and gpt-oss's softmax over the top-k logits is the same), OLMoE and FlexOlmo
#: where ``norm_topk_prob`` says.
_EVERY_LAYER = {"mixtral": lambda r: True, "minimax": lambda r: True, "granitemoe": lambda r: True,
                "olmoe": lambda r: r("norm_topk_prob"),
                "gpt_oss": lambda r: True, "phimoe": lambda r: False, "granitemoeshared": lambda r: True,
                "granitemoe_swa": lambda r: True,
                "hunyuan_v1_moe": lambda r: True, "minimax_m2": lambda r: True,
                "flex_olmo": lambda r: r("norm_topk_prob"),
                "dbrx": lambda r: r("ffn_config.moe_normalize_expert_weights") is not None,
                "jetmoe": lambda r: True}
#: Per family, what its experts add to plain SwiGLU ones: gpt-oss biases its router and every expert
#: projection, clamps its activation, and stores its experts in layouts of its own.
_EXPERT_EXTRAS: dict[str, Callable[[KeyReader], dict]] = {
    "gpt_oss": lambda r: dict(biased=True, activation=ClampedSwiGLU(float(r("swiglu_alpha")),
                                                                    float(r("swiglu_limit"))), layout="gpt_oss"),
    # Qwen3-VL-MoE renormalizes its top-k weights whatever norm_topk_prob says, as transformers runs it
    "qwen3_vl_moe": lambda r: dict(layout="fused_gate_up", normalize=True),
    "qwen3_5_moe_text": lambda r: dict(normalize=True),
    "phimoe": lambda r: dict(routing="sparsemixer", jitter_eps=float(r("router_jitter_noise"))),
    # GraniteMoeShared's shared MLP (0 wide: none), ungated, gate and up in one matrix (Moe.split)
    "granitemoeshared": lambda r: dict(shared_expert_size=r("shared_intermediate_size") or None,
                                       shared_module="shared_mlp", shared_gate=None, shared_fused=True),
    # GraniteMoeSWA: that shared MLP, its experts fused as transformers 5 saves them (no conversion to Granite's
    # input_linear / output_linear), outputs first
    "granitemoe_swa": lambda r: dict(shared_expert_size=r("shared_intermediate_size") or None,
                                     shared_module="shared_mlp", shared_gate=None, shared_fused=True,
                                     layout="fused_outputs_first"),
    "hunyuan_v1_moe": _hunyuan_extras,
    # MiniMax-M2: DeepSeek-V3's sigmoid scores chosen with a correction bias, in one group, unscaled; the bias is the
    # sparse MLP's own buffer (transformers' MiniMaxM2SparseMoeBlock), not the router's
    "minimax_m2": lambda r: dict(routing="sigmoid_grouped", correction_bias=CORRECTION_BIAS),
    "dbrx": lambda r: dict(layout="dbrx"),  # transformers' ffn.experts.mlp.{w1,v1,w2} (ferrum.moe.dbrx)
    "jetmoe": lambda r: dict(output_bias="bias"),  # JetMoeMoE's bias, added once the experts are summed
}
def _listed_kinds(r: KeyReader, layers: int) -> list[bool]:
    """Which layers are sparse: as mlp_layer_types lists them, every layer where it does not (Mellum's)."""
    return _listed_sparse(r, layers, [True] * layers)


#: Per Qwen-like family, which layers are sparse, where Qwen's mlp_only_layers and decoder_sparse_step do not say.
_LAYER_KINDS: dict[str, Callable[[KeyReader, int], list[bool]]] = {
    "mellum": _listed_kinds, "qwen3_5_moe_text": lambda r, layers: [True] * layers}
#: Per family, how many experts route each token, where num_experts_per_tok does not say.
_TOP_K: dict[str, Callable[[KeyReader], int]] = {"hunyuan_v1_moe": _hunyuan_top_k, "ernie4_5_moe": _ernie_top_k,
                                                 "dbrx": lambda r: r("ffn_config.moe_top_k"),
                                                 "aria_text": lambda r: r("moe_topk"),
                                                 "step3p5": lambda r: r("moe_top_k"),
                                                 "hunyuan": lambda r: _one_per_layer(r, "moe_topk")
                                                 if r("num_experts") > 1 else 1}
#: Per family, the key a refusal of its expert count per token names, where not num_experts_per_tok.
_TOP_K_NAME = {"dbrx": "ffn_config.moe_top_k", "aria_text": "moe_topk", "step3p5": "moe_top_k", "hunyuan": "moe_topk"}


@dataclass(frozen=True)
class MoeSpec:
    """Sizes and routing rule of a model's sparse MLPs (which layers have one is ``LayerSpec.mlp``)."""

    module: str  # checkpoint module of the sparse MLP in a layer: "block_sparse_moe" or "mlp"; "": the layer (Gemma 4)
    expert_names: tuple[str | None, str, str]  # checkpoint names of (gate, up, down) inside each expert (gate: ungated)
    num_experts: int
    top_k: int
    expert_size: int  # intermediate size of each routed expert
    normalize: bool  # divide the top-k probabilities by their sum (Mixtral always; Qwen: norm_topk_prob)
    shared_expert_size: int | None  # the shared expert's width (Qwen2-MoE's, GLM-4.5's), else None
    router: str = "gate"  # the router's module in the sparse MLP module
    stacked: tuple[str, str, str] | None = None  # the Hugging Face stacks of (gate, up, down) where not per expert
    biased: bool = False  # the router and every expert projection have biases (gpt-oss)
    unbiased_router: bool = False  # ...but the router (Phixtral's experts are biased, its router is not)
    #: The module holding the experts one by one in Hugging Face layouts (``M.experts.{e}.*``): Phixtral's ``mlp``.
    experts_module: str = "experts"
    #: The experts' activation where not SwiGLU; an ungated one (``gated`` False: Nemotron 3 Nano's) leaves the experts
    #: without a gate projection
    activation: ExpertActivation | None = None
    #: The shared expert's activation where not SwiGLU, never inferred from the experts' (Hy4 clamps its experts'
    #: SwiGLU, not its shared expert's): MiniMax-M3's clamped SwiGLU, Nemotron 3 Nano's ungated squared ReLU (its
    #: shared expert then without a gate projection)
    shared_activation: ExpertActivation | None = None
    layout: str | None = None  # a family's own checkpoint layouts (ferrum.moe.loading.LAYOUTS)
    #: The shared expert's module, and the module of its sigmoid gate (Qwen2-MoE's); None: ungated, added to the
    #: routed experts' sum as it is (GLM-4.5's ``shared_experts``)
    shared_module: str = "shared_expert"
    shared_gate: str | None = "shared_expert_gate"
    #: The routing rule: "softmax" (ferrum.moe.routing.route), a grouped one (ferrum.moe.routing.GROUPED_RULES:
    #: "sigmoid_grouped", DeepSeek-V3's and GLM-4.5's, with each layer's ``<router>.e_score_correction_bias``;
    #: "softmax_grouped", DeepSeek-V2's), run by ferrum.moe.routing.route_grouped with ``n_group``,
    #: ``topk_group`` and ``routed_scale``, or "sparsemixer" (Phi-3.5-MoE's: route_sparsemixer, ``jitter_eps``)
    routing: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scale: float = 1.0
    jitter_eps: float = 0.0  # sparsemixer's router_jitter_noise
    #: The router's weight kept in float32 and its product computed in float32 (DeepSeek's and GLM's, which
    #: transformers keeps so: ``_keep_in_fp32_modules_strict``), so a bfloat16 model picks the experts its float32
    #: router picks; else the router runs in the compute dtype, as Mixtral's and Qwen's do.
    router_float32: bool = False
    shared_fused: bool = False  # the shared expert's gate and up stored as one ``gate_up_proj``, gate rows first
    #: The module mlx-lm's conversions stack the experts in (``M.<module>.gate_proj.weight``); dots1's and Llama 4's
    #: ``experts``.
    mlx_lm_stack: str = "switch_mlp"
    #: The names of the (gate, up, down) stacks in that module: its SwitchGLU's, or (Nemotron-H) its SwitchMLP's
    #: ``fc1`` (up) and ``fc2`` (down).
    mlx_lm_names: tuple[str | None, str, str] = ("gate_proj", "up_proj", "down_proj")
    #: A ``layout`` "fused_gate_up" family whose Hugging Face checkpoints store the fused stacks inputs first (Llama 4's
    #: ``[E, hidden, 2 * inter]``, as transformers saves them), not outputs first (transformers 5's Qwen3-VL-MoE).
    fused_inputs_first: bool = False
    #: Where a corrected rule's per-expert correction bias sits in the sparse MLP module, where not under the
    #: router (``<router>.e_score_correction_bias``): ERNIE 4.5's ``moe_statics.e_score_correction_bias``,
    #: EXAONE MoE's and MiniMax-M2's ``e_score_correction_bias``; stored ``[1, E]`` where ``correction_bias_rows``
    #: (ERNIE's)
    correction_bias: str | None = None
    correction_bias_rows: bool = False
    #: Other names of the correction bias in the sparse MLP module, read where the checkpoint has no
    #: ``correction_bias``: mlx-lm's conversions of EXAONE MoE move it under the router.
    correction_bias_aliases: tuple[str, ...] = ()
    #: Checkpoints may leave the correction bias out, their runtime routing without it (mlx-lm's of ERNIE 4.5; A.X-K1's,
    #: which transformers routes with zeros):
    #: read as zeros where missing, with a warning, rather than refused.
    correction_bias_droppable: bool = False
    #: Each chosen expert reads its input times its routing weight and its output is summed unweighted (Llama 4),
    #: where other families weigh the outputs.
    weigh_input: bool = False
    #: The router reads its input RMS-normed without a weight, times this tensor of the sparse MLP module and
    #: hidden_size ** -0.5 (Gemma 4's ``router.scale``, folded into one norm weight at load: ``ROUTER_NORM``).
    router_norm: str | None = None
    #: The per-expert scale of the chosen experts' weights, in the sparse MLP module, for a rule that is
    #: ``expert_scaled`` (Gemma 4's ``router.per_expert_scale``).
    expert_scale: str | None = None
    #: The sparse MLP runs beside the layer's dense MLP, both reading the layer's stream (Gemma 4's MoE block): the
    #: norms before and after the dense MLP, then before and after the experts, their two outputs summed
    #: (:class:`ferrum.moe.beside.DenseBesideMoe`, the "dense+moe" kind; the router reads the stream itself).
    beside_dense: tuple[str, str, str, str] | None = None
    #: The shared expert's output times this, folded into its down_proj at load (Command A MoE's "average" of the
    #: routed and shared outputs: each halved).
    shared_scale: float = 1.0
    #: Identity experts after the ``num_experts`` routed ones (LongCat-Flash's zero-computation experts,
    #: :mod:`ferrum.moe.zero`): the router and its correction bias score ``num_experts + zero_experts``.
    zero_experts: int = 0
    #: The router's logits soft-capped in float32 before routing, ``cap * tanh(logits / cap)`` (Laguna's
    #: moe_router_logit_softcapping); None: as they are.
    router_softcap: float | None = None
    #: A bias in the sparse MLP module (JetMoE's ``mlp.bias``, ``[hidden]``) added to the output once the experts
    #: are summed; None: none.
    output_bias: str | None = None
    #: A linear of two outputs in the sparse MLP module whose softmax weighs the routed experts' sum (its first) and
    #: the shared expert's output (its second), where they are not simply added (Klear's biased ``coefficient``,
    #: :class:`ferrum.moe.mixed.CoefficientMix`); None: added.
    shared_mix: str | None = None
    #: Latent experts (Kimi K3's routed_expert_hidden_size): the routed experts read ``down(x)``, ``latent_size``
    #: wide, and their weighted sum, RMS-normed where a norm is named, is projected back by ``up``; the router and
    #: the shared expert read ``x`` at full width. The (down, norm or None, up) modules of the sparse MLP module.
    latent: tuple[str, str | None, str] | None = None
    latent_size: int = 0

    @property
    def expert_width(self) -> int | None:
        """The width the routed experts read and write: the latent size, or None (the hidden size)."""
        return self.latent_size if self.latent is not None else None

    @property
    def scored(self) -> int:
        """How many experts the router scores: the routed ones and the zero experts."""
        return self.num_experts + self.zero_experts

    def at(self, name: str) -> str:
        """``name`` of the sparse MLP module as a layer's tensor (the module may be the layer itself)."""
        return f"{self.module}.{name}" if self.module else name

    @property
    def gated(self) -> bool:
        """Whether the experts have a gate projection."""
        return self.activation is None or self.activation.gated

    @property
    def shared_gated(self) -> bool:
        """Whether the shared expert has a gate projection."""
        return self.shared_activation is None or self.shared_activation.gated

    @property
    def since(self) -> tuple[int, int]:
        """The plugin API a backend's ``moe_experts`` must declare to take these experts' ``needs``."""
        return (1, 0) if self.activation is None else self.activation.since

    @property
    def bias_name(self) -> str:
        """The correction bias's name in the sparse MLP module."""
        return self.correction_bias or f"{self.router}.{CORRECTION_BIAS}"

    @property
    def needs(self) -> tuple[str, ...]:
        """The ``moe_experts`` feature arguments these experts need (see ferrum.hookspec.moe_experts)."""
        return ("biases",) * self.biased + ("activation",) * (self.activation is not None)


#: Families routed by a grouped rule (``MoeSpec.routing``), with an ungated shared expert of ``n_shared_experts``
#: times the routed experts' width and dense MLPs where :func:`_sparse_layers` says.
_GROUPED = {"glm4_moe": "sigmoid_grouped", "deepseek_v3": "sigmoid_grouped", "deepseek_v2": "softmax_grouped",
            "glm4_moe_lite": "sigmoid_grouped", "dots1": "sigmoid_grouped", "exaone_moe": "sigmoid_grouped",
            "solar_open": "sigmoid_grouped", "kimi_linear": "sigmoid_grouped", "sarvam_moe": "sigmoid_grouped",
            "sarvam_mla": "sigmoid_grouped", "deepseek_v32": "sigmoid_grouped", "glm_moe_dsa": "sigmoid_grouped",
            "axk1": "sigmoid_grouped", "axk2": "sigmoid_grouped_zero_masked", "mistral4": "softmax_top2_grouped",
            "hy_v4": "sigmoid_grouped", "bailing_hybrid": "sigmoid_grouped", "dots3_note_text": "sigmoid_grouped",
            "kimi_k3": "sigmoid_grouped_zero_masked"}
#: Grouped rules that differ from another only in the dropped groups' experts, which one group has none of: with one
#: group they route as that one, which older plugins run too.
_ONE_GROUP = {"sigmoid_grouped_zero_masked": "sigmoid_grouped"}


def _groups(r: KeyReader, routing: str) -> tuple[int, int]:
    """``(n_group, topk_group)``; DeepSeek-V2's "greedy" topk_method ignores both (one group)."""
    if routing == "softmax_grouped" and r("topk_method") == "greedy":
        return 1, 1
    for name in ("n_group", "topk_group"):
        if r(name) is None:
            r.fail(name, f"must be set with topk_method {r('topk_method')!r}, got None")
    return r("n_group"), r("topk_group")


@dataclass(frozen=True)
class _GroupedFamily:
    """How a grouped family's sparse MLPs differ from DeepSeek-V3's: the key counting its shared experts, what its
    spec changes (``replace`` fields), and how its sparse layers are read."""

    shared_key: str = "n_shared_experts"
    changes: tuple[tuple[str, Any], ...] = ()
    sparse_layers: Callable[[KeyReader, int], list[bool]] | None = None  # None: _sparse_layers
    shared_size_key: str = "moe_intermediate_size"  # the key sizing each shared expert


_GROUPED_FAMILIES = {
    # Sarvam-30B: its release (and transformers' save_pretrained) names the router's correction bias expert_bias
    "sarvam_moe": _GroupedFamily(changes=(("correction_bias", "gate.expert_bias"),)),
    # K-EXAONE: its checkpoints keep the bias beside the router, mlx-lm's conversions under it
    "exaone_moe": _GroupedFamily("num_shared_experts", (
        ("correction_bias", CORRECTION_BIAS), ("correction_bias_aliases", (f"gate.{CORRECTION_BIAS}",))),
        _exaone_moe_sparse),
    # Mistral 4: its router in the compute dtype (transformers keeps nothing of it in float32), its experts fused as
    # transformers 5 saves them, only ever outputs first, or stacked as mlx-lm converts them (ferrum.moe.fused_gate_up)
    "mistral4": _GroupedFamily(changes=(("router_float32", False), ("layout", "fused_outputs_first"))),
    # Kimi Linear: mlx-lm's conversions keep the correction bias beside the router, its release under it
    "kimi_linear": _GroupedFamily(changes=(("correction_bias_aliases", (CORRECTION_BIAS,)),)),
    # Kimi K3: its release keeps the correction bias under the router or beside it (mlx-lm's sanitize takes both)
    "kimi_k3": _GroupedFamily(changes=(("correction_bias_aliases", (CORRECTION_BIAS,)),)),
    # Hy4: its experts fused as transformers 5 saves them, outputs first (ferrum.moe.fused_gate_up)
    "hy_v4": _GroupedFamily(changes=(("layout", "fused_outputs_first"),)),
    "deepseek_v32": _GroupedFamily(sparse_layers=_first_dense_or_listed),
    "glm_moe_dsa": _GroupedFamily(sparse_layers=_first_dense_or_listed),
    # A.X-K1: transformers routes it with zeros where a checkpoint has no correction biases
    "axk1": _GroupedFamily(changes=(("correction_bias_droppable", True),), sparse_layers=_first_dense_or_listed),
    # Ling 3: its release (and transformers' save_pretrained) names the router's correction bias expert_bias
    "bailing_hybrid": _GroupedFamily(changes=(("correction_bias", "gate.expert_bias"),),
                                     sparse_layers=_first_dense_or_listed),
    "axk2": _GroupedFamily(sparse_layers=_first_dense_or_listed),
    # Dots 3: shared experts of their own width
    "dots3_note_text": _GroupedFamily(shared_size_key="shared_experts_intermediate_size"),
}


def _grouped(r: KeyReader, model_type: str, count: int, top_k: int, layers: int) -> tuple[MoeSpec, list[bool]]:
    """DeepSeek-V2's, DeepSeek-V3's, GLM-4.5's and Mistral 4's sparse MLPs (transformers' ``DeepseekV2Moe``,
    ``DeepseekV3MoE``, ``Glm4MoeMoE``, ``Mistral4MoE``); refuses groupings their router cannot run. An uncorrected
    rule (DeepSeek-V2's, Mistral 4's) with one group and no scaling is the plain softmax rule, which backends run
    themselves."""
    routing, (module, names) = _GROUPED[model_type], LAYOUT[model_type]
    family = _GROUPED_FAMILIES.get(model_type, _GroupedFamily())
    rule = GROUPED_RULES[routing]
    groups, kept = _groups(r, routing)
    _check_groups(r, rule, count, top_k, groups, kept)
    scale = float(r("routed_scaling_factor"))
    if not rule.corrected and groups == 1 and scale == 1.0:
        routing = "softmax"
    if groups == 1:
        routing = _ONE_GROUP.get(routing, routing)
    spec = MoeSpec(module, names, count, top_k, r("moe_intermediate_size"), r("norm_topk_prob"),
                   r(family.shared_size_key) * r(family.shared_key), shared_module="shared_experts",
                   shared_gate=None, routing=routing, n_group=groups, topk_group=kept, routed_scale=scale,
                   router_float32=True)
    return replace(spec, **dict(family.changes)), (family.sparse_layers or _sparse_layers)(r, layers)


def _check_groups(r: KeyReader, rule: GroupRule, count: int, top_k: int, groups: int, kept: int) -> None:
    """Refuses a grouping the grouped ``rule`` cannot run over ``count`` experts, ``top_k`` of them chosen."""
    if count % groups:
        r.fail("n_group", f"({groups}) must divide the {count} routed experts (n_routed_experts) into equal groups")
    if count // groups < rule.min_group:
        r.fail("n_group", f"({groups}) leaves {count // groups} expert per group; a group's score sums its two best "
                          "experts, so each group needs at least two")
    if kept > groups:
        r.fail("topk_group", f"({kept}) exceeds the {groups} expert groups (n_group)")
    if top_k > kept * (count // groups):
        r.fail("num_experts_per_tok", f"({top_k}) exceeds the {kept * (count // groups)} experts of the {kept} "
                                      f"group(s) topk_group keeps")


def _hy_v3(r: KeyReader, sizes: object, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Tencent's Hy3 sparse MLP as transformers saves and runs it (``HYV3MoE``): a float32 router ``router.gate``
    whose sigmoid scores, plus the sparse MLP's own ``expert_bias`` (float32), choose the top-k, weighed by their
    uncorrected scores renormalized and scaled by router_scaling_factor; unbiased experts of moe_intermediate_size
    (fused in memory, per expert as saved), and an ungated ``shared_mlp`` of num_shared_experts times that (0:
    intermediate_size, as transformers sizes it). Layers are sparse as mlp_layer_types lists them, else all but the
    first."""
    layers, size = sizes.num_layers, r("moe_intermediate_size")
    spec = MoeSpec("mlp", LAYOUT["hy_v3"][1], count, top_k, size, True,
                   size * r("num_shared_experts") or sizes.intermediate_size, router="router.gate",
                   shared_module="shared_mlp", shared_gate=None, routing="sigmoid_grouped",
                   routed_scale=float(r("router_scaling_factor")), router_float32=True, correction_bias="expert_bias")
    return spec, _listed_sparse(r, layers, [i > 0 for i in range(layers)])


def _lfm2_moe(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """LFM2-MoE's sparse MLP as transformers runs it (``Lfm2MoeSparseMoeBlock``): a router ``feed_forward.gate`` in
    the compute dtype whose sigmoid scores, plus the block's own float32 ``expert_bias`` where use_expert_bias,
    choose the top-k, weighed by their unbiased scores (renormalized where norm_topk_prob) times
    routed_scaling_factor; SwiGLU experts of moe_intermediate_size (``experts.{e}.w1 / w3 / w2`` as saved), no shared
    expert; the first num_dense_layers layers dense. transformers adds 1e-6 to the sum it divides by, the grouped
    rule 1e-20: the weights differ by under 1e-6 / their sum."""
    biased = r("use_expert_bias")
    spec = MoeSpec("feed_forward", LAYOUT["lfm2_moe"][1], count, top_k, r("moe_intermediate_size"),
                   r("norm_topk_prob"), None, routing="sigmoid_grouped" if biased else "sigmoid_top_k",
                   routed_scale=float(r("routed_scaling_factor")), correction_bias="expert_bias" if biased else None)
    return spec, [i >= r("num_dense_layers") for i in range(sizes.num_layers)]


def _afmoe(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Arcee Trinity's sparse MLP as transformers runs it (``AfmoeSparseMoeBlock``): a router ``router.gate`` in the
    compute dtype whose sigmoid scores, plus the block's own float32 ``expert_bias``, choose the top-k, weighed by
    their unbiased scores always renormalized, times route_scale; SwiGLU experts of moe_intermediate_size and an
    ungated ``shared_experts`` MLP of num_shared_experts times that (none where 0); the first num_dense_layers
    layers dense."""
    size = r("moe_intermediate_size")
    spec = MoeSpec("mlp", LAYOUT["afmoe"][1], count, top_k, size, True, size * r("num_shared_experts") or None,
                   router="router.gate", shared_module="shared_experts", shared_gate=None, routing="sigmoid_grouped",
                   routed_scale=float(r("route_scale")), correction_bias="expert_bias")
    return spec, [i >= r("num_dense_layers") for i in range(sizes.num_layers)]


def _mimo_v2_flash(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """MiMo-V2-Flash's sparse MLP as transformers runs it (``MiMoV2FlashMoE``): DeepSeek-V3's float32 router and
    grouped sigmoid routing with ``gate.e_score_correction_bias``, scaled by routed_scaling_factor (null: 1), experts
    of moe_intermediate_size, no shared expert; sparse layers as mlp_layer_types lists them (else all but the first).
    Its release's moe_layer_freq (1: sparse), which transformers ignores and mlx-lm reads, must agree."""
    groups, kept = r("n_group"), r("topk_group")
    _check_groups(r, GROUPED_RULES["sigmoid_grouped"], count, top_k, groups, kept)
    scale = r("routed_scaling_factor")
    spec = MoeSpec("mlp", LAYOUT["mimo_v2_flash"][1], count, top_k, r("moe_intermediate_size"), r("norm_topk_prob"),
                   None, shared_gate=None, routing="sigmoid_grouped", n_group=groups, topk_group=kept,
                   routed_scale=1.0 if scale is None else float(scale), router_float32=True)
    layers = sizes.num_layers
    sparse = _listed_sparse(r, layers, [i > 0 for i in range(layers)])
    freq = r("moe_layer_freq")
    if isinstance(freq, list) and [kind == 1 for kind in freq] != sparse:
        r.fail("moe_layer_freq", f"is {freq!r}, but transformers makes layers {[i for i, s in enumerate(sparse) if s]} "
                                 "sparse (by mlp_layer_types, else all but the first) and ignores it; make them agree")
    return spec, sparse


def _flint(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Flint's sparse MLP as transformers runs it (``FlintSparseMoeBlock``): a float32 router ``gate`` whose top-k
    sigmoid scores (no bias) weigh the experts, renormalized where norm_topk_prob; SwiGLU experts of
    moe_intermediate_size and an ungated ``shared_expert`` of shared_expert_intermediate_size added in full. Layers
    are sparse as Qwen-MoE's decoder_sparse_step and mlp_only_layers say (null: the first two dense, as transformers
    reads it)."""
    dense, step = r("mlp_only_layers"), r("decoder_sparse_step")
    dense = [0, 1] if dense is None else dense
    spec = MoeSpec(*LAYOUT["flint"], count, top_k, r("moe_intermediate_size"), r("norm_topk_prob"),
                   r("shared_expert_intermediate_size"), shared_gate=None, routing="sigmoid_top_k",
                   router_float32=True)
    return spec, [i not in dense and (i + 1) % step == 0 for i in range(sizes.num_layers)]


def _laguna(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Laguna's sparse MLP as transformers saves and runs it (``LagunaSparseMoeBlock``): a router ``gate`` in the
    compute dtype whose logits, soft-capped by moe_router_logit_softcapping (0: not) in float32, give sigmoid scores
    that, plus ``experts.e_score_correction_bias`` (float32), choose the top-k, weighed by their uncorrected scores
    renormalized, times moe_routed_scaling_factor; SwiGLU experts of moe_intermediate_size and an ungated
    ``shared_expert`` of shared_expert_intermediate_size added after. Sparse layers as mlp_layer_types lists them,
    else all but the first."""
    cap = float(r("moe_router_logit_softcapping"))
    spec = MoeSpec(*LAYOUT["laguna"], count, top_k, r("moe_intermediate_size"), True,
                   r("shared_expert_intermediate_size"), shared_gate=None, routing="sigmoid_grouped",
                   routed_scale=float(r("moe_routed_scaling_factor")),
                   correction_bias=f"experts.{CORRECTION_BIAS}", router_softcap=cap or None)
    layers = sizes.num_layers
    return spec, _listed_sparse(r, layers, [i > 0 for i in range(layers)])


def _minimax_m3(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """MiniMax-M3's sparse MLP as transformers runs it (``MiniMaxM3VLSparseMoeBlock``): a router ``gate`` in the
    compute dtype whose sigmoid scores, plus ``gate.e_score_correction_bias`` (float32), choose the top-k, weighed
    by their uncorrected scores renormalized, times routed_scaling_factor; experts of intermediate_size and an
    ungated ``shared_experts`` MLP of shared_intermediate_size added after, all running gpt-oss's clamped SwiGLU
    (swiglu_alpha, swiglu_limit; gate and up not interleaved), stored fused as transformers saves its text model.
    Sparse layers as mlp_layer_types lists them (the release's moe_layer_freq is read as it), else all."""
    clamped = ClampedSwiGLU(float(r("swiglu_alpha")), float(r("swiglu_limit")))
    spec = MoeSpec(*LAYOUT["minimax_m3_vl_text"], count, top_k, sizes.intermediate_size, True,
                   r("shared_intermediate_size"), shared_module="shared_experts", shared_gate=None, shared_fused=True,
                   activation=clamped, shared_activation=clamped, routing="sigmoid_grouped",
                   routed_scale=float(r("routed_scaling_factor")))
    return spec, _listed_sparse(r, sizes.num_layers, [True] * sizes.num_layers)


def _lara_mini(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Lara Mini's sparse MLP as transformers saves and runs it (``LaraMiniSparseMoeBlock``): a float32 router ``gate``
    whose softmax's top-k weigh the experts, renormalized where norm_topk_prob; SwiGLU experts of
    moe_intermediate_size stored fused outputs first (``experts.gate_up_proj``, ``experts.down_proj``), an ungated
    ``shared_expert`` of shared_expert_intermediate_size added in full; every layer sparse."""
    spec = MoeSpec(*LAYOUT["lara_mini"], count, top_k, r("moe_intermediate_size"), r("norm_topk_prob"),
                   r("shared_expert_intermediate_size"), shared_gate=None, router_float32=True,
                   layout="fused_outputs_first")
    return spec, [True] * sizes.num_layers


def _cohere2_moe(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Command A MoE's sparse MLP as transformers runs it (``Cohere2MoeSparseMoeBlock``): a router ``gate`` in the
    compute dtype choosing the top-k logits, weighed by their softmax (the renormalized top-k probabilities) or, by
    expert_selection_fn, their sigmoids (renormalized where norm_topk_prob); experts of intermediate_size and an
    ungated ``shared_experts`` MLP of num_shared_experts times that (none where 0), the two outputs summed or, by
    shared_expert_combination_strategy "average", halved (both halves folded in: the routed weights scaled, the
    shared expert's down_proj halved at load); sparse layers as mlp_layer_types lists them, else from
    first_k_dense_replace on."""
    shared = sizes.intermediate_size * r("num_shared_experts") or None
    half = 0.5 if shared and r("shared_expert_combination_strategy") == "average" else 1.0
    sigmoid = r("expert_selection_fn") == "sigmoid"
    routing = "sigmoid_top_k" if sigmoid else "softmax_grouped" if half != 1.0 else "softmax"
    spec = MoeSpec("mlp", LAYOUT["cohere2_moe"][1], count, top_k, sizes.intermediate_size,
                   r("norm_topk_prob") if sigmoid else True, shared, shared_module="shared_experts", shared_gate=None,
                   routing=routing, routed_scale=half, shared_scale=half)
    layers, first = sizes.num_layers, r("first_k_dense_replace")
    return spec, _listed_sparse(r, layers, [i >= first for i in range(layers)])


def _jamba(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Jamba's sparse MLP as transformers runs it (``JambaSparseMoeBlock``): a router ``feed_forward.router`` whose
    softmax's top-k probabilities weigh the experts as they are (not renormalized: mlx-lm 0.32 renormalizes them),
    SwiGLU experts of intermediate_size, on the layers ``i % expert_layer_period == expert_layer_offset``."""
    period, offset = r("expert_layer_period"), r("expert_layer_offset")
    if offset >= period:
        r.fail("expert_layer_offset", f"({offset}) must be below expert_layer_period ({period})")
    spec = MoeSpec(*LAYOUT["jamba"], count, top_k, sizes.intermediate_size, False, None, router=ROUTER["jamba"])
    return spec, [i % period == offset for i in range(sizes.num_layers)]


def _llama4(r: KeyReader, sizes: Any, count: int) -> tuple[MoeSpec, list[bool]]:
    """Llama 4's sparse MLPs (transformers' ``Llama4TextMoe``): a router ``feed_forward.router`` whose top logit's
    sigmoid scales the chosen expert's *input*, experts of intermediate_size stored fused (``experts.gate_up_proj``
    ``[E, hidden, 2 * inter]``, ``experts.down_proj``: :mod:`ferrum.moe.fused_gate_up`), and an ungated
    ``shared_expert`` of intermediate_size added to its output; on the layers moe_layers lists, else every
    interleave_moe_layer_step-th one (the others dense, of intermediate_size_mlp)."""
    layers, inter = sizes.num_layers, r("intermediate_size")
    listed = r("moe_layers")
    if listed is None:
        step = r("interleave_moe_layer_step")
        if step == 0:
            r.fail("interleave_moe_layer_step", "is 0, which makes no layer sparse only with moe_layers [] beside it "
                                                "(MobileLLM-R1's dense layout); list the sparse layers in moe_layers")
        listed = list(range(step - 1, layers, step))
    if any(i >= layers for i in listed):
        r.fail("moe_layers", f"lists {listed!r}, past the model's {layers} layers")
    spec = MoeSpec("feed_forward", LAYOUT["llama4_text"][1], count, 1, inter, False, inter, router="router",
                   layout="fused_gate_up", shared_gate=None, routing="sigmoid_top_k", weigh_input=True,
                   fused_inputs_first=True)
    return spec, [i in listed for i in range(layers)]


def _kolibri1(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Kolibri-1's sparse MLP as transformers runs it (``Kolibri1SparseMoeBlock``): a router ``gate`` computing in
    float32 whose logits plus the layer's float32 correction bias choose the top-k, each weighed by its logit's
    sigmoid, renormalized where norm_topk_prob (``SIGMOID_LOGITS_CORRECTED``); experts of moe_intermediate_size and
    a SwiGLU ``shared_experts`` MLP of shared_expert_intermediate_size added to their sum; every layer sparse."""
    spec = MoeSpec("mlp", LAYOUT["kolibri1"][1], count, top_k, r("moe_intermediate_size"), r("norm_topk_prob"),
                   r("shared_expert_intermediate_size"), shared_module="shared_experts", shared_gate=None,
                   routing="sigmoid_logits_corrected", router_float32=True)
    return spec, [True] * sizes.num_layers


def _aria(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Aria's sparse MLP as transformers saves and runs it (``AriaTextMoELayer``): a router ``router`` in the compute
    dtype whose top-k logits' softmax (the renormalized top-k probabilities) weighs SwiGLU experts of
    intermediate_size stored fused inputs first (``experts.fc1.weight``, ``experts.fc2.weight``:
    :data:`ferrum.moe.fused_gate_up.ARIA`), and an ungated ``shared_experts`` MLP of moe_num_shared_experts times
    that (none where 0), biased by mlp_bias, added to their sum; every layer sparse."""
    inter, moe_size = sizes.intermediate_size, r("moe_intermediate_size")
    if moe_size not in (None, inter):
        r.fail("moe_intermediate_size", f"is {moe_size}, but transformers sizes Aria's experts by intermediate_size "
                                        f"({inter}) and ignores it; make the two agree", unsupported=True)
    spec = MoeSpec(*LAYOUT["aria_text"], count, top_k, inter, True, inter * r("moe_num_shared_experts") or None,
                   router="router", shared_module="shared_experts", shared_gate=None, layout="aria")
    return spec, [True] * sizes.num_layers


#: Ling's routing rule per (score_function, moe_router_enable_expert_bias, more than one group), as mlx-lm's
#: bailing_moe ``group_expert_select`` runs it: a group's two best scores summed, the dropped groups' experts
#: scoring 0, the chosen experts weighed by their uncorrected scores (Ling 2.0's sigmoid releases: A.X-K2's rule);
#: softmax scores never fall to that 0, so the uncorrected softmax rule masks as Mistral 4's. Missing: grouped
#: corrected softmax and uncorrected grouped sigmoid, which no release runs.
_BAILING_RULES = {("softmax", False, False): "softmax_top2_grouped", ("softmax", False, True): "softmax_top2_grouped",
                  ("softmax", True, False): "softmax_corrected", ("sigmoid", False, False): "sigmoid_top_k",
                  ("sigmoid", True, False): "sigmoid_grouped", ("sigmoid", True, True): "sigmoid_grouped_zero_masked"}


def _bailing_moe(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Ling's sparse MLP as mlx-lm's bailing_moe runs it (the release's ``BailingMoeSparseMoeBlock`` /
    ``BailingMoeV2SparseMoeBlock``): a router ``gate`` whose softmax or sigmoid scores (score_function), plus
    ``gate.expert_bias`` where moe_router_enable_expert_bias, choose the top-k within the topk_group best of n_group
    groups (:data:`_BAILING_RULES`), weighed by their uncorrected scores, renormalized where norm_topk_prob and more
    than one is chosen, times routed_scaling_factor; SwiGLU experts of moe_intermediate_size and an ungated
    ``shared_experts`` MLP of num_shared_experts times moe_shared_expert_intermediate_size (else
    moe_intermediate_size), none where 0 or not moe_router_enable_shared_expert; the first first_k_dense_replace
    layers dense."""
    scoring, biased, groups = r("score_function"), r("moe_router_enable_expert_bias"), r("n_group")
    routing = _BAILING_RULES.get((scoring, biased, groups > 1))
    if routing is None:
        r.fail("n_group", f"is {groups} with score_function {scoring!r} and moe_router_enable_expert_bias {biased}: "
                          "Ferrum runs grouped routing for sigmoid scores with an expert bias or softmax scores "
                          "without one; set n_group to 1", unsupported=True)
    kept, scale = (r("topk_group") if groups > 1 else 1), float(r("routed_scaling_factor"))
    _check_groups(r, GROUPED_RULES[routing], count, top_k, groups, kept)
    if routing == "softmax_top2_grouped" and groups == 1 and scale == 1.0:  # Ling v1's: what backends run themselves
        routing = "softmax"
    shared = r("num_shared_experts") if r("moe_router_enable_shared_expert") else 0
    width = (r("moe_shared_expert_intermediate_size") or r("moe_intermediate_size")) * shared or None
    spec = MoeSpec(*LAYOUT["bailing_moe"], count, top_k, r("moe_intermediate_size"),
                   r("norm_topk_prob") and top_k > 1, width, shared_module="shared_experts", shared_gate=None,
                   routing=routing, n_group=groups, topk_group=kept, routed_scale=scale, router_float32=True,
                   correction_bias="gate.expert_bias" if biased else None)
    return spec, [i >= r("first_k_dense_replace") for i in range(sizes.num_layers)]


def _deepseek(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """DeepSeek-MoE's sparse MLP as mlx-lm runs it (``DeepseekMoE``): a router ``gate`` in the compute dtype whose
    softmax's top-k probabilities weigh SwiGLU experts of moe_intermediate_size as they are, and an ungated
    ``shared_experts`` MLP of n_shared_experts times that (none where null) added to their sum; layer i sparse where
    i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    size, shared = r("moe_intermediate_size"), r("n_shared_experts")
    spec = MoeSpec(*LAYOUT["deepseek"], count, top_k, size, False, size * shared if shared else None,
                   shared_module="shared_experts", shared_gate=None)
    first, freq = r("first_k_dense_replace"), r("moe_layer_freq")
    return spec, [i >= first and i % freq == 0 for i in range(sizes.num_layers)]


def _klear(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Klear's sparse MLP as mlx-lm runs it (``KlearSparseMoeBlock``): a router ``gate`` in the compute dtype whose
    sigmoid scores, plus the block's own float32 ``expert_bias``, choose the top-k, weighed by their unbiased scores
    (renormalized where norm_topk_prob); SwiGLU experts of moe_intermediate_size and a SwiGLU ``shared_experts`` MLP
    of n_shared_experts times that, the two mixed by the softmax of a biased linear ``coefficient`` of two outputs
    (``MoeSpec.shared_mix``). Layers are sparse as Qwen-MoE's decoder_sparse_step and mlp_only_layers say."""
    size, dense, step = r("moe_intermediate_size"), r("mlp_only_layers"), r("decoder_sparse_step")
    spec = MoeSpec(*LAYOUT["Klear"], count, top_k, size, r("norm_topk_prob"), size * r("n_shared_experts"),
                   shared_module="shared_experts", shared_gate=None, routing="sigmoid_grouped",
                   correction_bias="expert_bias", shared_mix="coefficient")
    return spec, [i not in dense and (i + 1) % step == 0 for i in range(sizes.num_layers)]
def _step3p5(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Step 3.5's sparse MLP as mlx-lm runs it (``Step3p5MoE``): a router ``moe.gate`` whose sigmoid scores (in
    float32), plus the layer's ``moe.router_bias``, choose the top-k, weighed by their uncorrected scores, divided by
    their sum where norm_expert_weight, times moe_router_scaling_factor; SwiGLU experts of moe_intermediate_size
    stacked ``[E, out, in]`` as the release stores them, and a SwiGLU ``share_expert`` of share_expert_dim added after
    (their per-layer clamps: ``LayerSpec.activations``). The layers moe_layers_enum lists are sparse, else all but the
    first."""
    spec = MoeSpec(*LAYOUT["step3p5"], count, top_k, r("moe_intermediate_size"), r("norm_expert_weight"),
                   r("share_expert_dim"), stacked=STACKED["step3p5"], shared_module="share_expert", shared_gate=None,
                   routing="sigmoid_grouped", routed_scale=float(r("moe_router_scaling_factor")),
                   correction_bias="router_bias")
    return spec, step3p5_sparse(r, sizes.num_layers)


def _hunyuan(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Hunyuan's sparse MLP as mlx-lm runs it (``MoeBlock``): a float32 router ``gate.wg`` whose softmax's top-k
    probabilities weigh SwiGLU experts of moe_intermediate_size (else intermediate_size) as they are (Tencent's code
    renormalizes them where more than one is chosen; mlx-lm does not), and a SwiGLU ``shared_mlp`` of
    num_shared_expert times intermediate_size added to their sum where use_mixed_mlp_moe; every layer sparse where
    num_experts is above 1, else every layer dense (Hunyuan-7B)."""
    inter = sizes.intermediate_size
    shared = inter * _one_per_layer(r, "num_shared_expert") if r("use_mixed_mlp_moe") else None
    spec = MoeSpec(*LAYOUT["hunyuan"], count, top_k, _one_per_layer(r, "moe_intermediate_size") or inter, False,
                   shared, router=ROUTER["hunyuan"], shared_module="shared_mlp", shared_gate=None,
                   router_float32=True)
    return spec, [count > 1] * sizes.num_layers


def _phixtral(r: KeyReader, sizes: Any, count: int, top_k: int) -> tuple[MoeSpec, list[bool]]:
    """Phixtral's sparse MLP as mlx-lm runs it (``MOE``): an unbiased router ``moe.gate`` whose top-k logits' softmax
    weighs ungated experts of 4 x model_dim, ``fc2(gelu(fc1(x)))`` with GELU's tanh form (mlx-lm's ``SwitchMLP``:
    MLX's "precise" GELU, Phi-2's gelu_new) and biased projections, each under ``moe.mlp.{e}``; every layer sparse."""
    spec = MoeSpec(*LAYOUT["phixtral"], count, top_k, sizes.intermediate_size, True, None, biased=True,
                   unbiased_router=True, activation=Gelu(tanh=True), experts_module="mlp",
                   mlx_lm_names=LAYOUT["phixtral"][1])
    return spec, [True] * sizes.num_layers


def step3p5_sparse(r: KeyReader, layers: int) -> list[bool]:
    """Step 3.5's sparse layers as mlx-lm reads them: those moe_layers_enum lists, else all but the first."""
    listed = r("moe_layers_enum")
    sparse = {int(i) for i in listed.strip().split(",")} if listed else set(range(1, layers))
    return [i in sparse for i in range(layers)]


def _grouped_mlps(r: KeyReader, model_type: str, count: int, top_k: int, sizes: Any) -> tuple[MoeSpec, list[bool]]:
    return _grouped(r, model_type, count, top_k, sizes.num_layers)


def _ernie_mlps(r: KeyReader, model_type: str, count: int, top_k: int, sizes: Any) -> tuple[MoeSpec, list[bool]]:
    return _ernie(r, *LAYOUT[model_type], count, top_k, sizes.num_layers)


def _every_layer_mlps(r: KeyReader, model_type: str, count: int, top_k: int, sizes: Any
                      ) -> tuple[MoeSpec, list[bool]]:
    """Experts of intermediate_size on every layer (Mixtral's, OLMoE's...), with what :data:`_EXPERT_EXTRAS` adds."""
    extras = {"shared_expert_size": None, **_EXPERT_EXTRAS.get(model_type, lambda r: {})(r)}
    spec = MoeSpec(*LAYOUT[model_type], count, top_k, sizes.intermediate_size, _EVERY_LAYER[model_type](r),
                   router=ROUTER.get(model_type, "gate"), stacked=STACKED.get(model_type), **extras)
    return spec, [True] * sizes.num_layers


#: Qwen-like families with Qwen2-MoE's shared expert, its output times the sigmoid of ``shared_expert_gate``.
_SHARED_GATED = ("qwen2_moe", "qwen3_next", "qwen3_5_moe_text")


def _qwen_mlps(r: KeyReader, model_type: str, count: int, top_k: int, sizes: Any) -> tuple[MoeSpec, list[bool]]:
    """Qwen-MoE's sparse MLPs: experts of moe_intermediate_size on the layers decoder_sparse_step and mlp_only_layers
    leave sparse (or as :data:`_LAYER_KINDS` says), Qwen2-MoE's gated shared expert."""
    if model_type in _LAYER_KINDS:
        sparse = _LAYER_KINDS[model_type](r, sizes.num_layers)
    else:
        dense, step = r("mlp_only_layers") or [], r("decoder_sparse_step")
        sparse = [i not in dense and (i + 1) % step == 0 for i in range(sizes.num_layers)]
    shared = r("shared_expert_intermediate_size") if model_type in _SHARED_GATED else None
    extras = _EXPERT_EXTRAS.get(model_type, lambda r: {})(r)
    normalize = extras.pop("normalize") if "normalize" in extras else r("norm_topk_prob")
    return MoeSpec(*LAYOUT[model_type], count, top_k, r("moe_intermediate_size"), normalize, shared, **extras), sparse


def _by_sizes(read: Callable[[KeyReader, Any, int, int], tuple[MoeSpec, list[bool]]]
              ) -> Callable[[KeyReader, str, int, int, Any], tuple[MoeSpec, list[bool]]]:
    """A family's ``(reader, sizes, expert count, top-k)`` reading as a :data:`_SPARSE_MLPS` entry: most families'
    readings need not know their model_type, so one adapter instead of a lambda each."""
    return lambda r, model_type, count, top_k, sizes: read(r, sizes, count, top_k)


#: How a family reads its sparse MLPs, ``(reader, model_type, expert count, top-k, sizes) -> (spec, which layers are
#: sparse)``; Qwen-MoE's reading (:func:`_qwen_mlps`) where a family is not listed.
_SPARSE_MLPS: dict[str, Callable[[KeyReader, str, int, int, Any], tuple[MoeSpec, list[bool]]]] = {
    **{family: _every_layer_mlps for family in _EVERY_LAYER},
    **{family: _grouped_mlps for family in _GROUPED},
    "ernie4_5_moe": _ernie_mlps,
    "hy_v3": _by_sizes(_hy_v3),
    "lfm2_moe": _by_sizes(_lfm2_moe),
    "afmoe": _by_sizes(_afmoe),
    "mimo_v2_flash": _by_sizes(_mimo_v2_flash),
    "cohere2_moe": _by_sizes(_cohere2_moe),
    "jamba": _by_sizes(_jamba),
    "flint": _by_sizes(_flint),
    "laguna": _by_sizes(_laguna),
    "lara_mini": _by_sizes(_lara_mini),
    "minimax_m3_vl_text": _by_sizes(_minimax_m3),
    "llama4_text": lambda r, model_type, count, top_k, sizes: _llama4(r, sizes, count),  # top-1 (top_k 0: dense)
    "kolibri1": _by_sizes(_kolibri1),
    "aria_text": _by_sizes(_aria),
    "bailing_moe": _by_sizes(_bailing_moe),
    "deepseek": _by_sizes(_deepseek),
    "Klear": _by_sizes(_klear),
    "step3p5": _by_sizes(_step3p5),
    "hunyuan": _by_sizes(_hunyuan),
    "phixtral": _by_sizes(_phixtral),
}


#: The norm weight the router of a ``router_norm`` spec reads its input with, as placed (in the sparse MLP module).
ROUTER_NORM = "router_norm.weight"


def gemma4_moe(r: KeyReader, arch: Architecture) -> Architecture:
    """``arch`` with Gemma 4 26B-A4B's MoE block on every layer, beside the dense MLP (transformers'
    ``Gemma4TextDecoderLayer`` with enable_moe_block): the dense MLP between ``pre_feedforward_layernorm`` and
    ``post_feedforward_layernorm_1``; the router ``router.proj`` reading the layer's stream RMS-normed times
    ``router.scale`` and hidden_size ** -0.5, softmax top-k renormalized, times ``router.per_expert_scale``; GeGLU
    experts of moe_intermediate_size reading ``pre_feedforward_layernorm_2`` of the stream, stored fused outputs
    first (``experts.gate_up_proj``, ``experts.down_proj``; mlx-lm's ``experts.switch_glu.*``), then
    ``post_feedforward_layernorm_2``; the sum through ``post_feedforward_layernorm`` (the block's ``post_mlp``)."""
    sizes = {name: r(name) for name in ("num_experts", "top_k_experts", "moe_intermediate_size")}
    for name, value in sizes.items():
        if value is None:
            r.fail(name, "must be set with enable_moe_block: transformers has no default for it")
    if sizes["top_k_experts"] > sizes["num_experts"]:
        r.fail("top_k_experts", f"({sizes['top_k_experts']}) exceeds the {sizes['num_experts']} experts (num_experts)")
    spec = MoeSpec("", ("gate_proj", "up_proj", "down_proj"), sizes["num_experts"], sizes["top_k_experts"],
                   sizes["moe_intermediate_size"], True, None, router="router.proj", activation=GeluTanhGLU(),
                   layout="fused_outputs_first", shared_gate=None, routing="softmax_expert_scaled",
                   mlx_lm_stack="experts.switch_glu", router_norm="router.scale",
                   expert_scale="router.per_expert_scale",
                   beside_dense=("pre_feedforward_layernorm", "post_feedforward_layernorm_1",
                                 "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"))
    return replace(arch, moe=spec, norms={slot: name for slot, name in arch.norms.items() if slot != "pre_mlp"},
                   layers=tuple(replace(layer, mlp="dense+moe") for layer in arch.layers),
                   keep_float32=(*arch.keep_float32, f".{spec.expert_scale}"))


def nemotron_h_moe(r: KeyReader, arch: Architecture) -> Architecture:
    """``arch`` (its MoE blocks' ``LayerSpec.mlp`` "moe") with Nemotron 3 Nano's sparse MLP (transformers'
    ``NemotronHMoE``, the block's ``mixer``): a float32 router ``gate`` whose sigmoid scores plus
    ``gate.e_score_correction_bias`` choose the top-k within the topk_group best of n_group groups (DeepSeek-V3's
    rule), weighed by their uncorrected scores, renormalized where norm_topk_prob, times routed_scaling_factor;
    ungated squared-ReLU experts of moe_intermediate_size (``experts.{e}.up_proj`` / ``down_proj``; mlx-lm's
    ``switch_mlp.fc1`` / ``fc2``) and an ungated squared-ReLU ``shared_experts`` MLP of
    moe_shared_expert_intermediate_size, biased where mlp_bias says, added to their sum."""
    count, top_k = r("n_routed_experts"), r("num_experts_per_tok")
    if top_k > count:
        r.fail("num_experts_per_tok", f"({top_k}) exceeds the {count} experts (n_routed_experts)")
    groups, kept = r("n_group"), r("topk_group")
    _check_groups(r, GROUPED_RULES["sigmoid_grouped"], count, top_k, groups, kept)
    r("moe_latent_size")
    spec = MoeSpec("mixer", (None, "up_proj", "down_proj"), count, top_k, r("moe_intermediate_size"),
                   r("norm_topk_prob"), r("moe_shared_expert_intermediate_size"), shared_module="shared_experts",
                   shared_gate=None, activation=SquaredReLU(), shared_activation=SquaredReLU(),
                   routing="sigmoid_grouped", n_group=groups,
                   topk_group=kept, routed_scale=float(r("routed_scaling_factor")), router_float32=True,
                   mlx_lm_names=(None, "fc1", "fc2"))
    return replace(arch, moe=spec, keep_float32=(*arch.keep_float32, f".{spec.bias_name}", f".{spec.router}.weight"))


def with_moe(model_type: str, build: Callable[[KeyReader, object], Architecture]) -> Callable:
    """A family builder: the dense decoder of ``build``, with ``mlp="moe"`` on its sparse layers."""

    def build_moe(r: KeyReader, sizes: object) -> Architecture:
        arch = build(r, sizes)
        count = next(filter(None, map(r, _COUNT_NAMES[model_type])), None) or _DEFAULT_COUNT.get(model_type)
        if count is None:
            r.fail(_COUNT_NAMES[model_type][0], "must be set: transformers has no default expert count for "
                                                f"{model_type}")
        top_k = _TOP_K[model_type](r) if model_type in _TOP_K else r("num_experts_per_tok")
        if top_k > count:
            r.fail(_TOP_K_NAME.get(model_type, "num_experts_per_tok"), f"({top_k}) exceeds the {count} experts")
        spec, sparse = _SPARSE_MLPS.get(model_type, _qwen_mlps)(r, model_type, count, top_k, sizes)
        spec = replace(spec, mlx_lm_stack=MLX_LM_STACK.get(model_type, spec.mlx_lm_stack))
        arch = replace(arch, moe=spec, layers=tuple(
            replace(layer, mlp="moe") if moe else layer for layer, moe in zip(arch.layers, sparse)))
        if spec.routing in GROUPED_RULES and GROUPED_RULES[spec.routing].corrected:  # float32, as transformers keeps it
            arch = replace(arch, keep_float32=(*arch.keep_float32, f".{spec.bias_name}"))
        if spec.router_float32:
            arch = replace(arch, keep_float32=(*arch.keep_float32, f".{spec.router}.weight"))
        if model_type == "qwen2_moe":  # q/k/v bias from qkv_bias; o_proj never has one
            arch = replace(arch, qkv_bias=r("qkv_bias"), o_bias=False)
        return arch

    return build_moe
