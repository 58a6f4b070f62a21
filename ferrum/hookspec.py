"""The backend plugin contract: one pluggy hookspec, project name ``ferrum``.

A backend is a Python package that registers an object (usually a module)
under the entry-point group ``ferrum.backends``::

    [project.entry-points."ferrum.backends"]
    mybackend = "my_package.ferrum_plugin"

That *entry-point object* must be cheap to import: Ferrum imports it to list
backends. It implements :func:`backend_probe` (can I run here, and if not, why)
and :func:`backend_load`, which imports the heavy framework and returns the
*ops plugin*: the object whose hook implementations do the compute (it may be
the entry-point object itself). Ferrum resolves the ops plugin's hooks once
into a plain table (:class:`ferrum.ops.OpsTable`), so a forward pass never goes
through pluggy.

Conventions for every op
------------------------
* ``T`` is the backend's own array type; Ferrum never looks inside it.
* Token-major layout: a batch of ``T`` tokens from many sequences is one
  ``[T, ...]`` array; which token belongs to which sequence is described by an
  :class:`ferrum.attention.AttentionBatch`.
* Float results keep the input's dtype unless stated; reductions (norms,
  softmax) accumulate in float32.
* Dtypes are named by strings: ``"float32"``, ``"float16"``, ``"bfloat16"``,
  ``"int32"``, ``"int64"``.
* Ops return new arrays, except ``kv_write`` which updates the pool in place
  (a functional framework reassigns the arrays it holds inside the pool).

Quantized weights
-----------------
Quantized checkpoints reach a backend in one packed form, MLX's affine group
quantization, described exactly in :mod:`ferrum.quant.affine` (bit order,
shapes, scale dtypes): a :class:`ferrum.quant.QuantizedWeight` holding
``packed`` (uint32), ``scales`` and ``biases``, with ``w = scales * q +
biases`` per group of ``group_size`` inputs. A backend lists the ``(bits,
group_size)`` pairs its kernels run in ``BackendInfo.quant_formats`` and
implements :func:`quantized_upload`, :func:`quantized_linear` and
:func:`quantized_embedding`; every other pair (or every pair, for a backend
that implements none of them) runs through the core's reference composition
(:mod:`ferrum.quant.reference`): each matrix is dequantized once at load into
:func:`upload_weight`'s form while the dense matrices fit in half the backend's
``memory_bytes``, and past that kept packed on the host and dequantized into a
reused buffer before each :func:`linear`. ``BackendInfo.quantized_dtype``
names the compute dtype its low-bit kernels want (e.g. bfloat16), chosen by
default for quantized checkpoints.

Required ops must be implemented; optional ones (marked so) have a reference
composition in :mod:`ferrum.reference_ops` that Ferrum uses instead, and their
presence shapes :class:`ferrum.capabilities.ExecutorCapabilities`. An
implementation may accept a subset of a spec's arguments (pluggy's forward
compatibility); Ferrum adapts the call once when it builds the table.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "ferrum"
#: The contract's version, ``"MAJOR.MINOR"`` (changelog: docs/plugins.md). MINOR grows when
#: optional ops or record fields are added (older plugins keep working); MAJOR when a hook
#: changes incompatibly. A plugin reports the version it was written for in
#: ``BackendProbe.api_version`` and ``BackendInfo.api_version``; Ferrum refuses another MAJOR.
API_VERSION = "1.33"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: Bytes per element of each compute dtype name.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

#: Hooks every ops plugin must implement.
REQUIRED_OPS = (
    "backend_info",
    "from_numpy",
    "to_numpy",
    "reshape",
    "take_rows",
    "concat",
    "add",
    "linear",
    "rms_norm",
    "rope",
    "silu_mul",
    "kv_alloc",
    "kv_write",
    "kv_gather",
    "attention",
)

#: Hooks with a reference fallback in :mod:`ferrum.reference_ops`.
OPTIONAL_OPS = (
    "upload_weight",
    "cast",
    "embedding",
    "add_rms_norm",
    "paged_attention",
    "prepare_attention_batch",
    "sample",
    "sample_on_device",
    "quantized_upload",
    "quantized_linear",
    "quantized_embedding",
    "moe_route",
    "upload_experts",
    "moe_experts",
    "gelu_tanh_mul",
    "layer_norm",
    "gelu",
    "relu_squared",
    "relu",
    "xielu",
    "sigmoid_mul",
    "softplus_mul",
    "causal_conv1d",
    "gated_delta_rule",
    "ssd_update",
    "selective_scan",
    "rg_lru",
    "wkv7",
    "mul_scalar",
    "softcap",
    "clip",
    "mul",
    "quantize_activations",
    "fake_quantize",
    "lora_apply",
    "split",
    "compile_fn",
    "flush",
)

#: The optional ops that together run packed quantized weights natively.
QUANTIZED_OPS = ("quantized_upload", "quantized_linear", "quantized_embedding")


# --------------------------------------------------------------------------
# Discovery (called on the entry-point object; must stay cheap)
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def backend_probe() -> Any:
    """Say whether this backend can run here, without importing heavy frameworks.

    Returns a :class:`ferrum.backends.BackendProbe` with ``available`` and,
    when unavailable, a human ``reason`` (e.g. "torch.cuda.is_available() is
    False"). ``priority`` orders the automatic choice: lower runs first. For a
    quantized checkpoint (the embedded default model is one) the order is
    ``quantized_priority`` (``priority`` where unset), and a backend whose
    ``BackendInfo.quant_formats`` runs the checkpoint's format natively comes
    before one that would dequantize it.
    """


@hookspec(firstresult=True)
def backend_load() -> Any:
    """Import the framework and return the ops plugin object.

    Called once, only for the backend that is selected. The returned object is
    registered with a pluggy ``PluginManager`` that validates its hook
    signatures against this module.
    """


# --------------------------------------------------------------------------
# Ops (called on the ops plugin, through the resolved table)
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def backend_info() -> Any:
    """Describe the loaded backend: a :class:`ferrum.backends.BackendInfo`.

    ``name``, ``device`` (e.g. ``"cpu"``, ``"cuda:0"``, ``"metal"``),
    ``dtypes`` it computes in, ``default_dtype``, ``memory_bytes`` (device
    memory it may use, or ``None`` if unknown), ``max_batch`` (or ``None``),
    ``quant_formats`` (the ``(bits, group_size)`` pairs its quantized ops run
    natively), ``quantized_dtype`` (compute dtype for quantized checkpoints,
    or ``None`` to choose as for float ones) and ``computes_apart`` (a step runs
    apart from the thread that issues it, so asynchronous stepping pays; ``None``:
    any device but ``"cpu"``).
    """


@hookspec(firstresult=True)
def from_numpy(array: Any, dtype: str | None) -> Any:
    """Copy a host ``numpy.ndarray`` to the backend; ``dtype=None`` keeps its dtype."""


@hookspec(firstresult=True)
def to_numpy(x: Any) -> Any:
    """Copy to the host as ``numpy.ndarray``; floating arrays come back as float32."""


@hookspec(firstresult=True)
def cast(x: Any, dtype: str) -> Any:
    """(optional) Convert ``x`` to ``dtype``. Fallback: host round trip."""


@hookspec(firstresult=True)
def upload_weight(name: str, array: Any, dtype: str) -> Any:
    """(optional) Turn a checkpoint tensor into the backend's weight form.

    ``array`` is a host numpy array (float32, float16 or bfloat16). The result
    is only ever handed back to this backend's own ops (``linear``,
    ``embedding``, ``rms_norm``), so it may be pre-transposed or repacked.
    Fallback: ``from_numpy(array, dtype)``.
    """


@hookspec(firstresult=True)
def reshape(x: Any, shape: tuple[int, ...]) -> Any:
    """Row-major reshape (``-1`` allowed once), like ``numpy.reshape``."""


@hookspec(firstresult=True)
def take_rows(x: Any, indices: Any) -> Any:
    """``x[indices]`` along axis 0; ``indices`` is an int32 backend array."""


@hookspec(firstresult=True)
def concat(parts: list[Any]) -> Any:
    """Join arrays of equal trailing shape along axis 0."""


@hookspec(firstresult=True)
def split(x: Any, sizes: tuple[int, ...]) -> list[Any]:
    """(optional) ``x [..., sum(sizes)]`` cut along its last axis into consecutive parts of ``sizes``.

    The model fuses projections that read the same input (q/k/v, gate/up) into one
    matrix and splits the one output, but only on a backend that implements this
    natively (checked once at load): the fallback round-trips through the host.
    Parts may be views of ``x``; nothing writes to them.
    """


@hookspec(firstresult=True)
def compile_fn(fn: Any) -> Any:
    """(optional) A callable equivalent to ``fn``, which the backend may trace and compile.

    ``fn`` is a pure, row-wise function of backend arrays whose first axis is the
    batch's tokens (each output row depends only on the same row of the inputs, so a
    backend may pad the rows to a size it compiled for), returning a tuple of such
    arrays, built from ops of this table: the model hands over each decoder block's
    work before and after its KV write and attention, once at load. Weights it reads
    never change; a pass with LoRA adapters runs the plain functions. The model uses
    a call's outputs only before, or as the inputs of, its next call of a compiled
    function, so a backend may return views of buffers a later call overwrites
    (CUDA graphs). The backend
    decides when compiling pays (e.g. decode-sized batches only). Fallback: ``fn``.
    """


@hookspec(firstresult=True)
def add(a: Any, b: Any) -> Any:
    """Elementwise ``a + b`` of equal shapes."""


@hookspec(firstresult=True)
def linear(x: Any, weight: Any, bias: Any) -> Any:
    """``x @ weight.T + bias``: ``x [n, in]``, ``weight [out, in]`` as returned by
    :func:`upload_weight`, ``bias [out]`` or None."""


@hookspec(firstresult=True)
def embedding(weight: Any, ids: Any) -> Any:
    """(optional) Rows of ``weight [vocab, hidden]`` (as returned by :func:`upload_weight`)
    for ``ids [n]`` (int32). Fallback: ``take_rows``, so a plugin that repacks the
    embedding matrix must implement this op."""


@hookspec(firstresult=True)
def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * weight``, in float32."""


