"""A layer's experts in a checkpoint, stacked into ``[E, out, in]`` at load.

The model names each stacked projection as mlx-lm does,
``M.switch_mlp.{gate,up,down}_proj.weight`` (``M`` the sparse MLP module, e.g.
``model.layers.3.mlp``). A checkpoint holds it in one of two layouts:

* **stacked** (mlx-lm's converted and quantized checkpoints, after its
  ``sanitize``): that very tensor, 3-D, with ``.scales``/``.biases`` when packed
  (under ``M.experts.*`` instead for dots1 and Llama 4: ``MoeSpec.mlx_lm_stack``);
* **per expert** (Hugging Face releases, and what transformers 5's
  ``save_pretrained`` writes): ``M.experts.{e}.{name}.weight`` for every expert,
  with the family's names (Mixtral ``w1``/``w3``/``w2``, Qwen
  ``gate_proj``/``up_proj``/``down_proj``), each possibly packed. They are
  read together and stacked, one projection of one layer at a time;
* **stacked under the family's names** (GraniteMoE's ``M.input_linear``, gate
  and up rows in one stack, and ``M.output_linear``: ``MoeSpec.stacked``), float.

(transformers 5 fuses experts into ``M.experts.gate_up_proj`` only in memory;
its ``save_pretrained`` converts back to the per-expert layout.)
"""

from __future__ import annotations

import re

import numpy as np

from ferrum.checkpoint import is_float
from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.moe import dbrx, fused_gate_up, gpt_oss
from ferrum.moe.experts import HostExperts, StackedQuantized
from ferrum.moe.spec import MoeSpec
from ferrum.quant import awq_gptq, float_modes, fp8
from ferrum.quant.affine import FloatCodes
from ferrum.quant.config import AFFINE, FLOAT_MODES, QuantConfig, stored_mode

SWITCH = ("gate_proj", "up_proj", "down_proj")
#: ``MoeSpec.layout`` -> the module reading a family's own layouts: ``parts(present, name, packed_kinds)``
#: names the checkpoint tensors of a model tensor (None: none of the family's own, read per expert as every
#: family's are: DBRX's mlx-lm conversions), ``converts(part)`` says which of them are the family's own and
#: ``convert(name, got, shape, where)`` converts those.
LAYOUTS = {"gpt_oss": gpt_oss, "fused_gate_up": fused_gate_up, "fused_outputs_first": fused_gate_up.OUTPUTS_FIRST,
           "aria": fused_gate_up.ARIA, "dbrx": dbrx}
_PACKED = ("weight", "scales", "biases")
_AWQ_GPTQ = ("qweight", "qzeros", "scales")


def is_expert_stack(name: str) -> bool:
    """Whether model tensor ``name`` belongs to a layer's stacked experts (their matrices or biases)."""
    return ".switch_mlp." in name


def correction_bias_alias(present: set[str], spec: MoeSpec, name: str) -> str | None:
    """Where the checkpoint stores model tensor ``name``, a correction bias it does not hold under that name, as one
    of ``MoeSpec.correction_bias_aliases`` (mlx-lm's conversions of EXAONE MoE, Kimi Linear); None for any other
    tensor. The sparse MLP module is not matched: a layout may store it under another name (Kimi Linear's)."""
    tail = f".{spec.bias_name}"
    if name in present or not name.endswith(tail):
        return None
    stem = name.removesuffix(spec.bias_name)
    return next((stem + alias for alias in spec.correction_bias_aliases if stem + alias in present), None)


def mlx_lm_stack_name(spec: MoeSpec, name: str) -> str:
    """Where mlx-lm's conversions store stacked projection ``name`` (``M.switch_mlp.*``, or the family's
    ``MoeSpec.mlx_lm_stack`` and ``MoeSpec.mlx_lm_names``) in a family without layouts of its own."""
    module, rest = name.split(".switch_mlp.")
    proj, dot, kind = rest.partition(".")
    return f"{module}.{spec.mlx_lm_stack}.{spec.mlx_lm_names[SWITCH.index(proj)]}{dot}{kind}"


def stack_mode(quant: QuantConfig | None, spec: MoeSpec, name: str) -> str | None:
    """The quantization mode config.json gives the checkpoint module of stacked projection ``name``; None where
    its tensors say (:meth:`QuantConfig.declares`)."""
    if quant is None:
        return AFFINE
    module = name.removesuffix(".weight")
    # config.json names the module where the stack is stored: either name
    stored = (LAYOUTS[spec.layout].checkpoint_module(name, spec.mlx_lm_stack) if spec.layout is not None
              else mlx_lm_stack_name(spec, module + ".weight").removesuffix(".weight"))
    module = stored if stored in quant.modes or stored in quant.overrides else module
    return None if quant.infers_formats and not quant.declares(module) else quant.mode_for(module)


