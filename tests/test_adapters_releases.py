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
its layers whose attention or MLP is skipped or a linear map.
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
#: out_proj; OpenELM's proj_1 / proj_2 its gate_up_proj / down_proj).
LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense", "out_proj", "gate_proj",
          "up_proj", "gate_up_proj", "down_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "proj_1",
          "proj_2"}


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
            merged = release_adapter(folder, tmp_path_factory.mktemp(f"{family}_lora"), set(leaves))
            built[family, leaves] = folder, merged.parent / "adapter", _mlx_lm_reference(merged, for_mlx_lm), plain
        return built[family, leaves]

    return get


@pytest.mark.filterwarnings("ignore:.*vision or audio part")
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


def _qwen(folder: Path) -> None:
    from test_qwen1 import CONFIG

    _mlx_lm_release(CONFIG)(folder)


def _plamo2(folder: Path) -> None:
    from test_plamo2 import CONFIG, _as_released, _draw

    _mlx_lm_release(CONFIG, _draw, _as_released)(folder)


@pytest.mark.filterwarnings("ignore:.*seq_length")
@pytest.mark.parametrize("build, leaves, message", [
    (_qwen, LEAVES | {"c_attn", "c_proj", "w1", "w2"}, r"transformer\.h\.\d+\..*\(layers under h\.N"),
    (_plamo2, LEAVES, "hybrid models with recurrent layers .*PLaMo 2 Mamba layers' projections"),
    (_step3p5, LEAVES | {"g_proj"}, "step3p5's attention gate g_proj is not supported"),
])
def test_what_cannot_be_exact_is_refused_by_name(tmp_path, build, leaves, message):
    """Qwen's layers under transformer.h (a layout Ferrum does not adapt); PLaMo 2's Mamba layers; Step 3.5's
    per-head attention gate."""
    (tmp_path / "release").mkdir()
    build(tmp_path / "release")
    release_adapter(tmp_path / "release", tmp_path, leaves)
    with pytest.raises(AdapterError, match=message):
        float32_model(tmp_path / "release").adapters.load("a", tmp_path / "adapter")