@hookspec(firstresult=True)
def add_rms_norm(x: Any, residual: Any, weight: Any, eps: float) -> Any:
    """(optional) Fused residual add + RMSNorm.

    Returns ``(rms_norm(x + residual), x + residual)``. Fallback: ``add`` then
    ``rms_norm``.
    """


@hookspec(firstresult=True)
def rope(x: Any, positions: Any, inv_freq: Any) -> Any:
    """Rotary embedding, Hugging Face "rotate half" layout.

    ``x [T, heads, head_dim]``; ``positions [T]`` (int32, one per token, so a
    batch can mix sequences at different offsets); ``inv_freq [head_dim // 2]``
    (float32, already scaled for Llama-3 / linear rope scaling). For pair
    ``i``: ``angle = pos * inv_freq[i]``, rotating ``(x[i], x[i + d/2])``.
    A frequency may be 0 (pairs left unrotated) or negative (nanochat turns
    its pairs the other way): the same formula holds.
    """


@hookspec(firstresult=True)
def silu_mul(gate: Any, up: Any) -> Any:
    """SwiGLU: ``silu(gate) * up`` with ``silu(g) = g * sigmoid(g)``."""


@hookspec(firstresult=True)
def gelu_tanh_mul(gate: Any, up: Any) -> Any:
    """(optional) GeGLU (Gemma): ``gelu_tanh(gate) * up`` with
    ``gelu_tanh(g) = 0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g**3)))``.
    Fallback: computed on the host in float32, returned in ``gate``'s dtype."""


