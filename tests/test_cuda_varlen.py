"""The torch backend's variable-length attention: every item of a batch with several query tokens (whole
prompts, later chunks of long ones) in one FlashAttention 2 call per layer, beside items decoding one
token. Its host side (item order, key slots, prefix sums, the rows put back in token order) runs on any
device with a torch reference of the kernel's contract standing in for the kernel; the kernel itself runs
on a CUDA GPU. Both against a float64 reference, item by item."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ferrum.attention import AttentionBatch  # noqa: E402

from support import attention_batch, paged_reference  # noqa: E402

ops = pytest.importorskip("ferrum_cuda.ops")

BS, BLOCKS, HEADS, KV_HEADS, D = 16, 64, 8, 2, 64
#: (kv length after the step, query length): a whole 300-token prompt, a decode step, the 100-token
#: chunk that ends a 260-token prompt, a whole 7-token prompt, a decode step at a block's first slot.
ITEMS = [(300, 300), (40, 1), (260, 100), (7, 7), (17, 1)]
#: A lone item whose queries follow cached keys (a prefix-cache hit, a later chunk): the kernel's too.
LATER_CHUNK = [(260, 100)]


def batch_of(items, rng: np.random.Generator) -> tuple[AttentionBatch, list[np.ndarray]]:
    """``items`` over scattered blocks of the pool, and their block tables."""
    free = list(rng.permutation(BLOCKS))
    tables = [np.array([free.pop() for _ in range(-(-n // BS))]) for n, _ in items]
    return attention_batch([(t, n, q) for t, (n, q) in zip(tables, items)], BS), tables


def attend(dtype: str, window: int | None, items=ITEMS, sinks: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, ops.PreparedBatch]:
    """The backend's ``paged_attention`` over a pool of random K/V, and the float64 reference."""
    rng = np.random.default_rng(0 if window is None else window)
    pool = ops.kv_alloc(1, BLOCKS, BS, KV_HEADS, D, dtype)
    torch_dtype = pool.dtype
    k_host = rng.standard_normal((BLOCKS * BS, KV_HEADS, D)).astype(np.float32)
    v_host = rng.standard_normal((BLOCKS * BS, KV_HEADS, D)).astype(np.float32)
    # What the pool holds after rounding to its dtype is what the reference reads.
    k_dev, v_dev = torch.from_numpy(k_host).to(torch_dtype), torch.from_numpy(v_host).to(torch_dtype)
    every_slot = torch.arange(BLOCKS * BS, dtype=torch.int32)
    put = lambda t: t.to(ops.DEVICE)  # noqa: E731
    ops.kv_write(pool, 0, put(k_dev), put(v_dev), put(every_slot))
    batch, tables = batch_of(items, rng)
    batch.prepared = ops._prepare(batch, flash=True)
    q_dev = torch.from_numpy(rng.standard_normal((batch.num_tokens, HEADS, D)).astype(np.float32)).to(torch_dtype)
    sinks_dev = None if sinks is None else put(torch.from_numpy(sinks))
    got = ops.paged_attention(put(q_dev), pool, 0, batch, D**-0.5, window, sinks=sinks_dev).float().cpu().numpy()
    ref = paged_reference(q_dev.float().numpy(), k_dev.float().numpy(), v_dev.float().numpy(), batch.cu_seqlens_q,
                          batch.seq_lens, tables, BS, D**-0.5, window, sinks=sinks)
    return got, ref, batch.prepared


