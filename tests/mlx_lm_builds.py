"""Random checkpoints of model types only mlx-lm runs (their releases ship remote code transformers lacks): mlx-lm's
own Model given random parameters, saved under the release's names, proven to be what mlx-lm loads back."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from support import mlx_lm_logits, scaled_error, write_tokenizer


def randomized(model, draw: Callable[[str, tuple], np.ndarray]):
    """``model`` (an mlx-lm Model) with every parameter ``draw(name, shape)``, float32."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model.load_weights([(name, mx.array(draw(name, tuple(value.shape)).astype(np.float32)))
                        for name, value in tree_flatten(model.parameters())])
    return model


def logits(model, tokens) -> np.ndarray:
    """An in-memory mlx-lm model's float32 logits over ``tokens``."""
    import mlx.core as mx

    return np.array(model(mx.array([list(tokens)])).astype(mx.float32))[0]


def save_release(model, folder: Path, config: dict, tokens, release_name: Callable[[str], str] = lambda n: n,
                 extra: dict | None = None, vocab: int | None = None) -> np.ndarray:
    """``model``'s parameters saved in ``folder`` under the release's names (``release_name`` of mlx-lm's: the
    inverse of its ``sanitize``), with ``extra`` tensors beside them and ``config`` as config.json; asserts that
    mlx-lm's ``load_model`` of the folder is the model in memory, so the inverse naming is proven, and returns the
    logits over ``tokens``."""
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {release_name(name): np.array(value) for name, value in tree_flatten(model.parameters())}
    save_file({**tensors, **(extra or {})}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, vocab or config["vocab_size"])
    # named, as releases name it: else transformers' AutoTokenizer (in mlx-lm's convert) builds a config of the
    # unknown model_type, whose validators refuse layer kinds of its own (Gear's conv_mixer)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config,
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    want = logits(model, tokens)
    assert scaled_error(mlx_lm_logits(folder, tokens), want) < 1e-6
    return want


class MlxLmAsTransformers:
    """The ``hf`` of the support helpers (:func:`support.reference_logits`, :func:`support.
    assert_engine_keeps_greedy_tokens`...) for a model only mlx-lm runs: called, its logits over the tokens; its
    ``generate``, its greedy tokens, each the argmax of a full pass over the tokens so far."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids):
        import torch

        return SimpleNamespace(logits=torch.tensor(logits(self.model, [int(t) for t in ids[0]])[None]))

    def generate(self, ids, max_new_tokens: int, do_sample: bool = False):
        import torch

        tokens = [int(t) for t in ids[0]]
        for _ in range(max_new_tokens):
            tokens.append(int(np.argmax(logits(self.model, tokens)[-1])))
        return torch.tensor([tokens])
