"""GGUF imports of more dense families llama.cpp converts with its plain text-model writer (``jais2``, ``apertus``):
tiny random transformers models written as the converter writes them (Apertus's xIELU parameters in the metadata, its
llama3 rope as rope_freqs), imported, and run against transformers (float32 files) or the same file imported in
float32 (Q8_0); a control shows the row order counts."""

from __future__ import annotations

from dataclasses import replace

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import CheckpointError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import assert_logits_match, imported, tiny_model  # noqa: E402
from test_gguf_dense_families2 import _COMMON, _llama3_divisors, _mapped, _spread, _write  # noqa: E402

Q = gguf.GGMLQuantizationType


def _jais2(tmp_path, qtype):
    """Jais 2 (biased LayerNorms and projections, squared ReLU, rotate-half rope) as its converter writes it: names
    mapped, nothing else changed, the rope over the whole head."""
    hf, config = tiny_model(transformers.Jais2Config, **_COMMON)
    _spread(hf)
    _write(tmp_path / "m.gguf", "jais2", config, _mapped(hf, config, "jais2"), qtype,
           lambda w: w.add_rope_dimension_count(config.head_dim))
    return hf


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_jais2_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    hf = _jais2(tmp_path, qtype)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "jais2" and ours.arch.layers[0].rope is not None


def test_jais2_gguf_read_with_llamas_rows_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with its q/k rows un-permuted as Llama's (which llama.cpp's converter permutes, Jais
    2's it leaves) misses transformers' logits."""
    hf = _jais2(tmp_path, Q.F32)
    monkeypatch.setitem(architectures.ARCHITECTURES, "jais2",
                        replace(architectures.ARCHITECTURES["jais2"], permuted_qk=True))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


#: Apertus's rope: the release's llama3 scaling, another one (the file's numbers, not the family's defaults, read), and
#: none (no rope_freqs: plain rope at the file's base).
_APERTUS_ROPES = {
    "llama3": {"rope_type": "llama3", "rope_theta": 12_000_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "llama3-factor-4": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 4.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "default": {"rope_type": "default", "rope_theta": 10_000.0},
}


def _apertus(tmp_path, qtype, shared: bool = False, rope: str = "llama3"):
    """Apertus (per-head q/k norms, an ungated xIELU MLP, ``rope`` of :data:`_APERTUS_ROPES`) as its converter writes
    it: names mapped, q/k rows as stored, each xIELU parameter one metadata array over the layers (one number for all
    where ``shared``, as llama.cpp's loader also reads), a llama3 scaling as rope_freqs' divisors."""
    hf, config = tiny_model(transformers.ApertusConfig, rope_parameters=_APERTUS_ROPES[rope], **_COMMON)
    _spread(hf)  # the raw alpha_p / alpha_n too, one per layer
    if shared:
        with torch.no_grad():
            for layer in hf.model.layers[1:]:
                for name in ("alpha_p", "alpha_n"):
                    getattr(layer.mlp.act_fn, name).copy_(getattr(hf.model.layers[0].mlp.act_fn, name))
    xielu = {name: [getattr(layer.mlp.act_fn, name).item() for layer in hf.model.layers]
             for name in ("alpha_p", "alpha_n", "beta", "eps")}
    tensors = _mapped(hf, config, "apertus", skip=".act_fn.")
    if config.rope_parameters["rope_type"] == "llama3":
        tensors["rope_freqs.weight"] = _llama3_divisors(16, config.rope_parameters["rope_theta"],
                                                        config.rope_parameters)

    def metadata(w):
        w.add_rope_dimension_count(16)
        for name, values in xielu.items():  # one number: a float32 key, not a list (llama.cpp wants one per layer)
            if shared:
                w.add_float32(f"xielu.{name}", values[0])
            else:
                getattr(w, f"add_xielu_{name}")(values)

    _write(tmp_path / "m.gguf", "apertus", config, tensors, qtype, metadata)
    return hf


@pytest.mark.parametrize(("qtype", "shared", "rope"), [
    (Q.F32, False, "llama3"), (Q.F32, True, "llama3-factor-4"), (Q.F32, False, "default"), (Q.Q8_0, False, "llama3"),
], ids=["F32", "F32-one-xielu-factor-4", "F32-unscaled", "Q8_0"])
def test_apertus_gguf_matches_the_model_it_was_written_from(tmp_path, qtype, shared, rope):
    hf = _apertus(tmp_path, qtype, shared, rope)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "apertus" and ours.arch.activation == "xielu"
    assert ours.arch.layers[0].rope.kind == _APERTUS_ROPES[rope]["rope_type"]


def test_apertus_gguf_read_with_llamas_rows_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with its q/k rows un-permuted as Llama's (Apertus's converter is a LlamaModel that
    leaves them as stored) misses transformers' logits."""
    hf = _apertus(tmp_path, Q.F32)
    monkeypatch.setitem(architectures.ARCHITECTURES, "apertus",
                        replace(architectures.ARCHITECTURES["apertus"], permuted_qk=True))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_apertus_gguf_with_its_xielu_layers_swapped_misses_transformers(tmp_path, monkeypatch):
    """Control: each layer's xIELU parameters read as the other layer's miss transformers' logits."""
    hf = _apertus(tmp_path, Q.F32)
    read = architectures.ARCHITECTURES["apertus"].metadata_tensors

    def swapped(meta, p, cfg):
        return {name.replace(".0.", ".x.").replace(".1.", ".0.").replace(".x.", ".1."): value
                for name, value in read(meta, p, cfg).items()}

    monkeypatch.setitem(architectures.ARCHITECTURES, "apertus",
                        replace(architectures.ARCHITECTURES["apertus"], metadata_tensors=swapped))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_an_apertus_gguf_with_xielu_for_other_layers_is_refused(tmp_path):
    hf, config = tiny_model(transformers.ApertusConfig, **_COMMON)

    def metadata(w):
        for name in ("alpha_p", "alpha_n", "beta", "eps"):
            getattr(w, f"add_xielu_{name}")([0.5] * 3)

    _write(tmp_path / "m.gguf", "apertus", config, _mapped(hf, config, "apertus", skip=".act_fn."), Q.F32, metadata)
    with pytest.raises(CheckpointError, match="xielu.alpha_p"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
