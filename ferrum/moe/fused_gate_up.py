"""Experts stored as two stacks, gate and up in one: Qwen3-VL-MoE's and Llama 4's checkpoints.

The model reads ``M.switch_mlp.{gate,up,down}_proj.weight`` (``M`` a layer's ``mlp``, Llama 4's
``feed_forward``), as for every MoE family; a checkpoint holds it as one of:

* **the release's** (Qwen's upload; Llama 4's, and what transformers saves of it):
  ``M.experts.gate_up_proj [E, hidden, 2 * inter]``, inputs first, gate then up along the outputs, and
  ``M.experts.down_proj [E, inter, hidden]``;
* **transformers 5's** for Qwen3-VL-MoE (what its ``save_pretrained`` writes) and Mistral 4 (its only layout on
  the Hub too): the same two tensors outputs first, ``[E, 2 * inter, hidden]`` and ``[E, hidden, inter]``;
* **mlx-lm's and mlx-vlm's** conversions: ``[E, out, in]`` stacks under ``M.<stack>.<proj>.weight``, packed
  where quantized (read as every family's stacks are); ``stack`` is the family's ``MoeSpec.mlx_lm_stack``:
  the model's own ``switch_mlp`` for Qwen3-VL-MoE, ``experts`` for Llama 4 (mlx-lm's ``llama4.sanitize``).

The two orientations are told apart by shape; a model whose hidden size equals the stack's other side
(``2 * inter`` for gate and up, ``inter`` for down) cannot be, and is refused rather than guessed, except in a
family whose stacks are only ever stored outputs first (:data:`OUTPUTS_FIRST`: Mistral Small 4's hidden size, 4096,
is twice its experts' 2048); and, under names of their own, in a family whose stacks are only ever stored inputs
first (:data:`ARIA`: Aria's ``M.experts.fc1.weight`` and ``fc2.weight``, as its release and transformers 5's
``save_pretrained`` write them).
"""

from __future__ import annotations

import numpy as np

from ferrum.checkpoint import is_float
from ferrum.errors import CheckpointError

#: The fused stacks' names in ``M.experts``: (gate and up, down).
_STACKS = ("gate_up_proj", "down_proj")
#: The model's projection -> (which of the stacks, its half of gate and up: 0 gate, 1 up, None the whole).
_FUSED = {"gate_proj": (0, 0), "up_proj": (0, 1), "down_proj": (1, None)}


def _names(name: str, stacks: tuple[str, str] = _STACKS) -> tuple[str, str, str]:
    """``M.switch_mlp.<proj>.weight`` -> (``M.experts``, proj, the stored tensor it comes from)."""
    module, rest = name.split(".switch_mlp.")
    proj = rest.split(".")[0]
    return f"{module}.experts", proj, stacks[_FUSED[proj][0]]


def checkpoint_module(name: str, stack: str = "switch_mlp") -> str:
    """The module mlx-lm's layout stores model tensor ``name`` in (``M.<stack>.<proj>``)."""
    return mlx_lm_name(name, stack).rsplit(".", 1)[0]


def mlx_lm_name(name: str, stack: str = "switch_mlp") -> str:
    """Where mlx-lm's (and mlx-vlm's) layout stores model tensor ``name``: under ``M.<stack>``."""
    return name.replace(".switch_mlp.", f".{stack}.")


def parts(present: set[str], name: str, packed_kinds: tuple[str, ...], stack: str = "switch_mlp",
          stacks: tuple[str, str] = _STACKS) -> tuple[str, ...]:
    """The checkpoint tensors model tensor ``name`` is read from (the model's own name, mlx-lm's, or the fused
    stack, named as ``stacks`` says); ``packed_kinds`` those of a packed stack."""
    for stored in dict.fromkeys((name, mlx_lm_name(name, stack))):
        module = stored.rsplit(".", 1)[0]
        if stored in present:
            return tuple(f"{module}.{k}" for k in packed_kinds) if f"{module}.scales" in present else (stored,)
    experts, _, stored = _names(name, stacks)
    return (f"{experts}.{stored}",)


def converts(part: str, stacks: tuple[str, str] = _STACKS) -> bool:
    """Whether checkpoint tensor ``part`` is a fused stack (read by :func:`convert`), not one of a projection's own
    stacks (the model's, mlx-lm's)."""
    return part.rsplit(".experts.", 1)[-1] in stacks


def stored_shapes(name: str, part: str, shape: tuple[int, ...],
                  stacks: tuple[str, str] = _STACKS) -> tuple[tuple[int, ...], ...]:
    """The shapes float checkpoint tensor ``part`` may have where model tensor ``name`` is ``shape``: (inputs first,
    outputs first) for a fused stack."""
    if not converts(part, stacks):  # a stack under the model's or mlx-lm's name
        return (shape,)
    _, proj, _ = _names(name)
    e, out, inp = shape
    width = 1 if _FUSED[proj][1] is None else 2
    return (e, inp, out * width), (e, out * width, inp)