@hookspec(firstresult=True)
def layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    """(optional) LayerNorm over the last axis (Phi-2, StableLM, StarCoder2), in float32:
    ``(x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance; ``bias [hidden]``
    may be None (no bias added), and so may ``weight`` (OLMo's norms have neither). Fallback:
    computed on the host, as for :func:`gelu_tanh_mul`."""


@hookspec(firstresult=True)
def gelu(x: Any, tanh: bool) -> Any:
    """(optional) GELU of an ungated MLP's hidden layer (Phi-2, StarCoder2): exact, ``0.5 * x * (1 +
    erf(x / sqrt(2)))``, or with ``tanh`` the approximation of :func:`gelu_tanh_mul`. Fallback: computed
    on the host in float32."""


@hookspec(firstresult=True)
def relu_squared(x: Any) -> Any:
    """(optional) ``relu(x) ** 2``, the squared ReLU of an ungated MLP's hidden layer (Nemotron, Arcee), in
    ``x``'s dtype (the square of ``x``'s value rounded once, as torch's ``relu(x).square()`` gives it). Fallback:
    computed on the host in float32."""


@hookspec(firstresult=True)
def relu(x: Any) -> Any:
    """(optional, API 1.21) ``max(x, 0)``, the ReLU of an ungated MLP's hidden layer (OPT), in ``x``'s dtype.
    Fallback: computed on the host in float32."""


@hookspec(firstresult=True)
def xielu(x: Any, alpha_p: float, alpha_n: float, beta: float, eps: float) -> Any:
    """(optional) xIELU, the activation of Apertus's ungated MLP, as transformers computes it:
    ``where(x > 0, alpha_p * x * x + beta * x, (expm1(min(x, eps)) - x) * alpha_n + beta * x)``, each product, sum
    and difference in ``x``'s dtype in that order, with the four coefficients first rounded to ``x``'s dtype.
    ``alpha_p`` and ``alpha_n`` are the slopes the model uses, not its stored parameters: the caller has taken
    them through softplus (and added ``beta`` to the negative one); ``eps`` is negative (-1e-6), so the negative
    side never reaches ``expm1(0)``. Fallback: computed on the host in float32."""


@hookspec(firstresult=True)
def sigmoid_mul(gate: Any, x: Any) -> Any:
    """(optional, API 1.16) ``x * sigmoid(gate)`` elementwise, in ``x``'s dtype (Qwen3-Next's gated attention:
    each head's output times the sigmoid of its gate). Fallback: computed on the host in float32."""


@hookspec(firstresult=True)
def softplus_mul(gate: Any, x: Any) -> Any:
    """(optional, API 1.24) ``x * softplus(gate)`` elementwise, the softplus in float32, the product in ``x``'s dtype
    (Laguna's gated attention: each head's output times the softplus of its gate). Fallback: computed on the host in
    float32."""


@hookspec(firstresult=True)
def causal_conv1d(x: Any, weight: Any, state: Any, cu_seqlens: Any, silu: bool) -> Any:
    """(optional, API 1.16) Depthwise causal convolution over a flattened varlen batch (Gated DeltaNet's and short
    convolutions' mixing of the last ``K`` inputs): ``x [T, C]``, ``weight [C, K]``, ``state [B, C, K - 1]`` (each
    segment's ``K - 1`` inputs before its first row, zeros for a new sequence), ``cu_seqlens`` a host int32 array
    ``[B + 1]`` of segment bounds (``AttentionBatch.cu_seqlens_q``). Row ``t`` of segment ``b`` is
    ``sum_j window[t + j] * weight[:, j]`` over the window of the state's inputs then the segment's, SiLU taken of
    it where ``silu``. Returns ``(y [T, C] in x's dtype, new_state [B, C, K - 1])``: each window's last ``K - 1``
    inputs, in ``state``'s dtype. The state is not modified. Fallback: :mod:`ferrum.recurrent.kernels` on the
    host."""


