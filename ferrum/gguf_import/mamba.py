"""Mamba-1 files (``mamba``: Mamba and Falcon Mamba; ``jamba``) back into transformers' Mamba, FalconMamba and Jamba.

llama.cpp's converter writes the Mamba-1 mixer under its own names (``ssm_in``, ``ssm_x``, ``ssm_dt``, ...) and
changes two tensors, which the import undoes: ``A_log`` is stored as ``ssm_a = -exp(A_log)`` (taken back with a log)
and the convolution's ``[C, 1, K]`` weight squeezed to ``[C, K]``. It writes Falcon Mamba as ``mamba`` too, flagged
by ``ssm.dt_b_c_rms``: llama.cpp then RMS-norms the step, B and C with the layers' epsilon, so mixer_rms_eps is that
epsilon (Falcon Mamba's config.json has its own). A ``mamba`` file has no attention heads and no MLP (0s).

Jamba's layers are told apart as llama.cpp tells them: attention where the per-layer ``attention.head_count_kv`` is
not 0, experts where the block has a router (``ffn_gate_inp``); transformers' Jamba places both by a period and an
offset, which are read back from those layers (a file whose layers follow none is refused by name).
"""

from __future__ import annotations

from typing import Any, Callable

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, float32_value
from ferrum.gguf_import.gated_delta import Restored, a_log

#: The Mamba-1 mixer's tensors: GGUF name -> transformers' within the mixer (``ssm_a`` is :func:`a_log`'s).
_MAMBA = {"ssm_in.weight": "in_proj.weight", "ssm_in.bias": "in_proj.bias", "ssm_conv1d.weight": "conv1d.weight",
          "ssm_conv1d.bias": "conv1d.bias", "ssm_x.weight": "x_proj.weight", "ssm_dt.weight": "dt_proj.weight",
          "ssm_dt.bias": "dt_proj.bias", "ssm_d": "D", "ssm_out.weight": "out_proj.weight",
          "ssm_out.bias": "out_proj.bias", "ssm_dt_norm.weight": "dt_layernorm.weight",
          "ssm_b_norm.weight": "b_layernorm.weight", "ssm_c_norm.weight": "c_layernorm.weight"}


def mamba_tensors(module: str) -> Callable[[str, dict[str, Any]], tuple[Restored, ...] | None]:
    """A Mamba-1 mixer's tensor under its transformers name in ``module`` (Mamba's ``mixer``, Jamba's ``mamba``)."""
    def own(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
        if rest == "ssm_a":
            return (Restored(f"{module}.A_log", restore=a_log),)
        return (Restored(f"{module}.{_MAMBA[rest]}"),) if rest in _MAMBA else None
    return own


def _sizes(meta: Metadata, p: str) -> tuple[int, int, int, int]:
    """The scan's channels, state size, convolution kernel and step rank the ssm keys give."""
    return (int(meta.need(p + "ssm.inner_size")), int(meta.need(p + "ssm.state_size")),
            int(meta.need(p + "ssm.conv_kernel")), int(meta.need(p + "ssm.time_step_rank")))


def mamba_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """MambaConfig's keys (FalconMambaConfig's where ``ssm.dt_b_c_rms``) from llama.cpp's, whose Mamba writes no
    attention heads and no MLP: the sizes from the ssm keys, the biases the first block holds, the epsilon from
    layer_norm_rms_epsilon (the step / B / C norms' too, as llama.cpp runs them)."""
    hidden = cfg["hidden_size"]
    inner, state, kernel, rank = _sizes(meta, p)
    eps = float32_value(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5))
    config = {"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": hidden, "intermediate_size": inner,
              **({"expand": inner // hidden} if inner % hidden == 0 else {}), "state_size": state,
              "conv_kernel": kernel, "time_step_rank": rank, "layer_norm_epsilon": eps,
              "use_conv_bias": "blk.0.ssm_conv1d.bias" in meta.tensors, "use_bias": "blk.0.ssm_in.bias" in meta.tensors}
    if meta.get(p + "ssm.dt_b_c_rms", False):
        config.update(model_type="falcon_mamba", architectures=["FalconMambaForCausalLM"], mixer_rms_eps=eps)
    return config


def _periodic(layers: list[int], count: int, what: str, where: str) -> tuple[int, int]:
    """The (period, offset) of transformers' ``i % period == offset`` that picks exactly ``layers`` of ``count``
    (none or one: a period past the last layer)."""
    period = layers[1] - layers[0] if len(layers) > 1 else count + 1
    offset = layers[0] if layers else count
    if offset >= period or layers != [i for i in range(count) if i % period == offset]:
        raise UnsupportedFeatureError(f"{where}: Jamba's {what} layers {layers} are not those of i % period == offset "
                                      "(offset below period), the only ones transformers' Jamba (and Ferrum) places "
                                      "them on; such a file is not supported")
    return period, offset


def jamba_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """JambaConfig's keys from llama.cpp's: the Mamba sizes from the ssm keys, the attention layers (per-layer key /
    value heads) and expert layers (a router in the block) as periods and offsets, every MLP dense where no block
    has a router, the biases the first Mamba block holds."""
    where, layers, hidden = meta.where, cfg["num_hidden_layers"], cfg["hidden_size"]
    inner, state, kernel, rank = _sizes(meta, p)
    if inner % hidden:
        raise CheckpointError(f"{where}: ssm.inner_size {inner} is not a multiple of the width {hidden}")
    kv = meta.need(p + "attention.head_count_kv")
    kv = kv if isinstance(kv, list) else [kv] * layers
    if len(kv) != layers:
        raise CheckpointError(f"{where}: {p}attention.head_count_kv must list {layers} layers (0 for Mamba ones), "
                              f"got {len(kv)}")
    attention = [i for i, k in enumerate(kv) if k]
    experts = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in meta.tensors]
    attn_period, attn_offset = _periodic(attention, layers, "attention", where)
    mamba = next((i for i in range(layers) if i not in attention), 0)
    config = {"attn_layer_period": attn_period, "attn_layer_offset": attn_offset, "mamba_expand": inner // hidden,
              "mamba_d_state": state, "mamba_d_conv": kernel, "mamba_dt_rank": rank,
              "mamba_conv_bias": f"blk.{mamba}.ssm_conv1d.bias" in meta.tensors,
              "mamba_proj_bias": f"blk.{mamba}.ssm_in.bias" in meta.tensors}
    if not experts:  # transformers' (and llama.cpp's) dense Jamba
        return {**config, "num_experts": 1}
    period, offset = _periodic(experts, layers, "expert", where)
    return {**config, "expert_layer_period": period, "expert_layer_offset": offset}
