"""``DecoderOnlyLLM``: one Llama-family decoder built only from the ops table.

It never imports a compute framework. Every forward pass is a *unified
batch*: any mix of prefill chunks and decode tokens of many sequences, laid
out token-major, sharing one paged KV pool. The convenience calls (prefill,
decode, forward_verify...) are all that one pass with different items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from ferrum.attention import AttentionBatch
from ferrum.backends import Backend, backend_for_format, load_backend
from ferrum.checkpoint import Checkpoint
from ferrum.config import ModelConfig
from ferrum.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    PositionMismatchError,
    UnsupportedFeatureError,
)
from ferrum.paged_kv import PagedKVManager
from ferrum.weights import DTYPE_BYTES, Linear, Placed, place, read_weights

DEFAULT_BLOCK_SIZE = 16
#: Default KV pool size in tokens when the caller does not choose one.
DEFAULT_KV_TOKENS = 16384

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ForwardItem:
    """One slice of one sequence in a unified batch (the seeds' ``UnifiedBatchItem``).

    ``q_tokens`` are fed at positions ``pos_offset .. pos_offset + len - 1``;
    ``pos_offset`` must equal the sequence's cached length. Logits are
    produced for final chunks only (or for every position on request).
    """

    seq_id: Hashable
    q_tokens: Sequence[int]
    pos_offset: int
    is_final_chunk: bool = True


@dataclass(frozen=True)
class ForwardOutput:
    """Logits of one pass, still on the backend, and which rows belong to whom."""

    logits: Any  # backend array [rows, vocab]
    rows: dict[Hashable, tuple[int, int]]  # seq_id -> (first row, row count)


class _Layer:
    """One decoder block's weights; projections carry the op that applies them."""

    __slots__ = ("ln1", "ln2", "q", "k", "v", "o", "q_norm", "k_norm", "gate", "up", "down", "window")

    def __init__(self, **fields: Any):
        for name in self.__slots__:
            setattr(self, name, fields[name])


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, with its shape, in load order."""
    h, d, vocab = config.hidden_size, config.head_dim, config.vocab_size
    q, kv, inter = config.num_heads * d, config.num_kv_heads * d, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    if config.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if config.o_proj_bias:
        per_layer["self_attn.o_proj.bias"] = (h,)
    if config.mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)})
    if config.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    for i in range(config.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def choose_dtype(
    backend: Backend, requested: str | None, checkpoint_dtype: str | None, quantized: bool = False
) -> str:
    """The user's dtype, else the backend's low-bit kernel dtype for quantized checkpoints,
    else the checkpoint's on accelerators, else the backend default."""
    info = backend.info
    if requested is not None:
        if requested not in info.dtypes:
            raise UnsupportedFeatureError(
                f"backend {backend.name!r} computes in {', '.join(info.dtypes)}, not {requested!r}"
            )
        return requested
    if quantized and info.quantized_dtype in info.dtypes:
        return info.quantized_dtype
    if checkpoint_dtype in info.dtypes and info.device != "cpu":
        return checkpoint_dtype
    return info.default_dtype


class DecoderOnlyLLM:
    """A Llama / Mistral / Qwen2 / Qwen3 decoder over a paged KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        backend: Backend,
        weights: dict[str, Any],
        dtype: str,
        num_kv_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        self.config = config
        self.backend = backend
        self.ops = backend.ops
        self.dtype = dtype
        self._check_backend_supports(config)
        ops = self.ops
        self.kv = PagedKVManager(num_kv_blocks, block_size)
        self.pool = ops.kv_alloc(
            config.num_layers, num_kv_blocks, block_size, config.num_kv_heads, config.head_dim, dtype
        )
        embed = weights["model.embed_tokens.weight"]
        self.embed, self.embed_lookup = embed.weight, embed.embedding
        self.final_norm = weights["model.norm.weight"].weight
        self.lm_head = Linear(embed if config.tie_word_embeddings else weights["lm_head.weight"])
        self.inv_freq = ops.from_numpy(config.rope_inv_freq(), "float32")
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.layers = [self._layer(weights, i) for i in range(config.num_layers)]
        #: Bytes the weights occupy on the backend (packed ones at their packed or repacked size).
        self.weight_bytes = sum(p.nbytes for p in weights.values())

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        backend: str | Backend | None = None,
        dtype: str | None = None,
        num_kv_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_seq_len: int | None = None,
        progress: ProgressFn | None = None,
    ) -> "DecoderOnlyLLM":
        """Load a Hugging Face safetensors checkpoint folder onto a backend."""
        config = ModelConfig.from_file(path)
        if max_seq_len is not None:
            if max_seq_len <= 0:
                raise InvalidRequestError(f"max_seq_len must be positive, got {max_seq_len}")
            config = replace(config, max_seq_len=min(max_seq_len, config.max_seq_len))
        quant = config.quantization
        if not isinstance(backend, Backend):
            # Automatic choice for a quantized checkpoint: the first backend whose kernels run its format.
            backend = backend_for_format(quant.bits, quant.group_size) if backend is None and quant else (
                load_backend(backend)
            )
        dtype = choose_dtype(backend, dtype, config.torch_dtype, quantized=quant is not None)
        checkpoint = Checkpoint(path)
        shapes = weight_shapes(config)
        weights: dict[str, Placed] = {}
        embedding_role = "tied" if config.tie_word_embeddings else "embedding"
        for done, (name, tensor) in enumerate(read_weights(checkpoint, config, shapes), start=1):
            role = embedding_role if name == "model.embed_tokens.weight" else "linear"
            weights[name] = place(backend.ops, name, tensor, dtype, role)
            if progress is not None:
                progress(done, len(shapes), name)
        if num_kv_blocks is None:
            tokens = min(DEFAULT_KV_TOKENS, max(config.max_seq_len, 2048))
            num_kv_blocks = -(-tokens // block_size)
        return cls(config, backend, weights, dtype, num_kv_blocks, block_size)

    def _layer(self, w: dict[str, Placed], i: int) -> _Layer:
        p = f"model.layers.{i}."

        def tensor(name: str) -> Any:
            placed = w.get(p + name)
            return None if placed is None else placed.weight

        def projection(module: str) -> Linear:
            return Linear(w[f"{p}{module}.weight"], tensor(f"{module}.bias"))

        return _Layer(
            ln1=tensor("input_layernorm.weight"),
            ln2=tensor("post_attention_layernorm.weight"),
            q=projection("self_attn.q_proj"),
            k=projection("self_attn.k_proj"),
            v=projection("self_attn.v_proj"),
            o=projection("self_attn.o_proj"),
            q_norm=tensor("self_attn.q_norm.weight"),
            k_norm=tensor("self_attn.k_norm.weight"),
            gate=projection("mlp.gate_proj"),
            up=projection("mlp.up_proj"),
            down=projection("mlp.down_proj"),
            window=self.config.layer_sliding_windows[i],
        )

    def projections(self) -> list[Linear]:
        """Every linear projection, LM head included (profilers wrap their bound ops)."""
        names = ("q", "k", "v", "o", "gate", "up", "down")
        return [getattr(layer, n) for layer in self.layers for n in names] + [self.lm_head]

    def _check_backend_supports(self, config: ModelConfig) -> None:
        if any(w is not None for w in config.layer_sliding_windows):
            op = "paged_attention" if "paged_attention" in self.ops.native else "attention"
            if not self.ops.accepts(op, "sliding_window"):
                raise UnsupportedFeatureError(
                    f"this model uses sliding-window attention but backend {self.backend.name!r}'s "
                    f"{op} takes no sliding_window; choose another backend"
                )

    # ------------------------------------------------------------ validation
    def _validate(self, items: Sequence[ForwardItem]) -> None:
        if not items:
            raise InvalidRequestError("a forward pass needs at least one item")
        seen: set[Hashable] = set()
        vocab = self.config.vocab_size
        for item in items:
            if item.seq_id in seen:
                raise InvalidRequestError(f"sequence {item.seq_id!r} appears twice in one batch")
            seen.add(item.seq_id)
            n = len(item.q_tokens)
            if n == 0:
                raise InvalidRequestError(f"sequence {item.seq_id!r}: empty token list; give at least one token")
            tokens = np.asarray(item.q_tokens)
            if tokens.dtype.kind not in "iu":
                raise InvalidRequestError(f"sequence {item.seq_id!r}: token ids must be integers")
            bad = tokens[(tokens < 0) | (tokens >= vocab)]
            if bad.size:
                raise InvalidRequestError(
                    f"sequence {item.seq_id!r}: token id {int(bad[0])} is outside the vocabulary [0, {vocab})"
                )
            cached = self.kv.length(item.seq_id) if item.seq_id in self.kv else 0
            if item.pos_offset != cached:
                raise PositionMismatchError(
                    f"sequence {item.seq_id!r}: tokens start at position {item.pos_offset} "
                    f"but {cached} tokens are cached; continue at position {cached}"
                )
            if cached + n > self.config.max_seq_len:
                raise ContextLengthExceededError(
                    f"sequence {item.seq_id!r}: {cached + n} tokens exceed the context length "
                    f"of {self.config.max_seq_len}; shorten the prompt or max_tokens"
                )

    # --------------------------------------------------------------- forward
    def forward(self, items: Sequence[ForwardItem], all_logits: bool = False) -> ForwardOutput:
        """Run one unified batch; logits stay on the backend.

        With ``all_logits`` every query position of every item gets a row;
        otherwise only the last position of final chunks does. On any error
        the KV bookkeeping is rolled back, so the batch changed nothing.
        """
        self._validate(items)
        reservation = self.kv.reserve((item.seq_id, item.q_tokens) for item in items)
        try:
            out = self._forward(items, all_logits)
        except BaseException:
            self.kv.rollback(reservation)
            raise
        self.kv.commit(reservation)
        return out

    def _attention_batch(self, items: Sequence[ForwardItem]) -> AttentionBatch:
        kv = self.kv
        lengths = np.array([len(it.q_tokens) for it in items], dtype=np.int32)
        positions = np.concatenate(
            [np.arange(it.pos_offset, it.pos_offset + n, dtype=np.int32) for it, n in zip(items, lengths)]
        )
        slots = np.concatenate([kv.slots(it.seq_id, it.pos_offset, int(n)) for it, n in zip(items, lengths)])
        tables = [kv.block_table(it.seq_id) for it in items]
        width = max(len(t) for t in tables)
        block_tables = np.zeros((len(items), width), dtype=np.int32)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = table
        cu = np.zeros(len(items) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        seq_lens = np.array([it.pos_offset for it in items], dtype=np.int32) + lengths
        return AttentionBatch(positions, slots, cu, seq_lens, block_tables, kv.block_size)

    def _forward(self, items: Sequence[ForwardItem], all_logits: bool) -> ForwardOutput:
        ops, cfg = self.ops, self.config
        batch = self._attention_batch(items)
        batch.prepared = ops.prepare_attention_batch(batch)
        tokens = np.concatenate([np.asarray(it.q_tokens, dtype=np.int32) for it in items])
        positions = ops.from_numpy(batch.positions, None)
        slots = ops.from_numpy(batch.slot_mapping, None)
        n_tok = len(tokens)
        heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps, scale, inv_freq, pool = cfg.rms_norm_eps, self.scale, self.inv_freq, self.pool
        reshape, rope = ops.reshape, ops.rope

        h = self.embed_lookup(self.embed, ops.from_numpy(tokens, None))
        residual_in = None  # output of the previous block, not yet added to h
        for index, layer in enumerate(self.layers):
            if residual_in is None:
                x = ops.rms_norm(h, layer.ln1, eps)
            else:
                x, h = ops.add_rms_norm(residual_in, h, layer.ln1, eps)
            q = reshape(layer.q(x), (n_tok, heads, hd))
            k = reshape(layer.k(x), (n_tok, kv_heads, hd))
            v = reshape(layer.v(x), (n_tok, kv_heads, hd))
            if layer.q_norm is not None:
                q = ops.rms_norm(q, layer.q_norm, eps)
                k = ops.rms_norm(k, layer.k_norm, eps)
            q = rope(q, positions, inv_freq)
            k = rope(k, positions, inv_freq)
            ops.kv_write(pool, index, k, v, slots)
            attn = ops.paged_attention(q, pool, index, batch, scale, layer.window)
            o = layer.o(reshape(attn, (n_tok, heads * hd)))
            x, h = ops.add_rms_norm(o, h, layer.ln2, eps)
            residual_in = layer.down(ops.silu_mul(layer.gate(x), layer.up(x)))
        h = ops.add(residual_in, h)

        rows: dict[Hashable, tuple[int, int]] = {}
        if all_logits:
            for i, it in enumerate(items):
                start, end = batch.query_range(i)
                rows[it.seq_id] = (start, end - start)
        else:
            picks = []
            for i, it in enumerate(items):
                if it.is_final_chunk:
                    rows[it.seq_id] = (len(picks), 1)
                    picks.append(batch.query_range(i)[1] - 1)
            if not picks:
                return ForwardOutput(None, rows)
            if len(picks) != n_tok:
                h = ops.take_rows(h, ops.from_numpy(np.asarray(picks, dtype=np.int32), None))
        logits = self.lm_head(ops.rms_norm(h, self.final_norm, eps))
        return ForwardOutput(logits, rows)

    # ------------------------------------------------------ seeds' interface
    def unified_forward(self, items: Sequence[ForwardItem | tuple]) -> dict[Hashable, np.ndarray]:
        """Mixed prefill/decode batch; last-position logits of final chunks, by seq id."""
        items = [it if isinstance(it, ForwardItem) else ForwardItem(*it) for it in items]
        out = self.forward(items)
        if out.logits is None:
            return {}
        host = self.ops.to_numpy(out.logits)
        return {seq_id: host[start] for seq_id, (start, _) in out.rows.items()}

    def prefill(self, cache_id: Hashable, tokens: Sequence[int]) -> np.ndarray:
        """Start a sequence; returns the last position's logits ``[vocab]``."""
        if cache_id in self.kv:
            raise InvalidRequestError(
                f"sequence {cache_id!r} already has a KV cache; release it or continue with decode"
            )
        return self.unified_forward([ForwardItem(cache_id, tokens, 0, True)])[cache_id]

    def decode(self, cache_id: Hashable, token: int, pos: int) -> np.ndarray:
        """Feed one token at ``pos``; returns logits ``[vocab]``."""
        self.kv.length(cache_id)  # unknown id -> clear error
        return self.unified_forward([ForwardItem(cache_id, [token], pos, True)])[cache_id]

    def decode_batch(self, steps: Sequence[tuple[Hashable, int, int]]) -> np.ndarray:
        """``(cache_id, token, pos)`` per sequence; logits ``[n, vocab]`` in that order."""
        for cache_id, _, _ in steps:
            self.kv.length(cache_id)
        out = self.unified_forward([ForwardItem(c, [t], p, True) for c, t, p in steps])
        return np.stack([out[c] for c, _, _ in steps])

    def forward_verify(self, cache_id: Hashable, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` and return logits for every one of them ``[n, vocab]``.

        For speculative decoding: roll back rejected tokens with :meth:`truncate_kv`.
        """
        start = self.kv.length(cache_id) if cache_id in self.kv else 0
        out = self.forward([ForwardItem(cache_id, tokens, start, True)], all_logits=True)
        return self.ops.to_numpy(out.logits)

    def truncate_kv(self, cache_id: Hashable, new_len: int) -> None:
        """Forget positions ``new_len`` on (speculative-decoding rollback).

        When the cut falls inside a block shared with another sequence, the
        kept part of that block is recomputed into a private block, so the
        shared one is never written.
        """
        recompute = self.kv.truncate(cache_id, new_len)
        if recompute:
            start = new_len - len(recompute)
            self.forward([ForwardItem(cache_id, recompute, start, is_final_chunk=False)])

    def release(self, cache_id: Hashable) -> None:
        self.kv.release(cache_id)

    def reset(self) -> None:
        """Drop every sequence; the KV pool is reused."""
        self.kv.reset()

    def kv_capacity(self) -> int:
        """Tokens the KV pool can hold in total."""
        return self.kv.num_blocks * self.kv.block_size

    def kv_bytes(self) -> int:
        cfg = self.config
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * DTYPE_BYTES.get(self.dtype, 4)
        return self.kv_capacity() * per_token