@hookspec(firstresult=True)
def gated_delta_rule(q: Any, k: Any, v: Any, a: Any, b: Any, a_log: Any, dt_bias: Any, state: Any,
                     cu_seqlens: Any, beta_scale: float, lower_bound: float | None) -> Any:
    """(optional, API 1.16) Gated DeltaNet's recurrence (Qwen3-Next, Qwen3.5) over a flattened varlen batch, as
    transformers' ``torch_recurrent_gated_delta_rule`` with ``use_qk_l2norm_in_kernel``: ``q, k [T, Hk, Dk]``,
    ``v [T, Hv, Dv]`` (``Hv`` a multiple of ``Hk``; q/k head ``i`` serves value heads ``i * Hv / Hk`` on), the raw
    gate inputs ``a, b [T, Hv]``, the float32 ``a_log, dt_bias [Hv]``, ``state [B, Hv, Dk, Dv]`` float32 and
    ``cu_seqlens`` as for :func:`causal_conv1d`. In float32: q and k L2-normed over ``Dk`` (``x / sqrt(sum x^2 +
    1e-6)``), q times ``Dk ** -0.5``; ``g = -exp(a_log) * softplus(a + dt_bias)``, ``beta = sigmoid(b)``; per
    token ``S = S * exp(g)``, ``S += k (x) ((v - k S) * beta)``, ``out = q S``. Returns ``(out [T, Hv, Dv] in v's
    dtype, new_state float32)``; the state is not modified. Fallback: :mod:`ferrum.recurrent.kernels` on the
    host.

    API 1.20, handed only to plugins that declare 1.20 and whose implementation takes ``beta_scale`` (other plugins'
    layers that need it run the fallback, chosen once when a layer is built): the gate may be per key
    channel (Kimi Delta Attention: ``Hk == Hv``, ``a [T, Hv, Dk]``, ``dt_bias [Hv, Dk]``, ``g = -exp(a_log)[:,
    None] * softplus(a + dt_bias)`` and ``S = S * exp(g)[:, :, None]``, each key row of the state decaying at its
    own rate), and ``beta_scale``, a feature argument (1.0 where not given), multiplies ``beta``: OLMo Hybrid's
    ``allow_neg_eigval`` runs ``beta = 2 * sigmoid(b)``.

    API 1.27, handed only to plugins that declare 1.27 and whose implementation takes it: ``lower_bound``, a feature
    argument (None where not given), a negative number that bounds the log-decay from below instead of the
    softplus (Ling 3's ``kda_safe_gate``): ``g = lower_bound * sigmoid(exp(a_log) * (a + dt_bias))``, per head or
    per key channel alike."""


@hookspec(firstresult=True)
def ssd_update(x: Any, dt: Any, a_log: Any, b: Any, c: Any, d: Any, dt_bias: Any, state: Any, cu_seqlens: Any,
               dt_min: float, dt_max: float) -> Any:
    """(optional, API 1.17) Mamba-2's selective state-space recurrence (Granite 4.0-H, Nemotron-H) over a flattened
    varlen batch, as transformers' ``mamba2_chunk_scan`` computes it token by token: ``x [T, H, P]``, the raw step
    ``dt [T, H]``, ``b, c [T, G, N]`` (``H`` a multiple of ``G``; group ``g`` serves heads ``g * H / G`` on), the
    float32 ``a_log, d, dt_bias [H]``, ``state [B, H, P, N]`` float32 and ``cu_seqlens`` as for
    :func:`causal_conv1d`. In float32: ``dt = clip(softplus(dt + dt_bias), dt_min, dt_max)``; per token ``S = S *
    exp(-exp(a_log) * dt) + dt * x (x) b``, ``y = S c + d * x``. Returns ``(y [T, H, P] in x's dtype, new_state
    float32)``; the state is not modified. Fallback: :mod:`ferrum.recurrent.kernels` on the host."""


@hookspec(firstresult=True)
def selective_scan(x: Any, dt: Any, a_log: Any, b: Any, c: Any, d: Any, dt_bias: Any, state: Any,
                   cu_seqlens: Any) -> Any:
    """(optional, API 1.19) Mamba-1's selective scan (Mamba, Falcon Mamba, Jamba) over a flattened varlen batch, as
    transformers' ``mamba_selective_scan`` computes it token by token: ``x [T, D]`` (the convolution's output), the
    raw step ``dt [T, D]`` (``dt_proj``'s product, its bias not yet added), ``b, c [T, N]`` (shared by every
    channel), the float32 ``a_log [D, N]``, ``d, dt_bias [D]``, ``state [B, D, N]`` float32 and ``cu_seqlens`` as
    for :func:`causal_conv1d`. In float32: ``dt = softplus(dt + dt_bias)``; per token and channel ``S = S *
    exp(-exp(a_log) * dt) + dt * x * b``, ``y = S c + d * x``. Returns ``(y [T, D] in x's dtype, new_state
    float32)``; the state is not modified. The output gate (``silu(z)``) is the caller's. Fallback:
    :mod:`ferrum.recurrent.kernels` on the host."""


@hookspec(firstresult=True)
def rg_lru(x: Any, gate_x: Any, gate_a: Any, a_param: Any, state: Any, cu_seqlens: Any, starts: Any) -> Any:
    """(optional, API 1.25) Griffin's Real-Gated Linear Recurrent Unit (RecurrentGemma) over a flattened varlen
    batch, as transformers' ``RecurrentGemmaRglru`` computes it: ``x [T, W]`` (the convolution's output), the raw
    gate logits ``gate_x, gate_a [T, W]`` (the input and recurrence gates before their sigmoid), the float32
    ``a_param [W]``, ``state [B, W]`` float32, ``cu_seqlens`` as for :func:`causal_conv1d` and ``starts``, a host
    bool array ``[B]``: segment ``b`` begins its sequence (its first row is position 0). In float32: ``log_a =
    -8 * sigmoid(gate_a) * softplus(a_param)``, ``a = exp(log_a)``; per token ``h = a * h + sqrt(1 - exp(2 *
    log_a)) * sigmoid(gate_x) * x``, except a starting segment's first row, ``h = sigmoid(gate_x) * x`` (the past
    reset, the input not normalized); ``y = h``. Returns ``(y [T, W] in x's dtype, new_state float32)``; the state
    is not modified. Only plugins declaring 1.25 are handed it. Fallback: :mod:`ferrum.recurrent.kernels` on the
    host."""

