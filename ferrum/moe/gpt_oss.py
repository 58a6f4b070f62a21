"""gpt-oss's experts in the checkpoint layouts it is released and converted in.

The model reads ``M.switch_mlp.{gate,up,down}_proj.{weight,bias}`` (``M`` a layer's
``mlp``), as for every MoE family; a gpt-oss checkpoint holds them as one of:

* **Hugging Face, float** (what transformers' ``save_pretrained`` writes):
  ``M.experts.gate_up_proj [E, hidden, 2 * inter]``, laid out for ``x @ W`` (inputs
  first) with gate and up *interleaved* along the outputs (gate ``0::2``, up
  ``1::2``), ``M.experts.gate_up_proj_bias [E, 2 * inter]`` likewise, and
  ``M.experts.down_proj [E, inter, hidden]`` with ``down_proj_bias [E, hidden]``;
* **Hugging Face, MXFP4** (OpenAI's release, ``quant_method: mxfp4``): the same
  modules as ``*_blocks`` (uint8 ``[E, out, in / 32, 16]``, two E2M1 codes a byte,
  low nibble first, outputs first) and ``*_scales`` (uint8 E8M0 ``[E, out, in / 32]``):
  MLX's mxfp4 codes byte for byte (:mod:`ferrum.quant.float_modes`);
* **mlx-lm's** (after its ``sanitize``, as mlx-community publishes it):
  ``M.experts.{gate,up,down}_proj.weight`` stacked ``[E, out, in]``, packed with
  ``.scales`` (and ``.biases`` in affine mode) where quantized, and ``.bias``.
"""

from __future__ import annotations

import numpy as np

from ferrum.checkpoint import is_float
from ferrum.errors import CheckpointError

_FUSED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}


def _names(name: str) -> tuple[str, str, str, bool]:
    """``M.switch_mlp.<proj>.<kind>`` -> (``M.experts``, proj, the Hugging Face tensor it comes from, is a bias)."""
    module, rest = name.split(".switch_mlp.")
    proj, kind = rest.split(".")
    return f"{module}.experts", proj, _FUSED[proj][0], kind == "bias"


def checkpoint_module(name: str, stack: str = "experts") -> str:
    """The module mlx-lm's layout stores model tensor ``name`` in (where config.json's per-module
    quantization entries name it); always ``M.experts`` (``stack``, the layouts' common argument, unused)."""
    experts, proj, _, _ = _names(name)
    return f"{experts}.{proj}"


def mlx_lm_name(name: str, stack: str = "experts") -> str:
    """Where mlx-lm's layout stores model tensor ``name`` (random checkpoints are written this way)."""
    return f"{checkpoint_module(name)}.{name.rsplit('.', 1)[1]}"


def hugging_face_tensors(stacks: dict[str, np.ndarray], inputs_first: bool = True) -> dict[str, np.ndarray]:
    """Float expert tensors as the model names them (``M.switch_mlp.<proj>.<weight|bias>``, each layer's
    six present) stored as transformers stores them (always inputs first): the inverse of :func:`convert`, so
    that random checkpoints can be read by transformers too."""
    out = {}
    for name in stacks:
        experts, proj, fused, bias = _names(name)
        if proj == "up_proj":  # written with its gate
            continue
        if proj == "down_proj":
            out[f"{experts}.{fused}_bias" if bias else f"{experts}.{fused}"] = (
                stacks[name] if bias else stacks[name].transpose(0, 2, 1))
            continue
        gate, up = stacks[name], stacks[name.replace(".gate_proj.", ".up_proj.")]
        pair = np.stack([gate, up], axis=2)  # gate then up for each output: [E, out, 2(, in)]
        if bias:
            out[f"{experts}.{fused}_bias"] = pair.reshape(gate.shape[0], -1)
        else:
            out[f"{experts}.{fused}"] = pair.reshape(gate.shape[0], -1, gate.shape[2]).transpose(0, 2, 1)
    return {name: np.ascontiguousarray(array) for name, array in out.items()}


def stored_shapes(name: str, part: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The shape float checkpoint tensor ``part`` (of :func:`parts`) has where model tensor ``name`` is
    ``shape``: the model's own (mlx-lm's layout), or transformers' (inputs first, gate and up in one)."""
    if part.endswith((".weight", ".bias")):
        return (shape,)
    _, proj, _, bias = _names(name)
    width = 1 if _FUSED[proj][1] is None else 2
    return ((shape[0], shape[1] * width) if bias else (shape[0], shape[2], shape[1] * width),)


