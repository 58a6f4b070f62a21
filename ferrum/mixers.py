"""The kinds of mixer a block runs (``LayerSpec.mixer``), in one table the model reads.

A kind says how a layer of it is built from its weights (:meth:`MixerKind.build`), what its block's first half
projects (:meth:`MixerKind.project`), how it steps over a pass's batch between the halves (:meth:`MixerKind.step`:
attention's KV write and paged attention, a recurrent mixer's state gather and stage) and how its output is taken
(:meth:`MixerKind.output`, :meth:`MixerKind.ends`), so ``DecoderOnlyLLM`` branches on no mixer's name. The halves
stay pure functions of backend arrays (``ops.compile_fn``); a step runs on the host between them and reads and
changes the pass's state (``ferrum.model``'s ``_Pass``). ``DecoderOnlyLLM`` binds each layer's step at load, so a
pass looks nothing up per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from ferrum.arch.linear_blocks import ATTENTION as LINEAR_ATTENTION
from ferrum.arch.kv_quant import HIGH, LOW
from ferrum.arch.loop_gate import LoopGate
from ferrum.arch.norms import NORM_KINDS
from ferrum.errors import UnsupportedFeatureError
from ferrum.recurrent import MIXERS, mixer_spec
from ferrum.recurrent.state import StateShapes

if TYPE_CHECKING:
    from ferrum.arch.spec import Architecture, LayerSpec
    from ferrum.weights import Linear

#: A step's result: the mixer's output, what its output takes besides (the output gate, the gated norm's ``z``),
#: and the residual stream (narrowed past the last KV write).
Mixed = tuple[Any, tuple, Any]


class MixerWeights(NamedTuple):
    """What a layer's mixer is built of (``_Layer``'s fields of the same names; None where its kind has none)."""

    qkv: Any = None  # attention's ``x -> (q, k, v)`` (q alone where the layer reads another's keys and values)
    o: Any = None  # attention's output projection
    gate: Linear | None = None  # gated attention's output gate
    recurrent: Any = None  # a stateful mixer's layer (:mod:`ferrum.recurrent`): set only where it carries state
    loop_gate: LoopGate | None = None  # IQuest-Coder's second-pass mix of two attentions (stateless)


class MixerKind:
    """One kind of mixer; the defaults are those of a kind that carries no state, writes no K/V and whose block
    ends with its output, then its MLP."""

    #: It carries a state per sequence (:class:`ferrum.recurrent.state.RecurrentStates` holds one), so it reads
    #: every row of a batch to carry it on: a pass narrows to the logit rows past the last KV write only where no
    #: block past it has such a mixer.
    stateful = False

    def writes_kv(self, spec: LayerSpec) -> bool:
        """Whether the layer writes keys and values to the pool."""
        return False

    def state_shapes(self, arch: Architecture, spec: LayerSpec, dtype: str) -> StateShapes:
        """The layer's state per sequence (stateful kinds only)."""
        raise NotImplementedError

    def ends(self, arch: Architecture) -> str:
        """Which second half its block has (``DecoderOnlyLLM._block_halves`` builds each): "mixer_then_mlp", the
        mixer's output, then the MLP on the stream; "mixer_beside_mlp", the output alone, the MLP having run beside
        the mixer in the first half (parallel blocks); "mlp_alone", the MLP on the normed input (no mixer)."""
        return "mixer_then_mlp"

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        """The layer's mixer from its placed weights (``tensor`` / ``projection`` read them by relative name)."""
        raise NotImplementedError

    def project(self, model: Any, layer: Any) -> Callable[[Any, Any, Any], tuple]:
        """``(x, h, positions) -> (*projected, h)`` from the normed input ``x``: what :meth:`step` takes."""
        raise NotImplementedError

    def output(self, model: Any, layer: Any) -> Callable[..., Any] | None:
        """``(mixed, *extra) -> out``: the mixer's output as the block adds it; None where the block ends
        ``mlp_alone``."""
        return None

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        """The mixer over the pass's batch (``run``, the model's ``_Pass``), between the block's halves."""
        raise NotImplementedError

    def projections(self, layer: Any) -> list[Linear]:
        """The layer's mixer's linear projections (profilers wrap their bound ops): attention's q/k/v, output and
        gate where it has them, then a recurrent mixer's own."""
        own = [] if layer.recurrent is None else layer.recurrent.projections()
        if layer.qkv is None:
            return own
        return [*layer.qkv.linears, *getattr(layer.o, "linears", [layer.o]),
                *([layer.gate] if layer.gate is not None else []), *own]