def kernel_contract(q, k, v, cu_q, cu_k, max_q, max_k, scale, window):
    """What ``_flash_kernel`` promises, in plain torch item by item: causal (or a band of ``window`` keys)
    aligned to each item's last key, grouped query heads, the output and each row's log-sum-exp
    ``[H, tokens]``; and the kernel's input rules."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and q.is_contiguous() and k.is_contiguous()
    q_lens, k_lens = torch.diff(cu_q).tolist(), torch.diff(cu_k).tolist()
    assert (max_q, max_k) == (max(q_lens), max(k_lens))
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    for i, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        qi = q[cu_q[i] : cu_q[i + 1]].float().transpose(0, 1)
        ki, vi = (t[cu_k[i] : cu_k[i + 1]].float().transpose(0, 1).repeat_interleave(group, 0) for t in (k, v))
        qpos, kpos = torch.arange(nk - nq, nk, device=q.device)[:, None], torch.arange(nk, device=q.device)[None, :]
        allowed = (kpos <= qpos) & ((kpos > qpos - window) if window is not None else True)
        scores = (qi @ ki.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
        out[cu_q[i] : cu_q[i + 1]] = (scores.softmax(-1) @ vi).transpose(0, 1).to(q.dtype)
        lse[:, cu_q[i] : cu_q[i + 1]] = scores.logsumexp(-1)
    return out, lse


@pytest.mark.parametrize("window", [None, 50])
def test_prefill_items_share_one_call_beside_decode_items(monkeypatch, window):
    monkeypatch.setattr(ops, "_flash_kernel", kernel_contract)
    got, ref, prepared = attend("bfloat16", window)
    varlen = prepared.varlen
    assert varlen is not None and prepared.alone == [] and prepared.prefill is None
    assert varlen.cu_q.tolist() == [0, 300, 400, 407] and varlen.cu_k.tolist() == [0, 300, 560, 567]
    np.testing.assert_allclose(got, ref, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [None, 50])
def test_a_lone_later_chunk_takes_the_kernel_and_a_whole_prompt_does_not(monkeypatch, window):
    monkeypatch.setattr(ops, "_flash_kernel", kernel_contract)
    got, ref, prepared = attend("bfloat16", window, LATER_CHUNK)
    assert prepared.varlen is not None and prepared.varlen.cu_k.tolist() == [0, 260]
    np.testing.assert_allclose(got, ref, atol=3e-2, rtol=2e-2)
    monkeypatch.setattr(ops, "_flash_kernel", lambda *a, **k: pytest.fail("a whole prompt reached the flash kernel"))
    got, ref, prepared = attend("bfloat16", window, [(300, 300)])  # one SDPA call, causal or over the window
    assert prepared.kind == "single"
    np.testing.assert_allclose(got, ref, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [None, 50])
def test_sinks_take_the_kernel_and_scale_each_row_by_what_its_keys_keep(monkeypatch, window):
    """gpt-oss's sinks: the kernel's log-sum-exp gives each row's share of a softmax the sink joins."""
    monkeypatch.setattr(ops, "_flash_kernel", kernel_contract)
    sinks = np.random.default_rng(3).normal(0, 2, HEADS).astype(np.float32)
    got, ref, prepared = attend("bfloat16", window, sinks=sinks)
    assert prepared.varlen is not None and prepared.without_flash is None
    np.testing.assert_allclose(got, ref, atol=3e-2, rtol=2e-2)
    without, _, _ = attend("bfloat16", window)
    assert np.abs(got - without).max() > 0.1  # the sinks took their share


def test_calls_the_kernel_cannot_take_are_prepared_without_it(monkeypatch):
    """float32 (and soft-capped scores) go the SDPA way, from the same prepared batch."""
    monkeypatch.setattr(ops, "_flash_kernel", lambda *a, **k: pytest.fail("float32 reached the flash kernel"))
    got, ref, prepared = attend("float32", None)
    assert prepared.without_flash is not None and prepared.without_flash.varlen is None
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


needs_flash = pytest.mark.skipif(not ops._flash_varlen_available(),
                                 reason="needs a CUDA GPU with FlashAttention 2 (compute capability 8.0+)")


@needs_flash
@pytest.mark.parametrize("sinks", [None, 2.0], ids=["", "sinks"])
@pytest.mark.parametrize("items", [ITEMS, LATER_CHUNK], ids=["mixed", "later-chunk"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("window", [None, 50])
def test_flash_kernel_matches_the_reference(dtype, window, items, sinks):
    if sinks is not None:
        sinks = np.random.default_rng(3).normal(0, sinks, HEADS).astype(np.float32)
    got, ref, prepared = attend(dtype, window, items, sinks)
    assert prepared.varlen is not None and prepared.without_flash is None
    np.testing.assert_allclose(got, ref, atol=3e-2 if dtype == "bfloat16" else 4e-3, rtol=2e-2)
