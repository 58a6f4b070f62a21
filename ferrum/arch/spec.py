"""The description of a decoder that ``DecoderOnlyLLM`` composes its forward pass from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ferrum.arch.heads import StoredHeads
from ferrum.arch.rope import Rope
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.recurrent import MIXERS

if TYPE_CHECKING:
    from ferrum.moe.activation import ClampedSwiGLU

#: The mixers that attend over the KV pool: attention, Zamba 2's shared block before its Mamba-2, JetMoE's
#: mixture of attention heads, Baichuan-M1's attention over convolved keys and values, and IQuest-Coder's loop layers.
ATTENDING = ("attention", "shared_mamba2", "moa", "conv_attention", "loop_attention")


@dataclass(frozen=True)
class LayerSpec:
    """What differs between the layers of one model: the attention kind and the MLP slot."""

    window: int | None  # sliding window in tokens; None = full attention
    rope: Rope
    #: a kind of ferrum.arch.mlp.MLP_KINDS (dense gated MLP, "plain" ungated, "linear" one square map; MoE plugs in
    #: here), or "none": the block ends with its mixer (Nemotron-H's Mamba-2 and attention blocks)
    mlp: str = "dense"
    attn_scale: float | None = None  # this layer's own scale of q.k; None: the architecture's
    #: Chunked local attention (Llama 4's rope layers): the query at position ``p`` sees only the keys of its own
    #: chunk of ``chunk`` positions, ``[chunk * (p // chunk), p]``; None: no chunks.
    chunk: int | None = None
    qk_norm: bool = True  # this layer norms q and k where the architecture has a q/k norm (Llama 4: rope layers)
    #: Llama 4's attention temperature on this layer's queries, ``(beta, floor, shift)``: each query multiplied by
    #: ``1 + beta * log(1 + floor((position + shift) / floor))``; None: the architecture's ``query_scaling``.
    query_scaling: tuple[float, int, int] | None = None
    #: What the layer's checkpoint stores of its attention heads where it is not the model's (fewer query or
    #: key/value heads, narrower heads, values that are the keys), made the model's at load (:mod:`ferrum.arch.heads`).
    heads: StoredHeads = StoredHeads()
    #: The layer's latent attention sizes where they are not the architecture's (``Architecture.mla``): Dots 3's
    #: sliding layers, whose heads are padded to the KV pool's at load (:mod:`ferrum.arch.mla`). None: those.
    mla: Any = None
    #: What mixes the layer's tokens: "attention" over the paged KV cache, or a recurrent mixer carrying a state per
    #: sequence (:data:`ferrum.recurrent.MIXERS`: "gated_delta", Qwen3-Next's and Qwen3.5's linear attention;
    #: "mamba", Mamba's, Falcon Mamba's and Jamba's Mamba-1 layers; "mamba2", Granite 4.0-H's and Nemotron-H's
    #: Mamba-2 layers; "short_conv", LFM2's gated short convolutions; "kimi_delta", Kimi Linear's Kimi Delta
    #: Attention; "shared_mamba2", Zamba 2's hybrid layers: a shared attention + MLP block, then Mamba-2;
    #: "lightning", MiniMax's lightning attention; "rg_lru", RecurrentGemma's recurrent blocks; "conv_kv_gated",
    #: Gear's gated key/value convolutions; "rwkv7_first" / "rwkv7", RWKV-7's time mix in its first / later layers;
    #: "rwkv7_channel", its channel mix; "conv_attention", Baichuan-M1's attention over keys and values convolved
    #: along the sequence first),
    #: "loop_attention", IQuest-Coder's second-pass layers (:attr:`full_source`),
    #: "linear", one square map of the normed input (DeciLM's replace_with_linear, :mod:`ferrum.arch.linear_blocks`),
    #: or "none": the block is its MLP alone, after the block's one norm (Nemotron-H's MLP and MoE blocks).
    mixer: str = "attention"
    #: A recurrent mixer (:data:`ferrum.recurrent.MIXERS`) run beside ``mixer`` on the same normed input, its output
    #: added to the mixer's before the block goes on (Falcon-H1: Mamba-2 beside attention in every layer); None:
    #: the mixer alone. The layer then has both a KV pool layer and a recurrent state.
    beside: str | None = None
    #: The layer computes no keys or values: it attends those of layer ``kv_source`` (an earlier layer of its
    #: attention kind, whose pool layer it reads: Gemma 4 E2B / E4B's num_kv_shared_layers) with its own queries. It
    #: stores no k/v projections or norms, and the KV pool holds no layer of its own (``Architecture.kv_layers``).
    kv_source: int | None = None
    #: ...whose release norms those keys with the layer's own key norm (Hunyuan's cross-layer attention shares the
    #: source's raw keys): the ratio of its key norm's weight to the source's is folded into the layer's query norm
    #: at load (:mod:`ferrum.arch.cla`), which makes its scores over the source's normed keys its own exactly.
    own_key_norm: bool = False
    #: A "loop_attention" layer (IQuest-Coder's second pass) attends with its queries both its own keys and values
    #: within ``window`` and, in full, those of layer ``full_source`` (the same layer's first pass), the two outputs
    #: mixed per head by a gate of its rotated queries (:mod:`ferrum.arch.loop_gate`). None elsewhere.
    full_source: int | None = None
    #: The gated MLP's width where it is not the model's intermediate_size (Gemma 4's use_double_wide_mlp: the
    #: layers reading another's keys and values are twice as wide). None: the model's.
    intermediate_size: int | None = None
    #: Gemma 3n's activation_sparsity_pattern entry: the MLP's gate keeps only what exceeds its row's mean plus
    #: ``icdf(gate_sparsity)`` standard deviations (a gaussian top-k, :mod:`ferrum.arch.rowwise`) before the
    #: activation; 0: the whole gate.
    gate_sparsity: float = 0.0
    #: The layer has the architecture's attention sinks (``Architecture.sinks``); MiMo-V2-Flash's full layers
    #: have none.
    sinks: bool = True
    #: The layer's block norms where they are not the architecture's (``Architecture.norms``, slot -> tensor name):
    #: OLMo Hybrid's attention layers norm after attention and MLP, its Gated DeltaNet layers before. None: those.
    norms: tuple[tuple[str, str], ...] | None = None
    #: The block-norm slots (``pre_attn``...) whose norm is gated (A.X-K2's gated RMSNorm: the norm at
    #: ``<module>.norm``, then a low-rank sigmoid gate of its output beside it, :class:`ferrum.arch.norms.NormGate`).
    gated_norms: tuple[str, ...] = ()
    #: LongCat-Flash's shortcut-connected MoE: "give", the layer's MLP slot also computes an output of the same normed
    #: input (its sparse MLP) that the next layer's MLP output is summed with ("take"); None: neither.
    shortcut: str | None = None
    #: Zamba 2's hybrid layers (mixer "shared_mamba2"): which use of the architecture's shared blocks
    #: (``Architecture.shared_block``, :mod:`ferrum.arch.shared_block`) the layer runs before its Mamba-2, counted
    #: over the hybrid layers; it picks the block and that use's adapters. None elsewhere.
    shared_use: int | None = None
    #: What each half of the block adds its output to: "input", the stream its norm read (pre-norm blocks), or
    #: "normed", that norm's output (MiniMax's postnorm: ``alpha * norm(x) + beta * out``, the stream then
    #: holding no un-normed copy of the block's input).
    residual: str = "input"
    #: ``(mixer alpha, mixer beta, MLP alpha, MLP beta)``: each half's stream is ``alpha * residual + beta * out``
    #: (MiniMax's per-layer-kind factors); None: all 1.
    residual_scales: tuple[float, float, float, float] | None = None
    #: The layer's own SwiGLUs where they differ between layers (Step 3.5's swiglu_limits and swiglu_limits_shared):
    #: ``(its routed experts', its dense MLP's or shared expert's)``, each a
    #: :class:`ferrum.moe.activation.ClampedSwiGLU` or None (plain SwiGLU); None: the architecture's ``activation``
    #: and its ``moe``'s.
    activations: tuple[Any, Any] | None = None

    def block_norms(self, arch: Architecture) -> dict[str, str]:
        """The layer's block norms, slot -> tensor name in the layer."""
        return arch.norms if self.norms is None else dict(self.norms)

    @property
    def identity(self) -> bool:
        """The layer hands the stream on unchanged: no mixer and no MLP (Nemotron-Ultra's blocks that skip both), so
        it has no tensors, norms or KV pool layer, and a pass skips it. Its number stays the checkpoint's."""
        return self.mixer == "none" and self.mlp == "none" and self.beside is None

    @property
    def mixers(self) -> tuple[str, ...]:
        """The layer's mixers: ``mixer``, then the one ``beside`` it where there is one."""
        return (self.mixer,) if self.beside is None else (self.mixer, self.beside)