class Attention(MixerKind):
    """Attention over the paged KV cache: q/k/v projected (rotated where the rope has one table), K/V written,
    the queries attended, the heads projected out through ``o_proj`` (gated by the output gate where there is
    one). A layer that reads another's keys and values (``LayerSpec.kv_source``) projects queries alone."""

    def writes_kv(self, spec: LayerSpec) -> bool:
        return spec.kv_source is None

    def ends(self, arch: Architecture) -> str:
        return "mixer_beside_mlp" if arch.parallel else "mixer_then_mlp"

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        config, attention = model.config, model.attention
        if spec.kv_source is None:
            qkv, o = attention.build(model.ops, config, tensor, projection, model.attention_placed[
                id(spec.rope), id(spec.mla)])
        else:  # it reads another layer's keys and values: its queries alone
            qkv, o = attention.build_queries(config, projection)
        gate = projection("self_attn.gate_proj") if config.arch.attn_output_gate else None
        return MixerWeights(qkv, o, gate)

    def project(self, model: Any, layer: Any, rotate: bool = True) -> Callable[[Any, Any, Any], tuple]:
        """``q, k, v`` (``q`` alone in a layer that reads another's), normed, clipped and rotated as the
        architecture says (not rotated where not ``rotate``: the step does), then the output gate; in a parallel
        block the MLP's output joins ``h`` here."""
        ops, cfg = model.ops, model.config
        reshape = ops.reshape
        norm = NORM_KINDS[cfg.arch.norm](ops, cfg.rms_norm_eps)[0]
        heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        table = model.ropes[layer.rope].fixed if rotate else None
        qk_norm = cfg.arch.qk_norm if layer.q_norm is not None else None
        # "projection" norms go on the projections, "head" norms on each head, before rope or after it (Hunyuan's;
        # Talkie's "each_head")
        rotated = "rotated" if cfg.arch.qk_norm_after_rope else "head"
        where = {"projection": "projection", "head": rotated, "each_head": rotated}
        norm_at = where.get(qk_norm)
        parallel, clip, steps = cfg.arch.parallel, cfg.arch.clip_qkv, layer.kv_steps
        head_norm = norm if layer.qk_eps == cfg.rms_norm_eps else NORM_KINDS[cfg.arch.norm](ops, layer.qk_eps)[0]
        # "each_head" weights scale after a norm without one: a LayerNorm takes None, an RMSNorm a weight of ones
        unit = (model._ones_of(hd) if cfg.arch.norm == "rms" else None, None)

        def norm_qk(*qk: Any) -> list[Any]:
            """q and k normed (q alone in a layer without keys of its own)."""
            if qk_norm == "each_head":  # [heads, head_dim] weights: normed without, then scaled head by head
                return [ops.mul(head_norm(x, unit), w[0]) for x, w in zip(qk, (layer.q_norm, layer.k_norm))]
            return [head_norm(x, w) for x, w in zip(qk, (layer.q_norm, layer.k_norm))]

        def project(x: Any, h: Any, positions: Any) -> tuple:
            q, *kv = layer.qkv(x)  # q alone in a layer that reads another's keys and values
            # the output gate where the projections make it themselves (A.X-K2's latent queries, ferrum.arch.mla)
            qk, v, made = [q, *kv[:1]], kv[1:2], kv[2:]
            if norm_at == "projection":
                qk = norm_qk(*qk)
            if clip is not None:
                qk, v = [ops.clip(t, clip) for t in qk], [ops.clip(t, clip) for t in v]
            qk = [reshape(t, (-1, heads if i == 0 else kv_heads, hd)) for i, t in enumerate(qk)]
            v = [reshape(t, (-1, kv_heads, hd)) for t in v]
            if layer.v_norm is not None:
                v = [head_norm(t, layer.v_norm) for t in v]
            if norm_at == "head":
                qk = norm_qk(*qk)
            if table is not None:
                qk = [ops.rope(t, positions, table) for t in qk]
            if norm_at == "rotated":
                qk = norm_qk(*qk)
            if steps is not None and kv:  # AFM's keys and values on their int8 grids, before they are cached
                qk[1], v[0] = (ops.fake_quantize(t, step, LOW, HIGH) for t, step in zip((qk[1], v[0]), steps))
            if parallel:  # the MLP reads the block's input beside attention: its output joins h now, attention's later
                h = ops.add(h, layer.mlp(x if layer.pre_mlp is None else norm(h, layer.pre_mlp)))
            gate = made or ([layer.gate(x)] if layer.gate is not None else [])  # the output gate, to the second half
            return (*qk, *v, *gate, h)

        return project

    def output(self, model: Any, layer: Any) -> Callable[..., Any]:
        """The heads flattened, gated where the layer has an output gate, combined where they are differential
        (DiffLlama, :mod:`ferrum.arch.differential`), normed where it has a sub-norm (BitNet),
        through ``o_proj`` (read at each call: LoRA adapters swap it, :mod:`ferrum.adapters`)."""
        ops, cfg = model.ops, model.config
        width, norm = cfg.num_heads * cfg.head_dim, NORM_KINDS[cfg.arch.norm](ops, cfg.rms_norm_eps)[0]
        gated = ops.softplus_mul if cfg.arch.attn_gate == "softplus" else ops.sigmoid_mul

        def attention_out(attn: Any, *gate: Any) -> Any:
            flat = ops.reshape(attn, (-1, width))
            flat = gated(gate[0], flat) if gate else flat
            flat = flat if layer.differential is None else layer.differential(flat)
            return layer.o(flat if layer.sub_norm is None else norm(flat, layer.sub_norm))

        return attention_out

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        """Rotate and scale the queries where that depends on the batch, write K/V, narrow the pass to its kept
        rows at the last KV write, attend (within chunks where the layer attends in chunks)."""
        q, extra, h = self.queries(run, index, layer, projected, h)
        return self.attend(run, layer, q, layer.kv_layer, layer.window), tuple(extra), h

    @staticmethod
    def attend(run: Any, layer: Any, q: Any, kv_layer: int, window: int | None) -> Any:
        """The queries over pool layer ``kv_layer`` (within ``window``; in chunks where the layer attends so)."""
        attended = run.narrowed if layer.chunk is None else Attention._chunked(run, layer.chunk)
        return run.ops.paged_attention(q, run.pool, kv_layer, attended, layer.scale, window, run.softcap,
                                       layer.sinks, layer.alibi)

    @staticmethod
    def queries(run: Any, index: int, layer: Any, projected: tuple, h: Any) -> tuple[Any, list, Any]:
        """``(q, extra, h)``: the queries rotated and scaled, K/V written, the pass narrowed at its last KV write."""
        # q, then k and v where the layer computes its own, then what the second half takes besides: the output gate
        # if any, Gemma 3n's other predictions and Laurel's output (ferrum.arch.altup)
        q, *rest = projected
        kv, extra = (rest[:2], rest[2:]) if run.specs[index].kv_source is None else ([], rest)
        rotate = run.ropes.get(layer.rope)
        if rotate is not None:
            q, kv = rotate(q), kv and [rotate(kv[0]), kv[1]]
        scale_queries = run.scalers.get(layer.query_scaling)
        if scale_queries is not None:
            q = scale_queries(q)
        ops = run.ops
        if kv:  # a layer that reads another's keys and values writes none
            ops.kv_write(run.pool, layer.kv_layer, *kv, run.slots)
        if index == run.last_write and run.kept is not None:
            keep = run.narrow(index)
            q, h = ops.take_rows(q, keep), ops.take_rows(h, keep)
            extra = [ops.take_rows(x, keep) for x in extra]
        return q, extra, h

    @staticmethod
    def _chunked(run: Any, chunk: int) -> Any:
        """What a layer attending in chunks of ``chunk`` positions attends: the pass's batch split at chunk
        boundaries, made once per pass and chunk size (the narrowed batch's, past the last KV write)."""
        ops, attended = run.ops, run.narrowed
        if attended is run.batch:
            if chunk not in run.chunked:
                run.chunked[chunk] = batch = attended.chunked(chunk)
                if batch is not attended:
                    batch.prepared = ops.prepare_attention_batch(batch)
            return run.chunked[chunk]
        attended = attended.chunked(chunk)
        if attended.prepared is None:
            attended.prepared = ops.prepare_attention_batch(attended)
        return attended


