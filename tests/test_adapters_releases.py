"""LoRA adapters on releases transformers has no class for (remote code; mlx-lm runs them) and on the text models
of multimodal wrappers: each exact or refused by name.

A PEFT-format adapter (random A / B on the attention's and the MLP's projections, under the release's own module
names) must give the logits mlx-lm computes from the release with ``W + scale * B @ A`` merged into its weights,
on every backend, in one pass and decoding; the adapter with B zeroed must give the base model's. That covers what
the load does to a release's weights and so to the factors: PLaMo's query heads regrouped over its tiled key/value
heads (o_proj's columns, so the A factor's rows), Step 3.5's query heads padded per layer, Nanbeige's passes over
the stored layers (an adapter on a stored layer acts on every pass), TeleChat3's YaRN factor on q / k, Ling's fused
query_key_value, Lille's qkv_proj / out_proj, the shared experts of the sparse families, Kimi K2's latent attention,
OpenELM's fewer key/value heads and their queries per layer (padded at load), Nemotron NAS's (repeated at load) and
its layers whose attention or MLP is skipped or a linear map; layers under the family's own container (Talkie's
blocks.N, Phixtral's and Qwen's transformer.h.N) or stored apart (AFM's kv_reuse_layers.N, whose keys and values are
another layer's, rounded to int8 steps), layers that project queries alone (Hunyuan's cross-layer attention),
IQuest-Coder's looped, gated second pass, Spark 2.5's q_k_v_proj, Muse Glimmer's nesting. What cannot be exact is
refused by name: attention gates, recurrent layers, experts and routers, several attention blocks a layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferrum.errors import AdapterError
from lora_checks import adapted_logits, assert_adapter_gives, release_adapter
from support import float32_model, mlx_lm_logits, runnable_backends, scaled_error

pytest.importorskip("mlx_lm")
pytest.importorskip("safetensors")

TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]  # every family's vocabulary holds them
#: The projections an adapter targets where a release has them (Ling's dense is its o_proj; Lille's and OpenELM's
#: out_proj; OpenELM's proj_1 / proj_2 its gate_up_proj / down_proj; Spark 2.5's q_k_v_proj and Phixtral's Wqkv its
#: qkv_proj; Talkie's attn_* and mlp_* its q/k/v/o and gate/up/down; Qwen's c_attn, c_proj, w1, w2).
LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense", "out_proj", "gate_proj",
          "up_proj", "gate_up_proj", "down_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "proj_1",
          "proj_2", "q_k_v_proj", "Wqkv", "attn_query", "attn_key", "attn_value", "attn_resid", "mlp_gate",
          "mlp_linear", "mlp_resid", "c_attn", "c_proj", "w1", "w2"}
#: Modules of an adapted leaf's name that are no projection Ferrum adapts (Muse Glimmer's attention gate_proj),
#: left out of a family's adapter as ``exclude_modules`` leaves them.
SKIPPED = {"muse_glimmer": r".*\.self_attn\.gate_proj"}


def _mlx_lm_release(config: dict, draw=None, as_released=None, extra: dict | None = None):
    """A release of mlx-lm's Model of ``config`` with random parameters (mlx_lm_release)."""
    def build(folder: Path) -> None:
        from mlx_lm_release import random_mlx_lm_model, write_release

        write_release(folder, random_mlx_lm_model(config, draw=draw), config, TOKENS, as_released, extra)
    return build


def _sparse_release(module):
    def build(folder: Path) -> None:
        from mlx_lm_release import normal

        config = (module.deepseek_config if hasattr(module, "deepseek_config") else module.klear_config)()
        _mlx_lm_release(config, normal(), module.as_released)(folder)
    return build


def _ling(variant: str):
    def build(folder: Path) -> None:
        from test_bailing_moe import CONFIGS, build_mlx_lm_checkpoint

        build_mlx_lm_checkpoint(folder, CONFIGS[variant], TOKENS)
    return build


def _step3p5(folder: Path) -> None:
    from test_step3p5 import build_release

    build_release(folder)


def _kimi_k2(folder: Path) -> None:
    from support import randomized_reference, write_tokenizer
    from test_kimi_k2 import VOCAB, as_released, tiny_config

    randomized_reference(tiny_config()).save_pretrained(folder)
    write_tokenizer(folder, VOCAB)
    as_released(folder, "kimi_k2")


