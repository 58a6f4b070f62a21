"""Swiss AI's Apertus 1.5 (``apertus1p5_text``, and the text model of its ``apertus1p5`` wrapper): Apertus's blocks
(q/k norms, xIELU's per-layer slopes) over a vocabulary extended with image and audio tokens, the untied LM head pruned
to its first output_vocab_size rows, padded at load with rows whose logits are -inf; against transformers'
Apertus1p5TextForCausalLM and Apertus1p5ForConditionalGeneration on every runnable backend."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_generates_greedily_as_transformers,
    assert_logits_move, float32_model, reference_logits, runnable_backends, scaled_error, small_pool_engine,
    staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB, HEAD = 97, 80
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=11)]  # ids past HEAD among them


def text_config(**extra) -> dict:
    """Llama 3 rope scaling past 8 positions, the head pruned to HEAD rows, untied (as the releases); no padding id,
    which transformers' generate would mask in the prompts."""
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, output_vocab_size=HEAD, pad_token_id=None,
                rope_parameters={"rope_type": "llama3", "rope_theta": 12_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}, **extra)


def wrapper_config() -> transformers.Apertus1p5Config:
    """The wrapper with tiny vision and audio tokenizers, their code ranges inside the vocabulary."""
    return transformers.Apertus1p5Config(
        text_config=text_config(), image_token_offset=40, audio_token_offset=56, image_token_id=5, audio_token_id=6,
        vision_config=dict(codebook_size=16, embed_dim=8, latent_channels=32, base_channels=32,
                           channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], resolution=16),
        audio_config=dict(model_type="wavtokenizer_encoder", codebook_size=16, codebook_dim=32, hidden_size=32,
                          num_filters=4, num_lstm_layers=1, upsampling_ratios=[2, 2]))


def _randomized(model, layers):
    """Every parameter from N(0, 0.2); xIELU's buffers (beta, eps) each layer its own, so each is read."""
    torch.manual_seed(0)
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for i, layer in enumerate(layers(model)):
            layer.mlp.act_fn.beta.fill_(0.5 - 0.1 * i)
            layer.mlp.act_fn.eps.fill_(-1e-6 * (i + 1))
    return model


def build_checkpoints(tmp_path_factory) -> dict:
    """"text": Apertus1p5TextForCausalLM; "wrapper": Apertus1p5ForConditionalGeneration, as the releases store it
    (``model.language_model.*``, ``lm_head``, the tokenizers' towers beside them)."""
    out = {}
    for name, make, layers in (
            ("text", lambda: transformers.Apertus1p5TextForCausalLM(transformers.Apertus1p5TextConfig(**text_config())),
             lambda m: m.model.layers),
            ("wrapper", lambda: transformers.Apertus1p5ForConditionalGeneration(wrapper_config()),
             lambda m: m.model.language_model.layers)):
        folder = tmp_path_factory.mktemp(name)
        model = _randomized(make(), layers)
        model.save_pretrained(folder)
        out[name] = folder, model
    return out


def _assert_pruned_logits(logits: np.ndarray, want: np.ndarray) -> None:
    assert logits.shape[-1] == VOCAB and want.shape[-1] == HEAD
    assert np.all(logits[..., HEAD:] == -np.inf)
    assert scaled_error(logits[..., :HEAD], want) <= 1e-4