class HoldsMixer:
    """What a kind whose layer holds a recurrent mixer of :data:`ferrum.recurrent.MIXERS` (``LayerSpec.mixer``) has
    from it, whether it runs alone or around attention: the mixer's state per sequence, and its layer."""

    stateful = True

    def state_shapes(self, arch: Architecture, spec: LayerSpec, dtype: str) -> StateShapes:
        return mixer_spec(arch, spec.mixer).state_shapes(dtype)

    def mixer_layer(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
                    projection: Callable[[str], Linear], *args: Any) -> Any:
        """The mixer's layer from the placed weights, normed with the model's epsilon (``args``: the mixer's own)."""
        return mixer_spec(model.config.arch, spec.mixer).layer(model.ops, tensor, projection,
                                                               model.config.rms_norm_eps, *args)


class ConvolvedAttention(HoldsMixer, Attention):
    """Attention whose raw keys and values first run through a short causal convolution along the sequence
    (Baichuan-M1's, :mod:`ferrum.recurrent.kv_conv`): the first half projects q/k/v unrotated; the step convolves
    k and v from the sequences' states (staged until the pass ends), rotates q and the convolved k, then runs
    attention's step. The layer has a KV pool layer and a state, so a pass never narrows its rows past it."""

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        layer = self.mixer_layer(model, spec, tensor, projection)
        return super().build(model, spec, tensor, projection)._replace(recurrent=layer)

    def project(self, model: Any, layer: Any, rotate: bool = False) -> Callable[[Any, Any, Any], tuple]:
        return super().project(model, layer, rotate=False)

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        q, k, v, *rest = projected
        states, ops = run.states, run.ops
        k, v, new = layer.recurrent.mix(k, v, states.gather(index, run.seq_ids), run.batch.cu_seqlens_q)
        states.stage(index, run.seq_ids, new)
        table = run.model.ropes[layer.rope].fixed
        if table is not None:  # a rope of one table (else attention's step rotates them for the batch)
            q, k = ops.rope(q, run.positions, table), ops.rope(k, run.positions, table)
        return super().step(run, index, layer, (q, k, v, *rest), h)


