"""``DecoderOnlyLLM``: one decoder built only from the ops table, composed from an Architecture.

What a block is made of (norm placement, activation, soft-capping, rope per
layer, the MLP slot...) comes from :class:`ferrum.arch.Architecture`, which the
family table builds from config.json; nothing here asks which family it runs.
It never imports a compute framework. Every forward pass is a *unified
batch*: any mix of prefill chunks and decode tokens of many sequences, laid
out token-major, sharing one paged KV pool. The convenience calls (prefill,
decode, forward_verify...) are all that one pass with different items.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

from ferrum.adapters import AdapterRegistry
from ferrum.arch import Rope, gains, kv_quant
from ferrum.arch.alibi import ALIBI_SINCE
from ferrum.arch.differential import combine_for
from ferrum.arch.altup import OUTPUT_SCALE
from ferrum.arch.mlp import ACTIVATION_OPS, MLP_KINDS
from ferrum.arch.norms import NORM_KINDS, SUB_NORMS, NormGate, gate_modules, norm_eps
from ferrum.arch.positions import sinusoidal_table
from ferrum.arch.ngram import NgramEmbedding, windows as ngram_windows
from ferrum.arch.per_layer import TABLE as PER_LAYER_TABLE, PerLayerEmbedding, PerLayerMix
from ferrum.arch.tensors import (
    Fuser, bias_of, is_norm, prepare, resolve_layout, weight_shapes,
)
from ferrum.attention import AttentionBatch
from ferrum.backends import Backend, backend_for_format, declared_version, load_backend
from ferrum.checkpoint import Checkpoint
from ferrum.config import ModelConfig
from ferrum.device_tokens import DeviceToken, ends_on_device, host_view, token_ids
from ferrum.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    PositionMismatchError,
    UnsupportedFeatureError,
)
from ferrum.hookspec import DTYPE_BYTES
from ferrum.limits import check_kv_pool, check_layer_count
from ferrum.mixers import mixer_kind
from ferrum.paged_kv import PagedKVManager
from ferrum.quant import bitnet
from ferrum.recurrent.snapshots import StateSnapshots
from ferrum.recurrent.state import RecurrentStates
from ferrum.weights import Linear, Placed, place, read_weights

__all__ = ["DecoderOnlyLLM", "DeviceToken", "ForwardItem", "ForwardOutput", "choose_dtype", "weight_shapes"]

DEFAULT_BLOCK_SIZE = 16
#: Default KV pool size in tokens when the caller does not choose one.
DEFAULT_KV_TOKENS = 16384

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ForwardItem:
    """One slice of one sequence in a unified batch (the seeds' ``UnifiedBatchItem``).

    ``q_tokens`` are fed at positions ``pos_offset .. pos_offset + len - 1``;
    ``pos_offset`` must equal the sequence's cached length. Logits are
    produced for the last position of final chunks, or for every position of
    items with ``full_logits`` (speculative verification, scoring).
    ``metadata`` is the request's (see :mod:`ferrum.metadata`). The last
    token may be a :class:`DeviceToken`, still on the backend.
    """

    seq_id: Hashable
    q_tokens: Sequence[int | DeviceToken]
    pos_offset: int
    is_final_chunk: bool = True
    full_logits: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: Name of a LoRA adapter loaded on the model (``model.adapters``), or None for the base model.
    adapter: str | None = None


@dataclass(frozen=True)
class ForwardOutput:
    """Logits of one pass, still on the backend, and which rows belong to whom."""

    logits: Any  # backend array [rows, vocab]
    rows: dict[Hashable, tuple[int, int]]  # seq_id -> (first row, row count)


class _Layer:
    """One decoder block's weights; projections carry the op that applies them, ``mlp`` is its MLP slot."""

    __slots__ = ("pre_attn", "post_attn", "pre_mlp", "post_mlp", "qkv", "o", "q_norm", "k_norm",
                 "mlp", "window", "rope", "scale", "sinks", "alibi", "chunk", "query_scaling", "v_norm", "qk_eps",
                 "scalar", "mixer", "gate", "recurrent", "loop_gate", "kv_layer", "per_layer", "wide", "sub_norm",
                 "differential", "shortcut", "residual", "residual_scales", "skip", "kv_steps")

    def __init__(self, **fields: Any):
        for name in self.__slots__:
            setattr(self, name, fields[name])


class _RopeTables:
    """One rope's frequency tables on the backend; ``for_batch`` picks per token (see :mod:`ferrum.arch.rope`)."""

    def __init__(self, ops: Any, rope: Rope):
        self.ops, self.rope = ops, rope
        self.short = ops.from_numpy(rope.inv_freq(), "float32")
        self.long = ops.from_numpy(rope.inv_freq(long=True), "float32") if rope.switches else None

    @property
    def fixed(self) -> Any | None:
        """The table of a rope that has one table: blocks rotate with it inside their (compiled) first half."""
        return self.short if self.long is None else None

    def for_batch(self, positions: Any, batch: AttentionBatch) -> Callable[[Any], Any]:
        """Rotation for a rope whose table depends on the batch (longrope), applied between the block halves."""
        ops, rope, ratio = self.ops, self.ops.rope, self.rope.long_scaled
        rotations = [lambda x: rope(x, positions, self.short),
                     lambda x: rope(x, positions, self.long) if ratio == 1.0 else
                     ops.mul_scalar(rope(x, positions, self.long), ratio)]
        return per_token(self.ops, (batch.positions >= self.rope.original_max).astype(np.int64), rotations)


def per_token(ops: Any, choice: np.ndarray, variants: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """``x -> y`` whose row ``t`` is ``variants[choice[t]](x)``'s: the one variant a batch uses, else each used
    one over the whole batch and every token's row picked (few variants, each a cheap elementwise op)."""
    used, which = np.unique(choice, return_inverse=True)
    if len(used) == 1:
        return variants[int(used[0])]
    n = len(choice)
    rows = ops.from_numpy((np.arange(n) + n * which.reshape(-1)).astype(np.int32), None)
    return lambda x: ops.take_rows(ops.concat([variants[int(u)](x) for u in used]), rows)


def query_scaler(ops: Any, scaling: tuple, positions: np.ndarray) -> Callable[[Any], Any] | None:
    """Llama 4's attention scaling of a batch's queries (``Architecture.query_scaling`` ``(beta, original)``, or a
    layer's ``(beta, original, shift)``: positions counted from ``-shift``); None where every factor is 1
    (positions before ``original``)."""
    beta, original, shift = (*scaling, 0)[:3]
    factors, choice = np.unique(1.0 + beta * np.log1p(np.floor((positions + shift) / original)),
                                return_inverse=True)
    if len(factors) == 1 and factors[0] == 1.0:
        return None
    scale = [lambda q, f=float(f): q if f == 1.0 else ops.mul_scalar(q, f) for f in factors]
    return per_token(ops, choice.reshape(-1), scale)


class _Pass:
    """One forward pass's state that its blocks' mixer steps read and change (:meth:`ferrum.mixers.MixerKind.step`):
    the batch and its device positions and slots, the query rotations and scalers that depend on the batch, the
    chunked views made of it, the sequences (whose recurrent states a step gathers) and the layers' per-layer inputs.
    Past the last KV write (:meth:`narrow`) the positions, rotations, scalers, inputs and the batch attended
    (``narrowed``) are the kept rows'."""

    __slots__ = ("model", "ops", "pool", "softcap", "specs", "states", "last_write", "batch", "narrowed", "kept",
                 "chunked", "slots", "seq_ids", "inputs", "positions", "ropes", "scalers", "embedded", "values")

    def __init__(self, model: DecoderOnlyLLM, batch: AttentionBatch, kept: np.ndarray | None,
                 seq_ids: list[Hashable]):
        ops = model.ops
        self.model, self.ops, self.pool, self.states = model, ops, model.pool, model.states
        self.softcap, self.specs = model.config.arch.attn_softcap, model.config.arch.layers
        self.last_write, self.kept, self.seq_ids = model._last_write, kept, seq_ids
        self.batch = self.narrowed = batch  # what blocks attend: the batch, past the last KV write the kept rows'
        self.chunked: dict[int, AttentionBatch] = {}  # chunk size -> the batch its layers attend
        self.slots = ops.from_numpy(batch.slot_mapping, None)
        self.inputs: list[tuple] = []
        self.embedded: Any = None  # the token embeddings the first block reads (Zamba 2's shared blocks read them too)
        self.values: Any = None  # the values the first RWKV-7 layer hands the later ones (ferrum.mixers.ValueResidual)
        self._rebase(batch, {layer.query_scaling for layer in model.layers} - {None})

    def _rebase(self, batch: AttentionBatch, scalings: Any) -> None:
        """Positions, rotations and query scalers of ``batch``'s rows."""
        ops = self.ops
        self.positions = positions = ops.from_numpy(batch.positions, None)
        self.ropes = {key: tables.for_batch(positions, batch) for key, tables in self.model.ropes.items()
                      if tables.fixed is None}
        self.scalers = {scaling: query_scaler(ops, scaling, batch.positions) for scaling in scalings}

    def narrow(self, index: int) -> Any:
        """At layer ``index``, the last that writes K/V: the pass goes on with the kept rows only (see
        ``DecoderOnlyLLM._rows_past_last_write``); their indices on the backend, for the step to take its own rows."""
        ops, kept, model = self.ops, self.kept, self.model
        keep = ops.from_numpy(kept.astype(np.int32), None)
        self.narrowed = narrowed = self.batch.narrowed(kept)
        self.inputs[index:] = [tuple(ops.take_rows(x, keep) for x in xs) for xs in self.inputs[index:]]
        narrowed.prepared = ops.prepare_attention_batch(narrowed)
        model.adapters.keep_rows(kept)
        if index < len(model.layers) - 1:  # the blocks after it rotate and scale the kept rows' queries
            self._rebase(narrowed, self.scalers)
        return keep


def _tensor(weights: dict[str, Placed], name: str) -> Any:
    """A placed tensor on the backend, or None where there is none."""
    placed = weights.get(name)
    return None if placed is None else placed.weight


def _norm_weights(weights: dict[str, Placed], module: str) -> tuple[Any, Any] | None:
    """A norm's ``(weight, bias)`` on the backend (bias None where it has none); None where there is no such norm."""
    weight, bias = weights.get(f"{module}.weight"), weights.get(f"{module}.bias")
    return None if weight is None else (weight.weight, None if bias is None else bias.weight)


def kv_token_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes of K/V one token takes in the pool: a pool layer per layer that computes keys and values (layers that
    read another's, ``LayerSpec.kv_source``, and recurrent layers have none)."""
    layers = config.arch.kv_pool_layers
    return 2 * layers * config.num_kv_heads * config.head_dim * DTYPE_BYTES.get(dtype, 4)


def choose_dtype(
    backend: Backend, requested: str | None, checkpoint_dtype: str | None, quantized: bool = False
) -> str:
    """The user's dtype, else the backend's low-bit kernel dtype for quantized checkpoints,
    else the checkpoint's on accelerators, else the backend default."""
    info = backend.info
    if requested is not None:
        if not isinstance(requested, str):
            raise InvalidRequestError(f"dtype is a name such as {info.dtypes[0]!r}, not {requested!r}")
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


def times_unrounded(ops: Any, x: Any, factor: float, dtype: str) -> Any:
    """``x * factor`` with the product in float32, rounded once to ``dtype``, as transformers multiplies a tensor by
    a Python float (``mul_scalar`` rounds the factor to ``x``'s dtype first: MiniMax's alpha 3.5566 is 3.5625 in
    bfloat16, a bias on every block)."""
    if dtype == "float32":
        return ops.mul_scalar(x, factor)
    return ops.cast(ops.mul_scalar(ops.cast(x, "float32"), factor), dtype)


class DecoderOnlyLLM:
    """A decoder of any family in :data:`ferrum.arch.families.FAMILIES` over a paged KV cache."""

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
        arch = config.arch
        self.pool = ops.kv_alloc(
            arch.kv_pool_layers, num_kv_blocks, block_size, config.num_kv_heads, config.head_dim, dtype
        )
        chunks = {spec.chunk for spec in arch.layers} - {None}
        if any(c % block_size for c in chunks):
            raise UnsupportedFeatureError(
                f"this model attends in chunks of {min(chunks)} positions (attention_chunk_size), which Ferrum runs "
                f"with a KV block size that divides them; block_size {block_size} does not")
        embed = weights[f"{arch.prefix}embed_tokens.weight"]
        self.embed, self.embed_lookup = embed.weight, embed.embedding
        #: Learned absolute positions (GPT-2), or None.
        self.position_table = weights.get(f"{arch.prefix}embed_positions.weight")
        self._ones: dict[int, Any] = {}  # size -> the weight of ones of weightless RMSNorms, placed once
        #: Gemma 4 E2B / E4B's per-layer inputs (ferrum.arch.per_layer), or None.
        self.per_layer = None if arch.per_layer_inputs is None else PerLayerEmbedding(ops, config, weights)
        #: LongCat-Flash-Lite's n-gram embedding (ferrum.arch.ngram), or None.
        self.ngram = None if arch.ngram is None else NgramEmbedding(ops, arch.ngram, arch.prefix, weights)
        #: Whether every input token must be on the host (the n-gram embedding hashes tokens there), so a step is
        #: never fed the previous one's picks on the device (``ExecutorCapabilities.async_stepping``).
        self.needs_host_tokens = self.ngram is not None
        #: The ends of a residual stream wider than one array (``Architecture.wide``: Gemma 3n's copies,
        #: ferrum.arch.altup; hyper-connections' streams, ferrum.arch.hyper), or None.
        self.wide = None if arch.wide is None else arch.wide.stream(
            self, lambda name: weights[arch.prefix + name].weight,
            lambda module: Linear(weights[f"{arch.prefix}{module}.weight"],
                                  _tensor(weights, f"{arch.prefix}{module}.bias")))
        self.final_norm = _norm_weights(weights, f"{arch.prefix}norm") if arch.norm_params else self._weightless()
        if arch.head_gain is not None:  # the logits are linear in the final norm's weight (and bias)
            gain = gains.number(ops, weights[arch.head_gain].weight)
            self.final_norm = tuple(None if t is None else ops.mul_scalar(t, gain) for t in self.final_norm)
        #: The norm of the embeddings before the first block (BLOOM's; nanochat's, weightless), or None.
        self.embed_norm = None
        if arch.embed_norm:
            self.embed_norm = _norm_weights(weights, f"{arch.prefix}embed_norm") if (
                arch.norm_params and arch.embed_norm_params) else self._weightless()
        head_bias = weights.get(bias_of(arch.lm_head))
        self.lm_head = Linear(embed if config.tie_word_embeddings else weights[arch.lm_head],
                              None if head_bias is None else head_bias.weight)
        self.ropes = {id(r): _RopeTables(ops, r) for r in {id(spec.rope): spec.rope for spec in arch.layers}.values()}
        #: How the layers' attention projections are built, and what its layers share per rope and latent sizes
        #: (latent attention's 0/1 placement matrices, ferrum.arch.mla).
        self.attention = arch.attention
        shared = {(id(spec.rope), id(spec.mla)): spec for spec in arch.layers}
        self.attention_placed = {key: self.attention.place(ops, dtype, spec.rope, spec.mla)
                                 for key, spec in shared.items()}
        #: Each layer's layer of the KV pool (``Architecture.kv_layers``).
        self.kv_layers = arch.kv_layers
        # each layer's kind of mixer (LayerSpec.mixer -> ferrum.mixers.MIXER_KINDS, or two side by side)
        kinds = [mixer_kind(spec) for spec in arch.layers]
        #: The last layer that writes K/V: past it, a pass computes only its logit rows (``_rows_past_last_write``).
        #: None where no layer attends (a Nemotron-H pattern of Mamba-2 and MLP blocks alone).
        self._last_write = max((i for i, (kind, spec) in enumerate(zip(kinds, arch.layers)) if kind.writes_kv(spec)),
                               default=None)
        #: Whether no block from it on carries a state (a recurrent mixer needs every row to carry its state on).
        #: Whether the stream's arrays before its last are carried past the mixer step into each block's second
        #: half (attention residuals' stored blocks: ``Architecture.wide``'s ``carries``), so no pass is narrowed.
        self._carries = arch.wide is not None and arch.wide.carries
        self._narrows = self._last_write is not None and not any(
            kind.stateful for kind in kinds[self._last_write:]) and not self._carries
        #: ALiBi's slopes, float32 [heads] on the backend, or None.
        self._alibi = None if arch.alibi_slopes is None else ops.from_numpy(
            np.asarray(arch.alibi_slopes, dtype=np.float32), "float32")
        self.layers = [self._layer(weights, i) for i in range(config.num_layers)]
        #: The recurrent mixers' states per sequence (none where every layer attends).
        self.states = RecurrentStates(ops, {i: kind.state_shapes(arch, spec, dtype) for i, (kind, spec) in
                                            enumerate(zip(kinds, arch.layers)) if kind.stateful})
        #: Those states at cached prefixes' block boundaries, for the prefix cache (None where every layer attends).
        self.snapshots = StateSnapshots(self.states, self.kv) if self.states.layers else None
        #: Each block's work before and after its mixer's step, plain and as the backend compiles it.
        #: The layers before which the stream is normed by the final norm (a looped model's later passes).
        self._loop_starts = arch.loop_starts
        #: Which layers a pass skips (``LayerSpec.identity``); the first to run after each start reads the stream
        #: as the first block does.
        self._skips = [spec.identity for spec in arch.layers]
        runs = [i for i, skip in enumerate(self._skips) if not skip]
        firsts = {next((i for i in runs if i >= start), None) for start in {0, *self._loop_starts}}
        self._halves = [None if skip else self._block_halves(layer, first=i in firsts)
                        for i, (layer, skip) in enumerate(zip(self.layers, self._skips))]
        #: Each block's mixer step over a pass's batch, bound once (a pass looks no kind up per layer).
        self._steps = [kind.step for kind in kinds]
        #: Which layers hand a shortcut output to the next (``LayerSpec.shortcut`` "give").
        self._gives = [spec.shortcut == "give" for spec in arch.layers]
        self._compiled = [None if halves is None else tuple(map(ops.compile_fn, halves)) for halves in self._halves]
        self._final = self._final_norm_fn()
        self._final_compiled = ops.compile_fn(self._final)
        #: LoRA adapters resident beside the base weights (see :mod:`ferrum.adapters`).
        self.adapters = AdapterRegistry(self)
        #: Bytes the weights occupy on the backend (packed ones at their packed or repacked size).
        self.weight_bytes = sum(p.nbytes for p in {id(p): p for p in weights.values()}.values())  # aliases once
        #: Of those, the mixture-of-experts stacks' (a decode step reads only the experts its tokens chose).
        self.expert_weight_bytes = sum(p.nbytes for name, p in weights.items() if ".switch_mlp." in name)
        #: Of those, the tables a step looks a few rows up in: the input embedding where the LM head is a matrix
        #: of its own, learned positions.
        self.lookup_weight_bytes = (0 if config.tie_word_embeddings else embed.nbytes) + (
            0 if self.position_table is None else self.position_table.nbytes) + (
            0 if self.per_layer is None else weights[arch.prefix + PER_LAYER_TABLE].nbytes) + (
            0 if self.ngram is None else sum(table.nbytes for table in self.ngram.tables))

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
        trained = config.max_seq_len  # the rows of a learned position table, whatever context is asked for
        if max_seq_len is not None:
            if not isinstance(max_seq_len, Integral) or isinstance(max_seq_len, bool) or max_seq_len <= 0:
                raise InvalidRequestError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
            if max_seq_len > config.max_seq_len:
                limit = config.arch.context_limit
                why = limit[1] if limit is not None and limit[0] == config.max_seq_len else (
                    "positions it was not trained for")
                warnings.warn(f"max_seq_len {max_seq_len} is past {path}'s context of {config.max_seq_len} tokens "
                              f"({why}); the context stays at that", stacklevel=2)
            config = replace(config, max_seq_len=min(max_seq_len, config.max_seq_len))
        quant = config.quantization
        if quant is not None and quant.runs_as_float:  # FP8: decoded to float at load, loaded as a float model
            quant = None
        if not isinstance(backend, Backend):
            # Automatic choice for a quantized checkpoint: the first backend whose kernels run its format.
            backend = backend_for_format(quant.bits, quant.group_size) if backend is None and quant else (
                load_backend(backend)
            )
        dtype = choose_dtype(backend, dtype, config.torch_dtype, quantized=quant is not None)
        checkpoint = Checkpoint(path)
        check_layer_count(config.arch.layers_with_tensors, checkpoint.names(), str(path))
        if num_kv_blocks is None:
            tokens = min(DEFAULT_KV_TOKENS, max(config.max_seq_len, 2048))
            num_kv_blocks = -(-tokens // block_size)
        check_kv_pool(num_kv_blocks, block_size, kv_token_bytes(config, dtype), backend.info.device)
        config = resolve_layout(config, checkpoint.shapes())
        shapes = weight_shapes(replace(config, max_seq_len=trained))
        weights: dict[str, Placed] = {}
        embedding = f"{config.arch.prefix}embed_tokens.weight"
        roles = {embedding: "tied" if config.tie_word_embeddings else "embedding",
                 f"{config.arch.prefix}embed_positions.weight": "embedding",
                 f"{config.arch.prefix}{PER_LAYER_TABLE}": "embedding"}
        if config.arch.ngram is not None:  # the n-gram tables: looked a few rows up a step
            roles.update({config.arch.prefix + name: "embedding" for name in config.arch.ngram.lookup_tables()})
        # Fused projections (one linear, then a split) only where the backend splits natively.
        fuser = Fuser(config, shapes) if "split" in backend.ops.native else None
        bitnet_scheme = None if config.quantization is None else config.quantization.bitnet
        needs, since = config.arch.expert_features
        for done, (name, tensor) in enumerate(read_weights(checkpoint, config, shapes), start=1):
            for prepared, host in prepare(config, name, tensor):
                for part, array in fuser.add(prepared, host) if fuser else [(prepared, host)]:
                    # biases, norms and sinks are used as they are, never laid out for products (a 2-D norm too);
                    # a float32 vector too (a router's correction bias); a packed matrix keeps its compute dtype
                    float32 = part.endswith(config.arch.keep_float32) and isinstance(array, np.ndarray)
                    as_is = (part.endswith((".bias", ".sinks", ".layer_scalar", OUTPUT_SCALE)) or is_norm(part)
                             or gains.is_gain(config.arch, part)  # Talkie's learned scalars
                             or kv_quant.is_step(part)  # AFM's key and value steps
                             or float32 and (array.ndim == 1 or not part.endswith(".weight"))  # Kimi's dt_bias
                             or ".act_fn." in part  # xIELU's learned values (Apertus)
                             or part.endswith(("conv1d.weight",  # a depthwise convolution's taps (q_conv1d...)
                                               ".A_log")))  # Mamba-1's [D, N] decays
                    role = roles.get(part, "bias" if as_is else "linear")
                    weights[part] = place(backend.ops, part, array, "float32" if float32 else dtype, role, needs,
                                          since)
                    if bitnet_scheme is not None and role == "linear" and bitnet.quantizes_input(
                            bitnet_scheme, part, f"{config.arch.prefix}layers."):
                        weights[part] = bitnet.quantized_inputs(backend.ops, weights[part])
            if progress is not None:
                progress(done, len(shapes), name)
        for alias, source in config.arch.aliases:  # a layer reading another's tensors (Zamba 2's shared blocks)
            stem, into = config.arch.prefix + source, config.arch.prefix + alias
            weights.update({into + name[len(stem):]: placed for name, placed in list(weights.items())
                            if name.startswith(stem)})
        for name, values in config.arch.computed.items():  # computed, not stored (MiniMax's decay rates)
            name = config.arch.prefix + name  # under the wrapper's prefix too (MiniMax-VL-01's language_model.)
            weights[name] = place(backend.ops, name, np.asarray(values, dtype=np.float32), "float32", "bias")
        if config.arch.sinusoidal_positions:  # computed, not stored (XGLM)
            table = sinusoidal_table(config.max_seq_len, config.hidden_size, config.arch.position_offset)
            weights[f"{config.arch.prefix}embed_positions.weight"] = place(
                backend.ops, "embed_positions", table, dtype, "embedding")
        return cls(config, backend, weights, dtype, num_kv_blocks, block_size)

    def _layer(self, w: dict[str, Placed], i: int) -> _Layer:
        config = self.config
        arch, spec = config.arch, config.arch.layers[i]
        p = f"{arch.prefix}layers.{i}."

        def tensor(name: str) -> Any:
            placed = w.get(p + name)
            return None if placed is None else placed.weight

        def projection(module: str) -> Linear:
            return Linear(w[f"{p}{module}.weight"], tensor(f"{module}.bias"))

        norms = {slot: _norm_weights(w, p + name) if arch.norm_params else self._weightless()
                 for slot, name in spec.block_norms(arch).items()}
        for slot in spec.gated_norms:  # A.X-K2's: the norm's gate rides with its weights
            gate = NormGate(self.ops, *map(projection, gate_modules(spec.block_norms(arch)[slot])))
            norms[slot] = (*norms[slot], gate)
        sinks = tensor("self_attn.sinks")
        q_norm = _norm_weights(w, f"{p}self_attn.{arch.qk_norm_names[0]}")
        k_norm = _norm_weights(w, f"{p}self_attn.{arch.qk_norm_names[1]}")
        if arch.qk_norm is not None and not arch.qk_norm_params:  # a norm without a weight (Llama 4's L2 norm): 1s
            q_norm = k_norm = (self._ones_of(config.head_dim), None)
        kind = mixer_kind(spec)
        mixer = kind.build(self, spec, tensor, projection)
        # a padded layer's q/k/v norms: the stored head's RMSNorm (see ferrum.arch.heads)
        fit = (spec.heads.head_dim or config.head_dim) / config.head_dim
        v_norm = scalar = None
        if arch.v_norm:
            v_norm = (self.ops.from_numpy(np.full(config.head_dim, np.sqrt(fit), dtype=np.float32), self.dtype), None)
        if arch.layer_scalar:
            value = np.asarray(self.ops.to_numpy(w[p + "layer_scalar"].weight), dtype=np.float32).reshape(-1)[0]
            scalar = self.ops.from_numpy(np.full(config.hidden_size, value, dtype=np.float32), self.dtype)
        residual_scales = spec.residual_scales or (1.0, 1.0, 1.0, 1.0)
        if arch.gains:  # Talkie's: attention's and the MLP's outputs scaled, each query head weighed once normed
            residual_scales = (1.0, gains.number(self.ops, tensor(gains.ATTN)), 1.0,
                               gains.number(self.ops, tensor(gains.MLP)))
            heads = gains.values(self.ops, tensor(gains.HEADS))
            q_norm = (self.ops.from_numpy(np.repeat(heads[:, None], config.head_dim, axis=1), self.dtype), None)
        return _Layer(
            mixer=kind,
            gate=mixer.gate,
            recurrent=mixer.recurrent,
            loop_gate=mixer.loop_gate,
            v_norm=v_norm,
            qk_eps=norm_eps(config, "qk") * fit,
            scalar=scalar,
            pre_attn=norms.get("pre_attn"),
            post_attn=norms.get("post_attn"),
            pre_mlp=norms.get("pre_mlp"),
            post_mlp=norms.get("post_mlp"),
            qkv=mixer.qkv,
            o=mixer.o,
            sub_norm=_norm_weights(w, p + SUB_NORMS["attn"]) if arch.sub_norms else None,
            differential=combine_for(self.ops, tensor, config, i, self.dtype) if arch.differential else None,
            q_norm=q_norm if spec.qk_norm else None,
            k_norm=k_norm if spec.qk_norm else None,
            mlp=MLP_KINDS[spec.mlp].build(self.ops, tensor, projection, config, i),
            window=spec.window,
            shortcut=spec.shortcut,
            residual=spec.residual,
            residual_scales=residual_scales,
            skip=gains.number(self.ops, tensor(gains.SKIP)) if arch.embed_skip else None,
            rope=id(spec.rope),
            scale=arch.attn_scale if spec.attn_scale is None else spec.attn_scale,
            sinks=None if sinks is None else self.ops.cast(sinks, "float32"),  # the contract's float32 logits
            alibi=self._alibi,
            chunk=spec.chunk,
            query_scaling=spec.query_scaling or arch.query_scaling,
            kv_layer=self.kv_layers[i],
            per_layer=None if arch.per_layer_inputs is None else PerLayerMix(
                self.ops, projection, tensor, getattr(self.ops, ACTIVATION_OPS[arch.activation]), config.rms_norm_eps),
            wide=None if arch.wide is None else arch.wide.layer(self, tensor, projection, i),
            kv_steps=kv_quant.steps(self.ops, tensor) if arch.kv_quant else None,
        )

    def _weightless(self) -> tuple[Any, Any]:
        """The weights of a block or final norm that has none: ``(None, None)`` for a LayerNorm (OLMo 1's), which
        takes none; a weight of ones for an RMSNorm (nanochat's), as the backends' ``rms_norm`` needs one."""
        if self.config.arch.norm != "rms":
            return None, None
        return self._ones_of(self.config.hidden_size), None

    def _ones_of(self, size: int) -> Any:
        """A placed weight of ``size`` ones (the weight of an RMSNorm that has none), one per size."""
        if size not in self._ones:
            self._ones[size] = self.ops.from_numpy(np.ones(size, dtype=np.float32), self.dtype)
        return self._ones[size]

    def _block_halves(self, layer: _Layer, first: bool) -> tuple[Callable[..., tuple], Callable[..., tuple]]:
        """``enter(*stream, positions) -> (*projected, h)`` and ``leave(mixed, h, *extra[, inputs]) -> stream``:
        pure functions of backend arrays, so a backend may compile them (``compile_fn``). The stream between blocks
        is ``(residual, h)``, the first block's ``(h,)`` (no residual to add yet), or Gemma 3n's copies
        (:func:`ferrum.arch.altup.block_halves`), or hyper-connections' streams (:mod:`ferrum.arch.hyper`): the
        wide stream's own halves. What ``enter`` projects from the normed input, how ``leave`` takes
        the mixer's output ``mixed`` (and ``extra``, what its output takes besides) and which second half the block
        has are its mixer kind's (:data:`ferrum.mixers.MIXER_KINDS`); the layer's per-layer inputs (Gemma 4 and 3n
        E2B / E4B) come last."""
        ops, cfg = self.ops, self.config
        kind = layer.mixer
        norm, add_norm = NORM_KINDS[cfg.arch.norm](ops, cfg.rms_norm_eps)
        post_attn_norm, post_mlp_norm = (NORM_KINDS[cfg.arch.norm](ops, norm_eps(cfg, slot))[0]
                                         for slot in ("post_attn", "post_mlp"))
        project, mixer_out = kind.project(self, layer), kind.output(self, layer)
        if layer.wide is not None:
            return layer.wide.halves(self, layer, project, mixer_out, norm)
        scalar, mix, skip = layer.scalar, layer.per_layer, layer.skip
        # MiniMax's blocks: each half's output times beta joins alpha times its residual, the norm's input or output
        alpha, beta, mlp_alpha, mlp_beta = layer.residual_scales
        normed = layer.residual == "normed"

        def scaled(x: Any, factor: float) -> Any:
            return x if factor == 1.0 else times_unrounded(ops, x, factor, self.dtype)

        def add_then_norm(x: Any, h: Any, weights: Any) -> tuple[Any, Any]:
            """``(norm(x + h), x + h)``; without a norm there (OLMo 2's blocks) the sum is both."""
            if weights is None:
                summed = ops.add(x, h)
                return summed, summed
            return add_norm(x, h, weights)

        def enter_first(h: Any, positions: Any) -> tuple:
            x = h if layer.pre_attn is None else norm(h, layer.pre_attn)
            return project(x, scaled(x if normed else h, alpha), positions)

        def enter(residual: Any, h: Any, positions: Any) -> tuple:
            x, h = add_then_norm(residual, h, layer.pre_attn)
            return project(x, scaled(x if normed else h, alpha), positions)

        def mixer_then_mlp(mixed: Any, h: Any, *rest: Any) -> tuple:
            # the previous layer's shortcut output comes last (LayerSpec.shortcut "take")
            rest, taken = (rest[:-1], rest[-1]) if layer.shortcut == "take" else (rest, None)
            rest, skipped = (rest[:-1], rest[-1]) if skip is not None else (rest, None)  # the embeddings (Talkie)
            extra, inputs = (rest[:-1], rest[-1:]) if mix is not None else (rest, ())  # the mixer's; per-layer inputs
            o = mixer_out(mixed, *extra)
            if layer.post_attn is not None:
                o = post_attn_norm(o, layer.post_attn)
            if layer.mlp is None:  # the block ends with its mixer
                return o, h
            x, h = add_then_norm(scaled(o, beta), h, layer.pre_mlp)
            h = scaled(x if normed else h, mlp_alpha)
            out, given = layer.mlp(x) if layer.shortcut == "give" else (layer.mlp(x), None)
            out = out if layer.post_mlp is None else post_mlp_norm(out, layer.post_mlp)
            out = scaled(out, mlp_beta)
            if taken is not None:
                out = ops.add(out, taken)
            if skipped is not None:
                out = ops.add(out, scaled(skipped, skip))
            if given is not None:  # handed on to the next layer by the pass (DecoderOnlyLLM._forward)
                return out, h, given
            if mix is not None:  # Gemma 4 E2B / E4B: the stream so far, then what the layer's per-layer inputs add
                h = ops.add(out, h)
                out = mix(h, *inputs)
            if scalar is not None:  # Gemma 4: the stream after the layer, times its layer_scalar
                return ops.mul(out, scalar), ops.mul(h, scalar)
            return out, h

        def mixer_beside_mlp(mixed: Any, h: Any, *extra: Any) -> tuple:
            return mixer_out(mixed, *extra), h  # the MLP's output joined h in the first half

        def mlp_alone(x: Any, h: Any) -> tuple:
            return layer.mlp(x), h

        ends = {"mixer_then_mlp": mixer_then_mlp, "mixer_beside_mlp": mixer_beside_mlp, "mlp_alone": mlp_alone}
        return enter_first if first else enter, ends[kind.ends(cfg.arch)]

    def _final_norm_fn(self) -> Callable[[Any, Any], tuple]:
        """``final_norm(*stream) -> (normed,)`` after the last block: a pure function, compiled like the
        halves. The LM head stays outside, so logits, which outlive the pass, are never a buffer that a
        compiled call reuses (``compile_fn``)."""
        ops, wide, arch = self.ops, self.wide, self.config.arch
        norm, _ = NORM_KINDS[arch.norm](ops, norm_eps(self.config, "final"))

        def final_norm(residual: Any, h: Any) -> tuple:
            return (norm(ops.add(residual, h), self.final_norm),)

        def final_wide(*stream: Any) -> tuple:  # Gemma 3n's copies, hyper-connections' streams, made one
            return (norm(wide.narrow(stream), self.final_norm),)

        if wide is not None:
            return final_wide

        return final_norm

    def projections(self) -> list[Linear]:
        """Every linear projection, LM head included (profilers wrap their bound ops)."""
        attention = [p for layer in self.layers for p in layer.mixer.projections(layer)]
        mlps = [p for layer in self.layers if layer.mlp is not None for p in layer.mlp.projections()]
        gates = [p for layer in self.layers for norm in (layer.pre_attn, layer.post_attn, layer.pre_mlp, layer.post_mlp)
                 if norm is not None and len(norm) > 2 for p in norm[2].linears]
        per_layer = [] if self.per_layer is None else [self.per_layer.projection] + [
            p for layer in self.layers for p in (layer.per_layer.gate, layer.per_layer.projection)]
        wide = [] if self.wide is None else self.wide.projections() + [
            p for layer in self.layers for p in layer.wide.projections()]
        ngram = [] if self.ngram is None else self.ngram.projections
        return attention + mlps + gates + per_layer + wide + ngram + [self.lm_head]

    def _check_backend_supports(self, config: ModelConfig) -> None:
        op = "paged_attention" if "paged_attention" in self.ops.native else "attention"
        needs = {"sliding_window": any(w is not None for w in config.arch.windows),
                 "softcap": config.arch.attn_softcap is not None, "sinks": config.arch.sinks,
                 "alibi_slopes": config.arch.alibi_slopes is not None}
        what = {"sliding_window": "sliding-window attention", "softcap": "attention logit soft-capping",
                "sinks": "attention sinks", "alibi_slopes": "ALiBi position biases"}
        for arg, needed in needs.items():
            if needed and not self.ops.accepts(op, arg):
                raise UnsupportedFeatureError(
                    f"this model uses {what[arg]} but backend {self.backend.name!r}'s "
                    f"{op} takes no {arg}; choose another backend"
                )
        declared = declared_version(self.ops.info)
        if needs["alibi_slopes"] and declared < ALIBI_SINCE:  # an older plugin's argument of that name meant another
            raise UnsupportedFeatureError(
                f"this model uses ALiBi position biases (plugin API {'.'.join(map(str, ALIBI_SINCE))}), but backend "
                f"{self.backend.name!r} declares API {'.'.join(map(str, declared))}; update the plugin or choose "
                "another backend")

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
            host = item.q_tokens[:-1] if ends_on_device(item.q_tokens) else item.q_tokens
            if len(host):  # a decode step fed by the device has none to check
                tokens = np.asarray(host)
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
        otherwise every position of ``full_logits`` items and the last
        position of other final chunks do, in item order. On any error
        the KV bookkeeping is rolled back, so the batch changed nothing.
        """
        self._validate(items)
        if self.states.layers:
            self._check_states(items)
        salts = self.adapters.salts(items)
        reservation = self.kv.reserve(((item.seq_id, host_view(item.q_tokens)) for item in items), salts)
        try:
            with self.adapters.active(items):
                out = self._forward(items, all_logits)
        except BaseException:
            self.kv.rollback(reservation)
            self.states.discard()
            raise
        self.kv.commit(reservation)
        self.states.commit()
        if self.snapshots is not None:
            self.snapshots.after_pass(items)
        return out

    def _check_states(self, items: Sequence[ForwardItem]) -> None:
        """Drop the states of sequences the KV manager no longer holds, and refuse to continue a sequence whose
        cached positions have no state (KV adopted from the prefix cache without one, which
        :class:`~ferrum.recurrent.snapshots.StateSnapshots` prevents): its recurrent layers would start over."""
        self.states.prune(self.kv)
        for item in items:
            if item.pos_offset and item.seq_id not in self.states:
                raise UnsupportedFeatureError(
                    f"sequence {item.seq_id!r}: its first {item.pos_offset} positions were not computed by this "
                    "model (reused from the prefix cache), so its recurrent layers have no state for them; adopt "
                    "only matches PagedKVManager.match_prefix gives, or turn prefix caching off "
                    "(EngineConfig(enable_prefix_caching=False))")

    def _attention_batch(self, items: Sequence[ForwardItem]) -> AttentionBatch:
        """The pass's host metadata, computed for all items at once (a few numpy calls per pass,
        not per item: a decode step of many sequences builds it every step)."""
        kv, bs = self.kv, self.kv.block_size
        lengths = np.fromiter((len(it.q_tokens) for it in items), dtype=np.int32, count=len(items))
        offsets = np.fromiter((it.pos_offset for it in items), dtype=np.int32, count=len(items))
        tables = [kv.block_array(it.seq_id) for it in items]
        block_tables = np.zeros((len(items), max(len(t) for t in tables)), dtype=np.int32)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = table
        cu = np.zeros(len(items) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        item_of_token = np.repeat(np.arange(len(items)), lengths)
        positions = np.arange(cu[-1], dtype=np.int32) - (cu[:-1] - offsets)[item_of_token]  # int32 throughout
        slots = block_tables[item_of_token, positions // bs] * bs + positions % bs
        return AttentionBatch(positions, slots, cu, offsets + lengths, block_tables, bs)

    @staticmethod
    def _logit_rows(items: Sequence[ForwardItem], batch: AttentionBatch,
                    all_logits: bool) -> tuple[dict[Hashable, tuple[int, int]], np.ndarray]:
        """Which query rows get logits: by seq id, (first row of the logits, row count); and those
        rows' token indices (ascending). Every row with ``all_logits``, else see :meth:`forward`."""
        rows: dict[Hashable, tuple[int, int]] = {}
        picks: list[range] = []
        taken = 0
        for i, it in enumerate(items):
            start, end = batch.query_range(i)
            if all_logits or it.full_logits or it.is_final_chunk:
                first = start if all_logits or it.full_logits else end - 1
                rows[it.seq_id] = (taken, end - first)
                picks.append(range(first, end))
                taken += end - first
        return rows, np.fromiter((r for span in picks for r in span), dtype=np.int64, count=taken)

    def _rows_past_last_write(self, batch: AttentionBatch, picks: np.ndarray) -> np.ndarray | None:
        """The rows the blocks compute past the last KV write (the last block's, or that of the last block that
        writes any: ``LayerSpec.kv_source``), when not all: only the logit rows.

        The other rows' attention and MLP there feed nothing (their K/V is already written), so
        a prefill chunk of n tokens costs those blocks one query's attention instead of n (mlx-lm
        and llama.cpp skip the same work in the last block, transformers in Gemma 4's blocks that
        read others' K/V). A pass without logit rows keeps one
        row, so every layer is still attended. Not narrowed: batches in which some item decodes
        one token, whose attention runs over the backend's mirrors under a plan made for the
        whole batch's items (``ferrum.kv_mirror``), and models with a recurrent block past that write (a
        recurrent mixer reads every row to carry its state on).
        """
        if len(picks) == batch.num_tokens or len(batch.decoding) or not self._narrows:
            return None
        return picks if len(picks) else np.array([batch.num_tokens - 1])

    def _forward(self, items: Sequence[ForwardItem], all_logits: bool) -> ForwardOutput:
        ops, cfg = self.ops, self.config
        batch = self._attention_batch(items)
        batch.prepared = ops.prepare_attention_batch(batch)
        ids = token_ids(ops, [it.q_tokens for it in items])
        arch = cfg.arch
        compiled = self.adapters.batch is None
        halves, final = (self._compiled, self._final_compiled) if compiled else (self._halves, self._final)

        rows, picks = self._logit_rows(items, batch, all_logits)
        kept = self._rows_past_last_write(batch, picks)
        run = _Pass(self, batch, kept, [it.seq_id for it in items])

        h = self.embed_lookup(self.embed, ids)
        if self.ngram is not None:
            h = self.ngram(h, ngram_windows(arch.ngram, items, self.kv.history))
        if arch.embed_scale is not None:
            h = ops.mul_scalar(h, arch.embed_scale)
        if self.position_table is not None:
            h = ops.add(h, self.position_table.embedding(self.position_table.weight, run.positions))
        if self.embed_norm is not None:
            h = NORM_KINDS[arch.norm](ops, cfg.rms_norm_eps)[0](h, self.embed_norm)
        run.embedded = h
        # each layer's per-layer inputs, as leave's last argument (none without)
        run.inputs = inputs = (
            [()] * len(self.layers) if self.per_layer is None else [(x,) for x in self.per_layer(ids, h)])
        if arch.embed_skip:  # Talkie's: every block adds its share of the normed embeddings, after its MLP
            run.inputs = inputs = [(*xs, h) for xs in inputs]

        steps, gives = self._steps, self._gives
        # between blocks: (residual, h), the previous block's output not yet added to h; Gemma 3n's copies
        stream = (h,) if self.wide is None else self.wide.widen(h)
        for index, layer in enumerate(self.layers):
            if index in self._loop_starts:  # a looped model's next pass reads the stream normed
                stream = final(*stream)
            if self._skips[index]:  # the layer hands the stream on unchanged
                continue
            enter, leave = halves[index]
            carried = stream[:-1] if self._carries else ()
            *projected, h = enter(*stream, run.positions)
            mixed, extra, h = steps[index](run, index, layer, tuple(projected), h)
            stream = leave(mixed, h, *extra, *inputs[index], *carried)
            if gives[index]:  # LongCat-Flash's shortcut output, the next layer's leave's last argument
                *stream, given = stream
                inputs[index + 1] = (*inputs[index + 1], given)

        if not len(picks):
            return ForwardOutput(None, rows)
        if kept is None and len(picks) != batch.num_tokens:
            keep = ops.from_numpy(picks.astype(np.int32), None)
            stream = tuple(ops.take_rows(x, keep) for x in stream)
        logits = self.lm_head(final(*stream)[0])
        if arch.final_softcap is not None:
            logits = ops.softcap(logits, arch.final_softcap)
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
        if self.config.arch.recurrent and new_len != self.kv.length(cache_id):
            raise UnsupportedFeatureError(
                f"sequence {cache_id!r}: this model's recurrent layers keep no state per position, so its cache "
                f"cannot be cut back from {self.kv.length(cache_id)} to {new_len} tokens (speculative decoding needs "
                "that); release the sequence and prefill it again")
        recompute = self.kv.truncate(cache_id, new_len)
        if recompute:
            start = new_len - len(recompute)
            adapter = self.adapters.name_for_salt(self.kv.salt(cache_id))
            self.forward([ForwardItem(cache_id, recompute, start, is_final_chunk=False, adapter=adapter)])

    def release(self, cache_id: Hashable) -> None:
        self.kv.release(cache_id)
        self.states.release(cache_id)

    def flush(self) -> None:
        """Finish what a pass stopped half way left for the backend to evaluate on this thread (``ops.flush``)."""
        self.ops.flush()

    def reset(self) -> None:
        """Drop every sequence; the KV pool is reused."""
        self.kv.reset()
        self.states.reset()

    def kv_capacity(self) -> int:
        """Tokens the KV pool can hold in total."""
        return self.kv.num_blocks * self.kv.block_size

    def kv_bytes(self) -> int:
        return self.kv_capacity() * kv_token_bytes(self.config, self.dtype)