def parts(present: set[str], name: str, packed_kinds: tuple[str, ...], stack: str = "experts") -> tuple[str, ...]:
    """The checkpoint tensors model tensor ``name`` is read from; ``packed_kinds`` those of a packed stack
    in its quantization mode. A stack stored as the model names it (a GGUF import) or as mlx-lm does;
    else the Hugging Face tensors, so a missing one is reported by the name transformers writes."""
    experts, _, fused, bias = _names(name)
    kind = name.rsplit(".", 1)[1]
    for module in (name.removesuffix(f".{kind}"), checkpoint_module(name)):
        if f"{module}.{kind}" in present:
            packed = not bias and f"{module}.scales" in present
            return tuple(f"{module}.{k}" for k in packed_kinds) if packed else (f"{module}.{kind}",)
    if bias:
        return (f"{experts}.{fused}_bias",)
    if f"{experts}.{fused}_blocks" in present:
        return f"{experts}.{fused}_blocks", f"{experts}.{fused}_scales"
    return (f"{experts}.{fused}",)


def converts(part: str) -> bool:
    """Whether checkpoint tensor ``part`` is one of transformers' tensors (read by :func:`convert`), not a stack
    under the model's or mlx-lm's name (``.weight``, packed ``.scales`` and ``.biases``)."""
    return not part.endswith((".weight", ".scales", ".biases"))


def convert(name: str, got: dict[str, np.ndarray], shape: tuple[int, ...], where: str) -> tuple:
    """Biases, and Hugging Face stacks (``got`` holds one tensor, or blocks and scales), as the model reads
    them: a float ``[E, out]`` bias or ``[E, out, in]`` stack, or ``(codes uint32 [E, out, in / 8], scales)``
    in mxfp4. (Stacks stored as mlx-lm stores them are read as every family's are.)"""
    _, proj, fused, bias = _names(name)
    half = _FUSED[proj][1]
    outputs = np.s_[:] if half is None else np.s_[half::2]  # gate and up alternate along the outputs
    (first, array), *rest = got.items()
    if first.endswith(".bias"):  # stored as the model reads it
        return (_checked(array, shape, first, where),)
    if bias:
        return (_checked(array[:, outputs], shape, first, where),)
    if not rest:  # float, inputs first: [E, in, out]
        return (_checked(array[:, :, outputs].transpose(0, 2, 1), shape, first, where),)
    blocks, scales = array, rest[0][1]
    e, n, k = shape
    if blocks.dtype != np.uint8 or blocks.shape[-1] != 16 or blocks.ndim != 4 or scales.shape != blocks.shape[:-1]:
        raise CheckpointError(f"{where}: {first} must be uint8 [E, out, in / 32, 16] MXFP4 blocks with scales "
                              f"[E, out, in / 32]; got {blocks.dtype} {tuple(blocks.shape)} and {tuple(scales.shape)}")
    codes = np.ascontiguousarray(blocks[:, outputs]).reshape(*blocks[:, outputs].shape[:2], -1).view(np.uint32)
    if codes.shape != (e, n, k // 8):
        raise CheckpointError(f"{where}: {first} holds {tuple(codes.shape[:2])} rows of {codes.shape[2] * 8} inputs "
                              f"but config.json implies {e} experts of [{n}, {k}]")
    return codes, np.ascontiguousarray(scales[:, outputs])


def _checked(array: np.ndarray, shape: tuple[int, ...], part: str, where: str) -> np.ndarray:
    if tuple(array.shape) != shape or not is_float(array):
        raise CheckpointError(f"{where}: {part} gives a {array.dtype} {tuple(array.shape)} tensor where config.json "
                              f"implies float {shape}")
    return np.ascontiguousarray(array)


def mlx_lm_tensors(stacks: dict[str, np.ndarray], stack: str = "experts") -> dict[str, np.ndarray]:
    """Float tensors as the model names them stored where mlx-lm's layout stores them (:func:`mlx_lm_name`)."""
    return {mlx_lm_name(name, stack): array for name, array in stacks.items()}
