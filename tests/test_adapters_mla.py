"""LoRA adapters on Multi-head Latent Attention models (DeepSeek-V3, GLM-4.7-Flash, Mistral Small 4), against PEFT.

PEFT adapts the checkpoint's own latent projections (q_proj, or q_a_proj and q_b_proj; kv_a_proj_with_mqa, kv_b_proj,
o_proj) and the dense layers' MLP; Ferrum runs them with its own layout (q's rows per head rope-first, the latent split
from the rope key, heads expanded after kv_b_proj), so each B factor's rows must be moved as the weight's were. A
request with the adapter must give the logits of PEFT's merged model, in one pass and decoding; mixed with requests
without it in one pass, each its own. PEFT 0.21 (as transformers 5 fuses these families' experts) takes any
gate_proj / up_proj / down_proj target for the experts: the references here are built with the model type hidden
from that conversion, so PEFT wraps the dense MLPs' own linears.
"""

from __future__ import annotations


import numpy as np
import pytest

from ferrum.errors import AdapterError
from ferrum.model import DecoderOnlyLLM
from lora_checks import (
    adapted_logits, assert_a_mixed_batch_gives_each_request_its_own, assert_adapter_matches_peft, make_peft,
)
from support import randomized_reference, reference_logits, runnable_backends, scaled_error
from test_deepseek_v3 import YARN, dsv3_config
from test_glm4_moe_lite import lite_config
from test_mistral4 import m4_config, randomized

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
LATENT = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

#: name -> (transformers model, projections an adapter of LATENT + MLP adapts): DeepSeek-V3's layout with YaRN;
#: Moonlight's plain q_proj; rotate-half rope, biases and value heads as wide as q/k heads; GLM-4.7-Flash's dense
#: layer between sparse ones with a plain q_proj; Mistral Small 4 (Llama 4's query scaling).
MODELS = {
    "dsv3_yarn": (lambda: randomized_reference(dsv3_config(rope_parameters=YARN)), 3 * 5 + 3),
    "dsv3_plain_q": (lambda: randomized_reference(dsv3_config(q_lora_rank=None)), 3 * 4 + 3),
    "dsv3_rotate_half": (lambda: randomized_reference(dsv3_config(rope_interleave=False, attention_bias=True,
                                                                  v_head_dim=24)), 3 * 5 + 3),
    "glm4_moe_lite": (lambda: randomized_reference(lite_config(mlp_layer_types=["sparse", "dense", "sparse"],
                                                               q_lora_rank=None, rope_interleave=False)), 3 * 4 + 3),
    "mistral4": (lambda: randomized(m4_config()), 3 * 5 + 3),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (base folder, adapter folder, transformers model, PEFT's merged model, projections adapted)."""
    out = {}
    for name, (build, adapted) in MODELS.items():
        root = tmp_path_factory.mktemp(name)
        hf = build()
        hf.save_pretrained(root / "base")
        merged = make_peft(hf, root / "a", LATENT + MLP, experts=r".*experts.*")
        out[name] = root / "base", root / "a", hf, merged, adapted
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_matches_peft_forward_and_decode(checkpoints, backend, name):
    assert_adapter_matches_peft(*checkpoints[name], TOKENS, backend)


@pytest.mark.parametrize("target", LATENT[1:] + MLP)
def test_each_projection_counts(checkpoints, tmp_path, target):
    """An adapter of one projection alone matches PEFT's, and moves the logits (so its rows' placement is checked)."""
    base, _, hf, _, _ = checkpoints["dsv3_yarn"]
    merged = make_peft(hf, tmp_path / "a", [target], seed=3, experts=r".*experts.*")
    want = reference_logits(merged, TOKENS)
    assert scaled_error(reference_logits(hf, TOKENS), want) > 1e-2
    model = DecoderOnlyLLM.from_pretrained(base, backend="cpu", block_size=4, dtype="float32")
    model.adapters.load("a", tmp_path / "a")
    assert scaled_error(adapted_logits(model, TOKENS, "a"), want) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mixed_batch_gives_each_request_its_own(checkpoints, backend):
    base, folder, hf, merged, _ = checkpoints["dsv3_yarn"]
    assert_a_mixed_batch_gives_each_request_its_own(base, folder, hf, merged, TOKENS, backend)


def test_projections_the_attention_lacks_are_refused_by_name(checkpoints, tmp_path):
    """k_proj on latent attention; kv_b_proj on a model without it."""
    base, _, hf, _, _ = checkpoints["dsv3_yarn"]
    model = DecoderOnlyLLM.from_pretrained(base, backend="cpu", dtype="float32")
    make_peft(hf, tmp_path / "a", ["q_a_proj"])
    (tmp_path / "a" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text().replace(
        "q_a_proj", "k_proj"))
    import safetensors.numpy as st

    factors = st.load_file(tmp_path / "a" / "adapter_model.safetensors")
    st.save_file({k.replace("q_a_proj", "k_proj"): v for k, v in factors.items()},
                 tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="latent attention has no k_proj .*kv_b_proj"):
        model.adapters.load("a", tmp_path / "a")


@pytest.mark.parametrize("target", ["q_gate_proj", "q_b_proj"])  # transformers' name and the release's
def test_axk2s_query_and_gate_projection_is_refused_by_name(tmp_path, target):
    """A.X-K2's q_b_proj (transformers' q_gate_proj) gives each head's query and output gate, whose columns the load
    cuts: an adapter of it is refused by name under either name (the former got the generic refusal)."""
    import safetensors.numpy as st
    from test_axk2 import axk2_config

    hf = randomized_reference(axk2_config())
    hf.save_pretrained(tmp_path / "base")
    make_peft(hf, tmp_path / "a", ["q_gate_proj", "o_proj"])
    config, factors = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    config.write_text(config.read_text().replace("q_gate_proj", target))
    st.save_file({k.replace("q_gate_proj", target): v for k, v in st.load_file(factors).items()}, factors)
    model = DecoderOnlyLLM.from_pretrained(tmp_path / "base", backend="cpu", dtype="float32")
    with pytest.raises(AdapterError, match=rf"{target}.*q_b_proj.*cut"):
        model.adapters.load("a", tmp_path / "a")
