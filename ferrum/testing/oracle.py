"""Independent float64 numpy references for the backend ops and for a whole forward pass.

Written as plainly as possible and sharing no code with Ferrum's backends or
its reference compositions: this is what they are all checked against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ferrum.moe.activation import Situ
from ferrum.quant.affine import QuantizedWeight, dequantize
from ferrum.quant.config import QuantConfig


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def rms_norm(x, weight, eps: float) -> np.ndarray:
    x = f64(x)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * f64(weight)


def rope(x, positions, inv_freq) -> np.ndarray:
    """Rotate pairs ``(i, i + d/2)`` of every head by ``position * inv_freq[i]``."""
    x = f64(x)
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for t, pos in enumerate(np.asarray(positions)):
        for i in range(half):
            angle = float(pos) * float(inv_freq[i])
            c, s = np.cos(angle), np.sin(angle)
            a, b = x[t, :, i], x[t, :, i + half]
            out[t, :, i] = a * c - b * s
            out[t, :, i + half] = b * c + a * s
    return out


def silu_mul(gate, up) -> np.ndarray:
    g = f64(gate)
    return g / (1.0 + np.exp(-g)) * f64(up)


def linear(x, weight, bias=None) -> np.ndarray:
    out = f64(x) @ f64(weight).T
    return out if bias is None else out + f64(bias)


def _gelu(x: np.ndarray, tanh: bool) -> np.ndarray:
    """GELU in float64: its tanh form, or the exact one (erf)."""
    if tanh:
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def moe_experts(x, ids, weights, gate, up, down, shared=None, biases=None, activation=None) -> np.ndarray:
    """Token by token, chosen expert by chosen expert: ``sum_j w[t, j] * down_e(silu(gate_e x) * up_e x)``,
    plus ``w[t, k] * shared[t]`` when a shared expert's output is given. ``biases`` (gate, up, down ``[E, out]``)
    and ``activation`` (a ``ClampedSwiGLU``, gpt-oss; a ``GeluTanhGLU``, Gemma 4; an ungated ``SquaredReLU``, Nemotron
    3 Nano, or ``Gelu``, Phixtral, ``gate`` None; a ``Situ``, Kimi K3) as :func:`ferrum.hookspec.moe_experts`
    describes them."""
    x, weights = f64(x), f64(weights)
    top_k = ids.shape[1]
    out = np.zeros_like(x)
    bias = (lambda which, e: None) if biases is None else (lambda which, e: biases[which][e])
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(ids[t, j])
            u = linear(x[t : t + 1], up[e], bias(1, e))
            g = None if gate is None else linear(x[t : t + 1], gate[e], bias(0, e))
            if g is None and activation.op == "gelu":  # Phixtral's ungated GELU experts
                h = _gelu(u, activation.tanh)
            elif g is None:  # Nemotron 3 Nano's ungated squared-ReLU experts
                h = np.maximum(u, 0.0) ** 2
            elif activation is None:
                h = silu_mul(g, u)
            elif isinstance(activation, Situ):  # Kimi K3's SiTU experts
                h = activation.beta * np.tanh(g / activation.beta) / (1.0 + np.exp(-g))
                h = h * (u if activation.linear_beta is None else activation.linear_beta * np.tanh(
                    u / activation.linear_beta))
            elif activation.op == "gelu_tanh_mul":  # Gemma 4's GeGLU experts
                h = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3))) * u
            else:  # clamped: the gate before the swish (gpt-oss's, Hy4's) or the swish (Step 3.5's)
                g = np.minimum(g, activation.limit) if activation.clamp == "gate" else g
                swish = g / (1.0 + np.exp(-activation.alpha * g))
                swish = np.minimum(swish, activation.limit) if activation.clamp == "swish" else swish
                h = (np.clip(u, -activation.limit, activation.limit) + activation.up_offset) * swish
            out[t] += weights[t, j] * linear(h, down[e], bias(2, e))[0]
        if shared is not None:
            out[t] += weights[t, top_k] * f64(shared)[t]
    return out


def attention(q, k, v, scale: float, window: int | None) -> np.ndarray:
    """Query ``i`` of ``q_len`` sits at position ``kv_len - q_len + i``; causal, optional window."""
    q, k, v = f64(q), f64(k), f64(v)
    q_len, heads, _ = q.shape
    kv_len, kv_heads, _ = k.shape
    group = heads // kv_heads
    out = np.zeros_like(q)
    for h in range(heads):
        kh = h // group
        for i in range(q_len):
            pos = kv_len - q_len + i
            visible = [j for j in range(kv_len) if j <= pos and (window is None or j > pos - window)]
            scores = np.array([q[i, h] @ k[j, kh] * scale for j in visible])
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[i, h] = sum(w * v[j, kh] for w, j in zip(weights, visible))
    return out


def paged_attention(q, k_blocks, v_blocks, cu_seqlens_q, seq_lens, block_tables, scale: float,
                    window: int | None) -> np.ndarray:
    """Item by item: collect the item's keys block by block, then :func:`attention`.

    ``k_blocks, v_blocks [num_blocks, block_size, kv_heads, head_dim]`` of one layer.
    """
    block_size = k_blocks.shape[1]
    outputs = []
    for item, kv_len in enumerate(seq_lens):
        keys, values = [], []
        for position in range(int(kv_len)):
            block = block_tables[item][position // block_size]
            keys.append(k_blocks[block, position % block_size])
            values.append(v_blocks[block, position % block_size])
        start, end = int(cu_seqlens_q[item]), int(cu_seqlens_q[item + 1])
        outputs.append(attention(q[start:end], np.stack(keys), np.stack(values), scale, window))
    return np.concatenate(outputs)


class OracleModel:
    """A dense Llama / Qwen2 / Qwen3 forward in float64, from the checkpoint files alone.

    Supports what :mod:`ferrum.random_checkpoint` writes: GQA, optional qkv
    bias, optional q/k norms, tied or untied embeddings, plain rope; and the
    same packed by ``ferrum quantize`` (it computes with the dequantized values).
    """

    def __init__(self, folder: Path):
        self.config = json.loads((Path(folder) / "config.json").read_text())
        tensors = load_file(str(Path(folder) / "model.safetensors"))
        quant = QuantConfig.from_config(self.config)
        for scales in [name for name in tensors if name.endswith(".scales")]:  # packed: the values they stand for
            module = scales.removesuffix(".scales")
            packed = QuantizedWeight(
                tensors[f"{module}.weight"], tensors.pop(scales), tensors.pop(f"{module}.biases"),
                *quant.for_module(module),
            )
            tensors[f"{module}.weight"] = dequantize(packed)
        self.w = {name: f64(array) for name, array in tensors.items()}
        c = self.config
        self.head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        self.inv_freq = 1.0 / c.get("rope_theta", 10000.0) ** (np.arange(0, self.head_dim, 2) / self.head_dim)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """``[len(tokens), vocab]`` logits for every position."""
        c, w = self.config, self.w
        eps, d = c["rms_norm_eps"], self.head_dim
        positions = np.arange(len(tokens))
        h = w["model.embed_tokens.weight"][tokens]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
            q = linear(x, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
            k = linear(x, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
            v = linear(x, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
            q, k, v = (a.reshape(len(tokens), -1, d) for a in (q, k, v))
            if p + "self_attn.q_norm.weight" in w:
                q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
                k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
            q, k = rope(q, positions, self.inv_freq), rope(k, positions, self.inv_freq)
            attn = attention(q, k, v, 1.0 / np.sqrt(d), None).reshape(len(tokens), -1)
            h = h + linear(attn, w[p + "self_attn.o_proj.weight"])
            x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
            mlp = silu_mul(linear(x, w[p + "mlp.gate_proj.weight"]), linear(x, w[p + "mlp.up_proj.weight"]))
            h = h + linear(mlp, w[p + "mlp.down_proj.weight"])
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return linear(rms_norm(h, w["model.norm.weight"], eps), head)