@pytest.mark.parametrize("variant", ["text", "wrapper"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """The logits over the pruned head's rows are transformers', the others -inf: in one pass and decoding."""
    folder, hf = checkpoints[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the vision and audio tokenizers' tensors left unread, quietly
        model = float32_model(folder, backend, block_size=4)
    assert (model.config.model_type, model.config.arch.head_rows) == ("apertus1p5_text", HEAD)
    want = reference_logits(hf, TOKENS)
    _assert_pruned_logits(model.forward_verify("all", TOKENS), want)
    model.prefill("steps", TOKENS[:5])
    for pos in range(5, len(TOKENS)):
        _assert_pruned_logits(model.decode("steps", TOKENS[pos], pos), want[pos])


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoints, backend):
    folder, hf = checkpoints["text"]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(checkpoints, backend):
    folder, hf = checkpoints["text"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_ferrum_quantize_packs_the_pruned_head_and_its_output_runs(checkpoints, tmp_path):
    """`ferrum quantize` packs the pruned head as stored (HEAD rows); the load pads it with zero codes, scales and
    biases: logits over its rows near transformers' float ones, the others -inf, on every backend."""
    from safetensors import safe_open

    from ferrum.quant.convert import quantize_checkpoint

    folder, hf = checkpoints["text"]
    out = quantize_checkpoint(folder, tmp_path / "q", bits=8, group_size=32)
    with safe_open(out / "model.safetensors", "np") as stored:
        assert stored.get_slice("lm_head.scales").get_shape() == [HEAD, 64 // 32]
    want = reference_logits(hf, TOKENS)
    for backend in BACKENDS:
        logits = float32_model(out, backend).forward_verify("q", TOKENS)
        assert logits.shape[-1] == VOCAB and np.all(logits[..., HEAD:] == -np.inf), backend
        assert scaled_error(logits[..., :HEAD], want) < 2e-2, backend


def test_mlx_lm_packed_pruned_head_runs_as_mlx_lm_runs_it(checkpoints, tmp_path):
    """A packed pruned head as mlx-lm writes it (its Apertus with Apertus 1.5's head of HEAD rows, quantized and saved
    by mlx-lm's own utilities, under the release's config): every backend's logits over its rows are mlx-lm's."""
    import json

    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    apertus = pytest.importorskip("mlx_lm.models.apertus")

    class PrunedHead(apertus.Model):  # mlx-lm's Apertus, its head pruned as Apertus 1.5's releases prune it
        def __init__(self, args):
            super().__init__(args)
            self.lm_head = nn.Linear(args.hidden_size, HEAD, bias=False)

    folder, _ = checkpoints["text"]
    release = json.loads((folder / "config.json").read_text())
    rope = release["rope_parameters"]
    keys = dict(rope_theta=rope["rope_theta"], rope_scaling={**rope, "type": rope["rope_type"]}, mlp_bias=False,
                post_norm=False, qk_norm=True)  # mlx-lm's Apertus reads them so (transformers 4's spelling)
    model, config = mlx_utils.load_model(folder, model_config=keys,
                                         get_model_classes=lambda config: (PrunedHead, apertus.ModelArgs))
    model, config = mlx_utils.quantize_model(model, config, group_size=32, bits=4)
    out = tmp_path / "mlx"
    mlx_utils.save_model(out, model)
    (out / "config.json").write_text(json.dumps({**release, "quantization": config["quantization"]}))
    assert mx.load(str(out / "model.safetensors"))["lm_head.scales"].shape == (HEAD, 64 // 32)
    want = np.array(model(mx.array([TOKENS])).astype(mx.float32))[0]
    for backend in BACKENDS:
        logits = float32_model(out, backend).forward_verify("m", TOKENS)
        assert np.all(logits[..., HEAD:] == -np.inf), backend
        assert scaled_error(logits[..., :HEAD], want) <= 2e-3, backend


def test_the_parity_checks_xielu(checkpoints):
    """xIELU's per-layer beta moves transformers' logits: Apertus's activation is run, not a stand-in."""
    import copy

    folder, hf = checkpoints["text"]
    other = copy.deepcopy(hf)
    with torch.no_grad():
        other.model.layers[0].mlp.act_fn.beta.fill_(0.9)
    assert_logits_move(other, hf, TOKENS)


def test_an_unpruned_head_reads_every_row(tmp_path):
    """output_vocab_size null (or the vocabulary's) keeps the plain head: Apertus's family with the extended
    vocabulary."""
    for rows in (None, VOCAB):
        config = ModelConfig.from_dict({**text_config(), "model_type": "apertus1p5_text", "output_vocab_size": rows})
        assert config.arch.head_rows is None


@pytest.mark.parametrize("changes, error, words", [
    ({"output_vocab_size": 98}, ConfigError, "'output_vocab_size' (98) exceeds vocab_size (97)"),
    ({"tie_word_embeddings": True}, UnsupportedFeatureError, "prunes an LM head tied to the 97-row embedding"),
    ({"hidden_act": "silu"}, UnsupportedFeatureError, "'hidden_act'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict({**text_config(), "model_type": "apertus1p5_text", **changes})


def test_transformers_defaults_are_read():
    """Apertus1p5TextConfig's defaults: the extended vocabulary, llama3 rope over 12M, xIELU."""
    config = ModelConfig.from_dict({k: v for k, v in text_config().items()
                                    if k not in ("vocab_size", "rope_parameters", "output_vocab_size")}
                                   | {"model_type": "apertus1p5_text"})
    rope = config.arch.layers[0].rope
    assert (config.vocab_size, rope.kind, rope.theta, config.arch.activation) == (266_752, "llama3", 12e6, "xielu")