class LoopedAttention(Attention):
    """IQuest-Coder's second-pass layers (:mod:`ferrum.arch.loop_gate`): attention's step over the layer's own keys
    and values within its window, then the same queries over its first pass's (``LayerSpec.full_source``) in full,
    the two outputs mixed per head by the gate of the queries. It writes its own KV pool layer and carries no
    state."""

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        config = model.config
        gate = LoopGate.build(model.ops, model.dtype, projection, config.num_heads, config.head_dim)
        return super().build(model, spec, tensor, projection)._replace(loop_gate=gate)

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        q, extra, h = self.queries(run, index, layer, projected, h)
        local = self.attend(run, layer, q, layer.kv_layer, layer.window)
        full = self.attend(run, layer, q, run.model.kv_layers[run.specs[index].full_source], None)
        return layer.loop_gate.mix(q, full, local), tuple(extra), h

    def projections(self, layer: Any) -> list[Linear]:
        return [*super().projections(layer), *layer.loop_gate.projections()]


class Recurrent(HoldsMixer, MixerKind):
    """A recurrent mixer of :data:`ferrum.recurrent.MIXERS` (Gated DeltaNet, Mamba-1 and -2, LFM2's short convolution):
    its layer projects, mixes over the batch from the sequences' states and takes its output."""

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        return MixerWeights(recurrent=self.mixer_layer(model, spec, tensor, projection))

    def project(self, model: Any, layer: Any) -> Callable[[Any, Any, Any], tuple]:
        def project(x: Any, h: Any, positions: Any) -> tuple:
            return (*layer.recurrent.project(x), h)

        return project

    def output(self, model: Any, layer: Any) -> Callable[..., Any]:
        return layer.recurrent.output

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        """The mixer from the batch's sequences' states (gathered), its new states staged until the pass ends."""
        states = run.states
        core, extra, new = layer.recurrent.mix(projected, states.gather(index, run.seq_ids), run.batch.cu_seqlens_q)
        states.stage(index, run.seq_ids, new)
        return core, extra, h