@hookspec(firstresult=True)
def wkv7(r: Any, w: Any, k: Any, v: Any, a: Any, b: Any, state: Any, cu_seqlens: Any) -> Any:
    """(optional, API 1.30) RWKV-7's generalized delta rule (its time mix, as mlx-lm's ``_wkv7_step_ops`` and
    flash-linear-attention's ``chunk_rwkv7`` compute it) over a flattened varlen batch: the receptance ``r``, the
    log-decay ``w``, the key ``k``, the value ``v`` and the state's read and write vectors ``a, b``, all ``[T, H,
    D]``, ``state [B, H, Dk, Dv]`` float32, ``cu_seqlens`` as for :func:`causal_conv1d`. In float32, per token
    ``S = exp(w) * S + k (x) v + b (x) (a S)`` (``a S`` read before the decay, ``exp(w)`` over each key row),
    ``y = r S``. Returns ``(y [T, H, Dv] in v's dtype, new_state float32)``; the state is not modified. Only
    plugins declaring 1.30 are handed it. Fallback: :mod:`ferrum.recurrent.kernels` on the host."""


@hookspec(firstresult=True)
def mul_scalar(x: Any, factor: float) -> Any:
    """(optional) ``x * factor``, with ``factor`` first rounded to ``x``'s dtype (as transformers
    scales Gemma's embeddings). Fallback: host round trip, as for :func:`gelu_tanh_mul`."""


@hookspec(firstresult=True)
def softcap(x: Any, cap: float) -> Any:
    """(optional) Soft-capping (Gemma 2's final logits): ``cap * tanh(x / cap)``, in float32.
    Fallback: host round trip, as for :func:`gelu_tanh_mul`."""


@hookspec(firstresult=True)
def clip(x: Any, limit: float) -> Any:
    """(optional) ``x`` clipped to ``[-limit, limit]`` (OLMo's ``clip_qkv`` on q, k and v), in ``x``'s dtype.
    Fallback: host round trip, as for :func:`gelu_tanh_mul`."""


@hookspec(firstresult=True)
def mul(a: Any, b: Any) -> Any:
    """(optional) ``a * b`` elementwise, ``b`` broadcast over ``a``'s leading axes as numpy does (a weight per
    head, ``[heads, head_dim]``, over ``[tokens, heads, head_dim]``: Command R+'s q/k norms), in ``a``'s dtype.
    Fallback: host round trip, as for :func:`gelu_tanh_mul`."""


@hookspec(firstresult=True)
def quantize_activations(x: Any, levels: int) -> Any:
    """(optional, API 1.22) Each row of ``x [T, D]`` rounded to the integer grid of its largest magnitude and
    back, as BitNet's linear layers read their inputs (transformers' ``ActQuant``, ``levels`` 127): in float32,
    ``s = levels / max(max |x_row|, 1e-5)``, ``clip(round(x * s), -levels - 1, levels) / s`` (round half to even),
    returned in ``x``'s dtype. Fallback: computed on the host in float32."""


@hookspec(firstresult=True)
def fake_quantize(x: Any, scale: float, low: int, high: int) -> Any:
    """(optional, API 1.31) ``x`` rounded to the integer grid of step ``scale`` and back, as AFM's layers store
    their keys and values (mlx-lm's afm7 ``fake_8bit_quant``: ``low, high`` -128, 127, a learned ``scale`` per layer):
    in float32, ``clip(round(x / scale), low, high) * scale`` (``scale`` a float32 number, a true division, round half
    to even), returned in ``x``'s dtype. Fallback: computed on the host in float32."""


@hookspec(firstresult=True)
def flush() -> None:
    """(optional) Finish the work this thread issued and the backend still holds unevaluated or running (a lazy
    backend's pending KV writes, a step started and never read). The engine calls it when a step stopped half
    way (Ctrl-C in a caller stepping the engine) and when it drops a step it issued (every request in it had
    ended), so that nothing tied to this thread is left for the next step, which may run on another thread.
    Fallback: nothing (backends that run each op as it is called hold nothing)."""


@hookspec(firstresult=True)
def kv_alloc(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
) -> Any:
    """Allocate the paged KV pool: opaque, holding per layer a K and a V array
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (tokens, then heads)."""


@hookspec(firstresult=True)
def kv_write(pool: Any, layer: int, k: Any, v: Any, slot_mapping: Any) -> None:
    """Scatter new keys/values into ``layer`` of ``pool``, in place.

    ``k, v [n, num_kv_heads, head_dim]``; ``slot_mapping [n]`` (int32 backend
    array) with ``slot = block_id * block_size + offset_in_block``.
    """


@hookspec(firstresult=True)
def kv_gather(pool: Any, layer: int, block_ids: Any, length: int) -> Any:
    """Read one sequence's cache: ``(k, v)`` each ``[length, num_kv_heads, head_dim]``.

    ``block_ids`` is a host numpy int array of the sequence's blocks in order.
    """


