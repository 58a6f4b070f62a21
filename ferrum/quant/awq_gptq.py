"""AutoAWQ and GPTQ checkpoints (``quant_method`` "awq" / "gptq") repacked exactly into the affine form.

Both store a linear layer as int32 words of packed codes ``q``, packed zero
points ``z`` and float16 ``scales`` per group of ``group_size`` inputs, with
``w = (q - z) * scale``: the affine form with ``scale`` and ``bias = -z * scale``,
both kept in float32, where each is exact (a float16 times an integer below 256).
They differ in layout:

* **AWQ** (``version`` "gemm", 4 bits): ``qweight`` ``[in, out / 8]`` and
  ``qzeros`` ``[in / group, out / 8]``, eight outputs to a word, output ``j``
  of each eight in nibble ``(0, 4, 1, 5, 2, 6, 3, 7)[j]`` (AutoAWQ's
  ``AWQ_ORDER`` is the inverse);
* **GPTQ** (2, 4 or 8 bits): ``qweight`` ``[in * bits / 32, out]`` packed
  along the inputs, ``qzeros`` ``[in / group, out * bits / 32]`` along the
  outputs, both in order from the lowest bits; the v1 format
  (``checkpoint_format`` "gptq", the default) stores each zero less one,
  subtracted from the packed words as integers (a symmetric 4-bit layer's
  words read 0x77777777; a zero of 0 borrows from the next code), so one is
  added back to each code the same way; v2 stores each zero as it is. A
  ``g_idx`` other than ``input // group_size`` (act-order, ``desc_act``) puts a
  group's inputs apart, which no affine group holds: refused, as mlx-lm
  refuses it.

A MoE's experts, one such layer each in the Hugging Face layout, are repacked
one by one and stacked (:mod:`ferrum.moe.loading`).
"""

from __future__ import annotations

import numpy as np

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.quant.affine import QuantizedWeight

#: config.json's ``quant_method`` -> the mode :class:`ferrum.quant.QuantConfig` records (GPTQ by format).
METHODS = ("awq", "gptq", "gptq_v2")
#: A one in each code of a word, by bits: what GPTQ v1 took from its zeros' words (GPTQModel adds it back so).
_ONE_EACH = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
#: Output ``j`` of each eight sits in nibble ``_AWQ_NIBBLE[j]`` of its AWQ word.
_AWQ_NIBBLE = np.array([0, 4, 1, 5, 2, 6, 3, 7])


def _words_to_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 (or uint32) words -> their ``32 / bits`` codes each, lowest bits first, along a new last axis."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    return ((words.astype(np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.uint8)


def _awq_codes(words: np.ndarray) -> np.ndarray:
    """AWQ's ``[rows, out / 8]`` words -> ``[rows, out]`` codes in output order."""
    as_bytes = words.view(np.uint8).reshape(words.shape[0], -1, 4)  # little-endian: byte b holds nibbles 2b, 2b + 1
    codes = np.empty((*as_bytes.shape[:2], 8), np.uint8)
    for j, nibble in enumerate(_AWQ_NIBBLE.tolist()):
        byte = as_bytes[..., nibble // 2]
        codes[..., j] = byte >> 4 if nibble % 2 else byte & 15
    return codes.reshape(words.shape[0], -1)


def _awq_as_affine(qweight: np.ndarray) -> np.ndarray:
    """AWQ's ``[in, out / 8]`` words -> the affine form's ``[out, in / 8]``: two inputs to a byte (the lower one in
    the low nibble) before the transpose, which then moves half as many bytes (6x faster than unpacking,
    transposing and packing again)."""
    q = _awq_codes(qweight)  # [in, out]
    return np.ascontiguousarray((q[0::2] | q[1::2] << 4).T).view(np.uint32)


def repack(parts: dict[str, np.ndarray], module: str, mode: str, shape: tuple[int, int], bits: int,
           group_size: int, where: str) -> QuantizedWeight:
    """One ``[out, in]`` layer's ``qweight``, ``qzeros``, ``scales`` (and GPTQ's ``g_idx``) as a packed affine
    weight."""
    out, k = shape
    qweight, qzeros, scales = (parts[f"{module}.{kind}"] for kind in ("qweight", "qzeros", "scales"))
    groups = k // group_size
    per_word = 32 // bits
    words = (k, out // per_word) if mode == "awq" else (k // per_word, out)  # AWQ packs outputs, GPTQ inputs
    zero_words = (groups, out // per_word)
    if (qweight.dtype != np.int32 or qzeros.dtype != np.int32 or tuple(qweight.shape) != words
            or tuple(qzeros.shape) != zero_words or tuple(scales.shape) != (groups, out) or k % group_size):
        raise CheckpointError(
            f"{where}: {module} in {mode} at {bits} bits, group {group_size}, is int32 qweight {words}, "
            f"int32 qzeros {zero_words} and scales {(groups, out)}; got {qweight.dtype} {tuple(qweight.shape)}, "
            f"{qzeros.dtype} {tuple(qzeros.shape)} and {tuple(scales.shape)}"
        )
    g_idx = parts.get(f"{module}.g_idx")
    if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // group_size):
        raise UnsupportedFeatureError(
            f"{where}: {module}.g_idx orders its inputs by activation (desc_act), so a group's inputs are not "
            "adjacent; quantize the model without act-order, or use its float checkpoint"
        )
    if mode == "awq":
        packed, z = _awq_as_affine(qweight), _awq_codes(qzeros)  # z: [groups, out]
    else:  # a GPTQ word holds consecutive inputs lowest bits first, as an affine word does: only transposed
        packed = np.ascontiguousarray(qweight.view(np.uint32).T)
        words = qzeros.view(np.uint32)
        if mode == "gptq":  # v1 subtracted one from each zero as whole words: a zero of 0 borrowed from the next
            words = words + np.uint32(_ONE_EACH[bits])  # uint32 arithmetic wraps, as the subtraction did
        z = _words_to_codes(words, bits).reshape(groups, out).astype(np.int32)
    scale = np.ascontiguousarray(scales.astype(np.float32).T)  # [out, groups]
    return QuantizedWeight(packed, scale, -z.T.astype(np.float32) * scale, bits, group_size)
