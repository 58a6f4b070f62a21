"""Logit parity: Ferrum on every backend that runs here vs Hugging Face transformers,
vs mlx-lm (MLX backend), and backend vs backend; plus the consistency of the
paths through the paged KV cache.

Tolerances (float32 everywhere):
* vs transformers / mlx-lm: max |diff| <= 1e-4 * max(1, max |logit|). Measured:
  about 1e-6 on every backend and architecture (logit scale ~1.5).
* backend vs backend: the same bound, and identical greedy tokens for 32 steps.
* two paths of one backend (stepwise vs verify, chunked vs one-shot, batched vs
  alone, truncate + redecode): 2e-5 absolute, since only the batch layout differs.
"""

from __future__ import annotations

import numpy as np
import pytest

import ferrum.attention
from ferrum.model import DecoderOnlyLLM, ForwardItem

from support import ARCHITECTURES, reference_logits, runnable_backends, with_v4_rope_keys, write_arch_checkpoint

SAME_BACKEND_TOL = 2e-5
RUNNABLE = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]


def assert_parity(got: np.ndarray, ref: np.ndarray) -> None:
    bound = 1e-4 * max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(got - ref).max())
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> (folder, transformers model)."""
    out = {}
    for arch in ARCHITECTURES:
        folder = tmp_path_factory.mktemp(arch)
        out[arch] = (folder, write_arch_checkpoint(folder, arch))
    return out


_models: dict = {}


def load(folder, backend, **kw) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, **kw)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_transformers_all_positions_and_last(checkpoints, arch, backend):
    folder, hf = checkpoints[arch]
    ref = reference_logits(hf, TOKENS)
    model = load(folder, backend)
    assert_parity(model.forward_verify("all", TOKENS), ref)
    assert_parity(model.prefill("last", TOKENS), ref[-1])


@pytest.mark.parametrize("backend", [b for b in RUNNABLE if b != "cpu"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_backends_agree_with_cpu_and_greedy_tokens_match(checkpoints, arch, backend):
    folder, _ = checkpoints[arch]
    runs = {}
    for name in ("cpu", backend):
        model = load(folder, name)
        logits = model.prefill("g", TOKENS[:5])
        first = logits
        tokens = []
        for step in range(32):
            token = int(np.argmax(logits))
            tokens.append(token)
            logits = model.decode("g", token, 5 + step)
        runs[name] = (first, tokens)
    assert_parity(runs[backend][0], runs["cpu"][0])
    assert runs[backend][1] == runs["cpu"][1]


@pytest.mark.skipif("mlx" not in RUNNABLE, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("arch", ["llama", "llama_mha_untied", "qwen2", "qwen3"])
def test_mlx_backend_matches_mlx_lm(checkpoints, arch, tmp_path):
    """mlx-lm runs Mistral without its sliding window, so Mistral is compared with transformers only."""
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    folder = with_v4_rope_keys(checkpoints[arch][0], tmp_path / arch)
    loaded = mlx_utils.load_model(folder)
    reference_model = loaded[0] if isinstance(loaded, tuple) else loaded
    ref = np.array(reference_model(mx.array([TOKENS])).astype(mx.float32))[0]
    assert_parity(load(folder, "mlx").forward_verify("m", TOKENS), ref)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_sharded_checkpoint_loads_the_same(checkpoints, tmp_path, backend):
    _, hf = checkpoints["qwen2"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_parity(load(tmp_path, backend).forward_verify("s", TOKENS), reference_logits(hf, TOKENS))


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_stepwise_decode_equals_forward_verify(checkpoints, arch, backend):
    model = load(checkpoints[arch][0], backend)
    steps = [model.prefill("s", TOKENS[:3])]
    for pos in range(3, len(TOKENS)):
        steps.append(model.decode("s", TOKENS[pos], pos))
    verify = model.forward_verify("v", TOKENS)
    np.testing.assert_allclose(np.stack(steps), verify[2:], atol=SAME_BACKEND_TOL)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_chunked_prefill_equals_one_shot(checkpoints, arch, backend):
    model = load(checkpoints[arch][0], backend)
    one_shot = model.prefill("one", TOKENS)
    assert model.unified_forward([ForwardItem("c", TOKENS[:4], 0, False)]) == {}
    model.unified_forward([ForwardItem("c", TOKENS[4:9], 4, False)])
    chunked = model.unified_forward([ForwardItem("c", TOKENS[9:], 9, True)])["c"]
    np.testing.assert_allclose(chunked, one_shot, atol=SAME_BACKEND_TOL)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_mixed_batch_equals_each_sequence_alone(checkpoints, arch, backend):
    folder = checkpoints[arch][0]
    prompts = {"a": TOKENS[:9], "b": TOKENS[2:4], "c": TOKENS[:1], "d": TOKENS[1:13]}
    alone_model = load(folder, backend)
    alone = {}
    for k, p in prompts.items():
        alone[k] = [alone_model.prefill(k, p[:-1] or p)]
        if len(p) > 1:
            alone[k].append(alone_model.decode(k, p[-1], len(p) - 1))
    # batched: a and d were prefilled earlier and now decode, b and c prefill in the same pass
    model = load(folder, backend)
    first = model.unified_forward([ForwardItem("a", prompts["a"][:-1], 0, True), ForwardItem("d", prompts["d"][:-1], 0, True)])
    mixed = model.unified_forward(
        [
            ForwardItem("a", prompts["a"][-1:], len(prompts["a"]) - 1, True),
            ForwardItem("b", prompts["b"][:-1], 0, True),
            ForwardItem("c", prompts["c"], 0, True),
            ForwardItem("d", prompts["d"][-1:], len(prompts["d"]) - 1, True),
        ]
    )
    np.testing.assert_allclose(first["a"], alone["a"][0], atol=SAME_BACKEND_TOL)
    for k in ("a", "d"):
        np.testing.assert_allclose(mixed[k], alone[k][1], atol=SAME_BACKEND_TOL)
    for k in ("b", "c"):
        np.testing.assert_allclose(mixed[k], alone[k][0], atol=SAME_BACKEND_TOL)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_prompts_attended_alone_and_together_equal_each_sequence_alone(checkpoints, arch, backend, monkeypatch):
    """Long prefill items attend in a call of their own (``AttentionBatch.alone``) and the rest are padded
    into one; with the threshold lowered, one batch holds both kinds (a fresh prompt, a chunk after a cached
    prefix) beside short prompts and decodes, and the rows come back in token order (mistral: sliding-window
    masks)."""
    monkeypatch.setattr(ferrum.attention, "ALONE_PAIRS", 20)
    folder = checkpoints[arch][0]
    long_prompt, cached, chunk = TOKENS[:12], TOKENS[3:10], TOKENS[:6]
    reference = load(folder, backend)
    want = {"long": reference.prefill("long", long_prompt), "short": reference.prefill("short", TOKENS[4:6]),
            "one": reference.prefill("one", TOKENS[7:8])}
    reference.prefill("chunk", cached)
    want["chunk"] = reference.unified_forward([ForwardItem("chunk", chunk, len(cached), True)])["chunk"]
    reference.prefill("dec", TOKENS[:5])
    want["dec"] = reference.decode("dec", TOKENS[5], 5)

    model = load(folder, backend)
    model.prefill("chunk", cached)
    model.prefill("dec", TOKENS[:5])
    got = model.unified_forward([
        ForwardItem("short", TOKENS[4:6], 0, True),  # 2 x 2: padded with the others
        ForwardItem("long", long_prompt, 0, True),  # 12 x 12: alone
        ForwardItem("dec", TOKENS[5:6], 5, True),
        ForwardItem("chunk", chunk, len(cached), True),  # 6 x 13: alone
        ForwardItem("one", TOKENS[7:8], 0, True),
    ])
    for key, logits in want.items():
        np.testing.assert_allclose(got[key], logits, atol=SAME_BACKEND_TOL, err_msg=key)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_last_block_computes_only_the_rows_with_logits(checkpoints, arch, backend, monkeypatch):
    """In a pass where no item decodes, the last block attends and runs its MLP for the logit rows only
    (``DecoderOnlyLLM._rows_past_last_write``): logits and the K/V every layer wrote still match transformers."""
    folder, hf = checkpoints[arch]
    model = load(folder, backend)
    rows_attended = []  # query rows of each paged_attention call
    attend = model.ops.paged_attention
    monkeypatch.setattr(model.ops, "paged_attention",
                        lambda q, *args, **kw: rows_attended.append(q.shape[0]) or attend(q, *args, **kw))
    first = model.forward([
        ForwardItem("prompt", TOKENS[:9], 0, True),
        ForwardItem("chunk", TOKENS[:5], 0, is_final_chunk=False),
        ForwardItem("verify", TOKENS[2:8], 0, True, full_logits=True),
    ])
    layers = model.config.num_layers
    assert rows_attended == [20] * (layers - 1) + [7]  # 9 + 5 + 6 rows; then prompt's last row and verify's 6
    logits = model.ops.to_numpy(first.logits)
    assert first.rows == {"prompt": (0, 1), "verify": (1, 6)}
    assert_parity(logits[0], reference_logits(hf, TOKENS[:9])[-1])
    assert_parity(logits[1:], reference_logits(hf, TOKENS[2:8]))
    rows_attended.clear()
    assert model.unified_forward([ForwardItem("chunk", TOKENS[5:7], 5, is_final_chunk=False)]) == {}
    assert rows_attended == [2] * (layers - 1) + [1]  # no logit rows: one row keeps every layer attended
    after = model.unified_forward([  # every layer's K/V of both passes, read back
        ForwardItem("prompt", TOKENS[9:10], 9, True),
        ForwardItem("chunk", TOKENS[7:11], 7, True),
        ForwardItem("verify", TOKENS[8:9], 6, True),
    ])
    assert_parity(after["prompt"], reference_logits(hf, TOKENS[:10])[-1])
    assert_parity(after["chunk"], reference_logits(hf, TOKENS[:11])[-1])
    assert_parity(after["verify"], reference_logits(hf, TOKENS[2:9])[-1])


@pytest.mark.parametrize("backend", RUNNABLE)
def test_truncate_then_redecode_equals_never_decoding(checkpoints, backend):
    model = load(checkpoints["llama"][0], backend)
    model.prefill("t", TOKENS[:6])
    for pos, tok in enumerate([5, 6, 7, 8, 9, 10], start=6):  # crosses a block boundary
        model.decode("t", tok, pos)
    model.truncate_kv("t", 7)
    assert model.kv.length("t") == 7 and len(model.kv.block_table("t")) == 2
    again = model.decode("t", 42, 7)
    fresh = load(checkpoints["llama"][0], backend)
    fresh.prefill("t", TOKENS[:6])
    fresh.decode("t", 5, 6)
    np.testing.assert_allclose(again, fresh.decode("t", 42, 7), atol=SAME_BACKEND_TOL)