@hookspec(firstresult=True)
def attention(
    q: Any, k: Any, v: Any, scale: float, sliding_window: int | None, softcap: float | None, sinks: Any,
    alibi_slopes: Any,
) -> Any:
    """Causal attention of one sequence, GQA-aware.

    ``q [q_len, heads, head_dim]``, ``k, v [kv_len, kv_heads, head_dim]`` with
    ``heads % kv_heads == 0`` (query head ``h`` reads kv head
    ``h // (heads // kv_heads)``). The queries are the last ``q_len`` positions:
    query ``i`` sees keys ``j <= kv_len - q_len + i`` and, with a
    ``sliding_window`` ``w``, only ``j > kv_len - q_len + i - w``. With a
    ``softcap`` ``c`` (Gemma 2), scores ``s = scale * q.k`` become ``c * tanh(s / c)``
    before masking. With ``sinks`` (gpt-oss), a float32 ``[heads]`` array from
    ``from_numpy``, head ``h``'s softmax gets one more logit, ``sinks[h]``
    (unscaled, never masked), that has no value: ``p_j = exp(s_j) /
    (exp(sinks[h]) + sum_j' exp(s_j'))``, so a query may attend to less than
    a whole unit. With ``alibi_slopes`` (API 1.21: BLOOM, MPT), a
    float32 ``[heads]`` array from ``from_numpy``, head ``h``'s score of key
    ``j`` for the query at position ``p = kv_len - q_len + i`` gains
    ``alibi_slopes[h] * (j - p)`` (after the scale and any cap, before
    masking): a penalty growing with the distance. Softmax in float32.
    Returns ``[q_len, heads, head_dim]``.

    ``sliding_window``, ``softcap``, ``sinks`` and ``alibi_slopes`` are features: an
    implementation that leaves one out of its signature (or gives it a
    default, so older callers may omit it) declares whether it offers it, and
    Ferrum refuses a model that needs a feature the backend lacks, at load.
    """


@hookspec(firstresult=True)
def prepare_attention_batch(batch: Any) -> Any:
    """(optional) Turn an :class:`ferrum.attention.AttentionBatch`'s host
    metadata into whatever this backend's ``paged_attention`` wants (e.g.
    device arrays), once per forward pass. The result is stored in
    ``batch.prepared``. Fallback: ``None``."""


@hookspec(firstresult=True)
def paged_attention(
    q: Any, pool: Any, layer: int, batch: Any, scale: float, sliding_window: int | None, softcap: float | None,
    sinks: Any, alibi_slopes: Any,
) -> Any:
    """(optional) Variable-length causal attention of many sequences at once.

    ``q [T, heads, head_dim]`` holds every item's query tokens back to back.
    ``batch`` is an :class:`ferrum.attention.AttentionBatch`: ``cu_seqlens_q``
    (prefix sums of each item's query length), ``seq_lens`` (each item's KV
    length after this step, new tokens already written), ``block_tables``
    ``[items, max_blocks]`` and ``block_size``. Same masking rule (and
    ``softcap``, ``sinks``, ``alibi_slopes``: positions counted from the
    item's first key) as :func:`attention`, per item. An item may be a
    chunk of a sequence (Llama 4's chunked local attention, API 1.15:
    :meth:`ferrum.attention.AttentionBatch.chunked`): its positions and block
    table then start at the chunk's first position, and several items may
    belong to one sequence. Fallback: per item, ``kv_gather`` then
    ``attention``; a plugin that implements this op natively is reported as
    running unified batches natively.
    """


@hookspec(firstresult=True)
def sample(logits: Any, batch: Any) -> Any:
    """(optional) Pick one token per row of ``logits [n, vocab]`` (float, on the device).

    ``batch`` is a :class:`ferrum.sampling.SamplingBatch` of host numpy arrays,
    one row per sequence: temperature (0 = greedy), top-k, top-p, min-p, this
    step's uniform draw, sparse penalty/bias adjustments (a shift may be -inf:
    a token a grammar forbids; no (row, token) twice), and how many top
    logprobs are wanted. Returns a :class:`ferrum.sampling.SampleResult` of
    host numpy arrays: the chosen tokens, and when ``batch.num_logprobs > 0``
    the chosen tokens' logprobs and the top-n tokens with theirs, and (API
    1.9) ``unusable``, the rows whose logits hold NaN (their requests fail).
    The exact semantics are those of :func:`ferrum.sampling.sample_numpy`;
    only these small arrays should cross to the host. Fallback: ``to_numpy``
    of the logits, then that reference.
    """


@hookspec(firstresult=True)
def sample_on_device(logits: Any, batch: Any) -> Any:
    """(optional) :func:`sample` without waiting for the device: for asynchronous stepping.

    Returns a :class:`ferrum.sampling.DeviceSample`: ``ids``, the chosen
    tokens as a backend int32 ``[n]`` array that the next step's
    :func:`embedding` may take before the host has seen it, and ``read()``,
    which waits and returns the :class:`ferrum.sampling.SampleResult` that
    :func:`sample` would have. Start the device work before returning (MLX:
    ``mx.async_eval``, with the step's pending KV writes; torch: no host
    synchronisation until ``read``). A plugin that implements it is stepped
    asynchronously: the engine issues step N+1 before reading step N.
    Fallback: :func:`sample` at once, its tokens uploaded (synchronous stepping).
    """


