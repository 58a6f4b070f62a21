"""Checkpoints of model types only mlx-lm runs (their releases ship remote code; transformers has no class for them).

mlx-lm's own Model of the config is given random parameters (:func:`random_mlx_lm_model`) and written under the
release's names (:func:`write_release`: mlx-lm's ``sanitize`` inverted), and mlx-lm's ``load_model`` of the folder
must reproduce the model in memory, so the naming is proven, not assumed. The model in memory is the reference:
its logits (:func:`model_logits`), and :class:`MlxLmReference` where the checks in support.py call transformers'
model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from support import mlx_lm_logits, runnable_backends, scaled_error, write_tokenizer

#: A parameter's values from its name, shape and the model's generator; None: :func:`fan_in`'s draw.
Draw = Callable[[str, tuple[int, ...], np.random.Generator], "np.ndarray | None"]
#: mlx-lm's tensors (name -> values) -> the release's.
AsReleased = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def fan_in(gain: float = 1.0) -> Draw:
    """Activations of O(1) with every vector counting: norm weights ``1 + N(0, 0.2)``, biases ``N(0, 0.2)``,
    embeddings ``N(0, 1)``, the rest ``N(0, gain / sqrt(fan-in))`` (the last axis's size: a stack of experts' too)."""
    def draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        parts = name.split(".")
        if "norm" in name or (len(parts) > 1 and parts[-2].startswith("ln_")):
            return 1.0 + 0.2 * rng.standard_normal(shape)
        if name.endswith(".bias"):
            return 0.2 * rng.standard_normal(shape)
        if "embed" in name or "wte" in name:
            return rng.standard_normal(shape)
        return rng.standard_normal(shape) * gain / np.sqrt(shape[-1])
    return draw


def normal(std: float = 0.2, norms: tuple[str, ...] = ("norm", "ln."), stds: dict[str, float] | None = None) -> Draw:
    """Every parameter ``N(0, std)`` (far from uniform logits, every path counting), those whose name holds one of
    ``norms`` ``N(1, 0.1)`` (a norm's weight neither zeroes nor flips its output), those whose name holds a key of
    ``stds`` ``N(0, its value)`` (e.g. a correction bias large enough to change which experts are chosen)."""
    def draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        own = next((value for part, value in (stds or {}).items() if part in name), None)
        norm = own is None and any(n in name for n in norms)
        spread = own if own is not None else 0.1 if norm else std
        return float(norm) + rng.standard_normal(shape) * spread
    return draw


def random_mlx_lm_model(config: dict, seed: int = 0, draw: Draw | None = None) -> Any:
    """mlx-lm's Model of ``config`` (its ``model_type``'s module), float32, each parameter in order drawn by ``draw``
    from ``np.random.default_rng(seed)`` (:func:`fan_in`'s draw where ``draw`` gives None)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    rng, default = np.random.default_rng(seed), fan_in()
    drawn = []
    for name, param in tree_flatten(model.parameters()):
        shape = tuple(param.shape)
        values = draw(name, shape, rng) if draw is not None else None
        values = default(name, shape, rng) if values is None else values
        drawn.append((name, mx.array(np.asarray(values, dtype=np.float32))))
    model.update(tree_unflatten(drawn))
    mx.eval(model.parameters())
    return model


def parameters(model: Any) -> dict[str, np.ndarray]:
    """mlx-lm ``model``'s parameters by mlx-lm's names, as numpy arrays."""
    from mlx.utils import tree_flatten

    return {name: np.array(value) for name, value in tree_flatten(model.parameters())}


def model_logits(model: Any, tokens) -> np.ndarray:
    """An mlx-lm model's float32 logits over ``tokens``, ``[len(tokens), vocab]``."""
    import mlx.core as mx

    return np.array(model(mx.array([[int(t) for t in tokens]])).astype(mx.float32))[0]


def renamed(rename: Callable[[str], str | None]) -> AsReleased:
    """The :data:`AsReleased` of a rename of each name (mlx-lm's -> the release's; None: not stored)."""
    def as_released(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {rename(name): value for name, value in tensors.items()}
        return {name: value for name, value in out.items() if name is not None}
    return as_released


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


def write_release(folder: Path, model: Any, config: dict, tokens, as_released: AsReleased | None = None,
                  extra: dict[str, np.ndarray] | None = None, vocab: int | None = None,
                  tolerance: float = 0.0) -> np.ndarray:
    """Write mlx-lm's ``model`` to ``folder`` as its release stores it: its parameters through ``as_released``
    (mlx-lm's ``sanitize`` inverted), ``extra`` tensors beside (or over) them (what the release stores that
    sanitize drops), ``config`` as config.json and a tokenizer of ``vocab`` tokens (the config's vocab_size). Then
    check that mlx-lm's ``load_model`` of the folder gives the model's logits over ``tokens`` (within ``tolerance``,
    scaled: exactly by default), so the inverse naming is proven; returns those logits."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {**(as_released or (lambda t: t))(parameters(model)), **(extra or {})}
    save_file({name: np.array(value, order="C") for name, value in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, vocab or config["vocab_size"])
    # named, as releases name it: else transformers' AutoTokenizer (in mlx-lm's convert) builds a config of the
    # unknown model_type, whose validators refuse layer kinds of its own (Gear's conv_mixer)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config,
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    want = model_logits(model, tokens)
    error = scaled_error(mlx_lm_logits(folder, tokens), want)
    assert error <= tolerance, f"mlx-lm loads another model from the release ({error})"
    return want


class MlxLmReference:
    """mlx-lm's ``model`` where the checks in support.py call transformers' model: called on one prompt, its logits
    (``.logits``, ``[1, len, vocab]``); ``generate``, its greedy tokens, each the argmax of a whole forward pass
    over the tokens so far (so no cache of mlx-lm's is trusted)."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, input_ids: Any) -> Any:
        import torch

        return SimpleNamespace(logits=torch.from_numpy(model_logits(self.model, input_ids[0].tolist())[None]))

    def generate(self, input_ids: Any, max_new_tokens: int, do_sample: bool = False) -> Any:
        import torch

        assert not do_sample
        tokens = [int(t) for t in input_ids[0]]
        for _ in range(max_new_tokens):
            tokens.append(int(np.argmax(model_logits(self.model, tokens)[-1])))
        return torch.tensor([tokens])


def with_zeroed(model: Any, part: str) -> Any:
    """A copy of mlx-lm's ``model`` with every parameter whose name holds ``part`` zeroed (a control's model)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    copy = type(model)(model.args)
    copy.update(tree_unflatten([(name, mx.zeros_like(value) if part in name else value)
                                for name, value in tree_flatten(model.parameters())]))
    return copy


def backends() -> list:
    """The runnable backends, and the JAX plugin where installed (marked slow: it compiles each shape)."""
    import pytest

    from ferrum import backends as found

    return runnable_backends() + [pytest.param(e.name, marks=pytest.mark.slow) for e in found.available()
                                  if e.available and e.name == "jax"]


def assert_conversion_runs_as_mlx_lm(folder: Path, reference: Any, dest: Path, tokens, bits: int | None,
                                     group: int = 32) -> dict:
    """mlx-lm's conversion of release ``folder`` (packed at ``bits`` in groups of ``group`` where given) written to
    ``dest`` runs on every backend as mlx-lm runs it (within 1e-4, or 2e-3 packed), the plain one as mlx-lm runs the
    release (``reference``, its in-memory model); its stored tensors, for the caller's checks of its names."""
    from support import assert_every_backend_runs_it_as_mlx_lm, mlx_lm_converted

    stored, want = mlx_lm_converted(folder, dest, tokens, bits, group)
    if bits is None:
        assert scaled_error(want, model_logits(reference, tokens)) <= 1e-4
    assert_every_backend_runs_it_as_mlx_lm(dest, tokens, want, packed=bits is not None)
    return stored


def assert_engine_keeps_mlx_lm_greedy_tokens(folder: Path, reference: Any, vocab: int) -> None:
    """Alone, staggered with chunked prefills and under preemption, each request of a staggered workload gets the
    same greedy tokens from the engine (cpu, float32), the first mlx-lm's (``reference``)."""
    from functools import partial

    from support import assert_engine_keeps_greedy_tokens, small_pool_engine, staggered_greedy_workload

    assert_engine_keeps_greedy_tokens(partial(small_pool_engine, folder), MlxLmReference(reference),
                                      staggered_greedy_workload(vocab))


def assert_copied_release_converts_as_mlx_lm(folder: Path, tmp_path: Path, tokens, bits: int | None,
                                             config: dict) -> None:
    """mlx-lm's conversion of a copy of release ``folder`` (a copy in ``tmp_path``, so the module's shared release
    stays as written; packed at ``bits`` in groups of 32 where given) to ``tmp_path / "mlx"`` keeps the ``config``
    keys and values given and runs on every backend as mlx-lm runs it."""
    import shutil

    from support import assert_every_backend_runs_it_as_mlx_lm, mlx_lm_converted

    source = tmp_path / "release"
    shutil.copytree(folder, source)
    _, want = mlx_lm_converted(source, tmp_path / "mlx", tokens, bits=bits, group=32)
    converted = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert {key: converted[key] for key in config} == config
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", tokens, want, packed=bits is not None)


def assert_dropping_moves_mlx_lm_logits(folder: Path, reference: Any, tokens, changes: Callable[[Any], dict],
                                        monkeypatch: Any, least: float) -> None:
    """Loaded with its Architecture's fields replaced by ``changes(arch)`` (a feature dropped), release ``folder``'s
    float32 logits on cpu are further than ``least`` from mlx-lm's ``reference`` model's: the control that shows
    the feature counts."""
    from dataclasses import replace

    from ferrum.config import ModelConfig
    from support import float32_model

    read = ModelConfig.from_file

    def without(path):
        config = read(path)
        return replace(config, arch=replace(config.arch, **changes(config.arch)))

    monkeypatch.setattr(ModelConfig, "from_file", staticmethod(without))
    assert scaled_error(float32_model(folder).forward_verify("c", tokens), model_logits(reference, tokens)) > least
