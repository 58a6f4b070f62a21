"""DBRX's experts in the checkpoint layouts it is saved and converted in.

The model reads ``M.switch_mlp.{gate,up,down}_proj.weight`` (``M`` a layer's ``ffn``), as for every MoE
family; a DBRX checkpoint holds them as one of:

* **transformers'** (Databricks' release, and what ``save_pretrained`` writes): ``M.experts.mlp.w1`` (gate),
  ``.v1`` (up) and ``.w2`` (down), each 2-D ``[E * ffn, hidden]``, expert ``e``'s rows ``e * ffn:(e + 1) * ffn``;
  w1 and v1 hold each expert's ``[ffn, hidden]`` weight as a Linear does, w2 its down projection *transposed*
  (transformers computes ``x @ w2_e``);
* **mlx-lm's** (after its ``sanitize``, as mlx-community publishes it): one Linear per expert,
  ``M.experts.{e}.{w1,v1,w2}.weight`` (w2 ``[hidden, ffn]``), packed with ``.scales`` and ``.biases`` where
  quantized: the per-expert layout every family's loader reads (:mod:`ferrum.moe.loading`);
* **the model's own stacks** (what ``ferrum quantize`` writes), float or packed.
"""

from __future__ import annotations

import numpy as np

from ferrum.checkpoint import is_float
from ferrum.errors import CheckpointError

#: The model's projection -> its tensor in transformers' ``experts.mlp``.
_STORED = {"gate_proj": "w1", "up_proj": "v1", "down_proj": "w2"}


def _names(name: str) -> tuple[str, str]:
    """``M.switch_mlp.<proj>.weight`` -> (proj, transformers' tensor it comes from)."""
    module, rest = name.split(".switch_mlp.")
    proj = rest.split(".")[0]
    return proj, f"{module}.experts.mlp.{_STORED[proj]}"


def checkpoint_module(name: str, stack: str = "switch_mlp") -> str:
    """The module the model's own layout stores model tensor ``name`` in (``stack``: unused, as the layouts' other
    readers take it)."""
    return name.rsplit(".", 1)[0]


def mlx_lm_name(name: str, stack: str = "switch_mlp") -> str:
    """Where ``ferrum quantize`` writes model tensor ``name``: stacked under the model's own name."""
    return name


def parts(present: set[str], name: str, packed_kinds: tuple[str, ...], stack: str = "switch_mlp"
          ) -> tuple[str, ...] | None:
    """The checkpoint tensors model tensor ``name`` is read from where transformers' layout or the model's own
    stacks hold it; None where neither does (mlx-lm's experts, one Linear each, read as every family's are)."""
    module = checkpoint_module(name)
    if name in present:
        return tuple(f"{module}.{k}" for k in packed_kinds) if f"{module}.scales" in present else (name,)
    _, stored = _names(name)
    return (stored,) if stored in present else None


def stored_shapes(name: str, part: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The shapes float checkpoint tensor ``part`` may have where model tensor ``name`` is ``shape``."""
    if part == name:
        return (shape,)
    e, out, inp = shape
    proj, stored = _names(name)
    if part == stored:  # each expert's [ffn, hidden] rows, the down projection's transposed
        return ((e * inp, out) if proj == "down_proj" else (e * out, inp)),
    return ((out, inp),)  # one expert's Linear (mlx-lm's)


def converts(part: str) -> bool:
    """Whether checkpoint tensor ``part`` is one of transformers' tensors (read by :func:`convert`), not a stack
    under the model's or mlx-lm's name (``.weight``, packed ``.scales`` and ``.biases``)."""
    return not part.endswith((".weight", ".scales", ".biases"))


def convert(name: str, got: dict[str, np.ndarray], shape: tuple[int, ...], where: str) -> tuple:
    """transformers' tensor (one in ``got``) as the model reads it, ``[E, out, in]`` float."""
    (stored, array), = got.items()
    proj, _ = _names(name)
    e, out, inp = shape
    ffn, hidden = (inp, out) if proj == "down_proj" else (out, inp)
    if not is_float(array) or tuple(array.shape) != (e * ffn, hidden):
        raise CheckpointError(f"{where}: {stored} must be float [{e * ffn}, {hidden}] (the {e} experts' "
                              f"[{ffn}, {hidden}] matrices, one under the other), got {array.dtype} "
                              f"{tuple(array.shape)}")
    stack = array.reshape(e, ffn, hidden)
    return (np.ascontiguousarray(stack.transpose(0, 2, 1) if proj == "down_proj" else stack),)


def hugging_face_tensors(stacks: dict[str, np.ndarray], inputs_first: bool = False) -> dict[str, np.ndarray]:
    """Float stacks as the model names them (``M.switch_mlp.<proj>.weight``) stored as transformers stores them:
    the inverse of :func:`convert`."""
    out = {}
    for name, array in stacks.items():
        proj, stored = _names(name)
        stack = array.transpose(0, 2, 1) if proj == "down_proj" else array
        out[stored] = np.ascontiguousarray(stack.reshape(-1, stack.shape[-1]))
    return out


def mlx_lm_tensors(stacks: dict[str, np.ndarray], stack: str = "switch_mlp") -> dict[str, np.ndarray]:
    """Float stacks as mlx-lm's conversions store them: one Linear per expert, ``M.experts.{e}.<w1|v1|w2>.weight``."""
    out = {}
    for name, array in stacks.items():
        proj, stored = _names(name)
        module = stored.removesuffix(f".mlp.{_STORED[proj]}")
        out.update({f"{module}.{e}.{_STORED[proj]}.weight": np.ascontiguousarray(m) for e, m in enumerate(array)})
    return out
