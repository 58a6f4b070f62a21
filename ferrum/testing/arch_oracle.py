"""A float64 forward pass of the family table's attention models, written the way transformers writes it (a model
with what it does not compute, a recurrent mixer, a gate, a loop..., is refused by name).

It reads the checkpoint tensors as stored (under the checkpoint's own names,
fused q/k/v (GPT-NeoX's grouped per head) and gate/up split here, Gemma's
and Nemotron's ``1 + w`` norms (each norm's offset and epsilon as :mod:`ferrum.arch.norms`
gives them), LayerNorms with their biases, rope on the first
``rotary_dim`` dims with transformers' pairing or GPT-J's, longrope's attention
factor on cos and sin, Granite's multipliers applied where transformers applies
them, experts one matrix per expert, stacked as mlx-lm stacks them or fused as
Llama 4 stores them; Llama 4's chunked attention, NoPE layers' query temperature,
weightless q/k norms, input-weighted sigmoid routing and shared expert), so it
checks Ferrum's load-time rewrites as well as a backend's ops. Only the
interpretation of config.json (:class:`ferrum.arch.Architecture`) is shared
with Ferrum; the oracle is tested against transformers on every family.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ferrum.arch.norms import norm_eps, norm_offset
from ferrum.arch.tensors import bias_of, resolve_layout, stored_name
from ferrum.arch.spec import Architecture
from ferrum.config import ModelConfig
from ferrum.errors import UnsupportedFeatureError
from ferrum.moe.routing import route_sparsemixer
from ferrum.quant.affine import QuantizedWeight, dequantize
from ferrum.testing.oracle import f64, linear, moe_experts, rms_norm


def _rope(x: np.ndarray, positions: np.ndarray, rope, long_from: int | None) -> np.ndarray:
    """transformers' rotate-half on the first ``rotary_dim`` dims (GPT-J's adjacent pairs where the rope is
    interleaved), cos/sin times the attention factor."""
    r = rope.rotary_dim
    out = x.copy()
    for t, pos in enumerate(positions):
        long = long_from is not None and pos >= long_from
        inv = f64(rope.inv_freq(long=long))[: r // 2]
        factor = rope.attention_factor * (rope.long_scaled if long else 1.0)
        cos, sin = np.cos(pos * inv) * factor, np.sin(pos * inv) * factor
        rot = x[t, :, :r]
        first, second = (rot[:, 0::2], rot[:, 1::2]) if rope.interleaved else (rot[:, : r // 2], rot[:, r // 2:])
        turned = (first * cos - second * sin, second * cos + first * sin)
        if rope.interleaved:
            out[t, :, 0:r:2], out[t, :, 1:r:2] = turned
        else:
            out[t, :, :r] = np.concatenate(turned, axis=-1)
    return out


def _attention(q, k, v, scale, window, softcap, sinks=None, chunk=None, alibi=None) -> np.ndarray:
    """With ``sinks`` (gpt-oss), head ``h``'s scores get one more column, ``sinks[h]``, dropped after the softmax;
    with ``chunk`` (Llama 4's chunked layers), position ``i`` sees only the positions ``j`` with ``j // chunk ==
    i // chunk``; with ``alibi`` (BLOOM, MPT), head ``h``'s score of key ``j`` for query ``i`` gains ``alibi[h] *
    (j - i)``."""
    n, heads, _ = q.shape
    group = heads // k.shape[1]
    out = np.zeros_like(q)
    for h in range(heads):
        scores = q[:, h] @ k[:, h // group].T * scale
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        if alibi is not None:
            scores = scores + f64(alibi)[h] * (j - i)
        allowed = (j <= i) & ((j > i - window) if window is not None else True)
        if chunk is not None:
            allowed &= (j // chunk) == (i // chunk)
        scores = np.where(allowed, scores, -np.inf)
        if sinks is not None:
            scores = np.concatenate([scores, np.full((n, 1), f64(sinks)[h])], axis=1)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights = (weights / weights.sum(axis=-1, keepdims=True))[:, :n]
        out[:, h] = weights @ v[:, h // group]
    return out


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


_erf = np.vectorize(math.erf)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _sinusoids(positions: np.ndarray, dim: int) -> np.ndarray:
    """fairseq's sinusoidal positions in float64: sines of ``dim // 2`` frequencies, then their cosines."""
    half = dim // 2
    angles = positions[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))[None, :]
    out = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return np.pad(out, ((0, 0), (0, dim % 2)))