class Positioned(Recurrent):
    """A recurrent mixer whose projections read the tokens' positions and its layer's rope table (lightning
    attention, which Ring-linear rotates its queries and keys in; the table is the rope's one, fixed one)."""

    def project(self, model: Any, layer: Any) -> Callable[[Any, Any, Any], tuple]:
        table = model.ropes[layer.rope].fixed

        def project(x: Any, h: Any, positions: Any) -> tuple:
            return (*layer.recurrent.project(x, positions, table), h)

        return project


class Resetting(Recurrent):
    """A recurrent mixer that also reads which of the batch's segments begin their sequences (RecurrentGemma's
    RG-LRU, which resets there as transformers does at position 0): a segment resumed mid-sequence (a later prefill
    chunk, a prefix-cache hit, a decode step) carries its state instead."""

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        batch, states = run.batch, run.states
        cu = batch.cu_seqlens_q
        starts = np.zeros(len(cu) - 1, dtype=bool)
        filled = np.diff(cu) > 0
        starts[filled] = np.asarray(batch.positions)[cu[:-1][filled]] == 0
        core, extra, new = layer.recurrent.mix(projected, states.gather(index, run.seq_ids), cu, starts)
        states.stage(index, run.seq_ids, new)
        return core, extra, h


class ValueResidual(Recurrent):
    """A recurrent mixer that reads the values the pass's first layer of it handed on, and hands its own on where it
    is that layer (RWKV-7's value residual: the pass's ``values``, None until the first layer has run)."""

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        states = run.states
        core, extra, new, run.values = layer.recurrent.mix(projected, states.gather(index, run.seq_ids),
                                                           run.batch.cu_seqlens_q, run.values)
        states.stage(index, run.seq_ids, new)
        return core, extra, h


class NoMixer(MixerKind):
    """No mixer: the block is its MLP alone on the normed input (Nemotron-H's MLP and MoE blocks)."""

    def ends(self, arch: Architecture) -> str:
        return "mlp_alone"

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        return MixerWeights()

    def project(self, model: Any, layer: Any) -> Callable[[Any, Any, Any], tuple]:
        def project(x: Any, h: Any, positions: Any) -> tuple:
            return x, h

        return project

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        return projected[0], (), h  # the normed input, on to the MLP


class LinearMixer(NoMixer):
    """One square linear map of the normed input in place of attention (DeciLM's ``replace_with_linear``,
    :mod:`ferrum.arch.linear_blocks`): the normed input handed through the step as :class:`NoMixer` hands it, then
    mapped and added to the stream before the MLP. It writes no K/V and carries no state."""

    def ends(self, arch: Architecture) -> str:
        return "mixer_then_mlp"

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        return MixerWeights(o=projection(LINEAR_ATTENTION))

    def output(self, model: Any, layer: Any) -> Callable[..., Any]:
        return lambda x: layer.o(x)

    def projections(self, layer: Any) -> list[Linear]:
        return [layer.o]


