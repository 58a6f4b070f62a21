"""Gated DeltaNet files (``qwen35``, ``qwen35moe``, ``qwen3next``) back into transformers' Qwen3.5 layout.

llama.cpp's converter changes these layers' tensors, and the import undoes each change:

* ``A_log`` is stored as ``ssm_a = -exp(A_log)``: taken back as ``log(-ssm_a)``;
* ``dt_bias`` is ``ssm_dt.bias``, the convolution's ``[C, 1, K]`` weight squeezed to ``[C, K]``;
* every norm weight but the Gated DeltaNet's own is stored as ``1 + w`` (``_Architecture.norm_offset``);
* for Qwen3.5 with fewer key heads than value heads, every value-head-indexed tensor (the v rows of
  ``in_proj_qkv``, the convolution's v channels, ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a``'s rows, ``A_log``,
  ``dt_bias`` and ``out_proj``'s columns) has its heads reordered from grouped by key head ``(k, r)`` to tiled
  ``(r, k)`` for ggml's broadcast: :func:`untile` reorders them back;
* Qwen3-Next's grouped ``in_proj_qkvz`` is stored as Qwen3.5's ``attn_qkv`` and ``attn_gate`` (older files keep it
  whole as ``ssm_in``), its ``in_proj_ba`` as ``ssm_ba``, still grouped per key head: both are cut into Qwen3.5's
  four projections. llama.cpp runs a Qwen3-Next file as Qwen3.5-MoE runs (every layer sparse, top-k weights
  renormalised), so it is imported as one;
* newer converters may fuse the experts' gate and up stacks into ``ffn_gate_up_exps``: cut apart again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, prediction_blocks

#: The Gated DeltaNet's module in a layer.
_M = "linear_attn"


@dataclass(frozen=True)
class Restored:
    """One Hugging Face tensor made from one GGUF block tensor: its name within the layer, the source rows it takes
    in order (``None``: all, as stored), the order of its equal column groups, and a float-only value restore."""

    name: str
    rows: np.ndarray | None = None
    columns: np.ndarray | None = None
    restore: Callable[[np.ndarray, str], np.ndarray] | None = None


def fused_gate_up(rest: str, cfg: dict[str, Any], module: str = "",
                  count_key: str = "num_experts") -> tuple[Restored, ...] | None:
    """A fused expert stack ``ffn_gate_up_exps [E, 2I, H]`` (each expert's I gate rows, then its I up rows: Gemma 4's
    always, Qwen3.5-MoE's and Qwen3-Next's where a newer converter fused them, Mistral 4's as transformers stores
    them) as the gate stack and the up stack; whole rows move, so packed blocks stay exact. ``module``: the sparse
    MLP's, where it is not the layer itself; ``count_key``: the config's expert count."""
    if rest != "ffn_gate_up_exps.weight":
        return None
    count = cfg[count_key]
    rows = np.arange(count * 2 * cfg["moe_intermediate_size"]).reshape(count, 2, -1)
    return (Restored(f"{module}switch_mlp.gate_proj.weight", rows[:, 0].ravel()),
            Restored(f"{module}switch_mlp.up_proj.weight", rows[:, 1].ravel()))


def untile(heads_k: int, per_k: int, width: int) -> np.ndarray:
    """The stored rows, in Hugging Face's order, of ``heads_k * per_k`` value heads of ``width`` rows each that the
    converter reordered from grouped ``(k, r)`` to tiled ``(r, k)``."""
    return np.arange(heads_k * per_k * width).reshape(per_k, heads_k, width).transpose(1, 0, 2).reshape(-1)


def a_log(ssm_a: np.ndarray, name: str) -> np.ndarray:
    """``A_log`` from the stored ``-exp(A_log)``, which is negative wherever the file is sound."""
    if not (ssm_a < 0).all():
        raise CheckpointError(f"tensor {name} holds values >= 0; llama.cpp stores -exp(A_log) there, always negative")
    return np.log(-ssm_a.astype(np.float32))


@dataclass(frozen=True)
class _Sizes:
    heads_k: int
    heads_v: int
    dk: int
    dv: int

    @property
    def per_k(self) -> int:
        return self.heads_v // self.heads_k


def _sizes(cfg: dict[str, Any]) -> _Sizes:
    return _Sizes(cfg["linear_num_key_heads"], cfg["linear_num_value_heads"], cfg["linear_key_head_dim"],
                  cfg["linear_value_head_dim"])


def _qwen35_tensors(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
    """Qwen3.5's Gated DeltaNet tensors, value heads untiled where there are fewer key heads."""
    s = _sizes(cfg)
    keys = 2 * s.heads_k * s.dk
    tiled = s.heads_k != s.heads_v

    def heads(width: int) -> np.ndarray | None:
        return untile(s.heads_k, s.per_k, width) if tiled else None

    qkv = np.concatenate([np.arange(keys), keys + untile(s.heads_k, s.per_k, s.dv)]) if tiled else None
    table = {
        "attn_qkv.weight": Restored(f"{_M}.in_proj_qkv.weight", qkv),
        "attn_gate.weight": Restored(f"{_M}.in_proj_z.weight", heads(s.dv)),
        "ssm_beta.weight": Restored(f"{_M}.in_proj_b.weight", heads(1)),
        "ssm_alpha.weight": Restored(f"{_M}.in_proj_a.weight", heads(1)),
        "ssm_conv1d.weight": Restored(f"{_M}.conv1d.weight", qkv),
        "ssm_a": Restored(f"{_M}.A_log", heads(1), restore=a_log),
        "ssm_dt.bias": Restored(f"{_M}.dt_bias", heads(1)),
        "ssm_out.weight": Restored(f"{_M}.out_proj.weight", columns=heads(1)),
        **_COMMON,
    }
    found = table.get(rest)
    return fused_gate_up(rest, cfg, "mlp.") if found is None else (found,)