def _kimi_k25(folder: Path) -> None:
    from test_kimi_k2 import wrapped

    _kimi_k2(folder.parent / "text")
    shutil.rmtree(folder)
    wrapped(folder.parent / "text", folder, "kimi_k25")


def _dense_alias(model_type: str):
    """XVERSE's (Llama's blocks, no num_key_value_heads) or MiMo's (Qwen 2's, q/k/v biased) release."""
    def build(folder: Path) -> None:
        import transformers

        from support import build_transformers_model, write_tokenizer
        from test_mlx_lm_dense_aliases import SIZES, VOCAB, _release_config

        if model_type == "xverse":
            build_transformers_model(folder, transformers.LlamaConfig(**SIZES, num_key_value_heads=4))
            _release_config(folder, drop=("num_key_value_heads", "head_dim", "attention_bias", "mlp_bias"),
                            model_type="xverse", architectures=["XverseForCausalLM"])
        else:
            build_transformers_model(folder, transformers.Qwen2Config(**SIZES, num_key_value_heads=2))
            _release_config(folder, model_type="mimo", architectures=["MiMoForCausalLM"])
        write_tokenizer(folder, VOCAB)
    return build


def _pixtral(folder: Path) -> None:
    import transformers

    from support import build_transformers_model, write_tokenizer
    from test_mlx_lm_dense_aliases import SIZES, VOCAB, _release_config, _wrap

    text = folder.parent / "text"
    build_transformers_model(text, transformers.MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=None))
    write_tokenizer(text, VOCAB)
    _release_config(text)
    shutil.rmtree(folder)
    _wrap(text, folder, "pixtral", "mistral")


def _plamo(folder: Path) -> None:
    from test_plamo import CONFIG, _draw

    _mlx_lm_release(CONFIG, _draw)(folder)


def _plamo3(folder: Path) -> None:
    from test_plamo3 import CONFIG, _draw

    _mlx_lm_release(CONFIG, _draw)(folder)


def _nanbeige(folder: Path) -> None:
    from test_nanbeige import BUFFERS, CONFIG

    _mlx_lm_release(CONFIG, extra=BUFFERS)(folder)


def _lille(folder: Path) -> None:
    from test_lille130m import BUFFERS, CONFIG

    _mlx_lm_release(CONFIG, extra=BUFFERS)(folder)


def _telechat3(folder: Path) -> None:
    from test_telechat3 import RELEASE

    _mlx_lm_release(RELEASE)(folder)


def _telechat3_for_mlx_lm(config: dict) -> dict:
    from test_telechat3 import _telechat3_yarn

    return _telechat3_yarn(config)


def _mlx_lm_named(module):
    """A family whose test module builds mlx-lm's model randomized (``_mlx_lm_model``), written under names mlx-lm
    reads (Nemotron NAS's under mlx-lm's own, OpenELM's, which are the release's)."""
    def build(folder: Path) -> None:
        from mlx_lm_release import write_release

        write_release(folder, module._mlx_lm_model(module.CONFIG), module.CONFIG, TOKENS)
    return build


def _nemotron_nas(folder: Path) -> None:
    import test_nemotron_nas

    _mlx_lm_named(test_nemotron_nas)(folder)


def _openelm(folder: Path) -> None:
    import test_openelm

    _mlx_lm_named(test_openelm)(folder)


def _qwen(folder: Path) -> None:
    from test_qwen1 import CONFIG

    _mlx_lm_release(CONFIG)(folder)


def _talkie(folder: Path) -> None:
    from mlx_lm_release import write_release
    from test_talkie import CONFIG, ROTARY, _model

    write_release(folder, _model(), CONFIG, TOKENS, extra={ROTARY: np.ones(8, dtype=np.float32)})


def _spark2_5(folder: Path) -> None:
    from mlx_lm_release import write_release
    from test_spark2_5 import CONFIG, DROPPED, _model

    model = _model()
    extra = {DROPPED[0]: np.ones(4, dtype=np.float32), DROPPED[1]: np.array(model.model.embedding.weight)}
    write_release(folder, model, CONFIG, TOKENS, extra=extra)