@hookspec(firstresult=True)
def quantized_upload(name: str, weight: Any, dtype: str, role: str) -> Any:
    """(optional) Turn a :class:`ferrum.quant.QuantizedWeight` into this backend's packed form.

    Called only for ``(weight.bits, weight.group_size)`` pairs listed in
    ``BackendInfo.quant_formats``. ``dtype`` is the compute dtype;
    ``role`` says which ops will receive the result: ``"linear"``
    (:func:`quantized_linear`), ``"embedding"`` (:func:`quantized_embedding`)
    or ``"tied"`` (both: a tied embedding and LM head). The weight must stay
    packed (never dequantized to a whole float matrix at load); the backend
    may repack it for its kernels; a result with an ``nbytes`` attribute reports
    its resident size (memory figures use it). Returning ``None`` declines this tensor (for
    example a shape the kernel cannot take): the core's reference form then
    serves it. A weight loaded from one of MLX's float modes also carries the file's
    codes (``weight.float_codes``: uint32 codes, uint8 scales, ``mode``), the same
    values, which a backend with kernels for that mode may keep instead. Fallback:
    the reference form for every tensor.
    """


@hookspec(firstresult=True)
def quantized_linear(x: Any, weight: Any, bias: Any) -> Any:
    """(optional) ``x @ W.T + bias`` for a packed ``W [out, in]`` from :func:`quantized_upload`.

    ``x [n, in]`` and the result ``[n, out]`` are in the compute dtype; ``W`` is
    ``scales * q + biases`` per group (see :mod:`ferrum.quant.affine`).
    Fallback: dequantize into a reused buffer, then :func:`linear`.
    """


@hookspec(firstresult=True)
def quantized_embedding(weight: Any, ids: Any) -> Any:
    """(optional) Rows ``ids [n]`` (int32) of a packed ``[vocab, hidden]`` matrix from
    :func:`quantized_upload`, dequantized into the compute dtype: ``[n, hidden]``.
    Fallback: dequantize those rows on the host."""


@hookspec(firstresult=True)
def lora_apply(y: Any, x: Any, a: Any, b: Any, batch: Any) -> Any:
    """(optional) Add many LoRA adapters' low-rank products to one projection's output, per token.

    ``y [T, out]`` is the base projection's output (from whichever op applied the
    base weight, dense or packed) and ``x [T, in]`` its input. ``a [S, r, in]`` and
    ``b [S, r, out]`` stack the factors of every resident adapter by slot (``from_numpy``
    arrays in the compute dtype; ranks zero-padded to ``r``, the scale already in
    ``b``). ``batch`` is a :class:`ferrum.adapters.batching.LoraBatch` of host arrays
    describing the whole pass: ``token_slots`` (each token's slot, -1 for none),
    ``order`` (rows of tokens that use an adapter, sorted by slot), ``slots`` (their
    slots) and ``segments`` ``(slot, start, count)`` of equal slots over ``order``; a backend may keep its device copies of these in
    ``batch.prepared`` (a dict) and reuse them for every projection of the pass.
    Returns ``y`` with ``y[t] += (x[t] @ a[s].T) @ b[s]`` for each adapted token ``t``
    of slot ``s``; other rows unchanged, even where one slot's product overflows the
    compute dtype (select each token's slot; a 0/1 mask multiplying every slot's product
    turns another slot's inf into NaN). ``y`` is a fresh array nothing else reads,
    so it may be updated in place. Fallback: computed on the host in float32.
    """


# --------------------------------------------------------------------------
# Mixture of experts (see ferrum.moe)
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def moe_route(logits: Any, shared_logit: Any, top_k: int, normalize: bool, routing: Any) -> Any:
    """(optional) Pick each token's experts: ``(ids, weights)`` as backend arrays.

    ``logits [T, E]`` are the router's outputs in the compute dtype, or in
    float32 whatever the compute dtype where the family's router is
    (DeepSeek's, GLM's, dots1's, Hunyuan's: ``MoeSpec.router_float32``; its
    ``linear`` then takes a float32 input and a float32 weight). Softmax in
    float32, the ``top_k`` largest probabilities (``ids`` int32 ``[T, top_k]``,
    ties broken as ``torch.topk`` does, see :mod:`ferrum.moe.routing`), divided
    by their sum when ``normalize``. ``weights`` are float32 ``[T, top_k]``, or
    ``[T, top_k + 1]`` when ``shared_logit [T, 1]`` is given: the last column
    is ``sigmoid(shared_logit)``, the shared expert's weight (Qwen2-MoE).

    ``routing`` (API 1.12) is a feature, declared by the signature as for
    :func:`attention`: None for the softmax rule above, or a
    :class:`ferrum.moe.routing.GroupedRouting` (GLM-4.5, DeepSeek-V2 and V3, and
    the families after them: see its rules below):
    ``routing.rule`` (API 1.13, a :class:`ferrum.moe.routing.GroupRule`)
    scores the experts by ``scoring`` "sigmoid" or "softmax", adds a
    per-expert correction bias that only chooses where it is ``corrected``
    (``routing.bias``, float32 ``[E]`` from ``from_numpy``; else None), keeps
    the best ``routing.topk_group`` of ``routing.n_group`` expert groups by
    their ``group_score`` ("top2_sum": a group's two best scores summed;
    "max": its best), sets the others' experts to ``masked`` (-inf, or 0
    under softmax: an expert of a dropped group chosen in a tie then weighs
    0, or its score where ``dropped_weighed``, API 1.28), and weighs the
    chosen experts by their scores (normalized when
    ``normalize``) times ``routing.scale``, exactly as
    :func:`ferrum.moe.routing.route_grouped` says, every step in float32
    (``shared_logit`` is then None). An implementation without ``routing``
    is never handed one, nor is a rule handed to a plugin declaring an API
    older than the rule's ``since``: 1.12 for ``NOAUX_TC`` (DeepSeek-V3, GLM-4.5,
    dots1, K-EXAONE, Solar Open, MiniMax-M2, Hy3), 1.13 for
    ``GROUP_LIMITED_GREEDY`` (DeepSeek-V2), ``SOFTMAX_CORRECTED`` (ERNIE 4.5's
    softmax with a correction bias in one group), ``SIGMOID_TOP_K`` (Llama 4's
    plain sigmoid) and ``SOFTMAX_TOP2_GROUPED`` (Mistral 4's softmax grouped by
    each group's two best), 1.16 for ``SOFTMAX_EXPERT_SCALED`` (Gemma 4's softmax
    whose weights are then multiplied by ``routing.expert_scale[ids]``, float32
    ``[E]``), 1.23 for ``SIGMOID_LOGITS_CORRECTED`` (Kolibri-1's: its ``choice``
    "logits" chooses on the raw logits plus the bias, not on the scores), 1.28
    for ``NOAUX_TC_ZERO_MASKED`` (A.X-K2's noaux_tc masking dropped groups with
    0, which beats negative corrected scores: such a dropped expert is chosen
    and, ``dropped_weighed``, weighs its score); the model routes those layers
    by the fallback.
    Fallback: the host references :func:`ferrum.moe.routing.route` and
    :func:`~ferrum.moe.routing.route_grouped` (one copy of the logits to the
    host per MoE layer).
    """


