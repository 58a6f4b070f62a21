"""Executor capability flags, derived from what the loaded plugin implements.

Nothing here is keyed on a device or backend name: a flag is on because the
plugin implements the hook natively (``OpsTable.native``), because its
implementation accepts an argument (``OpsTable.accepts``), or because its
``backend_info`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferrum.hookspec import QUANTIZED_OPS


@dataclass(frozen=True)
class MemoryRequirements:
    weight_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class ExecutorCapabilities:
    backend: str
    attention_mechanisms: tuple[str, ...]
    paged_attention: bool  # the plugin runs varlen paged attention itself
    native_unified_batch: bool  # one kernel call serves a mixed prefill/decode batch
    sliding_window: bool
    device_sampling: bool  # tokens are picked on the backend; only their ids reach the host
    #: Sampled ids stay on the backend and are read a step later (``sample_on_device``), so the engine
    #: issues step N+1 while the device runs step N; else every step waits for its tokens (so for a model that needs
    #: every input token on the host: ``DecoderOnlyLLM.needs_host_tokens``).
    async_stepping: bool
    fused_ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    max_batch: int | None
    max_seq_len: int | None
    memory: MemoryRequirements | None
    #: (bits, group_size) of packed weights the plugin runs natively; the rest use the core's fallback.
    quant_formats: tuple[tuple[int, int], ...] = ()
    #: The plugin runs mixture-of-experts MLPs itself (``moe_experts``); else the core's per-expert loop.
    native_moe: bool = False
    #: The plugin adds LoRA products for many adapters itself (``lora_apply``); else the core's host fallback.
    native_lora: bool = False

    @classmethod
    def from_backend(cls, backend: Any, model: Any = None) -> "ExecutorCapabilities":
        ops, info = backend.ops, backend.info
        native = ops.native
        paged = "paged_attention" in native
        attention_op = "paged_attention" if paged else "attention"
        sliding = ops.accepts(attention_op, "sliding_window")
        mechanisms = ["paged_kv", "gqa", "varlen_paged" if paged else "gather_then_dense"]
        if sliding:
            mechanisms.append("sliding_window")
        if ops.accepts(attention_op, "softcap"):
            mechanisms.append("softcap")  # Gemma 2's soft-capped attention scores
        max_batch = info.max_batch
        memory = None
        max_seq_len = None
        if model is not None:
            # every live sequence holds at least one KV block
            blocks = model.kv.num_blocks
            max_batch = blocks if max_batch is None else min(max_batch, blocks)
            per_token = model.kv_bytes() // model.kv_capacity()
            memory = MemoryRequirements(model.weight_bytes, model.kv_bytes(), per_token)
            max_seq_len = model.config.max_seq_len
        return cls(
            backend=backend.name,
            attention_mechanisms=tuple(mechanisms),
            paged_attention=paged,
            native_unified_batch=paged,
            sliding_window=sliding,
            device_sampling="sample" in native,
            async_stepping="sample_on_device" in native and not getattr(model, "needs_host_tokens", False),
            fused_ops=tuple(op for op in ("add_rms_norm", "gelu_tanh_mul", "softcap") if op in native),
            dtypes=tuple(info.dtypes),
            devices=(info.device,),
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            memory=memory,
            quant_formats=tuple(info.quant_formats) if all(op in native for op in QUANTIZED_OPS) else (),
            native_moe="moe_experts" in native and "upload_experts" in native,
            native_lora="lora_apply" in native,
        )

    def quantization_summary(self) -> str:
        """``4,8-bit g32,64`` style: which packed formats run natively, or ``fallback``."""
        if not self.quant_formats:
            return "fallback"
        bits = sorted({b for b, _ in self.quant_formats})
        groups = sorted({g for _, g in self.quant_formats})
        full = len(self.quant_formats) == len(bits) * len(groups)
        if full:
            return f"{','.join(map(str, bits))}-bit g{','.join(map(str, groups))}"
        return " ".join(f"{b}b/g{g}" for b, g in sorted(self.quant_formats))