def _qwen3next_tensors(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
    """Qwen3-Next's: grouped per key head, as the checkpoint has them; ``ssm_ba`` (and an older file's ``ssm_in``,
    the whole ``in_proj_qkvz``) cut into Qwen3.5's separate projections."""
    s = _sizes(cfg)
    if rest == "ssm_ba.weight":  # per key head: b (r rows), a (r rows)
        rows = np.arange(2 * s.heads_v).reshape(s.heads_k, 2 * s.per_k)
        return (Restored(f"{_M}.in_proj_b.weight", rows[:, :s.per_k].ravel()),
                Restored(f"{_M}.in_proj_a.weight", rows[:, s.per_k:].ravel()))
    if rest == "ssm_in.weight":  # per key head: q (dk), k (dk), v (r * dv), z (r * dv)
        v = s.per_k * s.dv
        rows = np.arange(s.heads_k * (2 * s.dk + 2 * v)).reshape(s.heads_k, -1)
        qkv = np.concatenate([rows[:, :s.dk].ravel(), rows[:, s.dk:2 * s.dk].ravel(),
                              rows[:, 2 * s.dk:2 * s.dk + v].ravel()])
        return (Restored(f"{_M}.in_proj_qkv.weight", qkv), Restored(f"{_M}.in_proj_z.weight",
                                                                     rows[:, 2 * s.dk + v:].ravel()))
    found = {"attn_qkv.weight": Restored(f"{_M}.in_proj_qkv.weight"),
             "attn_gate.weight": Restored(f"{_M}.in_proj_z.weight"),
             "ssm_conv1d.weight": Restored(f"{_M}.conv1d.weight"),
             "ssm_a": Restored(f"{_M}.A_log", restore=a_log),
             "ssm_dt.bias": Restored(f"{_M}.dt_bias"),
             "ssm_out.weight": Restored(f"{_M}.out_proj.weight"), **_COMMON}.get(rest)
    return fused_gate_up(rest, cfg, "mlp.") if found is None else (found,)


#: Tensors both layouts store alike: the gated norm (not zero-centred, so not shifted) and the norm after attention.
_COMMON = {"ssm_norm.weight": Restored(f"{_M}.norm.weight"),
           "post_attention_norm.weight": Restored("post_attention_layernorm.weight")}
#: Per architecture, its Gated DeltaNet block tensors (``_Architecture.own_tensors``).
OWN_TENSORS = {"qwen35": _qwen35_tensors, "qwen3next": _qwen3next_tensors}
#: Norm weights the converter stores unshifted where the family's other norms are ``1 + w``.
UNSHIFTED_NORMS = (f"{_M}.norm.weight",)


def qwen3_hybrid_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen3.5's Gated DeltaNet sizes from llama.cpp's ssm keys (``ssm.state_size`` is the key head size,
    ``ssm.inner_size`` all value heads' width), which layers are recurrent (``attention.recurrent_layers`` where the
    file lists them, else every layer but each ``full_attention_interval``-th), and the trailing next-token-prediction
    layers, which are not decoder layers."""
    where = meta.where
    mtp = prediction_blocks(meta, p, cfg["num_hidden_layers"])
    layers = cfg["num_hidden_layers"] - mtp
    heads_v, inner = int(meta.need(p + "ssm.time_step_rank")), int(meta.need(p + "ssm.inner_size"))
    heads_k = int(meta.need(p + "ssm.group_count"))
    if heads_v <= 0 or heads_k <= 0 or inner % heads_v or heads_v % heads_k:
        raise CheckpointError(f"{where}: {p}ssm.inner_size {inner}, ssm.time_step_rank {heads_v} and ssm.group_count "
                              f"{heads_k} do not make whole value heads over whole key heads")
    recurrent = meta.get(p + "attention.recurrent_layers")
    if recurrent is None:
        interval = int(meta.get(p + "full_attention_interval", 4))
        recurrent = [(i + 1) % interval != 0 for i in range(layers)]
    recurrent = [bool(r) for r in recurrent][:layers]
    if len(recurrent) != layers:
        raise CheckpointError(f"{where}: {p}attention.recurrent_layers lists {len(recurrent)} layers of {layers}")
    scale = meta.get(p + "expert_weights_scale")
    if scale not in (None, 0, 1):
        raise UnsupportedFeatureError(f"{where}: {p}expert_weights_scale {scale} is not supported (Qwen3.5 does not "
                                      "scale its routed experts)")
    return {"num_hidden_layers": layers, "mtp_num_hidden_layers": mtp,
            "layer_types": ["linear_attention" if r else "full_attention" for r in recurrent],
            "linear_conv_kernel_dim": int(meta.need(p + "ssm.conv_kernel")),
            "linear_key_head_dim": int(meta.need(p + "ssm.state_size")), "linear_value_head_dim": inner // heads_v,
            "linear_num_key_heads": heads_k, "linear_num_value_heads": heads_v}