def _muse_glimmer(folder: Path) -> None:
    from mlx_lm_release import renamed, write_release
    from test_muse_glimmer import RELEASE, VOCAB, _model, _nested

    write_release(folder, _model(), RELEASE, TOKENS, renamed(_nested), vocab=VOCAB)


def _afm7(folder: Path) -> None:
    from mlx_lm_release import write_release
    from test_afm7 import CONFIG, _model

    write_release(folder, _model(), CONFIG, TOKENS)


def _iquestloopcoder(folder: Path) -> None:
    from mlx_lm_release import normal
    from test_iquestloopcoder import CONFIG

    _mlx_lm_release(CONFIG, normal())(folder)


def _hunyuan(folder: Path) -> None:
    from mlx_lm_release import normal
    from test_hunyuan import as_released, hunyuan_config

    _mlx_lm_release(hunyuan_config(), normal(), as_released)(folder)


def _phixtral(folder: Path) -> None:
    from mlx_lm_release import normal
    from test_phixtral import as_released, phixtral_config

    _mlx_lm_release(phixtral_config(), normal(stds={"fc1": 0.3}), as_released)(folder)


def _deepseek(folder: Path) -> None:
    import test_deepseek

    _sparse_release(test_deepseek)(folder)


def _klear(folder: Path) -> None:
    import test_klear

    _sparse_release(test_klear)(folder)


#: family -> (its release, the projections the adapter adapts, how mlx-lm reads the merged release's config where
#: Ferrum reads it otherwise). Counts: each layer's attention projections (PLaMo 3's, Lille's fused qkv and o; Ling's
#: query_key_value and dense; Kimi K2's five latent ones), the dense layers' MLPs, the shared experts' three.
FAMILIES = {
    "plamo": (_plamo, 3 * 7, None),
    "plamo3": (_plamo3, 4 * 4, None),
    "nanbeige": (_nanbeige, 2 * 7, None),  # two stored layers, run twice
    "lille-130m": (_lille, 2 * 5, None),
    "telechat3": (_telechat3, 2 * 7, _telechat3_for_mlx_lm),  # TeleChat3's YaRN factor: mlx-lm's at mscale 0.7
    "deepseek": (_deepseek, 3 * 4 + 3 + 2 * 3, None),
    "Klear": (_klear, 3 * 4 + 3 * 3, None),
    "bailing_moe_v1": (_ling("v1"), 3 * 2 + 3 + 2 * 3, None),
    "bailing_moe_v2": (_ling("v2"), 3 * 2 + 3 + 2 * 3, None),
    "step3p5": (_step3p5, 4 * 4 + 3 + 3 * 3, None),
    "kimi_k2": (_kimi_k2, 3 * 5 + 3 + 2 * 3, None),
    "xverse": (_dense_alias("xverse"), 2 * 7, None),
    "mimo": (_dense_alias("mimo"), 2 * 7, None),
    "pixtral": (_pixtral, 2 * 7, None),  # the vision tower's factor left out, with a warning
    "kimi_k25": (_kimi_k25, 3 * 5 + 3 + 2 * 3, None),
    # four layers with attention (1 to 6 key/value heads, repeated at load to 6), four dense MLPs: the skipped and
    # linear sub-blocks have nothing to adapt
    "nemotron-nas": (_nemotron_nas, 4 * 4 + 4 * 3, None),
    "openelm": (_openelm, 4 * 4, None),  # qkv_proj, out_proj, proj_1 (gate and up), proj_2; 1 to 3 key/value heads
    "talkie": (_talkie, 3 * 7, None),  # layers under blocks.N
    "spark2_5": (_spark2_5, 4 * 5, None),  # q_k_v_proj, out_proj and the MLP's three; its head gate g_proj is not
    "muse_glimmer": (_muse_glimmer, 4 * 7, None),  # Meta's nesting; its attention's gate_proj left out
    # three layers' qkv_proj, two KV-reuse layers' q_proj (under kv_reuse_layers.N), each layer's out_proj and MLP;
    # keys and values rounded to int8 steps after the adapted projection
    "afm7": (_afm7, 5 * 5, None),
    "iquestloopcoder": (_iquestloopcoder, 2 * 7, None),  # two stored layers, each run in both loops
    # cross-layer attention: layers 1 and 3 project queries alone; every layer's shared MLP
    "hunyuan": (_hunyuan, 5 * 2 + 3 * 2 + 5 * 3, None),
    "phixtral": (_phixtral, 2 * 2, None),  # Wqkv and out_proj under transformer.h.N; its experts are not adapted
    "qwen": (_qwen, 2 * 5, None),  # c_attn, attn.c_proj, w1, w2, mlp.c_proj under transformer.h.N
}