class Beside(MixerKind):
    """Attention and a recurrent mixer beside it on the same normed input, their outputs summed (Falcon-H1's
    layers: ``LayerSpec.beside``): both project in the first half, attention's arrays first; both step, attention
    writing K/V and the recurrent mixer carrying its state; the second half adds the two outputs. The layer has a
    KV pool layer and a recurrent state, so a pass never narrows its rows past it (``stateful``)."""

    stateful = True

    def __init__(self, attention: Attention, recurrent: Recurrent):
        self.attention, self.recurrent = attention, recurrent

    def writes_kv(self, spec: LayerSpec) -> bool:
        return self.attention.writes_kv(spec)

    def state_shapes(self, arch: Architecture, spec: LayerSpec, dtype: str) -> StateShapes:
        return mixer_spec(arch, spec.beside).state_shapes(dtype)

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        layer = mixer_spec(model.config.arch, spec.beside).layer(model.ops, tensor, projection,
                                                                 model.config.rms_norm_eps)
        return self.attention.build(model, spec, tensor, projection)._replace(recurrent=layer)

    @staticmethod
    def _counts(layer: Any) -> tuple[int, int]:
        """How many arrays attention's projection gives (q, k, v, the output gate) and how many its output takes
        besides the heads (the gate): where the recurrent mixer's begin (a layer beside attention computes its own
        keys and values)."""
        gated = int(layer.gate is not None)
        return 3 + gated, gated

    def project(self, model: Any, layer: Any) -> Callable[[Any, Any, Any], tuple]:
        attention, recurrent = self.attention.project(model, layer), self.recurrent.project(model, layer)

        def project(x: Any, h: Any, positions: Any) -> tuple:
            *attended, h = attention(x, h, positions)
            *mixed, h = recurrent(x, h, positions)
            return (*attended, *mixed, h)

        return project

    def output(self, model: Any, layer: Any) -> Callable[..., Any]:
        attention, recurrent, ops = self.attention.output(model, layer), self.recurrent.output(model, layer), model.ops
        gated = self._counts(layer)[1]

        def summed(attn: Any, *extra: Any) -> Any:
            """Attention's heads and gate, then the recurrent mixer's output and what it takes besides."""
            return ops.add(attention(attn, *extra[:gated]), recurrent(*extra[gated:]))

        return summed

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        arrays = self._counts(layer)[0]
        attn, gate, h = self.attention.step(run, index, layer, projected[:arrays], h)
        core, extra, h = self.recurrent.step(run, index, layer, projected[arrays:], h)
        return attn, (*gate, core, *extra), h


class AroundAttention(MixerKind):
    """A kind whose step runs attention's (:class:`Attention`) inside its own, so every layer of it writes its KV
    pool layer."""

    def __init__(self, attention: Attention):
        self.attention = attention

    def writes_kv(self, spec: LayerSpec) -> bool:
        return True


class SharedBlockThenRecurrent(AroundAttention, Recurrent):
    """Zamba 2's hybrid layers (:mod:`ferrum.arch.shared_block`): the use's shared block attends (writing its own KV
    pool layer) on the normed ``[x, token embeddings]``, its MLP and ``linear`` follow, and what they give joins the
    Mamba-2 mixer's input, which then steps as any recurrent mixer; the block ends with that mixer's output. The
    embeddings are the pass's (``_Pass.embedded``), so all of it runs between the halves: the first half only hands
    the residual stream on (the layer has no block norm before it)."""

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        block = self.mixer_layer(model, spec, tensor, projection, spec.shared_use)
        return MixerWeights(qkv=block.qkv, o=block.o, recurrent=block)

    def project(self, model: Any, layer: Any) -> Callable[[Any, Any, Any], tuple]:
        def project(x: Any, h: Any, positions: Any) -> tuple:
            return (h,)

        return project

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        block, attention = layer.recurrent, self.attention
        wide = block.attention_input(h, run.embedded, run.batch.num_tokens)
        *qkv, _ = attention.project(run.model, layer)(wide, h, run.positions)
        attn, _, h = attention.step(run, index, layer, tuple(qkv), h)
        joined = block.mamba_input(h, block.after_attention(attention.output(run.model, layer)(attn)))
        return super().step(run, index, layer, block.project(joined), h)


