"""Checkpoints of model types transformers has no class for (their releases ship remote code; mlx-lm runs them):
mlx-lm's own model given random weights, written under the release's names (mlx-lm's ``sanitize`` inverted) and
proven to be what mlx-lm loads back from them; and a greedy generator over it for the engine checks, where those ask
transformers' ``generate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from support import mlx_lm_logits, write_tokenizer


def random_mlx_lm_model(config: dict, seed: int = 0, std: float = 0.2, norms: tuple[str, ...] = ("norm", "ln."),
                        stds: dict[str, float] | None = None):
    """mlx-lm's model of ``config`` in float32, every parameter drawn from N(0, ``std``) (far from uniform logits,
    every path counting), those whose name holds one of ``norms`` from N(1, 0.1) (so that a norm's weight neither
    zeroes nor flips its output), those whose name holds a key of ``stds`` from N(0, its value) (a correction bias
    large enough to change which experts are chosen)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    rng, stds = np.random.default_rng(seed), stds or {}

    def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
        own = next((value for part, value in stds.items() if part in name), None)
        norm = own is None and any(n in name for n in norms)
        spread = own if own is not None else 0.1 if norm else std
        return (float(norm) + rng.standard_normal(shape) * spread).astype(np.float32)

    drawn = [(name, mx.array(draw(name, value.shape))) for name, value in tree_flatten(model.parameters())]
    model.update(tree_unflatten(drawn))
    mx.eval(model.parameters())
    return model


def model_logits(model, tokens) -> np.ndarray:
    """``model``'s (an mlx-lm model) float32 logits over ``tokens``, ``[len(tokens), vocab]``."""
    import mlx.core as mx

    return np.array(model(mx.array([list(tokens)])).astype(mx.float32))[0]


def with_zeroed(model, part: str):
    """A copy of mlx-lm's ``model`` with every parameter whose name holds ``part`` zeroed (a control's model)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    copy = type(model)(model.args)
    copy.update(tree_unflatten([(name, mx.zeros_like(value) if part in name else value)
                                for name, value in tree_flatten(model.parameters())]))
    return copy


def unstacked(tensors: dict[str, np.ndarray], stack: str, experts: str) -> dict[str, np.ndarray]:
    """``tensors`` with each stack of experts ``<layer>.<stack>.<name>`` (``[E, ...]``: mlx-lm's SwitchGLU's) split
    into one tensor per expert, ``<layer>.<experts>.<e>.<name>``, as releases store them."""
    out = {}
    for name, value in tensors.items():
        if f".{stack}." not in name:
            out[name] = value
            continue
        head, tail = name.split(f".{stack}.")
        out.update({f"{head}.{experts}.{e}.{tail}": value[e] for e in range(value.shape[0])})
    return out


def write_release(folder: Path, model, config: dict, release_names: Callable[[dict], dict], tokens,
                  vocab: int) -> Path:
    """Write ``model`` (mlx-lm's) to ``folder`` as its release stores it: its parameters through ``release_names``
    (mlx-lm's names -> the release's), config.json and a tokenizer of ``vocab`` ids; then check that mlx-lm's
    ``load_model`` of the folder (its sanitize renaming the release's names) gives the in-memory model's logits
    over ``tokens`` exactly, so the inverse naming is proven, not assumed."""
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = release_names({name: np.array(value) for name, value in tree_flatten(model.parameters())})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, vocab)
    np.testing.assert_array_equal(mlx_lm_logits(folder, tokens), model_logits(model, tokens))
    return folder


class GreedyMlxLm:
    """mlx-lm's ``model`` with the ``generate`` the engine checks (``assert_engine_keeps_greedy_tokens``) call on a
    transformers model: greedy tokens, each from a whole forward pass over what came before."""

    def __init__(self, model):
        self.model = model

    def generate(self, ids, max_new_tokens: int, do_sample: bool = False):
        import torch

        assert not do_sample
        tokens = ids[0].tolist()
        for _ in range(max_new_tokens):
            tokens.append(int(np.argmax(model_logits(self.model, tokens)[-1])))
        return torch.tensor([tokens])


def assert_conversion_runs_as_mlx_lm(folder: Path, reference, dest: Path, tokens, bits: int | None,
                                     group: int = 32) -> dict:
    """mlx-lm's conversion of release ``folder`` (packed at ``bits`` in groups of ``group`` where given) written to
    ``dest`` runs on every backend as mlx-lm runs it (within 1e-4, or 2e-3 packed), the plain one as mlx-lm runs the
    release (``reference``, its in-memory model); its stored tensors, for the caller's checks of its names."""
    from support import assert_every_backend_runs_it_as_mlx_lm, mlx_lm_converted, scaled_error

    stored, want = mlx_lm_converted(folder, dest, tokens, bits, group)
    if bits is None:
        assert scaled_error(want, model_logits(reference, tokens)) <= 1e-4
    assert_every_backend_runs_it_as_mlx_lm(dest, tokens, want, packed=bits is not None)
    return stored


def assert_engine_keeps_mlx_lm_greedy_tokens(folder: Path, reference, vocab: int) -> None:
    """Alone, staggered with chunked prefills and under preemption, each request of a staggered workload gets the
    same greedy tokens from the engine (cpu, float32), the first mlx-lm's (``reference``)."""
    from functools import partial

    from support import assert_engine_keeps_greedy_tokens, small_pool_engine, staggered_greedy_workload

    assert_engine_keeps_greedy_tokens(partial(small_pool_engine, folder), GreedyMlxLm(reference),
                                      staggered_greedy_workload(vocab))