def _mlx_lm_reference(folder: Path, for_mlx_lm) -> np.ndarray:
    """mlx-lm's logits of checkpoint ``folder`` (its config as ``for_mlx_lm`` rewrites it for mlx-lm, where given)."""
    if for_mlx_lm is None:
        return mlx_lm_logits(folder, TOKENS)
    copy = shutil.copytree(folder, folder.parent / f"{folder.name}_mlx_lm")
    (copy / "config.json").write_text(json.dumps(for_mlx_lm(json.loads((copy / "config.json").read_text()))))
    return mlx_lm_logits(copy, TOKENS)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``(family, leaves)`` -> (its release's folder, an adapter's folder on ``leaves``, mlx-lm's logits of the release
    merged with it and of the release alone), built on first use."""
    releases: dict = {}
    built: dict = {}

    def get(family: str, leaves: frozenset[str] = frozenset(LEAVES)):
        build, _, for_mlx_lm = FAMILIES[family]
        if family not in releases:
            folder = tmp_path_factory.mktemp(family) / "release"
            folder.mkdir()
            build(folder)
            releases[family] = folder, _mlx_lm_reference(folder, for_mlx_lm)
        folder, plain = releases[family]
        if (family, leaves) not in built:
            merged = release_adapter(folder, tmp_path_factory.mktemp(f"{family}_lora"), set(leaves),
                                     skip=SKIPPED.get(family))
            built[family, leaves] = folder, merged.parent / "adapter", _mlx_lm_reference(merged, for_mlx_lm), plain
        return built[family, leaves]

    return get


@pytest.mark.filterwarnings("ignore:.*vision or audio part")
@pytest.mark.filterwarnings("ignore:.*seq_length")  # Qwen's context, cut to seq_length
@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_gives_the_merged_release_s_logits(release, family, backend):
    folder, adapter, want, plain = release(family)
    assert_adapter_gives(folder, adapter, want, plain, FAMILIES[family][1], TOKENS, backend)


@pytest.mark.parametrize("family", ["plamo", "nanbeige", "step3p5", "openelm"])
def test_o_proj_alone_counts(release, family):
    """An o_proj adapter alone: its A factor's rows follow the query heads the load moves (PLaMo's regrouped, Step
    3.5's and OpenELM's padded); on Nanbeige it acts on both passes."""
    folder, adapter, want, plain = release(family, frozenset({"o_proj", "dense", "out_proj"}))
    assert scaled_error(plain, want) > 1e-2
    model = float32_model(folder, block_size=4)
    model.adapters.load("a", adapter)
    assert scaled_error(adapted_logits(model, TOKENS, "a"), want) <= 1e-4


@pytest.mark.parametrize("family", ["plamo", "nanbeige", "deepseek"])
def test_a_zeroed_adapter_gives_the_base_model(release, tmp_path, family):
    """The control: B zeroed, the adapted logits are the base model's, which are mlx-lm's of the release."""
    folder, _, _, plain = release(family)
    release_adapter(folder, tmp_path, LEAVES, zeroed=True)
    model = float32_model(folder, block_size=4)
    model.adapters.load("zero", tmp_path / "adapter")
    got = adapted_logits(model, TOKENS, "zero")
    assert scaled_error(got, adapted_logits(model, TOKENS, None)) == 0.0
    assert scaled_error(got, plain) <= 1e-4


def test_a_layer_past_the_stored_ones_of_a_looped_model_is_refused(release, tmp_path):
    """Nanbeige stores two layers and runs them twice: its adapters name the two, not the passes' four."""
    from safetensors.numpy import load_file, save_file

    folder, adapter, _, _ = release("nanbeige")
    shutil.copytree(adapter, tmp_path / "a")
    factors = tmp_path / "a" / "adapter_model.safetensors"
    save_file({name.replace(".layers.1.", ".layers.3."): value for name, value in load_file(factors).items()},
              str(factors))
    with pytest.raises(AdapterError, match="adapts layer 3 but the base model has 2 layers"):
        float32_model(folder).adapters.load("a", tmp_path / "a")


