"""Reading a LoRA adapter folder (PEFT or mlx-lm layout) into per-projection low-rank factors.

Both formats end up as one :class:`LoraAdapter`: for each adapted projection
``(layer, module)`` a pair ``a [in, r]``, ``b [r, out]`` in float32 and its
scale, so ``y += scale * (x @ a) @ b``. That is mlx-lm's layout; PEFT stores
the transposes (``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``).

Only what changes a plain linear projection's output by a low-rank product
is run; everything else an adapter may carry (DoRA magnitudes, embedding or
LM-head targets, trained biases, full module copies, GPT-2 style
``fan_in_fan_out`` weights, the experts and router of a mixture of experts,
Qwen2-MoE's sigmoid ``shared_expert_gate``) is refused by name rather than
silently dropped; factors of a multimodal model's vision or audio parts, which
Ferrum never runs, are left out with a warning. Phi-3's fused ``qkv_proj``
and ``gate_up_proj`` are projections like the others, and so are those a
checkpoint stores under its own names (Phi-2's ``dense``, ``fc1``, ``fc2``;
StarCoder2's ``c_fc``, ``c_proj``: ``Architecture.stored_names``), an ungated
MLP's up and down projections included. A sparse layer's shared expert is an
ordinary MLP beside the experts (:class:`ferrum.moe.block.MoeMLP`), so its
gate/up/down projections are adapted too, under one name whatever the family
calls its module (``MoeSpec.shared_module``: Qwen2-MoE's ``shared_expert``,
DeepSeek's ``shared_experts``, Hunyuan's ``shared_mlp``): :data:`SHARED`.
A layer is found under the checkpoint's own layers' container (``layers.N``;
Talkie's ``blocks.N``, GPT-style ``transformer.h.N``) or where the family
stores it apart (AFM's ``kv_reuse_layers.N``); a layer that attends another's
keys and values projects queries alone, so only its q_proj is adapted.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes  # also registers bfloat16 with numpy, so safetensors can read it
import numpy as np

from ferrum.arch.mlp import width
from ferrum.arch.heads import layout as heads_layout
from ferrum.arch.tensors import attention_as_loaded, llama_names, prepare
from ferrum.checkpoint import NOT_TEXT, is_float
from ferrum.errors import AdapterError

#: The projections an adapter may target, and the block part they live in.
PROJECTIONS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "qkv_proj": "self_attn",
    "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp", "down_proj": "mlp",
    # latent attention's (ferrum.arch.mla: MlaSpec.adaptable)
    "q_a_proj": "self_attn", "q_b_proj": "self_attn", "kv_a_proj_with_mqa": "self_attn", "kv_b_proj": "self_attn",
}
#: The projections, as the refusals list them.
_ADAPTABLE = "/".join(p.removesuffix("_proj") for p in PROJECTIONS)
#: A sparse layer's shared expert's projections, by Ferrum's name -> the leaf of its module
#: (``MoeSpec.at(MoeSpec.shared_module)``); each its own matrix, none fused with another.
SHARED = {f"shared_expert.{p}": p for p in ("gate_proj", "up_proj", "down_proj")}
#: Projections of one input, by the fused projection a checkpoint may store them as (Phi-3).
_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: Projections only latent attention has.
_LATENT_ONLY = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
_EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "embed_out")
_FUSED = ("query_key_value", "Wqkv")  # other models' fused attention projections
#: Module names inside a sparse MLP (GLM-4.5's and DeepSeek's shared_experts, GraniteMoeShared's shared_mlp).
_MOE = ("experts", "switch_mlp", "shared_expert", "shared_experts", "shared_mlp", "block_sparse_moe")
#: Llama's names of projections whose leaf is an adaptable one's but that Ferrum does not adapt: why, by the model's
#: config and the name the adapter gives.
_UNADAPTED = {"self_attn.gate_proj": lambda config, name: (
    f"LoRA on {config.model_type}'s attention gate {name} is not supported (Ferrum adapts {_ADAPTABLE}; "
    "this gate is no MLP projection); drop it from the adapter's targets"),
    # transformers' name of A.X-K2's q_b_proj, as PEFT adapts it
    **dict.fromkeys(("q_gate_proj", "self_attn.q_gate_proj"), lambda config, name: (
        f"LoRA on {config.model_type}'s {name} (its release's q_b_proj: each head's query and output gate, whose "
        "columns Ferrum cuts at load) is not supported; drop it from the adapter's targets"))}
_MOE_REFUSAL = ("adapts a mixture-of-experts projection (an expert or the router); on MoE models the attention "
                "projections, the dense layers' MLPs and the shared expert's gate_proj / up_proj / down_proj can "
                "be adapted")
#: A layer's mixer or MLP kind that has no projection LoRA adapts (Nemotron NAS's skipped and linear sub-blocks), and
#: what it is instead.
_NOTHING_ADAPTED = {"none": "skipped", "linear": "a linear map (one square matrix, which Ferrum does not adapt)"}
_SHARED_GATE_REFUSAL = ("is the shared expert's sigmoid gate (Qwen2-MoE's: one output, the shared expert's weight per "
                        "token), which Ferrum does not adapt; drop shared_expert_gate from the adapter's targets")

#: PEFT settings that change what an adapted projection computes, beyond ``scale * (x @ a) @ b``.
_PEFT_VARIANTS = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D weights)",
    "lora_bias": "trained LoRA biases (lora_bias)",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens: it acts only from its invocation tokens on)",
    "use_qalora": "QA-LoRA (use_qalora: its A factor reads pooled inputs)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing over several LoRA experts (arrow_config)",
    "kasa_config": "KaSA (kasa_config: a singular-value adaptation of the base weight)",
    "layer_replication": "layer replication (layer_replication: it repeats base layers)",
}
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"

Site = tuple[int, str]  # (layer index, projection name such as "q_proj")


@dataclass(frozen=True)
class LoraWeights:
    """One projection's factors: ``y += scale * (x @ a) @ b``."""

    a: np.ndarray  # [in, r] float32
    b: np.ndarray  # [r, out] float32
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[1]


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter read from disk and checked against a base model's shapes."""

    path: Path
    format: str  # "peft" | "mlx-lm"
    weights: dict[Site, LoraWeights]
    #: Content digest (factors and scales): what keys its KV blocks in the prefix cache.
    digest: bytes

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.weights.values())

    def nbytes(self, itemsize: int) -> int:
        """Bytes its factors take in a compute dtype of ``itemsize`` bytes per element."""
        return sum((w.a.size + w.b.size) * itemsize for w in self.weights.values())