def expert_parts(present: set[str], spec: MoeSpec, name: str, mode: str | None = AFFINE) -> tuple[str, ...]:
    """The checkpoint tensors that make up stacked projection ``name``, in the layout ``present`` holds, for
    its quantization ``mode`` (MLX's float modes have no biases; AWQ and GPTQ experts are per-expert
    ``qweight``, ``qzeros``, ``scales`` and maybe ``g_idx``; None: biases where the checkpoint has them)."""
    if mode is None:
        mode = AFFINE if _stored_biases(present, spec, name) else "float"
    packed = _PACKED if mode == AFFINE else _PACKED[:2]
    if spec.layout is not None:
        own = LAYOUTS[spec.layout].parts(present, name, packed, spec.mlx_lm_stack)
        if own is not None:
            return own
    stored = mlx_lm_stack_name(spec, name)
    if stored in present:
        at = stored.removesuffix(".weight")
        if f"{at}.global_scale" in present and mode != AFFINE:
            raise UnsupportedFeatureError(f"{at}.global_scale: nvfp4 experts with a tensor scale (global_scale) "
                                          "are not supported; quantize the experts without one")
        scale = fp8.scale_part(at, present)
        if scale is not None:  # FP8 experts, stacked
            return stored, scale
        return tuple(f"{at}.{k}" for k in packed) if f"{at}.scales" in present else (stored,)
    if spec.stacked is not None:  # packed too where gate and up are stacked apart (ferrum quantize's Step 3.5)
        at = _family_stack(spec, name)
        return tuple(f"{at}.{k}" for k in packed) if f"{at}.scales" in present else (f"{at}.weight",)
    if name.endswith(".bias"):  # each expert's bias (never packed)
        return tuple(per_expert_names(spec, name))
    per_expert = [n.removesuffix(".weight") for n in per_expert_names(spec, name)]
    if f"{per_expert[0]}.qweight" in present:
        kinds = _AWQ_GPTQ + (("g_idx",) if f"{per_expert[0]}.g_idx" in present else ())
    elif (scale := fp8.scale_part(per_expert[0], present)) is not None:  # FP8 experts: each weight and its scale
        kinds = ("weight", scale.rsplit(".", 1)[1])
    else:
        kinds = packed if f"{per_expert[0]}.scales" in present else _PACKED[:1]
    return tuple(f"{p}.{k}" for p in per_expert for k in kinds)


def _stored_biases(present: set[str], spec: MoeSpec, name: str) -> bool:
    """Whether packed stack ``name`` has biases beside it (stacked where the family's layout or mlx-lm stores it, or
    each expert's: mlx-lm's conversions of DBRX, a family with a layout of its own)."""
    if spec.layout is not None:
        modules = (name.removesuffix(".weight"), LAYOUTS[spec.layout].checkpoint_module(name, spec.mlx_lm_stack))
    else:
        modules = (mlx_lm_stack_name(spec, name).removesuffix(".weight"),)
    if spec.stacked is not None:
        modules += (_family_stack(spec, name),)
    if name.endswith(".weight"):
        modules += (per_expert_names(spec, name)[0].removesuffix(".weight"),)
    return any(f"{module}.biases" in present for module in modules)


def _family_stack(spec: MoeSpec, name: str) -> str:
    """The module of ``MoeSpec.stacked`` holding stacked projection ``name`` (``M.input_linear``, ``M.gate_proj``)."""
    module, rest = name.split(".switch_mlp.")
    return f"{module}.{spec.stacked[SWITCH.index(rest.partition('.')[0])]}"


def per_expert_names(spec: MoeSpec, name: str) -> list[str]:
    """``M.switch_mlp.gate_proj.weight`` (or ``.bias``) -> ``[M.experts.0.<gate name>.weight, ...]``, the Hugging
    Face layout (under ``MoeSpec.experts_module``)."""
    module, rest = name.split(".switch_mlp.")
    proj, kind = rest.split(".", 1)
    return [f"{module}.{spec.experts_module}.{e}.{spec.expert_names[SWITCH.index(proj)]}.{kind}"
            for e in range(spec.num_experts)]


def fused_half(spec: MoeSpec, name: str, parts: tuple[str, ...]) -> int | None:
    """Which half of its one part stacked projection ``name`` is (0 gate, 1 up), where gate and up share a
    stack (``MoeSpec.stacked``); else None."""
    if spec.stacked is None or ".switch_mlp." in parts[0]:
        return None
    gate, up, _ = spec.stacked
    proj = name.removesuffix(".weight").split(".switch_mlp.")[1]
    return SWITCH.index(proj) if gate == up and proj in SWITCH[:2] else None


def half_of(stack: np.ndarray, half: int) -> np.ndarray:
    """Of a stack ``[E, 2 * out, in]`` holding two projections' rows, the first (0, gate) or second (1, up)."""
    rows = stack.shape[1] // 2
    return stack[:, half * rows:(half + 1) * rows]