def _plamo2(folder: Path) -> None:
    from test_plamo2 import CONFIG, _as_released, _draw

    _mlx_lm_release(CONFIG, _draw, _as_released)(folder)


def _gear(folder: Path) -> None:
    from mlx_lm_release import write_release
    from test_gear import CONFIG, _model, _release_taps

    model = _model()
    write_release(folder, model, CONFIG, TOKENS, extra=_release_taps(model))


def _baichuan_m1(folder: Path) -> None:
    from mlx_lm_release import random_mlx_lm_model, write_release
    from test_baichuan_m1 import CONFIG, _as_released, _draw

    write_release(folder, random_mlx_lm_model(CONFIG, draw=_draw), CONFIG, TOKENS, _as_released, tolerance=1e-6)


def _rwkv7(folder: Path) -> None:
    from mlx_lm_release import write_release
    from test_rwkv7 import CONFIG, _mlx_lm_model, _release_names

    write_release(folder, _mlx_lm_model(CONFIG), CONFIG, TOKENS, _release_names)


def _ring_linear(folder: Path) -> None:
    from test_bailing_moe import build_mlx_lm_checkpoint
    from test_bailing_moe_linear import CONFIGS

    build_mlx_lm_checkpoint(folder, CONFIGS["mini"], TOKENS)


def _longcat_flash_lite(folder: Path) -> None:
    from test_longcat_flash_ngram import RELEASE, build_release

    build_release(folder, RELEASE)


@pytest.mark.parametrize("build, leaves, message", [
    (_plamo2, LEAVES, "hybrid models with recurrent layers .*PLaMo 2 Mamba layers' projections"),
    (_step3p5, LEAVES | {"g_proj"}, "step3p5's attention gate g_proj is not supported"),
    (_spark2_5, LEAVES | {"g_proj"}, "spark2_5's attention gate g_proj is not supported"),
    (_muse_glimmer, LEAVES, "muse_glimmer_text's attention gate self_attn.gate_proj is not supported"),
    (_gear, LEAVES, "hybrid models with recurrent layers .*the gated key/value convolution layers' projections"),
    (_baichuan_m1, LEAVES | {"W_pack"}, "hybrid models with recurrent layers .*the key/value convolution layers'"),
    (_rwkv7, LEAVES | {"r_proj", "key", "value"},
     "each hold an RWKV-7 time mix and channel mix, not attention and an MLP"),
    (_ring_linear, LEAVES, "hybrid models with recurrent layers .*the lightning attention layers' projections"),
    (_longcat_flash_lite, LEAVES, "checkpoint layers each hold several attention blocks"),
    (_phixtral, LEAVES | {"fc1", "fc2"}, "'fc1', which adapts a mixture-of-experts projection"),
    (_hunyuan, LEAVES | {"wg"}, "'wg', which adapts a mixture-of-experts projection"),
])
def test_what_cannot_be_exact_is_refused_by_name(tmp_path, build, leaves, message):
    """PLaMo 2's Mamba layers; the per-head attention gates of Step 3.5 and Spark 2.5, Muse Glimmer's gate_proj;
    the recurrent layers of Gear, Baichuan-M1 (keys and values convolved along the sequence) and Ring-linear; RWKV-7's
    time and channel mixes, LongCat-Flash-Lite's two attention blocks a layer; Phixtral's experts (fc1 / fc2) and
    Hunyuan's router (wg)."""
    (tmp_path / "release").mkdir()
    build(tmp_path / "release")
    release_adapter(tmp_path / "release", tmp_path, leaves)
    with pytest.raises(AdapterError, match=message):
        float32_model(tmp_path / "release").adapters.load("a", tmp_path / "adapter")