def check_range(adapter: LoraAdapter, dtype: str) -> None:
    """Refuse factors past the compute dtype's range (float16's 65504): they would run as inf, an adapted
    request's logits NaN. Checked on the factors as stacked, ``b`` times the scale."""
    try:
        limit = float(ml_dtypes.finfo(dtype).max)
    except (TypeError, ValueError):  # not a float dtype either knows: the plugin's own, checked as it runs
        return
    for (layer, proj), w in sorted(adapter.weights.items()):
        peak = max(float(np.abs(w.a).max(initial=0)), float(np.abs(w.b).max(initial=0)) * abs(w.scale))
        if peak > limit:
            raise AdapterError(
                f"{adapter.path}: layer {layer} {proj} has factors reaching {peak:.3g} (B times the scale), past "
                f"{dtype}'s largest value ({limit:.6g}); load the base model in bfloat16 or float32")


def read_adapter(path: str | Path, config: Any) -> LoraAdapter:
    """Read the adapter folder ``path`` (PEFT or mlx-lm layout) for a model of ``config`` (a ModelConfig)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist; give the folder holding {PEFT_CONFIG}")
    config_file = folder / PEFT_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{folder} has no {PEFT_CONFIG}; a PEFT or mlx-lm adapter folder has one")
    try:
        settings = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_file} is not readable JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise AdapterError(f"{config_file} must hold a JSON object")
    if config.arch.transposed:
        raise AdapterError(f"{folder}: LoRA on a checkpoint whose projections are stored [in, out] (GPT-2's Conv1D) is "
                           "not supported; load its mlx-lm conversion (Linear [out, in]) or merge the adapter")
    if (folder / PEFT_WEIGHTS).is_file():
        weights = _peft(folder, settings, config)
        kind = "peft"
    elif (folder / MLX_WEIGHTS).is_file():
        weights = _mlx_lm(folder, settings, config)
        kind = "mlx-lm"
    elif (folder / "adapter_model.bin").is_file():
        raise AdapterError(
            f"{folder} holds adapter_model.bin (pickled torch); save the adapter as safetensors "
            "(PEFT: save_pretrained(..., safe_serialization=True))"
        )
    else:
        raise AdapterError(f"{folder} holds neither {PEFT_WEIGHTS} (PEFT) nor {MLX_WEIGHTS} (mlx-lm)")
    if not weights:
        raise AdapterError(f"{folder}: the adapter adapts no projection")
    return LoraAdapter(folder, kind, weights, _digest(weights))


# ------------------------------------------------------------------- PEFT

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")


def _peft(folder: Path, settings: dict, config: Any) -> dict[Site, LoraWeights]:
    where = str(folder)
    if str(settings.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type {settings.get('peft_type')!r} is not supported; only LORA runs")
    for key, what in _PEFT_VARIANTS.items():
        if settings.get(key):
            raise AdapterError(f"{where}: {what} is not supported; train a plain LoRA adapter")
    if settings.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{where}: bias={settings['bias']!r} trains biases, which is not supported; use bias='none'")
    for key in ("modules_to_save", "trainable_token_indices"):
        if settings.get(key):
            raise AdapterError(
                f"{where}: {key}={settings[key]!r} carries full copies of modules (e.g. the LM head or "
                "embeddings), which is not supported"
            )
    _check_targets(where, settings, config)
    r, alpha = settings.get("r"), settings.get("lora_alpha")
    if not _is_int(r) or r <= 0 or not _is_number(alpha):
        raise AdapterError(f"{where}: {PEFT_CONFIG} needs a positive integer 'r' and a number 'lora_alpha'")
    rank_pattern = _pattern(where, settings, "rank_pattern", lambda v: _is_int(v) and v > 0, "positive integers")
    alpha_pattern = _pattern(where, settings, "alpha_pattern", _is_number, "numbers")
    rslora = bool(settings.get("use_rslora"))

    pairs: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
    skipped, untargeted = [], []
    for name, array in _read(folder / PEFT_WEIGHTS):
        if NOT_TEXT.search(name):
            skipped.append(name)
            continue
        m = _PEFT_KEY.match(name)
        at = None if m is None else _in_layer(config, m["module"])
        if at is None:
            raise AdapterError(f"{where}: {_peft_refusal(config, name)}")
        layer, numbered, path = at
        if not _targeted(settings, m["module"], numbered):
            untargeted.append(m["module"])
            continue
        proj = _site(where, config, path, name)
        if proj is None:
            raise AdapterError(f"{where}: {_peft_refusal(config, name)}")
        key = (layer, proj, m["module"])
        pairs.setdefault(key, {})[m["which"]] = array
    if skipped:
        warnings.warn(f"{where}: {len(skipped)} factors adapt a vision or audio part of a multimodal model (e.g. "
                      f"{skipped[0]}); Ferrum runs its text model, so they are not loaded", stacklevel=3)
    if untargeted:
        left_out = sorted(set(untargeted))
        warnings.warn(f"{where}: factors of {len(left_out)} modules its config does not adapt (target_modules, "
                      f"exclude_modules, layers_to_transform; e.g. {left_out[0]}); PEFT does not apply them, so they "
                      "are not loaded", stacklevel=3)
    weights, modules = {}, {}
    for (layer, proj, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if (layer, proj) in modules:
            raise AdapterError(f"{where}: {modules[layer, proj]} and {module} both adapt layer {layer} {proj} of the "
                               "text model; an adapter holds one pair of factors per projection")
        modules[layer, proj] = module
        rank_key, alpha_key = _pattern_key(where, rank_pattern, module), _pattern_key(where, alpha_pattern, module)
        rank = rank_pattern[rank_key] if rank_key is not None else r
        a_alpha = alpha_pattern[alpha_key] if alpha_key is not None else alpha
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"{where}: {module} has lora_A {a.shape} and lora_B {b.shape} but {PEFT_CONFIG} gives rank {rank} "
                "(r, or its rank_pattern entry); expected [r, in] and [out, r]"
            )
        scale = float(a_alpha) / (math.sqrt(rank) if rslora else rank)
        weights[(layer, proj)] = _checked(where, config, layer, proj, a.T, b.T, scale)
    return weights


def _targeted(settings: dict, module: str, layer: int) -> bool:
    """Whether PEFT adapts ``module`` (named from the base model down, in layer ``layer``), as its
    ``check_target_module_exists`` decides: not if ``exclude_modules`` names it; yes if a ``target_parameters``
    entry (``gate.weight``, ``experts.down_proj``) names a parameter of it (a bare parameter name may be any
    module's: those are taken, and checked like the others); else by ``target_modules``, a regex matching its
    whole name, or a list naming it whole or by its last dotted parts, in the ``layers_to_transform`` if any."""
    excluded = settings.get("exclude_modules")
    if isinstance(excluded, str) and re.fullmatch(excluded, module) or \
            isinstance(excluded, list) and _names(excluded, module):
        return False
    owners = [str(p).rpartition(".")[0] for p in settings.get("target_parameters") or ()]
    if any(not owner or module == owner or module.endswith(f".{owner}") for owner in owners):
        return True
    targets = settings.get("target_modules")
    if targets is None or targets == "all-linear":
        return targets is not None
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in map(str, targets):
        return True
    layers = settings.get("layers_to_transform")
    in_layers = layers in (None, []) or (layer == layers if isinstance(layers, int) else layer in layers)
    return _names(targets, module) and in_layers


def _names(entries: list, module: str) -> bool:
    """Whether a list of module names names ``module``: whole, or by its last dotted parts (PEFT's rule)."""
    return any(module == entry or module.endswith(f".{entry}") for entry in map(str, entries))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern(where: str, settings: dict, key: str, valid: Any, what: str) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern``: module-name regexes to values."""
    pattern = settings.get(key) or {}
    if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
        raise AdapterError(f"{where}: {PEFT_CONFIG} {key} must map module names to {what}, got {pattern!r}")
    return pattern


def _pattern_key(where: str, pattern: dict, module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to ``module``, as PEFT picks it."""
    for key in pattern:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise AdapterError(f"{where}: {PEFT_CONFIG} pattern key {key!r} is not a valid regex: {exc}") from None
    return None


def _peft_refusal(config: Any, name: str) -> str:
    if "lora_magnitude_vector" in name:
        return f"{name} is a DoRA magnitude vector; DoRA is not supported"
    if "lora_embedding" in name or any(f".{e}." in f".{name}" for e in _EMBEDDINGS):
        return f"{name} adapts an embedding or the LM head; only {_ADAPTABLE} projections are supported"
    if name.endswith(".bias"):
        return f"{name} is a trained bias; adapters that train biases are not supported"
    if any(f".{f}." in name for f in _FUSED):
        return f"{name} adapts a fused projection of another architecture; it is not supported"
    if any(f".{m}." in name for m in _MOE):
        return f"{name} {_MOE_REFUSAL}"
    container = config.arch.stored_names.get("layers", "layers")
    layouts = (r"(?:h|blocks|layers)", re.escape(container))  # GPT-Neo's, GPT-J's, MPT's h.N.attn, another's
    if [re.search(rf"(?:^|\.){c}\.\d+\.", name) is not None for c in layouts] == [True, False]:
        return (f"{name} adapts a module of layers under h.N / blocks.N / layers.N, but this base model's layers are "
                f"{container}.N: the adapter was trained for a model of another layout")
    return (f"tensor {name} is not a LoRA factor of a {_ADAPTABLE} projection "
            f"(expected ...{container}.N.<attention or MLP module>.<proj>.lora_A|lora_B.weight)")


def _in_layer(config: Any, module: str) -> tuple[int, int, str] | None:
    """Where the module the checkpoint (and so an adapter trained on it) names ``module`` lies: ``(layer, the index in
    its name, its path inside the layer)``, under the checkpoint's layers' container (``layers``, or the family's
    own: ``stored_names``, Talkie's ``blocks``, Phixtral's ``transformer.h``) or in a layer stored elsewhere
    (``Architecture.layer_stems``: AFM's ``kv_reuse_layers.{j}``); None where it is in no layer."""
    arch = config.arch
    for layer, stem in arch.layer_stems.items():
        m = re.fullmatch(rf"(?:.*\.)?{re.escape(stem)}\.(?P<path>\w+(?:\.\w+)+)", module)
        if m is not None:
            return layer, int(stem.rpartition(".")[2]), m["path"]
    container = re.escape(arch.stored_names.get("layers", "layers"))
    m = re.fullmatch(rf"(?:.*\.)?{container}\.(?P<layer>\d+)\.(?P<path>\w+(?:\.\w+)+)", module)
    if m is None:
        return None
    layer = int(m["layer"])
    if layer in arch.layer_stems:  # a module the checkpoint does not have: that layer is stored elsewhere
        raise AdapterError(f"{module} adapts layers.{layer}, which the base model does not have: it stores layer "
                           f"{layer} as {arch.layer_stems[layer]}; the adapter was trained for another model")
    return layer, layer, m["path"]


def _site(where: str, config: Any, path: str, tensor: str) -> str | None:
    """Ferrum's name of the projection at ``path`` in a layer, as the checkpoint, and so an adapter trained on it,
    names it: Llama's leaf for the attention's and the MLP's (Phi-2's ``self_attn.dense`` is ``o_proj``, Llama 4's
    dense ``feed_forward.gate_proj`` is ``gate_proj``), a :data:`SHARED` name for a sparse layer's shared expert's
    (its module as ``MoeSpec.shared_module`` names it). Refused by name where it is a projection Ferrum does not
    adapt (Laguna's ``self_attn.g_proj`` is its attention gate; an expert or the router, under the sparse MLP's
    module); None where it is no module of the attention or the MLP."""
    ours = llama_names(config.arch).get(path, path)
    if ours in _UNADAPTED:
        raise AdapterError(f"{where}: {_UNADAPTED[ours](config, path)}")
    part, _, leaf = ours.rpartition(".")
    spec = config.arch.moe
    shared = spec.at(spec.shared_module) if spec is not None and spec.shared_expert_size else None
    if part == shared and leaf in SHARED.values():
        return f"shared_expert.{leaf}"
    if part in ("self_attn", "mlp") and leaf not in _MOE:  # an experts stack PEFT adapts whole: mlp.experts
        return leaf
    sparse = spec is not None and spec.module and f"{part}.".startswith(f"{spec.module}.")
    if sparse or any(word in ours.split(".") for word in _MOE):
        raise AdapterError(f"{where}: {tensor} {_MOE_REFUSAL}")
    return None


def _named(config: Any, target: str) -> set[str]:
    """Llama's names (``part.leaf``) of the checkpoint's modules a ``target_modules`` / ``keys`` entry names (whole,
    or by its last dotted parts, as PEFT matches them); ``{target}`` where it names none the checkpoint renames."""
    named = {ours for theirs, ours in llama_names(config.arch).items() if "." in theirs and (
        f".{target}".endswith(f".{theirs}") or f".{theirs}".endswith(f".{target}"))}
    return named or {target}


def _target_refusal(config: Any, target: str) -> str | None:
    """Why the entry ``target`` names no projection Ferrum adapts (None where it names one)."""
    named = _named(config, target)
    if any(name.rsplit(".", 1)[-1] in PROJECTIONS for name in named - set(_UNADAPTED)):
        return None
    unadapted = sorted(named & set(_UNADAPTED))
    return _UNADAPTED[unadapted[0]](config, target) if unadapted else ""


def _moe_leaves(config: Any) -> set[str]:
    """The last names of the base model's expert projections and router (Phixtral's ``fc1`` / ``fc2``, Hunyuan's
    ``wg``: ``MoeSpec``), as a ``target_modules`` entry names them."""
    spec = config.arch.moe
    if spec is None:
        return set()
    return {name.rsplit(".", 1)[-1] for name in (*spec.expert_names, *spec.mlx_lm_names, spec.router) if name}


def _check_targets(where: str, settings: dict, config: Any) -> None:
    """Refuse by name a ``target_modules`` entry that is not one of the projections Ferrum adapts.

    A regex string is matched by PEFT against the base model's module names; the
    tensors it produced are checked one by one instead.
    """
    targets = settings.get("target_modules")
    if targets is None and not settings.get("target_parameters"):
        raise AdapterError(f"{where}: {PEFT_CONFIG} has no target_modules, for which PEFT takes its default for the "
                           "model type (q_proj and v_proj for most); name the adapted modules in target_modules")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(settings.get(key), str):
            try:
                re.compile(settings[key])
            except re.error as exc:
                raise AdapterError(f"{where}: {key} {settings[key]!r} is not a valid regex: {exc}") from None
    if not isinstance(settings.get("exclude_modules"), (str, list, type(None))):
        raise AdapterError(f"{where}: exclude_modules must be a list of module names or a regex string, "
                           f"got {settings['exclude_modules']!r}")
    layers = settings.get("layers_to_transform")
    if layers is not None and not (_is_int(layers) or isinstance(layers, list) and all(map(_is_int, layers))):
        raise AdapterError(f"{where}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
    if targets is None or isinstance(targets, str):  # a regex, or "all-linear": the tensors are checked instead
        return
    if not isinstance(targets, list):
        raise AdapterError(f"{where}: target_modules must be a list of module names or a regex string, "
                           f"got {targets!r}")
    for target in targets:
        leaf = str(target).rsplit(".", 1)[-1]
        refusal = _target_refusal(config, str(target))
        if refusal is None:
            continue
        if refusal:
            raise AdapterError(f"{where}: target_modules names {target!r}: {refusal}")
        if leaf in _EMBEDDINGS:
            raise AdapterError(
                f"{where}: target_modules names {target!r}; embedding and LM-head targets are not supported"
            )
        if leaf in _FUSED:
            raise AdapterError(f"{where}: target_modules names the fused projection {target!r}, which is not supported")
        if leaf == "shared_expert_gate":
            raise AdapterError(f"{where}: target_modules names {target!r}, which {_SHARED_GATE_REFUSAL}")
        if leaf in _MOE or leaf in ("gate", "router", "w1", "w2", "w3") or leaf in _moe_leaves(config):
            raise AdapterError(f"{where}: target_modules names {target!r}, which {_MOE_REFUSAL}")
        raise AdapterError(
            f"{where}: target_modules names {target!r}; only {', '.join(PROJECTIONS)} (or 'all-linear') are supported"
        )


# ----------------------------------------------------------------- mlx-lm

_MLX_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>a|b)$")


def _mlx_lm(folder: Path, settings: dict, config: Any) -> dict[Site, LoraWeights]:
    where = str(folder)
    kind = settings.get("fine_tune_type", "lora")
    if settings.get("use_dora") or kind == "dora":
        raise AdapterError(f"{where}: DoRA (fine_tune_type 'dora') is not supported; train a LoRA adapter")
    if kind != "lora":
        raise AdapterError(f"{where}: fine_tune_type {kind!r} is not supported; only 'lora' adapters run")
    params = settings.get("lora_parameters") or {}
    scale = params.get("scale", 20.0)  # mlx-lm's default
    if not isinstance(scale, (int, float)):
        raise AdapterError(f"{where}: lora_parameters.scale must be a number")
    for key in params.get("keys") or ():
        refusal = _target_refusal(config, str(key))
        if refusal is not None:
            raise AdapterError(f"{where}: lora_parameters.keys names {key!r}; " + (
                refusal or f"only {', '.join(PROJECTIONS)} are supported"))
    num_layers = settings.get("num_layers", 16)  # mlx-lm adapts model.layers[-max(num_layers, 0):]: 0 is all
    first = max(config.arch.stored_layers - num_layers, 0) if _is_int(num_layers) and num_layers > 0 else 0
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, array in _read(folder / MLX_WEIGHTS):
        m = _MLX_KEY.match(name)
        at = None if m is None else _in_layer(config, m["module"])
        proj = None if at is None else _site(where, config, at[2], name)
        if proj is None:
            if any(e in name for e in _EMBEDDINGS):
                what = "adapts an embedding or the LM head"
            elif any(f".{m}." in name for m in _MOE):
                what = _MOE_REFUSAL
            elif name.endswith(".m"):
                what = "is a DoRA magnitude"
            else:
                what = f"is not a lora_a / lora_b of a {_ADAPTABLE} projection"
            raise AdapterError(f"{where}: tensor {name} {what}; not supported")
        layer = at[0]
        if layer < first:
            raise AdapterError(
                f"{where}: {name} adapts layer {layer} but num_layers={num_layers} covers only the last ones"
            )
        pairs.setdefault((layer, proj), {})[m["which"]] = array
    weights = {}
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise AdapterError(f"{where}: layer {layer} {proj} has lora_{''.join(ab)} but not both lora_a and lora_b")
        a, b = ab["a"], ab["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"{where}: layer {layer} {proj}: lora_a {a.shape} and lora_b {b.shape} are not [in, r] and [r, out]"
            )
        rank = params.get("rank")
        if isinstance(rank, int) and a.shape[1] != rank:
            raise AdapterError(
                f"{where}: layer {layer} {proj} has rank {a.shape[1]} but lora_parameters.rank is {rank}"
            )
        weights[(layer, proj)] = _checked(where, config, layer, proj, a, b, float(scale))
    return weights


# ----------------------------------------------------------------- shared


def _read(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(f"{path} is not a readable safetensors file: {type(exc).__name__}: {exc}") from None


def projection_span(config: Any, layer: int, proj: str) -> tuple[str, int, int] | None:
    """Where ``proj``'s outputs lie: ``(group, start, stop)`` columns of the concatenated outputs of the
    projections that read the same input (a fused one covers its members'), or None where the base model
    has no such projection (an MoE layer's MLP, a member of a projection its checkpoint stores fused...). A shared
    expert's projection is its own group."""
    arch = config.arch
    if proj in SHARED:
        shape = _shared_shape(config, layer, proj)
        return None if shape is None else (proj, 0, shape[1])
    if _unadaptable(config, layer, proj) is not None:
        return None
    mla = _latent(config, layer)
    if PROJECTIONS[proj] == "self_attn" and (mla is not None or proj in _LATENT_ONLY):
        sizes = None if mla is None else mla.adaptable(config.hidden_size).get(proj)
        return None if sizes is None else (proj, 0, sizes[2])
    kind = arch.layers[layer].mlp
    inter = width(config, layer)  # the layer's own where the model's vary (Gemma 3n, Gemma 4's double-wide layers)
    if PROJECTIONS[proj] == "mlp" and kind == "plain":  # an ungated MLP: up and down, each its own matrix
        return {"up_proj": ("up_proj", 0, inter), "down_proj": ("down_proj", 0, config.hidden_size)}.get(proj)
    if PROJECTIONS[proj] == "mlp" and kind != "dense":
        return None
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    if arch.layers[layer].kv_source is not None and proj in ("qkv_proj", *_GROUPS["qkv_proj"]):
        return ("qkv_proj", 0, q) if proj == "q_proj" else None  # queries alone (DenseAttention.build_queries)
    outputs = {"qkv_proj": (q, kv, kv), "gate_up_proj": (inter, inter)}
    fused = {"qkv_proj": arch.fused_qkv, "gate_up_proj": arch.fused_gate_up}
    for group, members in _GROUPS.items():
        if proj == group:
            return (group, 0, sum(outputs[group])) if fused[group] else None
        if proj in members:
            start = sum(outputs[group][: members.index(proj)])
            return None if fused[group] else (group, start, start + outputs[group][members.index(proj)])
    return proj, 0, {"o_proj": config.hidden_size, "down_proj": config.hidden_size}[proj]


def projection_shape(config: Any, layer: int, proj: str) -> tuple[int, int] | None:
    """``(in, out)`` of a projection of the base model as its checkpoint stores it, and so as an adapter trained on
    it does: q/k/v/o as the layer stores its heads (:func:`ferrum.arch.heads.layout`: Gemma 4's narrower heads,
    MiMo-V2-Flash's narrower values and fewer key/value heads on its full layers, Laguna's fewer query heads,
    OpenELM's fewer key/value heads and their queries), which the B factor's rows are then fitted like
    (:func:`_as_loaded`), o_proj's A rows likewise (:func:`_inputs_as_loaded`); or None where the layer has no such
    matrix."""
    span = projection_span(config, layer, proj)
    if span is None:
        return None
    if proj in SHARED:
        return _shared_shape(config, layer, proj)
    mla = _latent(config, layer)
    if mla is not None and PROJECTIONS[proj] == "self_attn":
        return mla.adaptable(config.hidden_size)[proj][:2]
    shape = heads_layout(config, config.arch.layers[layer])
    q, k, v = (shape.rows(kind) for kind in ("q", "k", "v"))
    stored = {"q_proj": q, "k_proj": k, "v_proj": v, "qkv_proj": q + k + v}
    n_in = {"o_proj": shape.rows("o"), "down_proj": width(config, layer)}
    return n_in.get(proj, config.hidden_size), stored.get(proj, span[2] - span[1])


def _shared_shape(config: Any, layer: int, proj: str) -> tuple[int, int] | None:
    """``(in, out)`` of layer ``layer``'s shared expert's ``proj`` (a :data:`SHARED` name); None where the layer has
    no shared expert, or one without that projection (an ungated one's gate_proj)."""
    spec = config.arch.moe
    if config.arch.layers[layer].mlp != "moe" or not spec.shared_expert_size:
        return None
    if proj == "shared_expert.gate_proj" and not spec.shared_gated:
        return None
    s, h = spec.shared_expert_size, config.hidden_size
    return (s, h) if proj == "shared_expert.down_proj" else (h, s)


def _shared_tensor(config: Any, layer: int, proj: str) -> str:
    """The weight of layer ``layer``'s shared expert's ``proj`` (a :data:`SHARED` name), by Ferrum's names."""
    spec = config.arch.moe
    return f"{config.arch.prefix}layers.{layer}.{spec.at(spec.shared_module)}.{SHARED[proj]}.weight"


def _latent(config: Any, layer: int) -> Any:
    """Layer ``layer``'s latent attention (:class:`ferrum.arch.mla.MlaSpec`), None where it attends otherwise."""
    arch = config.arch
    return arch.latent(layer) if arch.mla is not None and arch.layers[layer].mixer == "attention" else None


def _padded_inputs(config: Any, layer: int, proj: str) -> bool:
    """Whether the load pads ``proj``'s inputs (o_proj's, after heads narrower than head_dim, or latent attention's
    heads padded to the KV pool's), which the adapter's factors are not fitted for."""
    mla = _latent(config, layer)
    if mla is not None:
        return proj == "o_proj" and mla.width_heads != mla.heads
    shape = heads_layout(config, config.arch.layers[layer])
    return proj == "o_proj" and not shape.paired and shape.value_dim != shape.head_dim


def _unadaptable(config: Any, layer: int, proj: str) -> str | None:
    """What layer ``layer``'s attention or MLP, whichever ``proj`` is of, is where it has no projection to adapt
    (:data:`_NOTHING_ADAPTED`); None where it has."""
    spec = config.arch.layers[layer]
    return _NOTHING_ADAPTED.get(spec.mixer if PROJECTIONS[proj] == "self_attn" else spec.mlp)


def _absent(config: Any, layer: int, proj: str) -> str:
    """Why the base model has no ``proj`` in ``layer``."""
    if proj not in SHARED and (instead := _unadaptable(config, layer, proj)) is not None:
        part = "attention" if PROJECTIONS[proj] == "self_attn" else "MLP"
        return f"layer {layer}'s {part} is {instead}: it has no {proj} to adapt; drop it from the adapter"
    if proj in SHARED:
        spec = config.arch.moe
        if config.arch.layers[layer].mlp != "moe" or not spec.shared_expert_size:
            return f"that layer has no shared expert for {proj} to adapt"
        return f"that layer's shared expert is ungated: it has an up and a down projection, no {SHARED[proj]}"
    mla = _latent(config, layer)
    if PROJECTIONS[proj] == "self_attn" and mla is not None:
        gated = " (A.X-K2's q_b_proj, whose columns are cut at load, is not)" if mla.output_gate else ""
        return (f"the layer's latent attention has no {proj} that Ferrum adapts: LoRA runs on its "
                f"{', '.join(mla.adaptable(config.hidden_size))}{gated}")
    if proj in _LATENT_ONLY:
        return f"{proj} is a projection of Multi-head Latent Attention, which the base model's attention is not"
    kind = config.arch.layers[layer].mlp
    if PROJECTIONS[proj] == "mlp" and kind == "plain":
        return f"that layer's MLP is ungated: it has an up and a down projection, no {proj}"
    if PROJECTIONS[proj] == "mlp" and kind != "dense":
        return f"that layer's MLP is a mixture of experts: {proj} {_MOE_REFUSAL}"
    source = config.arch.layers[layer].kv_source
    if source is not None and PROJECTIONS[proj] == "self_attn":
        return (f"layer {layer} attends the keys and values layer {source} projected (cross-layer attention, KV "
                f"reuse): it projects queries alone, so it has q_proj but no {proj} to adapt; drop it from the adapter")
    stored = next((g for g, members in _GROUPS.items() if proj in members), None)
    if stored is not None:
        return f"the base model stores {proj} inside the fused {stored}; adapt {stored}"
    return f"the base model stores {', '.join(_GROUPS[proj])} separately; adapt those"


def _checked(where: str, config: Any, layer: int, proj: str, a: np.ndarray, b: np.ndarray, scale: float) -> LoraWeights:
    if layer >= config.arch.stored_layers:  # a looped model's passes run the stored layers again (Nanbeige 4.2's)
        raise AdapterError(f"{where}: adapts layer {layer} but the base model has {config.arch.stored_layers} layers")
    if proj not in PROJECTIONS and proj not in SHARED:
        if config.arch.layers[layer].mlp != "dense" and proj == "shared_expert_gate":
            raise AdapterError(f"{where}: layer {layer} {proj} {_SHARED_GATE_REFUSAL}")
        if config.arch.layers[layer].mlp != "dense" and proj == "gate":
            raise AdapterError(f"{where}: layer {layer} {proj} {_MOE_REFUSAL}")
        raise AdapterError(
            f"{where}: layer {layer} {proj} " + (
                "adapts a fused projection" if proj in _FUSED else "is not a projection Ferrum adapts")
            + f"; only {', '.join(PROJECTIONS)} are supported"
        )
    shape = projection_shape(config, layer, proj)
    if shape is None:
        raise AdapterError(f"{where}: layer {layer} {proj}: {_absent(config, layer, proj)}")
    if _padded_inputs(config, layer, proj):
        raise AdapterError(f"{where}: layer {layer} o_proj: LoRA on an o_proj whose value heads Ferrum pads at load "
                           "(MiMo-V2-Flash's, Gemma 4's narrower heads, Dots 3's latent heads padded to the KV pool's) "
                           "is not supported; adapt the attention's other projections and the MLP")
    got = (a.shape[0], b.shape[1])
    if got != shape:
        raise AdapterError(
            f"{where}: layer {layer} {proj} maps {got[0]} -> {got[1]} features but the base model's maps "
            f"{shape[0]} -> {shape[1]}; the adapter was trained for another model"
        )
    for factor in (a, b):
        if not is_float(factor):
            raise AdapterError(f"{where}: layer {layer} {proj}: factors are {factor.dtype}, not floats")
    a32, b32 = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(a32).all() and math.isfinite(scale) and np.isfinite(b32 * np.float32(scale)).all()
    if not finite:
        raise AdapterError(f"{where}: layer {layer} {proj} holds non-finite values (NaN or inf), or its scale "
                           f"({scale:g}) times its B factor overflows float32")
    return LoraWeights(_inputs_as_loaded(config, layer, proj, a32), _as_loaded(config, layer, proj, b32), scale)


def _inputs_as_loaded(config: Any, layer: int, proj: str, a: np.ndarray) -> np.ndarray:
    """``a [in, r]``'s input rows moved and padded as the load moves the projection's weight columns: o_proj's
    heads (:func:`ferrum.arch.tensors.attention_as_loaded`: zero heads after each key/value head's queries in a layer
    of fewer query heads, Laguna's and Step 3.5's; OpenELM's zero groups; PLaMo's regrouped where its key/value heads
    are tiled)."""
    if proj != "o_proj":
        return a
    name = f"{config.arch.prefix}layers.{layer}.self_attn.o_proj.weight"
    (fitted,) = attention_as_loaded(config, config.arch.layers[layer], name, a.T)
    return np.ascontiguousarray(fitted[1].T, dtype=np.float32)


def _as_loaded(config: Any, layer: int, proj: str, b: np.ndarray) -> np.ndarray:
    """``b [r, out]``'s output columns moved and scaled as the load moves and scales the projection's weight
    rows (:func:`ferrum.arch.tensors.prepare`: q/k rows in rope's pairing, times longrope's or YaRN's
    attention factor; a shared expert's down_proj times ``MoeSpec.shared_scale``), so that the adapter adds to the
    outputs the base model computes."""
    name = (_shared_tensor(config, layer, proj) if proj in SHARED else
            f"{config.arch.prefix}layers.{layer}.{PROJECTIONS[proj]}.{proj}.weight")
    rows = np.concatenate([part for _, part in prepare(config, name, b.T, inputs=False)])
    return np.ascontiguousarray(rows.T, dtype=np.float32)


def _digest(weights: dict[Site, LoraWeights]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for (layer, proj), w in sorted(weights.items()):
        h.update(f"{layer}.{proj}:{w.scale!r}:{w.a.shape}".encode())
        h.update(w.a.tobytes())
        h.update(w.b.tobytes())
    return h.digest()