@hookspec(firstresult=True)
def upload_experts(name: str, weight: Any, dtype: str) -> Any:
    """(optional) Turn one stacked projection of a layer's experts into this backend's form.

    ``weight`` is ``[E, out, in]`` (gate and up ``[E, inter, hidden]``, down
    ``[E, hidden, inter]``): a host numpy float array, or a
    :class:`ferrum.moe.experts.StackedQuantized` (the packed affine form with a leading
    expert axis: ``packed [E, N, K*bits/32]``, ``scales``/``biases [E, N, K/gs]``),
    offered only for formats in ``BackendInfo.quant_formats``. The result is
    only handed back to :func:`moe_experts`. Returning ``None`` declines it: the
    core's reference form then serves it (a layer whose three projections end up
    in different forms is refused at load). Fallback: each expert's matrix
    placed as an ordinary weight.
    """


@hookspec(firstresult=True)
def moe_experts(
    x: Any, expert_ids: Any, expert_weights: Any, gate: Any, up: Any, down: Any, shared: Any, biases: Any,
    activation: Any,
) -> Any:
    """(optional) The routed SwiGLU experts of token-major ``x [T, hidden]``.

    ``out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))`` with
    ``e = expert_ids[t, j]``, ``w = expert_weights`` (both from
    :func:`moe_route`) and ``gate``, ``up``, ``down`` from :func:`upload_experts`.
    When ``shared [T, hidden]`` (a shared expert's output) is given,
    ``expert_weights`` has one more column and ``out[t] += w[t, top_k] * shared[t]``.
    The weighted sum accumulates in float32; the result has ``x``'s dtype.

    Two features (gpt-oss), declared by the signature as for :func:`attention`:
    ``biases``, None or ``(gate, up, down)`` arrays ``[E, out]`` in the compute
    dtype (from ``from_numpy``), expert ``e``'s row added to each projection's
    output; ``activation``, None for ``silu(g) * u`` or a
    :class:`ferrum.moe.activation.ClampedSwiGLU` in its place (its ``up_offset``, 1 for gpt-oss, is handed
    as another number, Hy4's 0, only to plugins declaring API 1.26; its ``clamp`` "swish", Step 3.5's
    ``clip(u) * min(silu(g), limit)``, only to plugins declaring API 1.29), or (API 1.16,
    handed only to plugins declaring it) a :class:`~ferrum.moe.activation.GeluTanhGLU`,
    ``gelu_tanh(g) * u`` as the ``gelu_tanh_mul`` op its ``op`` names, or (API 1.18, handed only
    to plugins declaring it) an ungated :class:`~ferrum.moe.activation.SquaredReLU` (its ``gated``
    False): the experts have no gate projection, ``gate`` is None, and expert ``e`` computes
    ``down_e(relu(up_e(x)) ** 2)``, the ``relu_squared`` op its ``op`` names, or (API 1.32, handed only to
    plugins declaring it) an ungated :class:`~ferrum.moe.activation.Gelu`: ``down_e(gelu(up_e(x)))``, the
    ``gelu`` op its ``op`` names with its ``tanh`` (Phixtral's True: the tanh form), or (API 1.33, handed only to
    plugins declaring it) a :class:`~ferrum.moe.activation.Situ` (Kimi K3's): ``softcap(u, linear_beta) *
    softcap(g, beta) * sigmoid(g)``, ``u`` uncapped where ``linear_beta`` is None, in float32. A backend whose
    ``moe_experts`` lacks one a model needs runs that model's experts through
    the fallback. Fallback: per used expert, ``take_rows`` + ``linear`` +
    ``silu_mul`` (or the activation's ``op``; the clamped activation on the host); the weighted sum on the host.
    """
