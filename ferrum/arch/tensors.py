"""Checkpoint tensors of an Architecture: their names and shapes, and the host-side changes made at load.

``weight_shapes`` lists the tensors exactly as the checkpoint stores them
(fused ones fused), so loading, ``ferrum quantize`` and the random checkpoint
writer agree on one list. ``prepare`` then turns each host tensor into what
the model reads:

* fused q/k/v (Phi-3 ``qkv_proj``) and gate/up (``gate_up_proj``) are split
  into row blocks, so each block gets its own changes below (a row block of a
  packed quantized matrix is still a packed matrix);
* Gemma's norms scale by ``1 + w``: the offset is added to the weights once;
* partial rotary: q and k rows are permuted within each head, and longrope's
  attention factor multiplies their rotated rows (see :mod:`ferrum.arch.rope`).

On a backend with a native ``split`` op, :class:`Fuser` then stacks the
prepared projections that read the same input (:data:`FUSED`) into one
matrix, whatever the checkpoint's layout, so a layer runs one ``linear``
where it ran three (q/k/v) or two (gate/up) and splits the output. Stacking
rows is exact for packed matrices too (each row keeps its own groups), as
long as the members share one format; a group that does not (GGUF files
often keep ``v_proj`` at more bits) stays unfused.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ferrum.arch.differential import LAMBDAS
from ferrum.arch import linear_blocks
from ferrum.arch.dsa import INDEXER
from ferrum.arch.heads import HeadLayout, layout as heads_layout
from ferrum.arch import gains, kv_quant, loop_gate
from ferrum.arch.mlp import MLP_KINDS
from ferrum.arch.moa import MODULE as MOA_MODULE
from ferrum.arch.norms import OFFSETS_ADDED, SUB_NORMS, gate_modules, norm_offset
from ferrum.arch.per_layer import TABLE as PER_LAYER_TABLE
from ferrum.errors import UnsupportedFeatureError
from ferrum.quant.affine import MLX_GROUP_SIZES, FloatCodes, QuantizedWeight
from ferrum.recurrent import MIXERS, mixer_spec
from ferrum.recurrent.gated_delta import MODULE as GATED_DELTA, SEPARATE_TAPS
from ferrum.weights import Linear, Projections

#: (decoder prefix, LM head) of the layouts a checkpoint may use: causal LMs, then Gemma 3's multimodal wrapper
#: as released (``language_model.model.*``) and as transformers 5 saves it (``model.language_model.*``).
LAYOUTS = (
    ("model.", "lm_head.weight"),
    ("language_model.model.", "language_model.lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
    ("transformer.", "lm_head.weight"),  # GPT-2's LM
    ("", "lm_head.weight"),  # GPT-2's bare decoder, as the first releases saved it
)


#: Projections that read the same input, fused at load: fused module -> its members, in row order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def weight_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, with its shape, in load order, by its stored name."""
    arch = config.arch
    h, d, vocab = config.hidden_size, config.head_dim, config.vocab_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    p = arch.prefix
    norm_parts = ("weight", "bias") if arch.norm_bias else ("weight",) if arch.norm_params else ()
    shapes = {f"{p}embed_tokens.weight": (vocab, h), **{f"{p}norm.{part}": (h,) for part in norm_parts}}
    if arch.embed_norm and arch.embed_norm_params:  # BLOOM's own weights (nanochat's and Muse Glimmer's have none)
        shapes.update({f"{p}embed_norm.{part}": (h,) for part in norm_parts})
    if arch.position_embedding and not arch.sinusoidal_positions:
        shapes[f"{p}embed_positions.weight"] = (config.max_seq_len + arch.position_offset, h)
    if not config.tie_word_embeddings:
        shapes[arch.lm_head] = (arch.head_rows or vocab, h)
    if arch.lm_head_bias:  # its own even where the head's weight is the embedding's
        shapes[bias_of(arch.lm_head)] = (vocab,)
    if arch.head_gain is not None:
        shapes[arch.head_gain] = (1,)
    if arch.per_layer_inputs is not None:
        shapes.update({p + name: shape for name, shape in arch.per_layer_inputs.tensors(h, config.num_layers).items()})
    if arch.wide is not None:
        shapes.update({p + name: shape for name, shape in arch.wide.tensors(h).items()})
    if arch.ngram is not None:
        shapes.update({p + name: shape for name, shape in arch.ngram.tensors().items()})
    attention: dict[str, tuple[int, ...]] = {}
    if arch.mla is not None:
        attention.update(arch.mla.tensors(h))
    elif arch.fused_qkv:
        attention["self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
    else:
        attention.update({"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                          "self_attn.v_proj.weight": (kv, h)})
    if arch.mla is None:
        attention["self_attn.o_proj.weight"] = (h, q)
    if arch.value_head_dim is not None:
        vd = arch.value_head_dim
        attention.update({"self_attn.v_proj.weight": (config.num_kv_heads * vd, h),
                          "self_attn.o_proj.weight": (h, config.num_heads * vd)})
    if arch.attn_output_gate and arch.attn_gate_stored:
        gate_rows = config.num_heads if arch.attn_gate_per_head else q
        if arch.mla is not None and arch.mla.value_gate:  # one row per value dim (Kimi K3's)
            gate_rows = arch.mla.heads * arch.mla.v_head_dim
        attention["self_attn.gate_proj.weight"] = (gate_rows, h)
    elif arch.attn_output_gate:  # each head's query then its gate
        attention["self_attn.q_proj.weight"] = (2 * q, h)
    if arch.sinks:
        attention["self_attn.sinks"] = (config.num_heads,)
    if arch.qkv_bias and arch.fused_qkv:
        attention["self_attn.qkv_proj.bias"] = (q + 2 * kv,)
    elif arch.qkv_bias:
        attention.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
    if arch.o_bias:
        attention["self_attn.o_proj.bias"] = (h,)
    if arch.differential:
        attention.update({f"self_attn.{name}": (d // 2,) for name in LAMBDAS})
    if arch.sub_norms:
        attention.update({f"{SUB_NORMS['attn']}.{part}": (q,) for part in norm_parts})
    qk_norms: dict[str, tuple[int, ...]] = {}
    if arch.qk_norm and arch.qk_norm_params:
        q_norm, k_norm = arch.qk_norm_names
        sizes = {"projection": ((q,), (kv,)), "head": ((d,), (d,)),  # per q (k) column, or per head dimension
                 "each_head": ((config.num_heads, d), (config.num_kv_heads, d))}[arch.qk_norm]
        parts = ("weight",) if arch.qk_norm == "each_head" else norm_parts  # per-head norms have no bias
        qk_norms.update({f"self_attn.{norm}.{part}": size for norm, size in zip((q_norm, k_norm), sizes)
                         for part in parts})
    for i, layer in enumerate(arch.layers[:len(arch.layers) // arch.loops]):  # a looped model's passes share them
        mlp = MLP_KINDS[layer.mlp].tensors(config, i)
        norms = qk_norms if layer.qk_norm else {}
        block_norms = {f"{norm}.{part}": (h,) for norm in layer.block_norms(arch).values() for part in norm_parts}
        for slot in layer.gated_norms:
            down, up = gate_modules(layer.block_norms(arch)[slot])
            block_norms.update({f"{down}.weight": (arch.norm_gate_rank, h), f"{up}.weight": (h, arch.norm_gate_rank)})
        if layer.mixer == "moa":  # JetMoE's attention experts
            own = {**block_norms, **arch.moa.tensors(h)}
        elif layer.mixer == "linear":  # one square map in place of attention (DeciLM's replace_with_linear)
            own = {**block_norms, **linear_blocks.tensors(linear_blocks.ATTENTION, h)}
        elif layer.mixer == "conv_attention":  # attention's, and its keys' and values' convolution taps
            own = {**block_norms, **_stored_attention(config, layer, attention, norms),
                   **arch.kv_conv.tensors(heads_layout(config, layer).kv_heads)}
        elif layer.mixer != "attention":  # a recurrent mixer's tensors, or none (an MLP-only block)
            mixer = mixer_spec(arch, layer.mixer)
            own = {**block_norms, **(mixer.tensors(h) if mixer is not None else {})}
            if layer.shared_use is not None:  # the shared block where this is its first use (Zamba 2)
                own.update(arch.shared_block.stored_at(layer.shared_use))
        else:  # attention's, and those of a recurrent mixer beside it
            own = {**block_norms, **_stored_attention(config, layer, attention, norms)}
            if layer.beside is not None:
                own.update(mixer_spec(arch, layer.beside).tensors(h))
        if arch.indexer is not None and arch.indexer.layers[i]:
            own.update(arch.indexer.tensors(h, arch))
        if arch.kv_quant and layer.kv_source is None and "attention" in layer.mixers:
            own.update(kv_quant.tensors())
        if arch.layer_scalar:
            own["layer_scalar"] = (1,)
        own.update(gains.layer_tensors(arch, config.num_heads))
        if arch.per_layer_inputs is not None:
            own.update(arch.per_layer_inputs.layer_tensors(h))
        if arch.wide is not None:
            own.update(arch.wide.layer_tensors(h))
        shapes.update({f"{p}layers.{i}.{name}": shape[::-1] if arch.transposed and len(shape) == 2 else shape
                       for name, shape in {**own, **mlp}.items()})
    for i, layer in enumerate(arch.layers):  # a loop layer's own gate (its other tensors its first pass's)
        if layer.mixer == "loop_attention":
            shapes.update({f"{p}layers.{i}.{name}": shape for name, shape in loop_gate.tensors(config.num_heads,
                                                                                               d).items()})
    return {stored_name(arch, name): shape for name, shape in shapes.items()}


def _stored_attention(config: Any, layer: Any, attention: dict[str, tuple[int, ...]],
                      norms: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A layer's attention tensors as stored: the model's, sized by the heads it stores (:mod:`ferrum.arch.heads`:
    fewer or narrower heads, no v_proj where the values are the keys), and no key/value tensors where it reads
    another layer's."""
    own = {**attention, **norms}
    if not layer.sinks:
        own.pop("self_attn.sinks", None)
    heads = heads_layout(config, layer)
    if not heads.identity:
        axes = {**_HEAD_AXES, **({"self_attn.gate_proj.weight": (0, "heads")} if config.arch.attn_gate_per_head
                                 else {})}  # one row per head as stored
        own.update({name: tuple(heads.rows(kind) if i == axis else n for i, n in enumerate(own[name]))
                    for name, (axis, kind) in axes.items() if name in own})
        fused = heads.rows("q") + heads.rows("k") + heads.rows("v")  # Baichuan-M1's W_pack, OpenELM's qkv_proj
        own.update({name: (fused, *own[name][1:]) for name in ("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias")
                    if name in own})
        own.update({name: _stored_norm(config, heads, name) for name in norms})
    if layer.heads.values_are_keys:
        own.pop("self_attn.v_proj.weight", None)
    if layer.mla is not None:  # its own latent sizes (Dots 3's sliding layers)
        own.update(layer.mla.tensors(config.hidden_size))
        if "self_attn.gate_proj.weight" in own:  # one row per head (attn_gate_per_head)
            own["self_attn.gate_proj.weight"] = (layer.mla.heads, config.hidden_size)
    if layer.kv_source is not None:  # its own key norm stays where its query norm folds it in (ferrum.arch.cla)
        if "self_attn.qkv_proj.weight" in own:  # fused q/k/v elsewhere: its queries alone (AFM's KV-reuse layers)
            own = {name.replace("qkv_proj", "q_proj"): (config.num_heads * config.head_dim, *shape[1:])
                   for name, shape in own.items() if name.startswith("self_attn.qkv_proj.")} | {
                name: shape for name, shape in own.items() if not name.startswith("self_attn.qkv_proj.")}
        key_norm = () if layer.own_key_norm else (f"self_attn.{config.arch.qk_norm_names[1]}.",)
        own = {name: shape for name, shape in own.items()
               if not name.startswith(("self_attn.k_proj.", "self_attn.v_proj.", *key_norm))}
    return own


#: The attention tensors whose heads the load fits (relative to the layer): the axis that runs over the heads, and
#: which of :meth:`ferrum.arch.heads.HeadLayout.rows` it is (a per-head output gate is repeated per head dim first).
_HEAD_AXES = {"self_attn.q_proj.weight": (0, "q"), "self_attn.q_proj.bias": (0, "q"),
              "self_attn.gate_proj.weight": (0, "q"), "self_attn.k_proj.weight": (0, "k"),
              "self_attn.k_proj.bias": (0, "k"), "self_attn.v_proj.weight": (0, "v"), "self_attn.v_proj.bias": (0, "v"),
              "self_attn.o_proj.weight": (1, "o"), "self_attn.sinks": (0, "heads")}


def _stored_norm(config: Any, shape: HeadLayout, name: str) -> tuple[int, ...]:
    """A q/k norm's stored shape: one head's dims ("head"), the stored heads' ("each_head"), or the projection's."""
    keys = name.startswith(f"self_attn.{config.arch.qk_norm_names[1]}.")
    if config.arch.qk_norm == "head":
        return (shape.dim,)
    if config.arch.qk_norm == "each_head":
        return (shape.kv_heads if keys else shape.query_heads, shape.dim)
    return (shape.rows("k" if keys else "q"),)


def attention_as_loaded(config: Any, layer: Any, name: str, tensor: Any, inputs: bool = True) -> list[tuple[str, Any]]:
    """Layer ``layer``'s stored attention tensor ``name`` as the model reads it, by the one map of
    :meth:`ferrum.arch.heads.HeadLayout.order`: rows (q/k/v/gate weights and biases, the sinks) and o_proj's columns
    unless not ``inputs`` (a LoRA B factor's are its rank) taken from where the stored heads hold them, zeros where
    they hold none; q/k norm weights padded and scaled to the stored head's RMSNorm; a v_proj made of k_proj where the
    values are the keys. Other tensors pass as they are.

    A packed matrix is moved as it is stored, never dequantized: a zero output row is a row of zero codes, scales and
    biases (its groups run along the inputs, so rows are independent); o_proj's inputs move in whole groups, else
    the tensor is refused by name (:func:`check_padded_groups`)."""
    if ".self_attn." not in name:
        return [(name, tensor)]
    shape, rel = heads_layout(config, layer), name.split(".self_attn.", 1)[1]
    tensor = _heads_fitted(config, shape, name, f"self_attn.{rel}", tensor, inputs)
    if shape.values_are_keys and rel.startswith("k_proj."):
        return [(name, tensor), (name.replace(".k_proj.", ".v_proj."), tensor)]
    return [(name, tensor)]


def _heads_fitted(config: Any, shape: HeadLayout, name: str, rel: str, tensor: Any, inputs: bool) -> Any:
    """:func:`attention_as_loaded`'s tensor (``rel``: its name relative to the layer), its heads as loaded."""
    if shape.identity:
        return tensor
    q_norm, k_norm = config.arch.qk_norm_names
    if rel in (f"self_attn.{q_norm}.weight", f"self_attn.{k_norm}.weight"):
        kind = "head" if config.arch.qk_norm == "head" else "k" if rel.startswith(f"self_attn.{k_norm}.") else "q"
        order = shape.order(kind)
        if order is None:
            return tensor
        out = _take_rows(np.asarray(tensor, dtype=np.float32).reshape(-1), order)
        return (out * np.float32(math.sqrt(shape.dim / shape.head_dim))).reshape(
            (-1, shape.head_dim) if np.ndim(tensor) == 2 else (-1,))
    axis, kind = _HEAD_AXES.get(rel, (None, None))
    order = None if axis is None or axis == 1 and not inputs else shape.order(kind)
    if order is None:
        return tensor
    if axis == 0:
        return _take_rows(tensor, order)
    if isinstance(tensor, QuantizedWeight):
        check_padded_groups(config, name, tensor.bits, tensor.group_size)
        blocks = _whole_groups(order, tensor.group_size, tensor.bits)
        return _each_array(tensor, lambda a: _take_rows(a.reshape(a.shape[0], len(tensor.scales[0]), -1).swapaxes(
            0, 1), blocks).swapaxes(0, 1).reshape(a.shape[0], -1))
    return np.ascontiguousarray(_take_rows(np.asarray(tensor).T, order).T)


def check_padded_groups(config: Any, name: str, bits: int, group_size: int) -> None:
    """Refuse model tensor ``name`` packed at ``bits`` / ``group_size`` where the load would move its inputs across
    groups (an o_proj whose heads the load pads or regroups, :func:`attention_as_loaded`): that needs new scales, i.e.
    requantizing. ``ferrum quantize`` and the GGUF import ask before they write, so they never write what Ferrum
    cannot load."""
    layer = _layer_of(name, config.arch.prefix)
    if layer is None or not name.endswith(".self_attn.o_proj.weight"):
        return
    shape = heads_layout(config, config.arch.layers[layer])
    order = None if shape.identity else shape.order("o")
    if order is None or _whole_groups(order, group_size, bits) is not None:
        return
    padding = shape.padding()
    cut = [p for p in padding if any(width % group_size for width in p[2])] or padding
    raise UnsupportedFeatureError(
        f"{name}: {'; '.join(what for what, _, _ in cut)}, which a packed matrix allows only in whole groups of "
        f"whole 32-bit words; group size {group_size} does not divide {' and '.join(w for _, w, _ in cut)}; "
        f"{_group_advice(bits, lambda n: _whole_groups(order, n, bits) is not None)}")


def _whole_groups(order: np.ndarray, group_size: int, bits: int) -> np.ndarray | None:
    """``order`` (a loaded column's stored column, -1 for a zero) as whole groups of ``group_size`` columns: each
    loaded group's stored group, -1 for a zero one; None where some group is neither, or a group is not whole 32-bit
    words of codes."""
    if group_size * bits % 32 or len(order) % group_size:
        return None
    blocks = order.reshape(-1, group_size)
    first = blocks[:, 0]
    zero = np.all(blocks == -1, axis=1)
    whole = (first % group_size == 0) & np.all(blocks == first[:, None] + np.arange(group_size), axis=1)
    return np.where(zero, -1, first // group_size) if np.all(zero | whole) else None


def _group_advice(bits: int, cuts: Callable[[int], bool]) -> str:
    """What to do where a group size does not cut a padded matrix: the group sizes that do, else the float load."""
    fitting = [str(size) for size in MLX_GROUP_SIZES if cuts(size)]
    if fitting:
        return f"quantize with group size {' or '.join(fitting)}, or load the float checkpoint"
    return f"no group size of {', '.join(map(str, MLX_GROUP_SIZES))} does at {bits} bits: load the float checkpoint"


def _each_array(tensor: Any, change: Callable[[np.ndarray], np.ndarray]) -> Any:
    """``change`` applied to a float matrix, or to each array of a packed one (codes, scales, biases and any
    float-mode codes and scales, all laid out by output row and input group alike)."""
    if not isinstance(tensor, QuantizedWeight):
        return change(np.asarray(tensor))
    codes = tensor.float_codes
    if codes is not None:
        codes = FloatCodes(change(codes.packed), change(codes.scales), codes.mode)
    return QuantizedWeight(change(tensor.packed), change(tensor.scales), change(tensor.biases), tensor.bits,
                           tensor.group_size, codes)


def bias_of(weight: str) -> str:
    """The name of the bias beside the weight ``weight``."""
    return weight.removesuffix(".weight") + ".bias"


def stored_name(arch: Any, name: str) -> str:
    """The checkpoint's name of tensor ``name`` (Llama's naming; :attr:`Architecture.stored_names`, then
    :attr:`Architecture.sublayers`)."""
    name = _renamed(arch, name, arch.stored_names, {f"layers.{i}": stem for i, stem in arch.layer_stems.items()})
    return name if arch.sublayers is None else arch.sublayers.stored(arch.prefix, name)


def llama_names(arch: Any) -> dict[str, str]:
    """The checkpoint's module names -> Llama's: :attr:`Architecture.stored_names` the other way round, a stored
    name several of ours share read back as :attr:`Architecture.read_names` says (never by the table's order)."""
    return {**{stored: ours for ours, stored in arch.stored_names.items()}, **arch.read_names}


def model_name(arch: Any, name: str) -> str:
    """Llama's name of checkpoint tensor ``name``: the inverse of :func:`stored_name`."""
    if arch.sublayers is not None:
        name = arch.sublayers.model(arch.prefix, name)
    return _renamed(arch, name, llama_names(arch), {stem: f"layers.{i}" for i, stem in arch.layer_stems.items()})


def _renamed(arch: Any, name: str, table: dict[str, str], stems: dict[str, str]) -> str:
    """``name`` with its module (under the prefix, or under a layer) and the layers' container looked up in
    ``table``, a layer stored elsewhere under its path in ``stems`` (``Architecture.layer_stems``, either way)."""
    if not (table or stems) or not name.startswith(arch.prefix):
        return name
    rest, stem = name[len(arch.prefix):], arch.prefix
    whole, _, part = rest.rpartition(".")
    if "." in whole and whole in table:  # a module under the prefix named by its path (RWKV-7's layers.0.pre_norm)
        return f"{stem}{table[whole]}.{part}"
    moved = next((path for path in stems if rest.startswith(path + ".")), None)
    if moved is not None:  # its inner names no container's, so the search below passes it by
        stem, rest = stem + stems[moved] + ".", rest[len(moved) + 1:]
    # the layers' container, maybe dotted (PLaMo's ``layers.layers``): the longest name that is followed by an index
    for container in sorted({c for c, to in table.items() if "layers" in (c, to)} | {"layers"}, key=len, reverse=True):
        index, _, inner = rest.removeprefix(f"{container}.").partition(".")
        if rest.startswith(f"{container}.") and index.isdigit() and inner:
            stem, rest = stem + f"{table.get(container, container)}.{index}.", inner
            break
    if rest in table:  # a parameter renamed on its own (MiMo-V2-Flash's self_attn.attention_sink_bias)
        return stem + table[rest]
    module, suffix = rest.rsplit(".", 1) if "." in rest else (rest, None)
    module = table.get(module, module)
    return stem + module + ("" if suffix is None else f".{suffix}")


def _transposed(name: str, tensor: Any) -> np.ndarray:
    """A projection stored ``[in, out]`` (GPT-2's Conv1D) as ``[out, in]``."""
    if isinstance(tensor, QuantizedWeight):
        raise UnsupportedFeatureError(f"{name}: packed projections stored transposed (GPT-2's Conv1D) are not "
                                      "supported; load the float checkpoint")
    return np.ascontiguousarray(np.asarray(tensor).T)


def rows(tensor: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a dense or packed matrix (or a vector)."""
    if isinstance(tensor, QuantizedWeight):
        return tensor.take_rows(slice(start, stop))
    return tensor[start:stop]


def _take_rows(tensor: Any, order: np.ndarray) -> Any:
    """Rows ``order`` of a dense or packed matrix (or a vector), a zero row where it says -1 (a padded head's)."""
    if np.all(order >= 0):
        return tensor.take_rows(order) if isinstance(tensor, QuantizedWeight) else tensor[order]
    zero = order < 0
    taken = _take_rows(tensor, np.where(zero, 0, order))

    def zeroed(a: np.ndarray) -> np.ndarray:
        a = np.array(a)
        a[zero] = 0  # a packed row of zero codes, scales and biases is a zero row
        return a

    return _each_array(taken, zeroed)


def _layer_of(name: str, prefix: str) -> int | None:
    """The layer index of Ferrum's tensor ``name`` under ``prefix``; None for a tensor outside the layers (or a stored
    name whose layers sit in a container of another name, PLaMo's ``layers.layers.N``)."""
    if not name.startswith(prefix + "layers."):
        return None
    index = name[len(prefix) + len("layers."):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def prepare(config: Any, name: str, tensor: Any, inputs: bool = True) -> list[tuple[str, Any]]:
    """One checkpoint tensor -> the tensors the model reads (renamed, transposed, split, offset, permuted). Not
    ``inputs``: its columns are not the matrix's inputs (a LoRA B factor's, its rank), which fewer query heads leave
    unpadded."""
    arch = config.arch
    name = model_name(arch, name)
    layer = _layer_of(name, arch.prefix)
    if arch.transposed and layer is not None and np.ndim(tensor) == 2:
        tensor = _transposed(name, tensor)
    if arch.indexer is not None and f".{INDEXER}" in name:  # checked for shape, never run (ferrum.arch.dsa)
        return []
    if arch.wide is not None and arch.wide.holds(name):
        parts = arch.wide.split(name, tensor, config.hidden_size)
    elif layer is None:
        if arch.position_offset and name == f"{arch.prefix}embed_positions.weight":  # the rows before position 0
            tensor = rows(tensor, arch.position_offset, tensor.shape[0])  # packed (ferrum quantize's) too
        if name == arch.lm_head and arch.head_normed and not isinstance(tensor, QuantizedWeight):
            tensor = normed_head(tensor, arch.head_norm_axis)
        parts = _padded_head(config, name, tensor) if name == arch.lm_head and arch.head_rows else [(name, tensor)]
    elif arch.mla is not None and arch.latent(layer).splits(name):
        parts = arch.latent(layer).split(name, tensor, rows)
    elif arch.moa is not None and f".{MOA_MODULE}." in name:
        parts = arch.moa.split(name, tensor)
    elif loop_gate.holds(name) and name.endswith(".weight"):  # IQuest-Coder's gate: one linear of every head's q
        parts = [(name, loop_gate.block_diagonal(tensor))]
    elif arch.shared_block is not None and ".shared_transformer." in name:
        parts = arch.shared_block.split(name, tensor, _take_rows)
    elif (mixer := _mixer_of(arch, arch.layers[layer], name)) is not None:  # its qkv_proj its own (lightning's)
        parts = mixer.split(name, tensor, _take_rows)
    elif ".self_attn.qkv_proj." in name:  # the layer's own heads where it stores fewer (ferrum.arch.heads)
        shape = heads_layout(config, arch.layers[layer])
        q, kv, v = (shape.rows(kind) for kind in ("q", "k", "v"))
        if arch.qkv_grouped:  # [kv head][its queries, key, value][dim] -> [queries; keys; values]
            tensor = _take_rows(tensor, grouped_qkv_order(shape.query_heads, shape.kv_heads, shape.dim))
        elif arch.qkv_shards:  # [shard][its queries, values, keys] -> [queries; keys; values]
            tensor = _take_rows(tensor, sharded_qkv_order(arch.qkv_shards, q))
        parts = [(name.replace("qkv_proj", "q_proj"), rows(tensor, 0, q)),
                 (name.replace("qkv_proj", "k_proj"), rows(tensor, q, q + kv)),
                 (name.replace("qkv_proj", "v_proj"), rows(tensor, q + kv, q + kv + v))]
    elif arch.attn_output_gate and not arch.attn_gate_stored and ".self_attn.q_proj." in name:
        # per head: its query, then its gate
        heads, d = config.num_heads, config.head_dim
        order = np.arange(2 * heads * d).reshape(heads, 2, d)
        parts = [(name, _take_rows(tensor, order[:, 0].ravel())),
                 (name.replace(".q_proj.", ".gate_proj."), _take_rows(tensor, order[:, 1].ravel()))]
    else:
        parts = MLP_KINDS[arch.layers[layer].mlp].split(config, name, tensor)
    if layer is not None:
        spec = arch.layers[layer]
        if arch.attn_gate_per_head and "attention" in spec.mixers:  # one row per head -> one per head dim
            parts = [(n, _each_array(t, lambda a: np.repeat(a, config.head_dim, axis=0)) if ".self_attn.gate_proj."
                      in n else t) for n, t in parts]
        parts = [loaded for n, t in parts for loaded in attention_as_loaded(config, spec, n, t, inputs)]
    return [(n, _transform(config, layer, n, t)) for n, t in parts]


def normed_head(head: Any, axis: int) -> np.ndarray:
    """A float LM head with each column (``axis`` 0: its L2 norm over the vocabulary; Ling's norm_head) or each row
    (1: over its token's dims; Baichuan-M1's NormHead) divided by its L2 norm plus 1e-7, in float32 (the releases'
    code and mlx-lm's sanitize compute it so), then in the head's dtype."""
    a = np.asarray(head)
    wide = a.astype(np.float32)
    return (wide / (np.linalg.norm(wide, axis=axis, keepdims=True) + np.float32(1e-7))).astype(a.dtype)


def _padded_head(config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
    """A pruned LM head (``Architecture.head_rows``) padded to the vocabulary with zero rows, and its bias: 0 on the
    stored rows, -inf on the others (their logits), so every pass's logits keep the vocabulary's width. A packed head
    is padded as it is stored, exactly: a zero row is a row of zero codes, scales and biases (its groups run along
    the inputs, so rows are independent), as :func:`attention_as_loaded` pads packed output rows."""
    stored, vocab = config.arch.head_rows, config.vocab_size
    head = _each_array(tensor, lambda a: np.pad(a, [(0, vocab - stored)] + [(0, 0)] * (a.ndim - 1)))
    bias = np.full(vocab, -np.inf, dtype=np.float32)
    bias[:stored] = 0.0
    return [(name, head), (bias_of(name), bias)]


def _mixer_of(arch: Any, spec: Any, name: str) -> Any:
    """The spec of the layer's recurrent mixer whose module holds tensor ``name``, or None."""
    for mixer in spec.mixers:
        found = mixer_spec(arch, mixer)
        if found is not None and f".{found.module}." in name:
            return found
    return None


#: The matrices (and biases) whose outputs a block adds to the residual stream.
_RESIDUAL_WRITERS = (".self_attn.o_proj.", ".mlp.down_proj.", ".switch_mlp.down_proj.", ".shared_mlp.down_proj.",
                     ".mamba.out_proj.")
#: The writers a norm after attention (``post_attn``) or after the MLP (``post_mlp``) follows: that norm would undo
#: a scale folded into them, so the scale goes into the norm's weight (and bias) instead (HyperCLOVA X's Peri-LN).
_NORMED_WRITERS = {"post_attn": (".self_attn.o_proj.",),
                   "post_mlp": (".mlp.down_proj.", ".switch_mlp.down_proj.", ".shared_mlp.down_proj.")}


def _writes_residual(norms: dict[str, str], name: str) -> bool:
    """Whether ``name`` is the last tensor before the residual stream of an attention, MLP or mixer output, in a
    layer of block ``norms``."""
    for slot, writers in _NORMED_WRITERS.items():
        norm = norms.get(slot)
        if norm is not None and (f".{norm}." in name or any(w in name for w in writers)):
            return f".{norm}." in name
    return any(w in name for w in _RESIDUAL_WRITERS)


def _transform(config: Any, layer: int | None, name: str, tensor: Any) -> Any:
    arch = config.arch
    offset = norm_offset(arch, name)
    if offset:
        tensor = np.asarray(tensor, dtype=np.float32) + np.float32(offset)
    if layer is None:
        if arch.per_layer_inputs is not None and name == arch.prefix + PER_LAYER_TABLE:
            return arch.per_layer_inputs.cover(tensor, config.vocab_size, _take_rows)
        if arch.logit_scale != 1.0 and name.startswith(f"{arch.prefix}norm."):  # the logits are linear in it
            tensor = np.asarray(tensor, dtype=np.float32) * np.float32(arch.logit_scale)
        return tensor
    if arch.altup is not None:
        tensor = arch.altup.prepare(name, tensor, config.hidden_size)
    if arch.residual_scale != 1.0 and _writes_residual(arch.layers[layer].block_norms(arch), name):
        tensor = scaled(tensor, arch.residual_scale)
    if arch.value_scale != 1.0 and ".self_attn.v_proj." in name:  # the values are linear in v_proj's rows
        tensor = scaled(tensor, arch.value_scale)
    if arch.scales:
        tensor = _multiplied(arch, name, tensor)
    rope = arch.layers[layer].rope
    if arch.mla is not None and ".self_attn." in name and arch.layers[layer].mixer == "attention":
        # latent attention lays out its own q and k heads (a recurrent layer's self_attn, Kimi Linear's, is not it)
        return arch.latent(layer).transform(name, tensor, rope, _take_rows, _scale_rows)
    heads = _rotated_heads(config, name, mixer_spec(arch, arch.layers[layer].mixer))
    if heads is None:
        return tensor
    if np.ndim(tensor) == 2 and is_norm(name):  # a weight per head: rotated as the rows of q (k) are
        return _transformed_rows(config, rope, heads, name, np.asarray(tensor).reshape(-1)).reshape(np.shape(tensor))
    return _transformed_rows(config, rope, heads, name, tensor)


def _multiplied(arch: Any, name: str, tensor: Any) -> Any:
    """A projection's weight or bias with the constant multipliers :attr:`Architecture.scales` gives its module."""
    module, part = name.rsplit(".", 1)
    found = next((factors for stem, factors in arch.scales.items()
                  if module.endswith(f".{stem}") or name.endswith(f".{stem}")), None)
    if found is None:
        return tensor
    rows, inputs = found
    factor = np.broadcast_to(np.asarray(rows, dtype=np.float32), (np.shape(tensor)[0],))
    return _scale_rows(tensor, factor * np.float32(inputs if part == "weight" else 1.0))


def folded_by_mlx_lm(config: Any, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """What mlx-lm's conversion of a family that folds constants into the weights (``Architecture.converted``:
    Falcon-H1's muP multipliers) multiplies each row of checkpoint matrix ``name`` (``shape``) by, so that Ferrum
    reads that conversion as the same model: the row's multiplier under the family's fields over its multiplier
    under the converted ones (scales a load split applies per part joined back). None: as stored."""
    arch, converted = config.arch, config.arch.converted
    name = model_name(arch, name)
    if not converted or not name.endswith(".weight") or len(shape) != 2:
        return None
    rows = shape[0]
    if name == f"{arch.prefix}embed_tokens.weight":
        factor = (arch.embed_scale or 1.0) / (converted.get("embed_scale", arch.embed_scale) or 1.0)
    elif name == arch.lm_head:
        factor = arch.logit_scale / converted.get("logit_scale", arch.logit_scale)
    else:
        return _row_multipliers(arch, name, rows) / _row_multipliers(
            replace(arch, scales=converted.get("scales", arch.scales)), name, rows)
    return None if factor == 1.0 else np.full(rows, factor, dtype=np.float32)


def _row_multipliers(arch: Any, name: str, rows: int) -> np.ndarray:
    """The multipliers :attr:`Architecture.scales` gives each row of layer weight ``name`` (Llama's naming)."""
    layer = _layer_of(name, arch.prefix)
    mixer = None if layer is None else _mixer_of(arch, arch.layers[layer], name)
    index = np.arange(rows)
    parts = [(name, index)] if mixer is None else mixer.split(name, index, _take_rows)
    out = np.ones(rows, dtype=np.float32)
    for part, where in parts:
        out[where] = _multiplied(arch, part, np.ones(len(where), dtype=np.float32))
    return out


def _transformed_rows(config: Any, rope: Any, heads: int, name: str, tensor: Any) -> Any:
    """A q/k projection's rows (or its norm's entries), ``heads`` of ``head_dim`` each: longrope's factor, and the
    rotary pairs made rotate-half (``Rope.rotary_permutation``)."""
    arch = config.arch
    d = config.head_dim
    if rope.attention_factor != 1.0 and is_norm(name) == (
            arch.qk_norm is not None and not arch.qk_norm_after_rope):
        # longrope's factor multiplies cos and sin, i.e. the rotated dims of q and k (after any q/k norm, or
        # before one that follows rope)
        factor = np.where(np.arange(d) < rope.rotary_dim, rope.attention_factor, 1.0)
        tensor = _scale_rows(tensor, np.tile(factor, heads))
    order = rope.rotary_permutation()
    if order is None:
        return tensor
    return _take_rows(tensor, (np.arange(heads)[:, None] * d + order[None, :]).reshape(-1))


def grouped_qkv_order(heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking q/k/v rows grouped by key/value head (each group's ``heads / kv_heads`` queries, then its
    key, then its value) to all queries, then all keys, then all values."""
    group = heads // kv_heads
    blocks = np.arange(kv_heads * (group + 2) * head_dim).reshape(kv_heads, group + 2, head_dim)
    return np.concatenate([blocks[:, :group].reshape(-1), blocks[:, group].reshape(-1),
                           blocks[:, group + 1].reshape(-1)])


def sharded_qkv_order(shards: int, width: int) -> np.ndarray:
    """Row order taking q/k/v rows in ``shards`` model-parallel shards (each its ``width / shards`` query rows, then
    as many value rows, then key rows: CodeGen's) to all queries, then all keys, then all values."""
    blocks = np.arange(3 * width).reshape(shards, 3, width // shards)
    return np.concatenate([blocks[:, part].reshape(-1) for part in (0, 2, 1)])


def is_norm(name: str) -> bool:
    """Whether ``name`` is a norm's weight or bias (a numbered norm too: Gemma 4's ``post_feedforward_layernorm_1``)."""
    parts = name.rsplit(".", 2)  # a bare parameter (Talkie's lm_head) is none
    return len(parts) > 1 and parts[-2].rstrip("0123456789").removesuffix("_").endswith("norm")


def _rotated_heads(config: Any, name: str, mixer: Any) -> int | None:
    """How many heads a q/k tensor holds (1 for a per-head norm), or None for any other tensor; in a layer of a
    recurrent ``mixer`` under ``self_attn`` (lightning attention's), its keys have as many heads as its queries."""
    arch = config.arch
    kv_heads = config.num_kv_heads if mixer is None else config.num_heads
    for norm, module, heads in zip(arch.qk_norm_names, ("self_attn.q_", "self_attn.k_"),
                                   (config.num_heads, kv_heads)):
        if f".self_attn.{norm}." in name:
            return 1 if arch.qk_norm == "head" else heads
        if f".{module}" in name:
            return heads
    return None


def scaled(tensor: Any, factor: float) -> Any:
    """Every entry times ``factor``: a matrix, a stack of experts, or either packed (its scales and biases)."""
    if hasattr(tensor, "scales"):  # QuantizedWeight, StackedQuantized: w = scales * q + biases, kept in float32
        scales, biases = (part.astype(np.float32) * np.float32(factor) for part in (tensor.scales, tensor.biases))
        return type(tensor)(tensor.packed, scales, biases, tensor.bits, tensor.group_size)  # float codes: not scalable
    return np.asarray(tensor, dtype=np.float32) * np.float32(factor)


def _scale_rows(tensor: Any, factor: np.ndarray) -> Any:
    if isinstance(tensor, QuantizedWeight):  # w = scales * q + biases: scale both, kept in float32 (exact)
        scales = tensor.scales.astype(np.float32) * factor[:, None].astype(np.float32)
        biases = tensor.biases.astype(np.float32) * factor[:, None].astype(np.float32)
        return QuantizedWeight(tensor.packed, scales, biases, tensor.bits, tensor.group_size)
    shape = (-1,) + (1,) * (np.ndim(tensor) - 1)
    return (np.asarray(tensor, dtype=np.float32) * factor.reshape(shape).astype(np.float32))


def projection_group(ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear], fused: str,
                     sizes: tuple[int, ...]) -> Projections:
    """A layer's ``fused`` group (a key of :data:`FUSED`) as the :class:`Fuser` left it: fused or one per member.

    ``tensor(name)`` / ``linear(module)`` read the layer's placed weights (names relative to the layer).
    """
    group = fused.rsplit(".", 1)[-1]
    if tensor(f"{fused}.weight") is not None:
        return Projections([linear(fused)], sizes, group, ops)
    return Projections([linear(member) for member in FUSED[fused]], sizes, group)


class DenseAttention:
    """The attention kind of q/k/v projections (one fused matrix where the :class:`Fuser` fused them) and ``o_proj``;
    latent attention is the other (:class:`ferrum.arch.mla.LatentAttention`). ``Architecture.attention`` picks."""

    def place(self, ops: Any, dtype: str, rope: Any, own: Any = None) -> None:
        """Nothing is shared between this kind's layers."""
        return None

    def build(self, ops: Any, config: Any, tensor: Callable[[str], Any], projection: Callable[[str], Linear],
              placed: None) -> tuple[Projections, Linear]:
        """One layer's ``x -> (q, k, v)`` projections and its output projection."""
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        qkv = projection_group(ops, tensor, projection, "self_attn.qkv_proj", (q, kv, kv))
        return qkv, projection("self_attn.o_proj")

    def build_queries(self, config: Any, projection: Callable[[str], Linear]) -> tuple[Projections, Linear]:
        """The projections of a layer that attends another's keys and values (``LayerSpec.kv_source``): ``x ->
        [q]`` and its output projection."""
        return Projections([projection("self_attn.q_proj")], (config.num_heads * config.head_dim,),
                           "qkv_proj"), projection("self_attn.o_proj")

    def adapt(self, qkv: Projections, o: Linear, wrap: Callable[[str, int, int, Linear], Linear],
              hidden: int) -> Linear:
        """A layer's projections LoRA adapts replaced by ``wrap(group, start, stop, matrix)`` (see
        :meth:`ferrum.weights.Projections.adapt`); returns the output projection's replacement."""
        qkv.adapt(wrap)
        return wrap("o_proj", 0, hidden, o)


DENSE_ATTENTION = DenseAttention()


class Fuser:
    """Holds the prepared members of each fused group of a layer (:data:`FUSED`) until all have
    arrived, then gives the group back as one matrix (and one bias, zeros for a member without).

    Tensors outside any group pass straight through; only the pending members of
    groups whose last member has not been read yet stay on the host.
    """

    def __init__(self, config: Any, names: Iterable[str]):
        """``names``: every checkpoint tensor that will be prepared (``weight_shapes``)."""
        self._group: dict[str, tuple[str, str]] = {}  # member tensor -> (layer prefix, fused module)
        self._expected: dict[tuple[str, str], int] = {}
        parts_of: dict[tuple[str, str], list[str]] = {}
        for name in names:
            for part in _member_parts(config, name):
                key = _group_of(config, part)
                if key is not None:
                    parts_of.setdefault(key, []).append(part)
        for (stem, fused), parts in parts_of.items():
            if all(f"{stem}{member}.weight" in parts for member in FUSED[fused]):  # not an ungated MLP's lone up_proj
                self._group.update(dict.fromkeys(parts, (stem, fused)))
                self._expected[(stem, fused)] = len(parts)
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, name: str, tensor: Any) -> list[tuple[str, Any]]:
        """The tensors ready to place now: ``[(name, tensor)]``, nothing, or a whole fused group."""
        key = self._group.get(name)
        if key is None:
            return [(name, tensor)]
        got = self._pending.setdefault(key, {})
        got[name] = tensor
        if len(got) < self._expected[key]:
            return []
        del self._pending[key]
        return _fused(*key, got)


def _member_parts(config: Any, name: str) -> list[str]:
    """The names ``prepare`` turns checkpoint tensor ``name`` into (a fused checkpoint tensor is split)."""
    name = model_name(config.arch, name)
    layer = _layer_of(name, config.arch.prefix)
    if layer is None:
        return [name]
    stem = f"{config.arch.prefix}layers.{layer}."
    if "." not in name[len(stem):]:  # a layer's own number (Gemma 4's layer_scalar)
        return [name]
    module, suffix = name[len(stem):].rsplit(".", 1)
    if module == "self_attn.k_proj" and config.arch.layers[layer].heads.values_are_keys:  # its v_proj made of k_proj
        return [name, f"{stem}self_attn.v_proj.{suffix}"]
    return [f"{stem}{m}.{suffix}" for m in FUSED.get(module, (module,))]


def _group_of(config: Any, name: str) -> tuple[str, str] | None:
    layer = _layer_of(name, config.arch.prefix)
    if layer is None:
        return None
    stem = f"{config.arch.prefix}layers.{layer}."
    module = name[len(stem):].rsplit(".", 1)[0]
    return next(((stem, fused) for fused, members in FUSED.items() if module in members), None)


def _fused(stem: str, fused: str, got: dict[str, Any]) -> list[tuple[str, Any]]:
    members = FUSED[fused]
    weights = [got[f"{stem}{m}.weight"] for m in members]
    formats = {(w.bits, w.group_size) if isinstance(w, QuantizedWeight) else None for w in weights}
    if len(formats) != 1:
        return list(got.items())
    out = [(f"{stem}{fused}.weight", stack_rows(weights))]
    biases = [got.get(f"{stem}{m}.bias") for m in members]
    if any(b is not None for b in biases):
        out.append((f"{stem}{fused}.bias", np.concatenate([
            np.zeros(w.shape[0], np.float32) if b is None else np.asarray(b, dtype=np.float32)
            for w, b in zip(weights, biases)])))
    return out


def stack_rows(tensors: list[Any]) -> Any:
    """Dense or packed matrices of one format, one under the other (the inverse of :func:`rows`)."""
    if isinstance(tensors[0], QuantizedWeight):
        packed, scales, biases = (_concat([getattr(t, f) for t in tensors]) for f in ("packed", "scales", "biases"))
        codes = [t.float_codes for t in tensors]
        if all(c is not None for c in codes) and len({c.mode for c in codes}) == 1:  # kept where all have them
            joined = FloatCodes(_concat([c.packed for c in codes]), _concat([c.scales for c in codes]), codes[0].mode)
        else:
            joined = None
        return QuantizedWeight(packed, scales, biases, tensors[0].bits, tensors[0].group_size, joined)
    return _concat(tensors)


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    """Row-stacked; members of different float dtypes (one rescaled in float32) meet in float32."""
    if len({a.dtype for a in arrays}) > 1:
        arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    return np.concatenate(arrays)


def resolve_layout(config: Any, stored: Mapping[str, tuple[int, ...]]) -> Any:
    """``config`` with the decoder prefix and LM head name of the layout the checkpoint's tensors (``stored``: name
    -> shape) use (the family's own ``layouts`` first, then the common ones; with the norms' epsilon and the
    architecture's fields of that layout where it has its own), and for a family stored transposed
    (GPT-2's Conv1D), whether this checkpoint is: mlx-lm's conversions (under ``model.``) and Ferrum's GGUF
    imports save the projections ``[out, in]``."""
    own = [(replace(config.arch, prefix=prefix, lm_head=head, stored_names={**config.arch.stored_names, **names},
                    **(rest[1] if len(rest) > 1 else {})), rest[0] if rest else None)
           for prefix, head, names, *rest in config.arch.layouts if _holds_modules(stored, names.values())]
    for arch, eps in [*own, *((replace(config.arch, prefix=prefix, lm_head=head), None) for prefix, head in LAYOUTS)]:
        embedding = stored_name(arch, f"{arch.prefix}embed_tokens.weight").removesuffix(".weight")
        if f"{embedding}.weight" in stored or f"{embedding}.scales" in stored:
            config = replace(config, arch=arch, **({} if eps is None else {"rms_norm_eps": float(eps)}))
            break
    if config.arch.gated_delta is not None:
        config = _gated_delta_layout(config, stored)
    if config.arch.kimi_delta is not None:
        config = _kimi_delta_layout(config, stored)
    for mixer in ("mamba", "mamba2", "short_conv", "kimi_delta", "rg_lru", "conv_kv_gated"):
        if mixer_spec(config.arch, mixer) is not None:
            config = _taps_layout(config, mixer, stored)
    if config.arch.rwkv7_first is not None:
        config = _rwkv7_layout(config, stored)
    if config.arch.fused_gate_up:
        config = _unfused_gate_up_layout(config, stored)
    if config.arch.moe is not None:
        config = _unfused_shared_layout(_fused_experts_layout(config, stored), stored)
    if config.arch.transposed and _stored_untransposed(config, stored):
        config = replace(config, arch=replace(config.arch, transposed=False))
    return config


def _holds_modules(stored: Mapping[str, tuple[int, ...]], modules: Any) -> bool:
    """Whether the checkpoint holds a tensor in (or named) each of ``modules`` (a family's own layout may share the
    prefix and embedding of its usual one and rename only some modules: mlx-lm's LFM2-MoE conversions, the dense
    MLPs); a stack of experts (``M.switch_mlp.*``) is held where ``M``'s experts are, stacked, fused or per expert."""
    dotted = [f".{name}." for name in stored]
    wanted = {module.split(".switch_mlp.")[0] + ".experts" if ".switch_mlp." in module and not any(
        f".{module}." in name for name in dotted) else module for module in modules}
    return all(any(f".{module}." in name for name in dotted) for module in wanted)


def _gated_delta_layout(config: Any, stored: Mapping[str, tuple[int, ...]]) -> Any:
    """mlx-lm's conversions store the convolution ``[C, K, 1]`` (OLMo Hybrid's q's, k's and v's each) and the
    zero-centred norms already shifted by 1."""
    arch = config.arch
    layer = next(i for i, spec in enumerate(arch.layers) if spec.mixer == "gated_delta")
    taps = stored_name(arch, f"{arch.prefix}layers.{layer}.{GATED_DELTA}.conv1d.weight")
    shape = stored.get(taps) or stored.get(taps.replace(".conv1d.", f".{SEPARATE_TAPS[0]}."))
    if shape is None or arch.gated_delta.conv_kernel == 1 or shape[-1] != 1:
        return config
    return replace(config, arch=replace(arch, **OFFSETS_ADDED, gated_delta=replace(arch.gated_delta, conv_last=True)))


def _taps_layout(config: Any, mixer: str, stored: Mapping[str, tuple[int, ...]]) -> Any:
    """mlx-lm's conversions store a recurrent mixer's convolution ``[C, K, 1]`` (Mamba-1's, Mamba-2's, LFM2's, Kimi
    Delta Attention's, RecurrentGemma's RG-LRU, Gear's key/value convolutions), and run with the architecture's
    ``converted`` fields (the multipliers they folded in)."""
    arch, spec = config.arch, mixer_spec(config.arch, mixer)
    layer = next((i for i, layer in enumerate(arch.layers) if mixer in layer.mixers), None)
    if layer is None:  # the mixer is configured but no layer runs it (Ling 3 with every layer full attention)
        return config
    shape = stored.get(stored_name(arch, f"{arch.prefix}layers.{layer}.{spec.module}.{spec.taps}.weight"))
    if shape is None or spec.conv_kernel == 1 or shape[-1] != 1:
        return config
    return replace(config, arch=replace(arch, **{MIXERS[mixer]: replace(spec, conv_last=True)}, **arch.converted,
                                        converted={}))


def _kimi_delta_layout(config: Any, stored: Mapping[str, tuple[int, ...]]) -> Any:
    """Kimi Delta Attention as the checkpoint stores it: q/k/v and their taps fused (mlx-lm's kimi_k3 conversions:
    ``qkv_proj``), ``A_log`` of another shape holding at least one value a head (their ``[H]``; a release's longer
    one)."""
    arch, spec = config.arch, config.arch.kimi_delta
    layer = next((i for i, layer in enumerate(arch.layers) if "kimi_delta" in layer.mixers), None)
    if layer is None:
        return config
    stem = f"{arch.prefix}layers.{layer}.{spec.module}"
    fused = stored_name(arch, f"{stem}.qkv_proj.weight") in stored
    a_log = stored.get(stored_name(arch, f"{stem}.A_log"))
    heads_like = a_log is not None and int(np.prod(a_log)) >= spec.heads and sorted(a_log)[:-1] == [1] * (
        len(a_log) - 1)
    shape = tuple(a_log) if heads_like and tuple(a_log) != spec.tensors(config.hidden_size)[
        f"{spec.module}.A_log"] else None
    if not fused and shape is None:
        return config
    return replace(config, arch=replace(arch, kimi_delta=replace(spec, fused=fused, a_log_shape=shape)))


def _rwkv7_layout(config: Any, stored: Mapping[str, tuple[int, ...]]) -> Any:
    """mlx-lm's conversions of RWKV-7 store ``k_k``, ``k_a`` and ``g_norm`` per head, ``[H, D]``."""
    arch = config.arch
    shape = stored.get(stored_name(arch, f"{arch.prefix}layers.0.{arch.rwkv7_first.module}.k_k"))
    if shape is None or len(shape) != 2:
        return config
    return replace(config, arch=replace(arch, rwkv7_first=replace(arch.rwkv7_first, per_head=True),
                                        rwkv7=replace(arch.rwkv7, per_head=True)))


def _unfused_gate_up_layout(config: Any, stored: Mapping[str, tuple[int, ...]]) -> Any:
    """A family stored with gate and up fused whose checkpoint holds them apart under Llama's names (mlx-lm's
    conversions of Granite 4.0-H's dense models: ``mlp.gate_proj`` / ``up_proj`` / ``down_proj`` where transformers
    keeps ``shared_mlp.input_linear`` / ``output_linear``) is read in that layout."""
    arch = config.arch
    layer = next((i for i, spec in enumerate(arch.layers) if spec.mlp == "dense"), None)
    if layer is None or f"{arch.prefix}layers.{layer}.mlp.gate_proj.weight" not in stored:
        return config
    names = {ours: theirs for ours, theirs in arch.stored_names.items() if ours not in _DENSE_MLP}
    return replace(config, arch=replace(arch, fused_gate_up=False, stored_names=names))


#: The dense MLP's modules under Llama's names (fused or not).
_DENSE_MLP = ("mlp.gate_up_proj", *FUSED["mlp.gate_up_proj"], "mlp.down_proj")


def _unfused_shared_layout(config: Any, stored: Mapping[str, tuple[int, ...]]) -> Any:
    """A family whose shared expert is stored with gate and up fused (transformers' MiniMax-M3 text model) whose
    checkpoint holds them apart (its release, and transformers' save of the multimodal wrapper) is read so."""
    arch, moe = config.arch, config.arch.moe
    layer = next((i for i, spec in enumerate(arch.layers) if spec.mlp == "moe"), None)
    if layer is None or not moe.shared_fused:
        return config
    gate = stored_name(arch, f"{arch.prefix}layers.{layer}.{moe.at(moe.shared_module)}.gate_proj.weight")
    if gate not in stored and gate.removesuffix(".weight") + ".scales" not in stored:
        return config
    return replace(config, arch=replace(arch, moe=replace(moe, shared_fused=False)))


def _fused_experts_layout(config: Any, stored: Mapping[str, tuple[int, ...]]) -> Any:
    """A family read per expert whose checkpoint holds transformers 5's fused stacks instead (``M.experts.
    gate_up_proj [E, 2 * inter, hidden]`` and ``M.experts.down_proj``, outputs first: Qwen3.5-MoE's release, and
    what transformers 5 writes where no conversion maps them back) is read in that layout."""
    arch, moe = config.arch, config.arch.moe
    if moe.layout is not None or moe.stacked is not None:
        return config
    layer = next((i for i, spec in enumerate(arch.layers) if spec.mlp == "moe"), None)
    fused = stored_name(arch, f"{arch.prefix}layers.{layer}.{moe.module}.experts.gate_up_proj")
    if layer is None or fused not in stored:
        return config
    return replace(config, arch=replace(arch, moe=replace(moe, layout="fused_outputs_first")))


def _stored_untransposed(config: Any, stored: Mapping[str, tuple[int, ...]]) -> bool:
    """Told by the MLP's up projection: packed (never transposed), or ``[out, in]`` by its shape, or, where it is
    square, by mlx-lm's prefix."""
    up = stored_name(config.arch, f"{config.arch.prefix}layers.0.mlp.up_proj.weight").removesuffix(".weight")
    if f"{up}.scales" in stored:
        return True
    if config.intermediate_size == config.hidden_size:
        return config.arch.prefix == "model."
    return stored.get(f"{up}.weight") == (config.intermediate_size, config.hidden_size)
