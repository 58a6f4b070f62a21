"""LoRA adapters on MoE models' shared experts and dense layers (Qwen2-MoE's ``shared_expert``, DeepSeek-V3's
``shared_experts``), against PEFT.

The shared expert is an ordinary MLP beside the routed experts, so PEFT adapts its gate/up/down projections as any
linear; a request with the adapter must give the logits of PEFT's merged model, in one pass and decoding, and mixed
with requests without it, each its own. The experts, and Qwen2-MoE's sigmoid ``shared_expert_gate``, stay refused
by name. PEFT 0.21 (as transformers 5 fuses DeepSeek-V3's experts) takes any gate_proj / up_proj / down_proj
target there, ``shared_experts.gate_proj`` included, for the experts: the references here are built with the model
type hidden from that conversion (as in test_adapters_mla.py) and the experts excluded (``\\.experts``, which
leaves DeepSeek's ``shared_experts``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrum.errors import AdapterError
from ferrum.model import DecoderOnlyLLM
from lora_checks import (
    adapted_logits, assert_a_mixed_batch_gives_each_request_its_own, assert_adapter_matches_peft, make_peft,
)
from support import randomized_reference, reference_logits, runnable_backends, scaled_error
from test_deepseek_v3 import dsv3_config

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
MLP = ["gate_proj", "up_proj", "down_proj"]

#: name -> (transformers model, the shared expert's module, projections an adapter of q_proj, o_proj and MLP adapts):
#: Qwen2-MoE with its first layer dense (mlp_only_layers) and a sigmoid-gated shared expert on the others; DeepSeek-V3
#: (latent attention, q_a_proj / q_b_proj) with its first layer dense and two shared experts (one MLP twice as wide).
MODELS = {
    "qwen2_moe": (lambda: randomized_reference(transformers.Qwen2MoeConfig(
        vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=40,
        shared_expert_intermediate_size=56, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0])),
        "shared_expert", 3 * 2 + 3 * 3),
    "deepseek_v3": (lambda: randomized_reference(dsv3_config(n_shared_experts=2)), "shared_experts", 3 * 1 + 3 * 3),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (base folder, adapter folder, transformers model, PEFT's merged model, projections adapted)."""
    out = {}
    for name, (build, _, adapted) in MODELS.items():
        root = tmp_path_factory.mktemp(name)
        hf = build()
        hf.save_pretrained(root / "base")
        out[name] = root / "base", root / "a", hf, make_peft(hf, root / "a", ["q_proj", "o_proj"] + MLP), adapted
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_matches_peft_forward_and_decode(checkpoints, backend, name):
    assert any(f".{MODELS[name][1]}.gate_proj.lora_A" in key for key in _factors(checkpoints[name][1]))
    assert_adapter_matches_peft(*checkpoints[name], TOKENS, backend)