def _renamed_adapter(adapter: Path, dest: Path, old: str, new: str) -> Path:
    """A copy of the PEFT adapter ``adapter`` whose factors' names have ``old`` replaced by ``new``."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter, dest)
    factors = dest / "adapter_model.safetensors"
    save_file({name.replace(old, new): value for name, value in load_file(factors).items()}, str(factors))
    return dest


@pytest.mark.parametrize("family, old, new, message", [
    ("hunyuan", ".layers.0.self_attn.k_proj.", ".layers.1.self_attn.k_proj.",
     "layer 1 attends the keys and values layer 0 projected .* no k_proj to adapt"),
    ("afm7", ".layers.0.self_attn.qkv_proj.", ".kv_reuse_layers.0.self_attn.qkv_proj.",
     "layer 3 attends the keys and values layer 2 projected .* has q_proj but no qkv_proj"),
    ("talkie", ".blocks.", ".layers.", "layers under .* but this base model's layers are blocks.N"),
])
def test_a_projection_the_layer_lacks_is_refused(release, tmp_path, family, old, new, message):
    """Factors of a key projection on a layer that reads another's keys and values (Hunyuan's cross-layer attention,
    AFM's KV-reuse layers), which an adapter would otherwise leave unused; and factors under layers.N where the base
    model's layers are blocks.N."""
    _, adapter, _, _ = release(family)
    with pytest.raises(AdapterError, match=message):
        float32_model(release(family)[0]).adapters.load("a", _renamed_adapter(adapter, tmp_path / "a", old, new))


@pytest.mark.parametrize("family, num_layers, stored", [("talkie", 2, "blocks.{1,2}"),
                                                        ("afm7", 3, "layers.2 and kv_reuse_layers.{0,1}")])
def test_mlx_lm_s_own_adapter_gives_mlx_lm_s_logits(release, tmp_path, family, num_layers, stored):
    """mlx-lm's LoRA (``linear_to_lora_layers`` over its model's last ``num_layers`` layers, factors at random) under
    mlx-lm's module names, which are the release's: every backend's logits are mlx-lm's with the adapter loaded."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
    from mlx_lm.utils import load_model

    from mlx_lm_release import model_logits

    folder, _, _, plain = release(family)
    settings = {"fine_tune_type": "lora", "num_layers": num_layers,
                "lora_parameters": {"rank": 4, "scale": 3.0, "dropout": 0.0}}
    model = load_model(folder)[0]
    linear_to_lora_layers(model, num_layers, settings["lora_parameters"])
    rng = np.random.default_rng(3)
    factors = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.2)
               for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
    assert len(factors) == 2 * 14, stored  # the last layers' q (or qkv) and o projections and MLPs
    (tmp_path / "adapter").mkdir()
    mx.save_safetensors(str(tmp_path / "adapter" / "adapters.safetensors"), factors)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(settings))
    want = model_logits(load_adapters(load_model(folder)[0], str(tmp_path / "adapter")), TOKENS)
    assert scaled_error(want, plain) > 0.1
    for backend in runnable_backends():
        ours = float32_model(folder, backend, block_size=4)
        ours.adapters.load("a", tmp_path / "adapter")
        assert scaled_error(adapted_logits(ours, TOKENS, "a"), want) <= 1e-4, backend


@pytest.mark.parametrize("stored, named", [("q_proj", "q_proj"), ("q_proj", "qkv_proj")])
def test_a_reuse_layer_named_as_ferrum_numbers_it_is_refused(release, tmp_path, stored, named):
    """AFM stores its KV-reuse layers at kv_reuse_layers.{j}, not at layers.{i} (which Ferrum numbers them as): an
    adapter naming layers.3 names no module of the release and is refused, whatever its projection."""
    from safetensors.numpy import load_file, save_file

    folder, adapter, _, _ = release("afm7")
    shutil.copytree(adapter, tmp_path / "a")
    factors = tmp_path / "a" / "adapter_model.safetensors"
    at = f".kv_reuse_layers.0.self_attn.{stored}."
    renamed = {name.replace(at, f".layers.3.self_attn.{named}."): value for name, value in load_file(factors).items()
               if at in name}
    assert len(renamed) == 2
    save_file(renamed, str(factors))
    with pytest.raises(AdapterError):
        float32_model(folder).adapters.load("a", tmp_path / "a")
