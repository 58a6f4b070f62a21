"""Random checkpoints of model types only mlx-lm runs (their releases ship remote code), shared by their family tests.

mlx-lm's own Model is built from the config and given random values, which are written under the release's names
(``rename``: mlx-lm's name -> the release's, the inverse of its ``sanitize``); mlx-lm's ``load_model`` of that folder
must give the in-memory model's logits, so the naming is proven, not assumed. The in-memory model is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from support import mlx_lm_logits, runnable_backends, scaled_error


def backends() -> list:
    """The built-in backends that run here, and the JAX plugin where it is installed (slow: its compiles)."""
    import pytest

    from ferrum import backends as found

    return runnable_backends() + [pytest.param(e.name, marks=pytest.mark.slow) for e in found.available()
                                  if e.available and e.name == "jax"]


def mlx_lm_model(config: dict):
    """mlx-lm's Model for ``config``, float32, its parameters random: matrices scaled by their fan-in so activations
    stay O(1), biases and norm weights spread around 0 and 1 so that each matters, embeddings of unit spread."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    rng = np.random.default_rng(0)
    values = []
    for name, param in tree_flatten(model.parameters()):
        shape = param.shape
        if "norm" in name or name.split(".")[-2].startswith("ln_"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.2 * rng.standard_normal(shape)
        elif "embed" in name or "wte" in name:
            value = rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[-1])
        values.append((name, mx.array(value.astype(np.float32))))
    model.update(tree_unflatten(values))
    return model


def write_release(folder: Path, config: dict, rename: Callable[[str], str | None] = lambda name: name,
                  extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """``folder`` holding ``config`` and :func:`mlx_lm_model`'s values under the release's names (``rename``; None:
    not stored), plus ``extra`` tensors (what the release stores that mlx-lm's sanitize drops). Returns the model's
    logits over :data:`TOKENS`, checked to be what mlx-lm's ``load_model`` of the folder computes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    model = mlx_lm_model(config)
    tensors = {rename(name): np.array(value) for name, value in tree_flatten(model.parameters())}
    tensors = {name: value for name, value in tensors.items() if name is not None}
    save_file({**tensors, **(extra or {})}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    want = np.array(model(mx.array([TOKENS])).astype(mx.float32))[0]
    assert scaled_error(mlx_lm_logits(folder, TOKENS), want) < 1e-6, "mlx-lm loads another model from the release"
    return want


VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


class MlxLmGreedy:
    """mlx-lm's greedy tokens, from its full forward at each step, as :func:`support.assert_engine_keeps_greedy_tokens`
    asks transformers' ``generate`` for them."""

    def __init__(self, folder: Path):
        from mlx_lm.utils import load_model

        loaded = load_model(folder)
        self.model = loaded[0] if isinstance(loaded, tuple) else loaded

    def generate(self, input_ids, max_new_tokens: int, do_sample: bool = False):
        import mlx.core as mx
        import torch

        ids = input_ids[0].tolist()
        for _ in range(max_new_tokens):
            ids.append(int(np.argmax(np.array(self.model(mx.array([ids])).astype(mx.float32))[0, -1])))
        return torch.tensor([ids])
