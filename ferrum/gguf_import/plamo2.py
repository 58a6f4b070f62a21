"""PLaMo 2 files (``plamo2``) back into Preferred Networks' release layout, as Ferrum's ``plamo2`` family (mlx-lm's)
reads it.

llama.cpp's converter (its Plamo2Model) marks the Mamba layers by 0 query and key/value heads in per-layer arrays (the
release's mamba_step pattern, found again), writes ``A_log`` as ``-exp(A_log)``, ``dt_bias`` as ``ssm_dt.bias``, the
taps squeezed to ``[C, K]``, the inner norms' and q/k weights under llama.cpp's names, and adds each sandwich norm's
offset to its weight (1 before the mixer and the MLP and for the final norm, 1/5 after the mixer, 1/5^1.5 after the
MLP), taken off again. q/k/v stay fused (rows as stored: rotate-half rope); gate and up stay fused. What llama.cpp
runs otherwise is refused by name: another rope base (mlx-lm's PLaMo 2 rotates at 10000), another epsilon (its q/k
norms' is 1e-6, llama.cpp's the file's), Mamba groups. llama.cpp does not clip the Mamba steps to [0.001, 100] as
mlx-lm (and Ferrum) do: a file cannot say where that matters. The converter's PLaMo tokenizer (``plamo2``, PLaMo 3's
too) is not rebuilt yet: such files are refused at the tokenizer, by name.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, float32_value
from ferrum.gguf_import.gated_delta import Restored, a_log

#: The sandwich norms and the fused MLP under the release's (Llama-named) modules; q/k/v are Llama's names already.
TENSORS = (("post_attention_norm", "post_attention_layernorm.weight"),
           ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
           ("post_ffw_norm", "post_feedforward_layernorm.weight"), ("ffn_up.weight", "mlp.gate_up_proj.weight"))
#: What the converter added to the norms after the mixer and after the MLP (the others: ``norm_offset`` 1).
NORM_OFFSETS = (("post_mixer_norm.weight", 1.0 / 5), ("post_mlp_norm.weight", 1.0 / 5 ** 1.5))
#: The Mamba layers' tensors: GGUF -> the release's within the layer (``ssm_a`` as ``A_log``).
_MAMBA = {"ssm_in.weight": "in_proj.weight", "ssm_conv1d.weight": "conv1d.weight", "ssm_x.weight": "bcdt_proj.weight",
          "ssm_dt.weight": "dt_proj.weight", "ssm_dt.bias": "dt_bias", "ssm_d": "D",
          "ssm_out.weight": "out_proj.weight", "ssm_dt_norm": "dt_norm_weight", "ssm_b_norm": "B_norm_weight",
          "ssm_c_norm": "C_norm_weight"}
#: mlx-lm's PLaMo 2 q/k norm epsilon and rope base, both fixed.
_QK_EPS, _ROPE_BASE = 1e-6, 10000.0


def own_tensors(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
    """A Mamba layer's tensor under the release's name (the taps' ``[C, K]`` read as ``[C, 1, K]``)."""
    if rest == "ssm_a":
        return (Restored("mixer.A_log", restore=a_log),)
    return (Restored(f"mixer.{_MAMBA[rest]}"),) if rest in _MAMBA else None


def _mamba_step(kinds: list[bool]) -> int:
    """The mamba_step whose pattern (mlx-lm's ``is_mamba``) gives the layers' kinds (True: Mamba), else 0."""
    count = len(kinds)
    for step in range(2, 2 * count + 2):
        if count <= step // 2:
            want = [i != count - 1 for i in range(count)]
        else:
            want = [i % step != step // 2 for i in range(count)]
        if want == kinds:
            return step
    return 0


def plamo2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The release's config keys: the Mamba sizes from the ssm keys, mamba_step from which layers have no heads."""
    where, layers = meta.where, cfg["num_hidden_layers"]
    for what, value, want in (("rope.freq_base", cfg["rope_theta"], _ROPE_BASE),
                              ("attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"], float32_value(_QK_EPS))):
        if value != want:
            raise UnsupportedFeatureError(f"{where}: {p}{what} {value} in a plamo2 file is not supported (mlx-lm's "
                                          f"PLaMo 2 runs {want} where llama.cpp runs the file's)")
    if cfg["rope_scaling"] is not None or meta.get(p + "ssm.group_count"):
        raise UnsupportedFeatureError(f"{where}: rope scaling or {p}ssm.group_count in a plamo2 file is not supported "
                                      "(PLaMo 2 has neither)")
    kv = meta.need(p + "attention.head_count_kv")
    kinds = [not k for k in (kv if isinstance(kv, list) else [kv] * layers)]
    step = _mamba_step(kinds) if len(kinds) == layers else 0
    if not step or not any(kinds):
        raise UnsupportedFeatureError(f"{where}: {p}attention.head_count_kv {kv!r:.80} is not supported: PLaMo 2's "
                                      "Mamba layers (0 heads) come as a mamba_step pattern")
    heads, inner = int(meta.need(p + "ssm.time_step_rank")), int(meta.need(p + "ssm.inner_size"))
    if inner != heads * cfg["head_dim"]:
        raise CheckpointError(f"{where}: {p}ssm.inner_size {inner} is not ssm.time_step_rank {heads} heads of "
                              f"{cfg['head_dim']} (attention.key_length)")
    return {"hidden_size_per_head": cfg["head_dim"], "mamba_num_heads": heads, "mamba_step": step,
            "mamba_enabled": True, "mamba_d_state": int(meta.need(p + "ssm.state_size")),
            "mamba_d_conv": int(meta.need(p + "ssm.conv_kernel"))}