class MixtureOfAttention(AroundAttention):
    """JetMoE's mixture of attention heads (:mod:`ferrum.arch.moa`): the first half projects the router's logits,
    every expert's queries (rotated with the keys), keys and values; the step routes on the host, picks each token's
    query heads, runs attention's step (KV write, narrowing, paged attention) and places each slot's gated output in
    its expert's block; the second half is the experts' output projections as one biased linear. Its rope has one
    table (the family refuses longrope), so the queries rotate in the first half."""

    def build(self, model: Any, spec: LayerSpec, tensor: Callable[[str], Any],
              projection: Callable[[str], Linear]) -> MixerWeights:
        layer = model.config.arch.moa.layer(model.ops, projection, model.dtype)
        return MixerWeights(qkv=layer, o=layer.o)

    def project(self, model: Any, layer: Any) -> Callable[[Any, Any, Any], tuple]:
        ops, spec = model.ops, model.config.arch.moa
        table = model.ropes[layer.rope].fixed

        def project(x: Any, h: Any, positions: Any) -> tuple:
            logits, queries, k, v = layer.qkv(x)
            queries = ops.reshape(queries, (-1, spec.num_experts * spec.kv_heads, spec.head_dim))
            k, v = (ops.reshape(t, (-1, spec.kv_heads, spec.head_dim)) for t in (k, v))
            if table is not None:
                queries, k = ops.rope(queries, positions, table), ops.rope(k, positions, table)
            return logits, queries, k, v, h

        return project

    def output(self, model: Any, layer: Any) -> Callable[..., Any]:
        return lambda placed: layer.o(placed)

    def step(self, run: Any, index: int, layer: Any, projected: tuple, h: Any) -> Mixed:
        logits, queries, k, v = projected
        experts = layer.qkv
        ids, weights = experts.route(logits)
        attn, _, h = self.attention.step(run, index, layer, (experts.heads(queries, ids), k, v), h)
        if index == run.last_write and run.kept is not None:  # the pass went on with its kept rows
            ids, weights = ids[run.kept], weights[run.kept]
        return experts.placed(attn, ids, weights), (), h


#: ``LayerSpec.mixer`` -> its kind.
MIXER_KINDS: dict[str, MixerKind] = {"attention": Attention(), "none": NoMixer(), "linear": LinearMixer(),
                                     **{name: Recurrent() for name in MIXERS}}
MIXER_KINDS["shared_mamba2"] = SharedBlockThenRecurrent(MIXER_KINDS["attention"])
MIXER_KINDS["moa"] = MixtureOfAttention(MIXER_KINDS["attention"])
MIXER_KINDS["rg_lru"] = Resetting()
MIXER_KINDS["rwkv7_first"] = MIXER_KINDS["rwkv7"] = ValueResidual()
MIXER_KINDS["lightning"] = Positioned()
MIXER_KINDS["conv_attention"] = ConvolvedAttention()
MIXER_KINDS["loop_attention"] = LoopedAttention()


def mixer_kind(spec: LayerSpec) -> MixerKind:
    """The kind of a layer's mixers: ``MIXER_KINDS[spec.mixer]``, or, with a recurrent mixer ``beside`` attention,
    the two composed (:class:`Beside`)."""
    if spec.beside is None:
        return MIXER_KINDS[spec.mixer]
    if spec.mixer != "attention" or spec.beside not in MIXERS or spec.kv_source is not None:
        raise UnsupportedFeatureError(
            f"a layer runs {spec.beside!r} beside {spec.mixer!r} (kv_source {spec.kv_source}); Ferrum runs only a "
            "recurrent mixer beside attention that computes its own keys and values")
    return _BESIDE



_BESIDE = Beside(MIXER_KINDS["attention"], Recurrent())
