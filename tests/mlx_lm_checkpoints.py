"""Random checkpoints of the model types only mlx-lm runs (their releases ship remote code transformers lacks): mlx-lm's
own model built from a config, its parameters drawn, written under the release's names, and mlx-lm's greedy
generation standing in for transformers' where the family tests want it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from support import write_tokenizer

#: A parameter's name -> its values of that shape, or None for the default draw (see :func:`random_mlx_lm_model`).
Draw = Callable[[str, tuple[int, ...], np.random.RandomState], "np.ndarray | None"]


def random_mlx_lm_model(module: Any, config: dict, seed: int = 0, draw: Draw | None = None) -> Any:
    """mlx-lm's ``module.Model`` of ``config`` with float32 parameters drawn from ``seed``: ``draw``'s where it
    gives them, else matrices ``N(0, 1 / fan_in)`` (embeddings ``N(0, 1)``) and vectors ``1 + U(-0.3, 0.3)``, so
    that activations stay O(1) and every vector counts."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.RandomState(seed)
    drawn = []
    for name, param in tree_flatten(model.parameters()):
        shape = tuple(param.shape)
        values = draw(name, shape, rng) if draw is not None else None
        if values is None and "embed" in name:
            values = rng.normal(0.0, 1.0, shape)
        elif values is None and len(shape) >= 2:
            values = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
        elif values is None:
            values = 1.0 + rng.uniform(-0.3, 0.3, shape)
        drawn.append((name, mx.array(np.asarray(values, dtype=np.float32))))
    model.update(tree_unflatten(drawn))
    mx.eval(model.parameters())
    return model


def write_release(folder: Path, model: Any, config: dict, stored: Callable[[str, np.ndarray], np.ndarray],
                  vocab: int) -> Path:
    """``model``'s parameters saved as a release stores them (``stored(name, values)``: mlx-lm's ``sanitize`` the
    other way round), with ``config`` and a tokenizer of ``vocab`` tokens."""
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(stored(name, np.array(p))) for name, p in tree_flatten(model.parameters())}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, vocab)
    return folder


def logits_of(model: Any, tokens: list[int]) -> np.ndarray:
    """An mlx-lm model's float32 logits over ``tokens``, ``[len(tokens), vocab]``."""
    import mlx.core as mx

    return np.array(model(mx.array([tokens])).astype(mx.float32))[0]


class MlxLmReference:
    """mlx-lm's model where the family checks (tests/support.py) call transformers' model: its logits (``logits``
    of a call on one prompt) and greedy ``generate``, each step over the whole sequence again, so no cache of
    mlx-lm's is trusted."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, input_ids: Any) -> Any:
        import torch

        return SimpleNamespace(logits=torch.from_numpy(logits_of(self.model, [int(t) for t in input_ids[0]])[None]))

    def generate(self, prompt: Any, max_new_tokens: int, do_sample: bool = False) -> Any:
        import torch

        tokens = [int(t) for t in prompt[0]]
        for _ in range(max_new_tokens):
            tokens.append(int(np.argmax(logits_of(self.model, tokens)[-1])))
        return torch.tensor([tokens])