@dataclass(frozen=True)
class Architecture:
    """What one decoder block is made of, and where its tensors live in the checkpoint.

    Built from ``config.json`` by the family table (:mod:`ferrum.arch.families`);
    the model reads only this, never the model_type.
    """

    layers: tuple[LayerSpec, ...]
    #: Block norms, slot -> tensor name in the layer: ``pre_attn`` and ``pre_mlp`` (Llama); Gemma's sandwich
    #: adds ``post_attn`` (on the attention output) and ``post_mlp``; OLMo 2 has only those two.
    norms: dict[str, str]
    #: Every norm scales by ``norm_offset + w`` (Gemma's RMSNorms and Nemotron's LayerNorm1P store ``w`` around 0:
    #: offset 1), folded into the weights at load; ``norm_offsets`` gives a module its own
    #: (:func:`ferrum.arch.norms.norm_offset` reads both).
    norm_offset: float = 0.0
    #: The offsets of the norms whose module (Ferrum's name, relative to its layer or to the prefix) has its own:
    #: PLaMo 2's and 3's norms after attention and the MLP (1 / 5 and 1 / 5 ** 1.5 beside 1), its q/k norms (0),
    #: Muse Glimmer's plain final RMSNorm (``"norm"``: 0) after its (1 + w) block norms.
    norm_offsets: dict[str, float] = field(default_factory=dict)
    #: The epsilons of the norms whose slot has its own, where the config's rms_norm_eps is not theirs
    #: (:func:`ferrum.arch.norms.norm_eps`): ``"qk"`` (PLaMo 2's remote code fixes 1e-6, AFM's 1e-5), ``"final"``
    #: (JetMoE's blocks fix 1e-6 while its final norm reads rms_norm_eps), ``"post_attn"`` / ``"post_mlp"`` (Muse
    #: Glimmer's post_norm_eps).
    norm_eps: dict[str, float] = field(default_factory=dict)
    #: Every norm's kind (:data:`ferrum.arch.norms.NORM_KINDS`): "rms" (RMSNorm) or "layer" (LayerNorm: Phi-2,
    #: StableLM, StarCoder2, GPT-2...), with a bias beside each weight where ``norm_bias``.
    norm: str = "rms"
    norm_bias: bool = False
    #: False: the block and final norms have no weight at all (OLMo 1's LayerNorm; nanochat's RMSNorm, run with a
    #: weight of ones).
    norm_params: bool = True
    #: Attention and the MLP both read the block's normed input and both outputs join the residual stream
    #: (Phi-2, StableLM 2 12B); the MLP reads ``pre_mlp``'s norm of the input where the block has one.
    parallel: bool = False
    #: The activation: of the gated MLP, "silu" | "gelu_tanh"; of the ungated one (``LayerSpec.mlp`` "plain"),
    #: "gelu_tanh" | "gelu" (exact) | "relu" (OPT) | "relu2" (``relu(x) ** 2``: Nemotron, Arcee) | "xielu" (Apertus:
    #: its slopes learned per layer, ``mlp.act_fn.*``); or a record the gated MLP composes (``composed(ops)``):
    #: MiniMax-M3's :class:`ferrum.moe.activation.ClampedSwiGLU`, its experts' record.
    activation: str | ClampedSwiGLU = "silu"
    embed_scale: float | None = None  # Gemma: sqrt(hidden), applied in the compute dtype; Granite's multiplier
    #: The token embeddings normed (the blocks' kind of norm) before the first block: nanochat's without a weight,
    #: BLOOM's with its own ``embed_norm`` weights (``word_embeddings_layernorm``) where ``norm_params``.
    embed_norm: bool = False
    #: False: that norm has no weight even where the blocks' have one (Muse Glimmer's scaleless norm).
    embed_norm_params: bool = True
    #: Granite: multiplies what each block's attention and MLP add to the residual stream, and the logits.
    #: Folded into the o_proj / down_proj rows and the final norm at load (ferrum.arch.tensors).
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    #: Constant multipliers folded into a layer's projections at load (Falcon-H1's muP multipliers): module, relative
    #: to the layer and after any split (``mamba.in_proj_xbc``) -> ``(rows, inputs)``: ``rows`` (a number, or one per
    #: output row) multiplies the weight's rows and the bias, as a multiplier of the projection's output does;
    #: ``inputs`` multiplies the weight alone, as one of its input does; a tensor's own name (``self_attn.o_proj.bias``)
    #: scales that tensor alone by ``rows``. Exact: the products are linear in both.
    scales: dict[str, tuple[Any, float]] = field(default_factory=dict)
    #: Fields that differ where the checkpoint is mlx-lm's conversion (its recurrent convolutions stored
    #: ``[C, K, 1]``), which folded constant multipliers into the weights itself (Falcon-H1): set by
    #: :func:`ferrum.arch.tensors.resolve_layout`.
    converted: dict[str, Any] = field(default_factory=dict)
    attn_scale: float = 1.0  # multiplies q.k (1/sqrt(head_dim), or query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    sinks: bool = False  # gpt-oss: a learned logit per query head joins every softmax (``self_attn.sinks``)
    #: The values' (and o_proj's inputs') dims per head where fewer than head_dim (MiMo-V2-Flash's 128 beside q/k heads
    #: of 192): each v head and o_proj's columns per head are padded with zeros to head_dim at load, which leaves the
    #: attention's output exactly as it was (the padded dims are 0 and read by zero columns). None: head_dim.
    value_head_dim: int | None = None
    #: The values times this number (MiMo-V2-Flash's attention_value_scale), folded into v_proj's rows at load.
    value_scale: float = 1.0
    #: ALiBi (BLOOM, MPT, Falcon-RW): head ``h``'s scores gain ``slopes[h] * (key position - query position)``
    #: (:mod:`ferrum.arch.alibi`); None: positions come from rope or a table.
    alibi_slopes: tuple[float, ...] | None = None
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    #: The norm of q and k before rope: "head", one scale per head dim (Qwen3, Gemma 3), "each_head", a scale per
    #: head and dim (Command R+: ``[heads, head_dim]``), or "projection", one over all of q's heads and one over
    #: k's (OLMo 2); None without.
    qk_norm: str | None = None
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")  # their modules in self_attn (Hunyuan's query_layernorm...)
    qk_norm_after_rope: bool = False  # Hunyuan norms q and k once rotated
    #: "each_head" weights stored one tensor a head, ``<norm>.norms.<h>.weight`` (StableLM 2 12B), stacked at load.
    qk_norm_split: bool = False
    #: The q/k norm has no weight (Llama 4's L2 norm: ``x / sqrt(mean(x ** 2) + eps)``, an RMSNorm without a scale).
    qk_norm_params: bool = True
    #: BitNet's sub-norms, the blocks' kind of norm with their own weights: on attention's flattened heads before
    #: o_proj (``self_attn.attn_sub_norm``) and on the gated MLP's hidden layer before down_proj (``mlp.ffn_sub_norm``).
    sub_norms: bool = False
    #: DiffLlama's differential attention (:mod:`ferrum.arch.differential`): heads of twice the stored dims
    #: (``StoredHeads.head_dim``), each value head paired with another, outputs combined before o_proj.
    differential: bool = False
    #: Gemma 4: the values are RMS-normed too, per head and without a weight (``v_norm``).
    v_norm: bool = False
    #: Gemma 4: each layer's stored ``layer_scalar`` (one number) multiplies the residual stream after the layer.
    layer_scalar: bool = False
    #: Gemma 4 E2B / E4B's per-layer inputs (:class:`ferrum.arch.per_layer.PerLayerInputs`), or None.
    per_layer_inputs: Any = None
    #: LongCat-Flash-Lite's n-gram embedding (:class:`ferrum.arch.ngram.NgramSpec`): hashed n-grams ending at each
    #: token add to its embedding; None: the token's embedding alone.
    ngram: Any = None
    #: Gemma 3n's residual stream of several copies that each block predicts and corrects, with its Laurel residual
    #: (:class:`ferrum.arch.altup.AltUpSpec`), or None: one stream.
    altup: Any = None
    #: Hy4's hyper-connections: the residual stream as several streams each block reads a mix of and writes its
    #: output into (:class:`ferrum.arch.hyper.HyperSpec`), or None.
    hyper: Any = None
    #: Kimi K3's attention residuals: each sub-layer reads a softmax mix of the blocks' outputs so far
    #: (:class:`ferrum.arch.attn_res.AttnResSpec`), or None.
    attn_res: Any = None
    #: OLMo's clip_qkv: q, k and v clipped to [-c, c] once projected (and OLMoE's q and k once normed).
    clip_qkv: float | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    #: Query head ``h`` reads key/value head ``h % kv_heads`` (PLaMo's keys and values tiled over n_shared_head
    #: groups), not ``h // group``: the query heads are regrouped at load (q_proj's rows, o_proj's columns), exactly.
    tiled_kv_heads: bool = False
    fused_qkv: bool = False  # checkpoint holds self_attn.qkv_proj (Phi-3)
    #: ...with its rows grouped by key/value head: that head's queries, then its key, then its value (GPT-NeoX's
    #: per-head q, k, v; Falcon's groups).
    qkv_grouped: bool = False
    #: ...with its rows in this many model-parallel shards, each its share of the queries, then of the values, then
    #: of the keys (CodeGen's mp_num, 4); 0: not so.
    qkv_shards: int = 0
    fused_gate_up: bool = False  # checkpoint holds mlp.gate_up_proj (Phi-3)
    up_rows_first: bool = False  # ...with the up rows before the gate rows (Hunyuan-7B's gate_and_up_proj)
    #: Multi-head Latent Attention (DeepSeek-V3): a :class:`ferrum.arch.mla.MlaSpec` in place of q/k/v projections;
    #: the model's heads are then its q/k heads (``head_dim`` = qk_nope + qk_rope dims, as many key/value heads).
    mla: Any = None
    #: The sizes and layout of the layers whose mixer is "gated_delta" (:class:`ferrum.recurrent.gated_delta.
    #: GatedDeltaSpec`), else None.
    gated_delta: Any = None
    #: ...whose mixer is "mamba" (:class:`ferrum.recurrent.mamba.MambaSpec`), else None.
    mamba: Any = None
    #: ...whose mixer is "mamba2" (:class:`ferrum.recurrent.mamba2.Mamba2Spec`), else None.
    mamba2: Any = None
    #: The size and layout of the layers whose mixer is "short_conv" (:class:`ferrum.recurrent.short_conv.
    #: ShortConvSpec`), else None.
    short_conv: Any = None
    #: ...whose mixer is "kimi_delta" (:class:`ferrum.recurrent.kimi_delta.KimiDeltaSpec`), else None.
    kimi_delta: Any = None
    #: ...whose mixer is "rg_lru" (:class:`ferrum.recurrent.rg_lru.RgLruSpec`: RecurrentGemma's recurrent blocks),
    #: else None.
    rg_lru: Any = None
    #: ...whose mixer is "conv_kv_gated" (:class:`ferrum.recurrent.conv_kv_gated.ConvKvGatedSpec`: Gear's conv_mixer
    #: layers), else None.
    conv_kv_gated: Any = None
    #: Zamba 2's shared transformer blocks and its hybrid layers' Mamba-2 (:class:`ferrum.arch.shared_block.
    #: SharedBlockSpec`; mixer "shared_mamba2"), else None.
    shared_block: Any = None
    #: JetMoE's mixture of attention heads (:class:`ferrum.arch.moa.MoaSpec`; mixer "moa"), else None.
    moa: Any = None
    #: ``(alias, source)`` module prefixes under ``prefix`` (``layers.7.shared_transformer.``): the tensors a layer
    #: reads from another layer's, placed once and read by both (Zamba 2's later uses of a shared block).
    aliases: tuple[tuple[str, str], ...] = ()
    #: ...whose mixer is "lightning" (:class:`ferrum.recurrent.lightning.LightningSpec`), else None.
    lightning: Any = None
    #: RWKV-7's time mixes (:class:`ferrum.recurrent.rwkv7.Rwkv7Spec`): of the layers whose mixer is "rwkv7", and of
    #: the first, "rwkv7_first" (its ``first``); its channel mixes', "rwkv7_channel"
    #: (:class:`ferrum.recurrent.rwkv7.Rwkv7ChannelSpec`); else None.
    rwkv7: Any = None
    rwkv7_first: Any = None
    rwkv7_channel: Any = None
    #: ...whose mixer is "conv_attention" (:class:`ferrum.recurrent.kv_conv.KvConvSpec`), else None.
    kv_conv: Any = None
    #: Tensors the model reads that no checkpoint stores, computed from config.json and placed in float32 at load:
    #: name under :attr:`prefix` -> values (a vector). MiniMax's lightning decay rates, which depend on each layer's
    #: depth.
    computed: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: Qwen3-Next's gated attention: q_proj emits each head's query then its gate; the attention output is
    #: multiplied by sigmoid(gate) before o_proj.
    attn_output_gate: bool = False
    #: ...whose gate the checkpoint stores as a projection of its own, ``self_attn.gate_proj`` (AFMoE's), not in
    #: q_proj's rows.
    attn_gate_stored: bool = False
    #: ...the gate's activation: "sigmoid" (Qwen3-Next's, AFMoE's) or "softplus" (Laguna's).
    attn_gate: str = "sigmoid"
    #: ...stored one row per head (Laguna's per-head ``g_proj``), its rows repeated over each head's dims at load.
    attn_gate_per_head: bool = False
    #: DeepSeek Sparse Attention's indexers (:class:`ferrum.arch.dsa.IndexerSpec`: DeepSeek-V3.2's, GLM-5's), whose
    #: tensors are checked for shape and dropped at load; None without.
    indexer: Any = None
    #: ``(tokens, why)``: the longest context the model runs as its release does (DSA's index_topk, up to which its
    #: sparse attention is dense attention exactly); ``max_seq_len`` is lowered to it at load, saying ``why``, so
    #: the context checks refuse anything longer. None: the config's context.
    context_limit: tuple[int, str] | None = None
    #: The rank of the gated norms' gates (``LayerSpec.gated_norms``; A.X-K2's gated_norm_rank); 0 without.
    norm_gate_rank: int = 0
    moe: Any = None  # ferrum.moe.spec.MoeSpec of the layers whose mlp is "moe" (Mixtral, Qwen-MoE)
    #: Endings of the tensors placed in float32 whatever the compute dtype (transformers' _keep_in_fp32_modules:
    #: GLM-4.5's router correction biases, which choose between experts whose scores differ in the fourth digit).
    keep_float32: tuple[str, ...] = ()
    #: Multi-token prediction layers stored after the decoder's (GLM-4.5's ``num_nextn_predict_layers``): draft
    #: heads Ferrum does not run, as transformers does not, so their tensors are not reported unread.
    mtp_layers: int = 0
    #: transformers' ``_keys_to_ignore_on_load_unexpected`` for the family, a regular expression searched in each
    #: tensor's name: what its releases store that transformers does not load (ERNIE 4.5 MoE's and K-EXAONE's
    #: multi-token prediction heads), so not reported unread either.
    unloaded: str | None = None
    #: Llama 4's attention scaling (Ministral 3), ``(beta, original)``: each query is multiplied by ``1 + beta *
    #: log(1 + floor(position / original))``, exactly 1 before ``original_max_position_embeddings``.
    query_scaling: tuple[float, int] | None = None
    #: Learned absolute positions (GPT-2): ``embed_positions`` rows added to the token embeddings (after
    #: ``embed_scale`` scales them: XGLM, BioGPT).
    position_embedding: bool = False
    #: Rows of the position table before position 0's (OPT, BioGPT, XGLM: 2, fairseq's padding offset); the stored
    #: table is that much longer, and its first rows are dropped at load.
    position_offset: int = 0
    #: The position table is fairseq's sinusoids (XGLM), computed at load (:mod:`ferrum.arch.positions`), not stored.
    sinusoidal_positions: bool = False
    #: Talkie's learned scalars in each layer, read at load (:mod:`ferrum.arch.gains`): ``attn_gain`` and
    #: ``mlp_gain`` multiply attention's and the MLP's outputs before they join the residual stream, and
    #: ``self_attn.head_gain`` ([heads]) each query head once its (weightless, "each_head") q norm has normed it.
    gains: bool = False
    #: Talkie's embedding skips: each block adds its stored ``embed_skip`` scalar times the normed token embeddings
    #: (``embed_norm``'s output) after its MLP.
    embed_skip: bool = False
    #: A stored scalar the logits are multiplied by (Talkie's ``lm_head_gain.w_g``: its name, outside the prefix),
    #: folded into the final norm's weight at load; None: none.
    head_gain: str | None = None
    #: The layers' projections are stored ``[in, out]`` (GPT-2's Conv1D), transposed at load.
    transposed: bool = False
    prefix: str = "model."  # where the decoder's tensors live ("language_model.model." in Gemma 3 multimodal)
    lm_head: str = "lm_head.weight"
    lm_head_bias: bool = False  # Phi-2's LM head adds a bias
    #: The rows an untied LM head stores where it is pruned to the vocabulary's first ones (Apertus 1.5's
    #: output_vocab_size: its image and audio tokens are read, never predicted); padded at load to the vocabulary
    #: with zero rows (a packed head's: zero codes, scales and biases) and a head bias of -inf on them, so the logits
    #: keep the vocabulary's width and those tokens are never drawn. None: every row stored.
    head_rows: int | None = None
    #: The LM head's columns divided by their L2 norms over the vocabulary (plus 1e-7) at load (Ling's norm_head, as
    #: its release and mlx-lm's sanitize do); a packed head is taken as normed, as mlx-lm's conversions (and
    #: ``ferrum quantize``) norm it before packing.
    head_normed: bool = False
    #: The axis of the head ``[vocab, hidden]`` those norms run over: 0, each column's over the vocabulary (Ling's), or
    #: 1, each token's row (Baichuan-M1's NormHead).
    head_norm_axis: int = 0
    #: Modules the checkpoint stores under other names than Llama's, relative to the prefix or to a layer:
    #: Llama's name -> the checkpoint's (Phi-2: ``{"self_attn.o_proj": "self_attn.dense", "norm":
    #: "final_layernorm", ...}``). Ferrum uses Llama's names from loading on (:mod:`ferrum.arch.tensors`).
    stored_names: dict[str, str] = field(default_factory=dict)
    #: A stored name two of Ferrum's share in ``stored_names`` -> the one it reads back as
    #: (:func:`ferrum.arch.tensors.llama_names`), so no order of the table decides it: Ling 3's ``attention.dense``,
    #: its latent attention's ``o_proj`` and its linear layers' ``out_proj`` (which KimiDeltaSpec.split renames back).
    read_names: dict[str, str] = field(default_factory=dict)
    #: The family's other checkpoint layouts, tried before the common ones (``ferrum.arch.tensors.LAYOUTS``):
    #: ``(prefix, LM head, names beyond stored_names)`` (mlx-lm's GPT-NeoX: ``model.h.*``, ``model.embed_out``),
    #: and optionally a fourth entry, the norms' epsilon that checkpoints in that layout run with in place of the
    #: config's (mlx-lm's nanochat fixes 1e-5 where transformers defaults to 1e-6; None: the config's), and a fifth,
    #: the architecture's fields that layout changes (mlx-lm's Step 3.5 stores its zero-centred norms plus 1:
    #: :data:`ferrum.arch.norms.OFFSETS_ADDED`).
    layouts: tuple[tuple[Any, ...], ...] = ()
    #: Checkpoint layers that each hold several of Ferrum's (LongCat-Flash's two sub-blocks):
    #: :class:`ferrum.arch.sublayers.SubLayers`, or None: one each.
    sublayers: Any = None
    #: A looped transformer's passes (Nanbeige 4.2's num_loops): ``layers`` are the stored ones this many times in
    #: turn, each pass with KV pool layers of its own, reading the first pass's weights (``aliases``), the stream
    #: normed by the final norm after each pass but the last (:attr:`loop_starts`); 1: one pass.
    loops: int = 1
    #: False: the stream goes from one pass to the next un-normed (IQuest-Coder's loops).
    loop_norm: bool = True
    #: AFM: each layer's keys (rotated and normed) and values rounded to the int8 grid of its own learned steps
    #: before they are cached (:mod:`ferrum.arch.kv_quant`).
    kv_quant: bool = False
    #: Layers the checkpoint stores outside the layers' container: Ferrum's layer -> its module path under the prefix
    #: (AFM's KV-reuse layers, ``kv_reuse_layers.{j}`` after the ``layers.*``); the names inside are renamed as any
    #: layer's (``stored_names``).
    layer_stems: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shared = {stored for stored in self.stored_names.values()
                  if list(self.stored_names.values()).count(stored) > 1} - set(self.read_names)
        misread = {stored for stored, ours in self.read_names.items() if self.stored_names.get(ours) != stored}
        if shared or misread:
            raise ConfigError(f"stored names {sorted(shared | misread)} are each several of Ferrum's (stored_names) "
                              "or read back as a name not stored so: Architecture.read_names must say which one "
                              "each reads back as")
        partial = [i for i, layer in enumerate(self.layers) if "none" in (layer.mixer, layer.mlp)]
        joined = [what for what, on in (("per-layer inputs", self.per_layer_inputs is not None),
                                        ("layer scalars", self.layer_scalar), ("parallel blocks", self.parallel),
                                        (self.wide.name if self.wide else "", self.wide is not None)) if on]
        if partial and joined:  # the blocks' second halves that skip the mixer or the MLP apply none of those
            raise UnsupportedFeatureError(f"layer {partial[0]} lacks a mixer or an MLP, which Ferrum does not run with "
                                          f"{' and '.join(joined)}")
        if self.head_gain is not None and self.norm != "rms":  # folded into the final norm's weight, which a
            # weightless LayerNorm has none of
            raise UnsupportedFeatureError(f"a logit gain (head_gain, {self.head_gain}) is folded into the final "
                                          f"RMSNorm's weight; with a {self.norm!r} norm it is not supported")
        if all(layer.identity for layer in self.layers):
            raise ConfigError("every layer skips both its mixer and its MLP: the model has no block to run; check "
                              "the config's layers")
        if any(layer.identity and layer.norms != () for layer in self.layers):
            raise ConfigError("a layer without a mixer and an MLP hands the stream on unchanged: give it no norms "
                              "(LayerSpec.norms=())")
        kinds = [layer.shortcut for layer in self.layers]
        paired = all((a == "give") == (b == "take") for a, b in zip([None, *kinds], [*kinds, None]))
        if not paired or not set(kinds) <= {None, "give", "take"}:
            raise UnsupportedFeatureError("a layer's shortcut output (LayerSpec.shortcut) must go to the next layer: "
                                          "each 'give' followed by a 'take', each 'take' after a 'give'")
        if any(kinds) and joined:  # the blocks that hand one on apply none of those
            raise UnsupportedFeatureError(f"shortcut outputs between layers with {' and '.join(joined)} are not "
                                          "supported")
        # a wide stream's blocks (AltUp's, hyper-connections') run plain attention, then the MLP; a parallel block's
        # attention runs the MLP in its first half, which neither those blocks nor a mixer beside attention do
        # (attention residuals' blocks run any one mixer, then the MLP)
        other = next((i for i, layer in enumerate(self.layers) if layer.mixers != ("attention",)), None)
        widths = [w.name for w in (self.altup, self.hyper, self.attn_res) if w is not None]
        if len(widths) > 1:
            raise UnsupportedFeatureError(f"{' with '.join(widths)} is not supported: one wide stream at a time")
        beside_one = next((i for i, layer in enumerate(self.layers) if len(layer.mixers) != 1), None)
        if self.attn_res is not None and beside_one is not None:
            raise UnsupportedFeatureError(f"layer {beside_one} runs {' beside '.join(self.layers[beside_one].mixers)}"
                                          f", which Ferrum does not run with {self.attn_res.name}")
        if self.wide is not None and self.attn_res is None and other is not None:
            raise UnsupportedFeatureError(f"layer {other} runs {' beside '.join(self.layers[other].mixers)}, which "
                                          f"Ferrum does not run with {self.wide.name} (their blocks attend alone)")
        if self.wide is not None and self.parallel:
            raise UnsupportedFeatureError(f"{self.wide.name} in parallel blocks is not supported")
        if self.wide is not None and self.altup is None and (
                self.per_layer_inputs is not None or self.layer_scalar or any(
                    set(layer.block_norms(self)) != {"pre_attn", "pre_mlp"} for layer in self.layers)):
            raise UnsupportedFeatureError(f"{self.wide.name} run with a norm before attention and before the MLP "
                                          "and nothing else (no norms after them, per-layer inputs or layer scalars)")
        beside = next((i for i, layer in enumerate(self.layers) if layer.beside is not None), None)
        if self.parallel and beside is not None:
            raise UnsupportedFeatureError(f"layer {beside} runs {self.layers[beside].beside} beside attention, which "
                                          "Ferrum does not run in parallel blocks")
        for i, layer in enumerate(self.layers):
            if layer.residual == "input" and layer.residual_scales is None:
                continue
            if layer.residual not in ("input", "normed"):
                raise UnsupportedFeatureError(f"layer {i}'s residual is {layer.residual!r}; Ferrum adds a block's "
                                              "outputs to its 'input' or to its 'normed' input")
            if (partial or joined or any(kinds) or self.wide is not None
                    or set(layer.block_norms(self)) != {"pre_attn", "pre_mlp"}):
                raise UnsupportedFeatureError(f"layer {i} scales its residual or adds to its normed input (MiniMax's "
                                              "blocks), which Ferrum runs only in sequential blocks with a mixer and "
                                              "an MLP, each normed before and not after")
        if self.loops > 1 and (len(self.layers) % self.loops or self.wide is not None or self.sublayers is not None):
            raise UnsupportedFeatureError(f"{self.loops} passes over the layers (loops) need a whole number of "
                                          "layers per pass, one residual stream and one Ferrum layer per stored one")
        for i, layer in enumerate(self.layers):
            source = layer.full_source
            attends = source is not None and 0 <= source < i and self.layers[source].mixer == "attention" and (
                self.layers[source].kv_source is None)
            if (layer.mixer == "loop_attention") != (source is not None) or source is not None and not attends:
                raise ConfigError(f"layer {i}: a 'loop_attention' layer attends an earlier attention layer's own keys "
                                  "and values in full (LayerSpec.full_source), and only such a layer does")
        if (self.gains or self.embed_skip) and (partial or joined or any(kinds) or other is not None):
            raise UnsupportedFeatureError("learned block gains and embedding skips (Talkie's) run in sequential "
                                          "attention blocks with an MLP, without per-layer inputs, layer scalars, "
                                          "shortcuts or a wide stream")
        if self.value_head_dim is not None and self.mla is not None:  # latent attention sizes its values itself
            raise UnsupportedFeatureError("values narrower than the heads (value_head_dim) with latent attention "
                                          "(its v_head_dim sizes them): Ferrum pads plain attention's values only")

    @property
    def expert_features(self) -> tuple[tuple[str, ...], tuple[int, int]]:
        """The ``moe_experts`` feature arguments every sparse layer's experts need, and the plugin API that hands
        them (``MoeSpec.needs`` and ``since``, with the layers' own activations'); none without experts."""
        if self.moe is None:
            return (), (1, 0)
        own = [layer.activations[0] for layer in self.layers if layer.activations and layer.activations[0]]
        needs = self.moe.needs + (("activation",) if own and "activation" not in self.moe.needs else ())
        return needs, max([self.moe.since, *(act.since for act in own)])

    def latent(self, layer: int) -> Any:
        """Layer ``layer``'s latent attention sizes (:class:`ferrum.arch.mla.MlaSpec`), or None without."""
        return self.layers[layer].mla or self.mla

    @property
    def wide(self) -> Any:
        """The residual stream's form where it is wider than one array (AltUp's copies, hyper-connections'
        streams, attention residuals' blocks): its spec, which builds the model's ends and each block's halves;
        None: one stream."""
        return next((w for w in (self.altup, self.hyper, self.attn_res) if w is not None), None)

    @property
    def stored_layers(self) -> int:
        """How many layers the checkpoint stores (fewer than Ferrum runs where each holds several sub-blocks, or
        where the model loops over them)."""
        return len(self.layers) // (1 if self.sublayers is None else self.sublayers.count) // self.loops

    def first_pass(self, layer: int) -> int:
        """The layer of the first pass that layer ``layer`` runs again (``loops``), whose stored weights it reads;
        ``layer`` itself where the model runs one pass."""
        return layer % (len(self.layers) // self.loops)

    @property
    def layers_with_tensors(self) -> int:
        """How many of the checkpoint's layers it holds tensors of at least: ``stored_layers`` less the identity
        layers at the end (``LayerSpec.identity``), which store none, and those stored elsewhere (``layer_stems``)."""
        runs = [i for i, layer in enumerate(self.layers[:len(self.layers) // self.loops])
                if not layer.identity and i not in self.layer_stems]
        return max(runs) // (1 if self.sublayers is None else self.sublayers.count) + 1

    @property
    def loop_starts(self) -> frozenset[int]:
        """The layers that start a pass after the first (``loops``): the stream is normed by the final norm before
        each (none where not ``loop_norm``)."""
        return frozenset(range(self.stored_layers, len(self.layers), self.stored_layers)) if (
            self.loops > 1 and self.loop_norm) else frozenset()

    @property
    def attention(self) -> Any:
        """How the layers' attention projections are built: latent attention where ``mla`` is set
        (:class:`ferrum.arch.mla.LatentAttention`), else q/k/v and o (:class:`ferrum.arch.tensors.DenseAttention`)."""
        from ferrum.arch.mla import LatentAttention  # imported here: both modules read this one's records
        from ferrum.arch.tensors import DENSE_ATTENTION

        return DENSE_ATTENTION if self.mla is None else LatentAttention(self.mla)

    @property
    def recurrent(self) -> bool:
        """Whether some layer carries a recurrent state per sequence (prefix reuse only where a state is kept,
        ferrum.recurrent.snapshots; no rollback)."""
        return any(mixer in MIXERS for layer in self.layers for mixer in layer.mixers)

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(layer.window for layer in self.layers)

    @property
    def kv_pool_layers(self) -> int:
        """How many layers the KV pool holds."""
        return len(set(self.kv_layers) - {None})

    @property
    def kv_layers(self) -> tuple[int | None, ...]:
        """Each layer's layer of the KV pool: its own (numbered in order among the layers that have one), or its
        ``kv_source``'s; None for a layer that attends nothing (a recurrent one, or an MLP-only block). The pool
        holds as many layers as there are distinct pool layers (:attr:`kv_pool_layers`)."""
        own: dict[int, int] = {}
        for i, layer in enumerate(self.layers):
            if layer.kv_source is None and layer.mixer in ATTENDING:
                own[i] = len(own)
        return tuple(own.get(i if layer.kv_source is None else layer.kv_source) for i, layer in enumerate(self.layers))