def _relu_squared(x: np.ndarray) -> np.ndarray:
    return np.square(np.maximum(x, 0.0))


#: The ungated MLP's activations by ``Architecture.activation``.
_PLAIN_ACTIVATIONS = {"gelu_tanh": _gelu_tanh, "gelu": _gelu, "relu": lambda x: np.maximum(x, 0.0),
                      "relu2": _relu_squared}


def layer_norm(x, weight, bias, eps: float) -> np.ndarray:
    x = f64(x)
    centered = x - x.mean(axis=-1, keepdims=True)
    out = centered / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    out = out if weight is None else out * f64(weight)
    return out if bias is None else out + f64(bias)


#: The architecture fields whose non-default values the oracle does not compute (recurrent and latent mixers, gates,
#: folded or computed constants, loops, sub-layers...): a family setting any is refused, not checked wrongly.
_UNCHECKED = ("scales", "value_head_dim", "value_scale", "sub_norms", "differential", "v_norm",
              "layer_scalar", "per_layer_inputs", "ngram", "altup", "hyper", "tiled_kv_heads", "up_rows_first", "mla",
              "gated_delta", "mamba", "mamba2", "short_conv", "kimi_delta", "rg_lru", "conv_kv_gated", "shared_block",
              "moa", "aliases", "lightning", "rwkv7", "rwkv7_first", "rwkv7_channel", "kv_conv", "computed",
              "attn_output_gate", "indexer", "norm_gate_rank", "gains", "embed_skip", "head_gain", "head_rows",
              "head_normed", "sublayers", "loops", "kv_quant", "embed_norm_params")
_DEFAULTS = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(Architecture)
             if f.name in _UNCHECKED}


def _check_covered(config: ModelConfig) -> None:
    """Refuses a model the oracle would compute wrongly: a field of :data:`_UNCHECKED` set, or a layer whose mixer is
    not attention or whose MLP is not dense, plain or sparse."""
    arch = config.arch
    unread = [name for name, default in _DEFAULTS.items() if getattr(arch, name) != default]
    unread += sorted({f"mixer {layer.mixer!r}" for layer in arch.layers if layer.mixer != "attention"}
                     | {f"MLP {layer.mlp!r}" for layer in arch.layers if layer.mlp not in ("dense", "plain", "moe")})
    if unread:
        raise UnsupportedFeatureError(f"ArchOracle does not compute {', '.join(unread)} ({config.model_type}): check "
                                      "this family against its reference implementation instead")