def convert(name: str, got: dict[str, np.ndarray], shape: tuple[int, ...], where: str,
            stored_as: str | None = None, stacks: tuple[str, str] = _STACKS) -> tuple:
    """A stored stack (one tensor in ``got``) as the model reads it, ``[E, out, in]`` float; ``stored_as``: the
    family stores it only "inputs_first" (:data:`ARIA`) or "outputs_first" (:data:`OUTPUTS_FIRST`)."""
    (stored, array), = got.items()
    _, proj, _ = _names(name)
    half = _FUSED[proj][1]
    release, saved = stored_shapes(name, stored, shape, stacks)
    if array.ndim != 3 or not is_float(array):
        raise CheckpointError(f"{where}: {stored} must be a float [E, ...] stack, got {array.dtype} "
                              f"{tuple(array.shape)}")
    if stored_as is not None:
        only = release if stored_as == "inputs_first" else saved
        if tuple(array.shape) != only:
            raise CheckpointError(f"{where}: {stored} has shape {tuple(array.shape)} where config.json implies "
                                  f"{only} ({stored_as.replace('_', ' ')})")
        release, saved = (only, None) if stored_as == "inputs_first" else (None, only)
    elif release == saved:
        raise CheckpointError(f"{where}: {stored} {tuple(array.shape)} could be stored inputs first or outputs "
                              "first (the hidden size equals the other side); Ferrum cannot tell which")
    out = shape[1]
    picked = np.s_[:] if half is None else np.s_[half * out:(half + 1) * out]
    if tuple(array.shape) == release:  # inputs first
        return (np.ascontiguousarray(array[:, :, picked].transpose(0, 2, 1)),)
    if tuple(array.shape) == saved:
        return (np.ascontiguousarray(array[:, picked]),)
    raise CheckpointError(f"{where}: {stored} has shape {tuple(array.shape)} where config.json implies {release} "
                          f"(inputs first) or {saved}")


def hugging_face_tensors(stacks: dict[str, np.ndarray], inputs_first: bool = False,
                         names: tuple[str, str] = _STACKS) -> dict[str, np.ndarray]:
    """Float stacks as the model names them (``M.switch_mlp.<proj>.weight``) stored as transformers writes them
    (under ``names``): gate rows then up rows in one, outputs first (transformers 5's Qwen3-VL-MoE) or,
    ``inputs_first``, transposed (Llama 4's ``[E, hidden, 2 * inter]``); the inverse of :func:`convert` on that
    form."""
    out = {}
    for name, array in stacks.items():
        experts, proj, stored = _names(name, names)
        if proj == "up_proj":  # written with its gate
            continue
        if proj == "gate_proj":
            array = np.concatenate([array, stacks[name.replace(".gate_proj.", ".up_proj.")]], axis=1)
        out[f"{experts}.{stored}"] = np.ascontiguousarray(array.transpose(0, 2, 1) if inputs_first else array)
    return out


def mlx_lm_tensors(stacks: dict[str, np.ndarray], stack: str = "switch_mlp") -> dict[str, np.ndarray]:
    """Float tensors as the model names them stored where mlx-lm's layout stores them (:func:`mlx_lm_name`)."""
    return {mlx_lm_name(name, stack): array for name, array in stacks.items()}


class _StoredOneWay:
    """This module's layout for a family whose fused stacks are only ever stored one way, ``stored_as``
    ("inputs_first" or "outputs_first"), told apart by name alone, so that a hidden size equal to a stack's other
    side is no ambiguity, under the family's ``stacks`` names in ``M.experts`` (gate and up, down)."""

    checkpoint_module = staticmethod(checkpoint_module)
    mlx_lm_name = staticmethod(mlx_lm_name)

    def __init__(self, stored_as: str, stacks: tuple[str, str] = _STACKS):
        self.stored_as, self.stacks = stored_as, stacks

    def parts(self, present: set[str], name: str, packed_kinds: tuple[str, ...], stack: str = "switch_mlp"
              ) -> tuple[str, ...]:
        return parts(present, name, packed_kinds, stack, self.stacks)

    def converts(self, part: str) -> bool:
        return converts(part, self.stacks)

    def stored_shapes(self, name: str, part: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        shapes = stored_shapes(name, part, shape, self.stacks)
        return shapes if len(shapes) == 1 else shapes[self.stored_as == "outputs_first"],

    def convert(self, name: str, got: dict[str, np.ndarray], shape: tuple[int, ...], where: str) -> tuple:
        return convert(name, got, shape, where, self.stored_as, self.stacks)

    def hugging_face_tensors(self, stacks: dict[str, np.ndarray], inputs_first: bool = False
                             ) -> dict[str, np.ndarray]:
        return hugging_face_tensors(stacks, self.stored_as == "inputs_first", self.stacks)

    @staticmethod
    def mlx_lm_tensors(stacks: dict[str, np.ndarray], stack: str = "switch_mlp") -> dict[str, np.ndarray]:
        return mlx_lm_tensors(stacks, stack)


#: ``MoeSpec.layout`` "fused_outputs_first" (:data:`ferrum.moe.loading.LAYOUTS`): Mistral 4's (transformers 5's
#: ``Mistral4Experts`` holds them so, mlx-lm's ``sanitize`` splits them so).
OUTPUTS_FIRST = _StoredOneWay("outputs_first")
#: ``MoeSpec.layout`` "aria": Aria's ``experts.fc1.weight [E, hidden, 2 * inter]`` and ``experts.fc2.weight
#: [E, inter, hidden]`` (transformers' ``AriaExperts``, ``is_transposed``: only ever inputs first).
ARIA = _StoredOneWay("inputs_first", ("fc1.weight", "fc2.weight"))