@pytest.mark.parametrize("proj", MLP)
@pytest.mark.parametrize("name", list(MODELS))
def test_each_shared_projection_counts(checkpoints, tmp_path, name, proj):
    """An adapter of one shared-expert projection alone matches PEFT's and moves the logits."""
    base, _, hf, _, _ = checkpoints[name]
    merged = make_peft(hf, tmp_path / "a", [f"{MODELS[name][1]}.{proj}"], seed=3)
    want = reference_logits(merged, TOKENS)
    assert scaled_error(reference_logits(hf, TOKENS), want) > 1e-2
    model = DecoderOnlyLLM.from_pretrained(base, backend="cpu", block_size=4, dtype="float32")
    assert model.adapters.load("a", tmp_path / "a").projections == 2  # the sparse layers' shared experts
    assert scaled_error(adapted_logits(model, TOKENS, "a"), want) <= 1e-4


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mixed_batch_gives_each_request_its_own(checkpoints, backend, name):
    base, folder, hf, merged, _ = checkpoints[name]
    assert_a_mixed_batch_gives_each_request_its_own(base, folder, hf, merged, TOKENS, backend)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_same_factors_in_mlx_lms_layout_match_peft(checkpoints, tmp_path, name):
    """PEFT's factors rewritten as mlx-lm saves them (``lora_a [in, r]``, ``lora_b [r, out]``, one scale), the shared
    expert's under the model's own module name, give PEFT's merged model's logits."""
    import safetensors.numpy as st

    base, folder, _, merged, adapted = checkpoints[name]
    peft_factors = st.load_file(folder / "adapter_model.safetensors")
    factors = {key.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_a").replace(
        ".lora_B.weight", ".lora_b"): value.T.copy() for key, value in peft_factors.items()}
    assert any(f".{MODELS[name][1]}.down_proj.lora_b" in key for key in factors)
    (tmp_path / "m").mkdir()
    st.save_file(factors, tmp_path / "m" / "adapters.safetensors")
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 3, "lora_parameters": {"rank": 4, "scale": 2.0}}))
    model = DecoderOnlyLLM.from_pretrained(base, backend="cpu", block_size=4, dtype="float32")
    assert model.adapters.load("m", tmp_path / "m").projections == adapted
    assert scaled_error(adapted_logits(model, TOKENS, "m"), reference_logits(merged, TOKENS)) <= 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_the_experts_stay_refused_by_name(checkpoints, tmp_path, name):
    """Qwen2-MoE: PEFT's LoRA on the fused experts' down_proj stack (target_parameters) beside the shared expert's;
    DeepSeek-V3: PEFT's own conversion, which puts the MLP targets on the experts."""
    base, _, hf, _, _ = checkpoints[name]
    if name == "qwen2_moe":
        make_peft(hf, tmp_path / "a", ["shared_expert.down_proj"], hide=False, target_parameters=["experts.down_proj"])
    else:
        make_peft(hf, tmp_path / "a", MLP, hide=False)
    assert any(".mlp.experts." in key for key in _factors(tmp_path / "a"))
    model = DecoderOnlyLLM.from_pretrained(base, backend="cpu", dtype="float32")
    with pytest.raises(AdapterError, match=r"mlp\.experts\..* adapts a mixture-of-experts projection"):
        model.adapters.load("a", tmp_path / "a")
    assert len(model.adapters) == 0


def test_the_shared_expert_gate_is_refused_by_name(checkpoints, tmp_path):
    """Qwen2-MoE's sigmoid shared_expert_gate, named in target_modules or found among the factors."""
    base, _, hf, _, _ = checkpoints["qwen2_moe"]
    make_peft(hf, tmp_path / "a", ["shared_expert.up_proj", "shared_expert_gate"])
    model = DecoderOnlyLLM.from_pretrained(base, backend="cpu", dtype="float32")
    with pytest.raises(AdapterError, match="names 'shared_expert_gate', which is the shared expert's sigmoid gate"):
        model.adapters.load("a", tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "target_modules": ".*shared_expert.*"}))
    with pytest.raises(AdapterError, match="layer 1 shared_expert_gate is the shared expert's sigmoid gate"):
        model.adapters.load("a", tmp_path / "a")


def test_a_shared_expert_the_base_lacks_is_refused(checkpoints, tmp_path):
    """Factors of DeepSeek's shared_experts on its dense layer, and of Qwen2-MoE's on DeepSeek-V3."""
    base, _, hf, _, _ = checkpoints["deepseek_v3"]
    make_peft(hf, tmp_path / "a", ["shared_experts.up_proj"])
    import safetensors.numpy as st

    factors = st.load_file(tmp_path / "a" / "adapter_model.safetensors")
    model = DecoderOnlyLLM.from_pretrained(base, backend="cpu", dtype="float32")
    st.save_file({k.replace("layers.1.", "layers.0."): v for k, v in factors.items()},
                 tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="layer 0 shared_expert.up_proj: that layer has no shared expert"):
        model.adapters.load("a", tmp_path / "a")
    st.save_file({k.replace("shared_experts", "shared_expert"): v for k, v in factors.items()},
                 tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "a" / "adapter_config.json").write_text(
        (tmp_path / "a" / "adapter_config.json").read_text().replace("shared_experts", "shared_expert"))
    with pytest.raises(AdapterError, match=r"mlp\.shared_expert\.up_proj\.lora_A\.weight adapts a mixture-of-experts"):
        model.adapters.load("a", tmp_path / "a")


def _factors(folder) -> list[str]:
    import safetensors.numpy as st

    return list(st.load_file(folder / "adapter_model.safetensors"))