def assemble_stack(name: str, parts: dict[str, np.ndarray], shape: tuple[int, ...], spec: MoeSpec,
                   quant: QuantConfig | None, where: str) -> HostExperts:
    """Model tensor ``name`` (a stacked projection, or its ``[E, out]`` biases) from its checkpoint ``parts``
    (see :func:`expert_parts`)."""
    first = next(iter(parts))
    if spec.layout is not None and (len(shape) == 2 or LAYOUTS[spec.layout].converts(first)):
        got = LAYOUTS[spec.layout].convert(name, parts, shape, where)
        return got[0] if len(got) == 1 else _float_mode_experts(*got, "mxfp4", shape, f"{where}: {first}")
    if name.endswith(".bias"):  # stacked as mlx-lm stores them, or each expert's
        names = sorted(parts, key=_expert_index)
        biases = parts[first] if len(names) == 1 else np.stack([parts[n] for n in names])
        if tuple(biases.shape) != shape:
            raise CheckpointError(f"{where}: expert biases {', '.join(names)} stack to {tuple(biases.shape)} but "
                                  f"config.json implies {shape}")
        return biases
    return assemble_experts(name, parts, shape, quant, where, fused_half(spec, name, tuple(parts)),
                            stack_mode(quant, spec, name))


def assemble_experts(name: str, parts: dict[str, np.ndarray], shape: tuple[int, int, int],
                     quant: QuantConfig | None, where: str, half: int | None = None,
                     mode: str | None = AFFINE) -> HostExperts:
    """One stacked projection from its parts (see :func:`expert_parts`; ``half`` of a fused gate and up stack,
    see :func:`fused_half`), checked against ``shape``."""
    def stacked(kind: str) -> np.ndarray:
        names = sorted((n for n in parts if n.endswith(f".{kind}")), key=_expert_index)  # shards read out of order
        if parts[names[0]].ndim == 3:
            return parts[names[0]]

        def form(array: np.ndarray) -> tuple:
            return array.shape, "float" if is_float(array) else array.dtype

        odd = next((n for n in names if form(parts[n]) != form(parts[names[0]])), None)
        if odd is not None:  # np.stack would refuse another shape raw, and take ints among floats as weights
            raise CheckpointError(
                f"{where}: expert tensor {odd} is {parts[odd].dtype} {tuple(parts[odd].shape)} but {names[0]} is "
                f"{parts[names[0]].dtype} {tuple(parts[names[0]].shape)}; every expert's must match (config.json "
                f"implies {shape[1:]})")
        return np.stack([parts[n] for n in names])

    if any(n.endswith(".qweight") for n in parts):
        return _awq_gptq_experts(parts, shape, quant, where)
    weight = stacked("weight")
    if half is not None and weight.ndim == 3 and weight.shape[1] == 2 * shape[1]:
        weight = half_of(weight, half)
    first = next(iter(parts)).removesuffix(".weight")
    scale_kind = next((k for k in fp8.SCALE_NAMES if any(n.endswith(f".{k}") for n in parts)), None)
    if scale_kind is not None:  # one stack's scales as stored, or each expert's stacked
        scale_parts = [n for n in parts if n.endswith(f".{scale_kind}")]
        scales = parts[scale_parts[0]] if len(scale_parts) == 1 and weight.ndim == 3 else stacked(scale_kind)
        return _fp8_experts(weight, scales, quant, shape, f"{where}: {first}")
    if not any(n.endswith(".scales") for n in parts):
        if fp8.is_fp8(weight):
            raise CheckpointError(fp8.unscaled(f"{first}.weight", weight, quant, where))
        if tuple(weight.shape) != shape or not is_float(weight):
            raise CheckpointError(
                f"{where}: experts {first} stack to {weight.dtype} {tuple(weight.shape)} but config.json implies "
                f"float {shape} (a packed weight needs .scales and .biases beside it)"
            )
        return weight
    declared = mode is not None
    if not declared:  # config.json does not name the stack: its tensors say
        mode = stored_mode(first, weight, stacked("scales"), shape[-1], any(n.endswith(".biases") for n in parts),
                           where)
    if mode != AFFINE:
        return _float_mode_experts(weight, stacked("scales"), mode, shape, f"{where}: {first}")
    scales, biases = stacked("scales"), stacked("biases")
    e, n, k = shape
    if weight.dtype != np.uint32 or weight.shape[:2] != (e, n) or scales.shape[:2] != (e, n) or not scales.shape[-1]:
        raise CheckpointError(
            f"{where}: quantized experts {first} must be uint32 [{e}, {n}, K*bits/32] with scales "
            f"[{e}, {n}, groups]; got {weight.dtype} {tuple(weight.shape)} and scales {tuple(scales.shape)}"
        )
    if k % scales.shape[-1] or (weight.shape[-1] * 32) % k:
        raise CheckpointError(f"{where}: {first} {tuple(weight.shape)} does not describe [{n}, {k}] experts")
    fmt = (weight.shape[-1] * 32 // k, k // scales.shape[-1])
    said = None if quant is None else quant.for_module(first)
    if declared and fmt != said:
        raise CheckpointError(
            f"{where}: {first} is stored at {fmt[0]} bits, group size {fmt[1]}, but config.json's quantization "
            f"says {said}; the checkpoint and its config disagree"
        )
    try:
        return StackedQuantized(weight, scales, biases, *fmt)
    except Exception as exc:
        raise CheckpointError(f"{where}: {first}: {exc}") from exc


def _float_mode_experts(weight: np.ndarray, scales: np.ndarray, mode: str, shape: tuple[int, int, int],
                        where: str) -> HostExperts:
    """Experts in one of MLX's float modes, each decoded as a matrix is (:mod:`ferrum.quant.float_modes`)."""
    e, n, k = shape
    if weight.ndim != 3 or scales.ndim != 3 or weight.shape[0] != e or scales.shape[0] != e:
        raise CheckpointError(f"{where}: {mode} experts must stack {e} experts' codes and scales; got "
                              f"{tuple(weight.shape)} and {tuple(scales.shape)}")
    if not float_modes.has_affine_form(mode, k):  # dense float32, as such a matrix is
        return np.stack([float_modes.decode(weight[i], scales[i], mode, (n, k), f"{where} (expert {i})")
                         for i in range(e)])
    for i in range(e):  # checked now, so that a damaged file fails at load, not when a backend asks
        float_modes.checked_scales(weight[i], scales[i], mode, (n, k), f"{where} (expert {i})")

    def affine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # the experts as one [E * N, K] matrix
        codes, groups = weight.reshape(e * n, -1), scales.reshape(e * n, -1)
        parts = float_modes.fp4_affine(codes, float_modes.checked_scales(codes, groups, mode, (e * n, k), where), mode)
        return tuple(part.reshape(e, n, -1) for part in parts)

    return StackedQuantized.deferred(affine, shape, 5, FLOAT_MODES[mode][1], FloatCodes(weight, scales, mode))


def _fp8_experts(weight: np.ndarray, scales: np.ndarray, quant: QuantConfig | None, shape: tuple[int, int, int],
                 where: str) -> np.ndarray:
    """FP8 experts, each decoded to float32 as a matrix is (:mod:`ferrum.quant.fp8`), stacked."""
    if quant is None or quant.fp8 is None:
        raise CheckpointError(f"{where}: the experts hold FP8 weight scales, but config.json has no FP8 "
                              "quantization_config (quant_method 'fp8', or compressed-tensors' 'float-quantized')")
    e, n, k = shape
    if weight.ndim != 3 or weight.shape[0] != e or scales.shape[:1] != (e,):
        raise CheckpointError(f"{where}: FP8 experts must stack {e} experts' weights and scales; got "
                              f"{tuple(weight.shape)} and {tuple(scales.shape)}")
    return np.stack([fp8.decode(weight[i], scales[i], quant.fp8, (n, k), f"{where} (expert {i})") for i in range(e)])


def _awq_gptq_experts(parts: dict[str, np.ndarray], shape: tuple[int, int, int], quant: QuantConfig | None,
                      where: str) -> StackedQuantized:
    """Per-expert AWQ or GPTQ layers, each repacked as a dense layer is (:mod:`ferrum.quant.awq_gptq`), stacked."""
    paths = sorted({n.rsplit(".", 1)[0] for n in parts}, key=_expert_index)
    mode = None if quant is None else quant.mode_for(paths[0])
    if mode not in awq_gptq.METHODS:
        raise CheckpointError(f"{where}: {paths[0]}.qweight marks AWQ or GPTQ experts, but config.json has no "
                              "quantization_config with quant_method awq or gptq")
    experts = [awq_gptq.repack({n: a for n, a in parts.items() if n.rsplit(".", 1)[0] == path}, path, mode,
                               shape[1:], quant.bits, quant.group_size, where) for path in paths]
    if len(experts) != shape[0]:
        raise CheckpointError(f"{where}: {len(experts)} AWQ/GPTQ experts where config.json implies {shape[0]}")
    return StackedQuantized.of(experts)


def _expert_index(name: str) -> int:
    """Expert ``e`` of a per-expert tensor or module ``M.<experts>.{e}.<projection>[.<kind>]``; 0 for a stacked
    one."""
    found = re.search(r"\.(\d+)\.[^.]+(?:\.[^.]+)?$", name) if ".switch_mlp." not in name else None
    return int(found.group(1)) if found else 0
