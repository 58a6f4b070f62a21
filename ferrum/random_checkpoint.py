"""Random-weight Hugging Face checkpoints of any family in :data:`ferrum.arch.families.FAMILIES`.

Benchmarks use them at realistic sizes and the plugin conformance kit at
tiny ones, so neither needs a download. The folder is an ordinary
checkpoint (``config.json`` in the v4 style that transformers, mlx-lm and
Ferrum all read, plus ``model.safetensors``), written atomically. Mixture-of-experts
layers are written one matrix per expert, the Hugging Face layout all three read
(see :mod:`ferrum.moe.loading`), except a family with layouts of its own (gpt-oss, Qwen3-VL-MoE,
Llama 4), written as mlx-lm stores it or, for transformers, as transformers does (neither reads the other's;
mlx-lm reads Llama 4 only as the ``llama4`` wrapper, so a ``llama4_text`` config is for transformers' layout); for
transformers, LongCat-Flash's zero experts' gate and up rows too, which its expert stack holds and mlx-lm refuses.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ferrum.arch.kv_quant import is_step
from ferrum.arch.norms import norm_offset
from ferrum.arch.tensors import model_name
from ferrum.config import ModelConfig
from ferrum.errors import InvalidRequestError
from ferrum.moe.loading import LAYOUTS, SWITCH, is_expert_stack, per_expert_names
from ferrum.moe.spec import MoeSpec
from ferrum.moe.zero import SAVED_BY_TRANSFORMERS
from ferrum.model import weight_shapes
from ferrum.weights import split_norm_parts

_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
#: How a family with expert layouts of its own (:data:`ferrum.moe.loading.LAYOUTS`) is written.
EXPERT_LAYOUTS = ("mlx-lm", "transformers")
#: AFM's key / value quantization steps are drawn as ``exp(N(0, STEP_SPREAD))``: positive and near mlx-lm's initial
#: 1.0 whatever the weights' std (a step near zero or below it makes the int8 grid degenerate).
STEP_SPREAD = 0.1


def has_own_expert_layout(config: dict) -> bool:
    """Whether ``write_random_checkpoint``'s ``expert_layout`` changes what it writes for ``config``."""
    moe = ModelConfig.from_dict({"rms_norm_eps": 1e-6, **config}).arch.moe
    return moe is not None and (moe.layout is not None or moe.zero_experts > 0)


def _zero_experts_rows(moe: MoeSpec, name: str, shape: tuple[int, ...], dtype: str) -> dict[str, np.ndarray]:
    """The zero experts' rows transformers saves beside the routed experts' (LongCat-Flash's gate and up, never run):
    zeros, so that its model reads every tensor it holds."""
    if not moe.zero_experts or name.removesuffix(".weight").rsplit(".", 1)[1] not in SAVED_BY_TRANSFORMERS:
        return {}
    names = per_expert_names(replace(moe, num_experts=moe.scored), name)[moe.num_experts:]
    return {n: np.zeros(shape[1:], dtype=_STORAGE[dtype]) for n in names}


def write_random_checkpoint(
    folder: Path,
    config: dict,
    dtype: str = "bfloat16",
    std: float = 0.02,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    expert_layout: str = "mlx-lm",
) -> Path:
    """Write ``config`` with normal(0, ``std``) weights (norms scaling by about 1) into ``folder``;
    ``expert_layout`` (one of :data:`EXPERT_LAYOUTS`) matters only to a family with layouts of its own."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise InvalidRequestError(f"expert_layout must be one of {EXPERT_LAYOUTS}, not {expert_layout!r}")
    full = {"rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, **config, "torch_dtype": dtype}
    model_config = ModelConfig.from_dict(full)
    shapes = weight_shapes(model_config)
    moe = model_config.arch.moe
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "config.json").write_text(json.dumps(full, indent=2))
    tensors, own_layout = {}, {}
    for done, (name, shape) in enumerate(shapes.items(), start=1):
        array = np.asarray(rng.standard_normal(shape, dtype=np.float32) * std)  # a 0-d one an array too (AFM's steps)
        if name.endswith("norm.weight"):  # scaling by about 1 once its offset is added (Gemma's by 1 + w)
            array += 1.0 - norm_offset(model_config.arch, model_name(model_config.arch, name))
        elif is_step(model_name(model_config.arch, name)):
            array = np.asarray(np.exp(STEP_SPREAD * rng.standard_normal(shape, dtype=np.float32)))
        if moe is not None and moe.layout is not None and is_expert_stack(name):  # a family's own layout
            own_layout[name] = array.astype(_STORAGE[dtype])
        elif len(shape) == 3 and is_expert_stack(name) and moe.stacked is not None:  # Granite's input/output_linear
            module, proj = name.removesuffix(".weight").split(".switch_mlp.")
            stacked = f"{module}.{moe.stacked[SWITCH.index(proj)]}.weight"  # gate's rows, then up's (listed first)
            part = array.astype(_STORAGE[dtype])
            tensors[stacked] = np.concatenate([tensors[stacked], part], axis=1) if stacked in tensors else part
        elif is_expert_stack(name) and (len(shape) == 3 or name.endswith(".bias")):  # the experts' weights or biases
            tensors.update(zip(per_expert_names(moe, name), array.astype(_STORAGE[dtype])))
            if expert_layout == "transformers":
                tensors.update(_zero_experts_rows(moe, name, shape, dtype))
        elif heads := split_norm_parts(model_config, name):  # a norm a head, each its own tensor (StableLM 2 12B)
            tensors.update(zip(heads, array.astype(_STORAGE[dtype])))
        else:
            tensors[name] = array.astype(_STORAGE[dtype])
        if progress is not None:
            progress(done, len(shapes), name)
    if own_layout:
        layout = LAYOUTS[moe.layout]
        transformers = expert_layout == "transformers"
        tensors.update(layout.hugging_face_tensors(own_layout, moe.fused_inputs_first) if transformers else
                       layout.mlx_lm_tensors(own_layout, moe.mlx_lm_stack))
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