class ArchOracle:
    """``logits(tokens)``: ``[len(tokens), vocab]`` for a float checkpoint folder of a family whose architecture it
    computes (others are refused: :func:`_check_covered`)."""

    def __init__(self, folder: Path):
        tensors = load_file(str(Path(folder) / "model.safetensors"))
        self.config = resolve_layout(ModelConfig.from_file(folder), {n: t.shape for n, t in tensors.items()})
        _check_covered(self.config)
        quant = self.config.quantization
        for scales in [name for name in tensors if name.endswith(".scales")]:  # packed: the values they stand for
            module = scales.removesuffix(".scales")
            parts = (tensors[f"{module}.weight"], tensors.pop(scales), tensors.pop(f"{module}.biases"))
            if parts[0].ndim == 3:  # stacked experts (mlx-lm's), each its own matrix
                tensors[f"{module}.weight"] = np.stack([dequantize(QuantizedWeight(*(a[e] for a in parts),
                                                                                   *quant.for_module(module)))
                                                        for e in range(len(parts[0]))])
            else:
                tensors[f"{module}.weight"] = dequantize(QuantizedWeight(*parts, *quant.for_module(module)))
        for head in sorted(n for n in tensors if re.search(r"\.norms\.0\.weight$", n)):  # a norm a head (StableLM)
            module = head.removesuffix(".norms.0.weight")
            count = sum(1 for n in tensors if n.startswith(f"{module}.norms."))
            tensors[f"{module}.weight"] = np.stack([tensors.pop(f"{module}.norms.{h}.weight") for h in range(count)])
        self.stored = {name: f64(array) for name, array in tensors.items()}

    def w(self, name: str) -> np.ndarray | None:
        """Tensor ``name`` (Llama's naming), read under the checkpoint's name (a layer's projection stored
        transposed, as GPT-2's Conv1D, turned back); None where it has none."""
        arch = self.config.arch
        tensor = self.stored.get(stored_name(arch, name))
        in_layer = name.startswith(f"{arch.prefix}layers.")
        return tensor.T if arch.transposed and in_layer and tensor is not None and tensor.ndim == 2 else tensor

    def _norm(self, x: np.ndarray, module: str, params: bool = True, slot: str = "") -> np.ndarray:
        """Norm ``module`` of ``x`` at its offset (Gemma's and Nemotron's 1 + w, PLaMo's own) and the epsilon of its
        ``slot``; without ``params`` (OLMo 1's LayerNorms, nanochat's RMSNorms, Llama 4's L2 q/k norm:
        ``x / sqrt(mean(x^2) + eps)``), no weight."""
        cfg, arch = self.config, self.config.arch
        eps, offset = norm_eps(cfg, slot), norm_offset(arch, f"{module}.weight")
        if arch.norm == "layer":  # weights and bias where it has them (OLMo's have neither)
            weight = self.w(f"{module}.weight") if params else None
            weight = None if weight is None else weight + offset
            return layer_norm(x, weight, self.w(f"{module}.bias") if params else None, eps)
        return rms_norm(x, self.w(f"{module}.weight") + offset if params else 1.0, eps)

    def logits(self, tokens: list[int]) -> np.ndarray:
        cfg, w, arch = self.config, self.w, self.config.arch
        n, d = len(tokens), cfg.head_dim
        q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        positions = np.arange(n)
        p_model = arch.prefix
        h = w(p_model + "embed_tokens.weight")[tokens]
        if arch.embed_scale is not None:  # the tokens' embeddings only (XGLM, BioGPT add positions after)
            h = h * arch.embed_scale
        if arch.sinusoidal_positions:  # fairseq's sinusoids (XGLM), from position_offset on
            h = h + _sinusoids(positions + arch.position_offset, cfg.hidden_size)
        elif arch.position_embedding:  # learned absolute positions (GPT-2), position_offset rows in (OPT, BioGPT)
            h = h + w(p_model + "embed_positions.weight")[positions + arch.position_offset]
        blocks = arch.norm_params
        if arch.embed_norm:  # the embeddings normed before the first block: nanochat's without a weight, BLOOM's with
            h = self._norm(h, p_model + "embed_norm", params=blocks)
        for i, spec in enumerate(arch.layers):
            p = f"{p_model}layers.{i}."
            norm = {slot: p + name for slot, name in arch.norms.items()}
            x = self._norm(h, norm["pre_attn"], blocks, "pre_attn") if "pre_attn" in norm else h
            if arch.fused_qkv:
                qkv = linear(x, w(p + "self_attn.qkv_proj.weight"), w(p + "self_attn.qkv_proj.bias"))
                if arch.qkv_grouped:  # per key/value head: its queries, its key, its value
                    groups = qkv.reshape(n, cfg.num_kv_heads, -1, d)
                    qkv = np.concatenate([groups[:, :, :-2].reshape(n, -1), groups[:, :, -2].reshape(n, -1),
                                          groups[:, :, -1].reshape(n, -1)], axis=1)
                elif arch.qkv_shards:  # per shard: its queries, its values, its keys (CodeGen)
                    shards = qkv.reshape(n, arch.qkv_shards, 3, -1)
                    qkv = np.concatenate([shards[:, :, i].reshape(n, -1) for i in (0, 2, 1)], axis=1)
                q, k, v = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size], qkv[:, q_size + kv_size:]
            else:
                q, k, v = (linear(x, w(f"{p}self_attn.{m}_proj.weight"), w(f"{p}self_attn.{m}_proj.bias"))
                           for m in "qkv")
            q_norm, k_norm = (f"{p}self_attn.{name}" for name in arch.qk_norm_names)
            qk_norm = arch.qk_norm if spec.qk_norm else None  # Llama 4 norms q and k on its rope layers only
            qk_params = arch.qk_norm_params  # False: q/k norms without a weight (Llama 4's, nanochat's)
            if qk_norm == "projection":
                q, k = self._norm(q, q_norm, qk_params, "qk"), self._norm(k, k_norm, qk_params, "qk")
            if arch.clip_qkv is not None:
                q, k, v = (np.clip(a, -arch.clip_qkv, arch.clip_qkv) for a in (q, k, v))
            q, k, v = (a.reshape(n, -1, d) for a in (q, k, v))
            if qk_norm in ("head", "each_head") and not arch.qk_norm_after_rope:  # [d] or [heads, d] weights
                q, k = self._norm(q, q_norm, qk_params, "qk"), self._norm(k, k_norm, qk_params, "qk")
            long_from = spec.rope.original_max if spec.rope.switches else None
            q, k = _rope(q, positions, spec.rope, long_from), _rope(k, positions, spec.rope, long_from)
            if qk_norm == "head" and arch.qk_norm_after_rope:
                q, k = self._norm(q, q_norm, qk_params, "qk"), self._norm(k, k_norm, qk_params, "qk")
            if spec.query_scaling is not None:  # Llama 4's NoPE layers: positions counted from -shift
                beta, floor, shift = spec.query_scaling
                q = q * (1.0 + beta * np.log(1.0 + np.floor((positions + shift) / floor)))[:, None, None]
            elif arch.query_scaling is not None:  # Ministral 3's attention scaling
                beta, original = arch.query_scaling
                q = q * (1.0 + beta * np.log(1.0 + np.floor(positions / original)))[:, None, None]
            scale = arch.attn_scale if spec.attn_scale is None else spec.attn_scale
            attn = _attention(q, k, v, scale, spec.window, arch.attn_softcap,
                              w(p + "self_attn.sinks"), spec.chunk, arch.alibi_slopes).reshape(n, -1)
            o = linear(attn, w(p + "self_attn.o_proj.weight"), w(p + "self_attn.o_proj.bias"))
            if "post_attn" in norm:
                o = self._norm(o, norm["post_attn"], blocks, "post_attn")
            if arch.parallel:  # the MLP reads the block's input, beside attention
                x = self._norm(h, norm["pre_mlp"], blocks, "pre_mlp") if "pre_mlp" in norm else x
                h = h + (o + self._mlp(x, p, spec.mlp)) * arch.residual_scale
                continue
            h = h + o * arch.residual_scale
            x = self._norm(h, norm["pre_mlp"], blocks, "pre_mlp") if "pre_mlp" in norm else h
            y = self._mlp(x, p, spec.mlp)
            if "post_mlp" in norm:
                y = self._norm(y, norm["post_mlp"], blocks, "post_mlp")
            h = h + y * arch.residual_scale
        head = self.stored.get(arch.lm_head)
        head = w(p_model + "embed_tokens.weight") if head is None else head
        logits = linear(self._norm(h, p_model + "norm", blocks, "final"), head,
                        self.stored.get(bias_of(arch.lm_head))) * arch.logit_scale
        if arch.final_softcap is not None:
            logits = arch.final_softcap * np.tanh(logits / arch.final_softcap)
        return logits


    def _mlp(self, x: np.ndarray, p: str, kind: str) -> np.ndarray:
        w, arch = self.w, self.config.arch
        if kind == "moe":
            return self._experts(x, p)
        if kind == "plain":
            up = linear(x, w(p + "mlp.up_proj.weight"), w(p + "mlp.up_proj.bias"))
            act = self._xielu(up, p) if arch.activation == "xielu" else _PLAIN_ACTIVATIONS[arch.activation](up)
            return linear(act, w(p + "mlp.down_proj.weight"), w(p + "mlp.down_proj.bias"))
        if arch.fused_gate_up:
            gate, up = np.split(linear(x, w(p + "mlp.gate_up_proj.weight")), 2, axis=-1)
        else:
            gate = linear(x, w(p + "mlp.gate_proj.weight"), w(p + "mlp.gate_proj.bias"))
            up = linear(x, w(p + "mlp.up_proj.weight"), w(p + "mlp.up_proj.bias"))
        act = _gelu_tanh(gate) if arch.activation == "gelu_tanh" else gate / (1.0 + np.exp(-gate))
        return linear(act * up, w(p + "mlp.down_proj.weight"), w(p + "mlp.down_proj.bias"))

    def _xielu(self, x: np.ndarray, p: str) -> np.ndarray:
        """Apertus's xIELU from the layer's stored parameters, as transformers' XIELUActivation reads them."""
        alpha_p, alpha_n, beta, eps = (float(self.w(f"{p}mlp.act_fn.{name}").reshape(-1)[0])
                                       for name in ("alpha_p", "alpha_n", "beta", "eps"))
        softplus = lambda v: v if v > 20 else math.log1p(math.exp(v))  # noqa: E731 (torch's threshold)
        alpha_p, alpha_n = softplus(alpha_p), beta + softplus(alpha_n)
        return np.where(x > 0, alpha_p * x * x + beta * x, (np.expm1(np.minimum(x, eps)) - x) * alpha_n + beta * x)

    def _experts(self, x: np.ndarray, p: str) -> np.ndarray:
        """A sparse MLP: softmax over the router's logits, the top-k (renormalised where the family says),
        Phi-3.5-MoE's sparsemixer (:func:`ferrum.moe.routing.route_sparsemixer`, tested against transformers'), or
        Llama 4's top-k logits weighed by their sigmoids, each chosen expert reading its input times its weight
        (``MoeSpec.weigh_input``); then :func:`ferrum.testing.oracle.moe_experts` over the experts as stored, plus
        the shared expert (sigmoid-gated where the family gates it)."""
        moe, w = self.config.arch.moe, self.w
        m = f"{p}{moe.module}."
        logits = linear(x, w(f"{m}{moe.router}.weight"), w(f"{m}{moe.router}.bias"))
        stacks, biases = zip(*(self._stack(m, which) for which in range(3)))
        biases = None if biases[0] is None else biases
        if moe.routing == "sigmoid_top_k":
            ids = np.argsort(-logits, axis=-1, kind="stable")[:, : moe.top_k]
            weights = 1.0 / (1.0 + np.exp(-np.take_along_axis(logits, ids, axis=-1)))
            if moe.weigh_input:  # each expert reads x times its weight; its output is summed as it is
                ones = np.ones((len(x), 1))
                return self._shared(x, m) + sum(
                    moe_experts(x * weights[:, j:j + 1], ids[:, j:j + 1], ones, *stacks, None, biases, moe.activation)
                    for j in range(moe.top_k))
            return self._shared(x, m) + moe_experts(x, ids, weights, *stacks, None, biases, moe.activation)
        if moe.routing == "sparsemixer":
            ids, weights = route_sparsemixer(logits, moe.jitter_eps)
        else:
            probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            ids = np.argsort(-probs, axis=-1)[:, : moe.top_k]
            weights = np.take_along_axis(probs, ids, axis=-1)
            if moe.normalize:
                weights /= weights.sum(axis=-1, keepdims=True)
        return self._shared(x, m) + moe_experts(x, ids, weights, *stacks, None, biases, moe.activation)

    def _shared(self, x: np.ndarray, m: str) -> np.ndarray | float:
        """The shared expert's SwiGLU MLP (``M.<shared_module>.*``; gate and up fused where so stored), times the
        sigmoid of ``M.<shared_gate>`` where gated; 0 where the family has none."""
        moe, w = self.config.arch.moe, self.w
        if not moe.shared_expert_size:
            return 0.0
        s = f"{m}{moe.shared_module}."
        if w(f"{s}gate_up_proj.weight") is not None:
            gate, up = np.split(linear(x, w(f"{s}gate_up_proj.weight")), 2, axis=-1)
        else:
            gate, up = (linear(x, w(f"{s}{n}_proj.weight"), w(f"{s}{n}_proj.bias")) for n in ("gate", "up"))
        out = linear(gate / (1.0 + np.exp(-gate)) * up, w(f"{s}down_proj.weight"), w(f"{s}down_proj.bias"))
        if moe.shared_gate is not None:
            out = out / (1.0 + np.exp(-linear(x, w(f"{m}{moe.shared_gate}.weight"))))
        return out

    def _stack(self, m: str, which: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The gate (0), up (1) or down (2) projections of every expert ``[E, out, in]`` and their biases:
        stacked as mlx-lm stores them (``M.experts.gate_proj`` with ``.bias``), fused as Llama 4 stores them
        (``M.experts.gate_up_proj [E, hidden, 2 * inter]``, gate columns first, ``M.experts.down_proj [E, inter,
        hidden]``), or one matrix per expert."""
        w, moe = self.w, self.config.arch.moe
        stacked = f"{m}experts.{('gate_proj', 'up_proj', 'down_proj')[which]}"
        if w(f"{stacked}.weight") is not None:
            return w(f"{stacked}.weight"), w(f"{stacked}.bias")
        fused = w(f"{m}experts.{'down_proj' if which == 2 else 'gate_up_proj'}")
        if fused is not None:  # inputs first (x @ W); Qwen3-VL-MoE's transformers-5 form (outputs first) not read
            hidden, inter = self.config.hidden_size, moe.expert_size
            if fused.shape[1:] != ((inter, hidden) if which == 2 else (hidden, 2 * inter)):
                raise ValueError(f"{m}experts: the oracle reads fused experts inputs first, got {fused.shape}")
            part = fused if which == 2 else fused[:, :, which * inter:(which + 1) * inter]
            return part.transpose(0, 2, 1), None
        return np.stack([w(f"{m}experts.{e}.{moe.expert_names[which]}.weight") for e in range(moe.num_experts)]), None


def attention(q, k, v, scale: float, window: int | None, softcap: float | None, sinks=None,
              alibi=None) -> np.ndarray:
    """One sequence's attention, queries at the last ``q_len`` positions, scores soft-capped before masking."""
    q, k, v = f64(q), f64(k), f64(v)
    q_len, kv_len = q.shape[0], k.shape[0]
    padded = np.zeros((kv_len - q_len, *q.shape[1:]))
    return _attention(np.concatenate([padded, q]), k, v, scale, window, softcap, sinks, alibi=alibi)[kv_len - q_len:]


def gelu_tanh_mul(gate, up) -> np.ndarray:
    return _gelu_tanh(f64(gate)) * f64(up)


def gelu(x, tanh: bool) -> np.ndarray:
    return _gelu_tanh(f64(x)) if tanh else _gelu(f64(x))
