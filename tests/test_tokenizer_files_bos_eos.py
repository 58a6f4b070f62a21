"""Whether a checkpoint with only a sentencepiece tokenizer.model puts BOS / EOS around the text: tokenizer_config's
add_bos_token / add_eos_token, else its tokenizer class's default, checked against transformers' own class on a
model trained here; and the BOS / EOS pieces sentencepiece itself takes (by their text, control pieces only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tokenizer_files import write_spm

from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.tokenizer import Tokenizer

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world", "The quick brown fox jumps"]
#: Each class's piece layout, as its real checkpoints lay out their tokenizer.model (transformers' GemmaTokenizer
#: numbers its specials as Gemma's model does, so its model must too).
LAYOUTS = {
    "llama": dict(model_type="bpe", byte_fallback=True),
    "gemma": dict(model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                  eos_piece="<eos>", bos_piece="<bos>", normalization_rule_name="identity",
                  remove_extra_whitespaces=False, add_dummy_prefix=False),
    "t5": dict(model_type="unigram", byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
}
CLASSES = {"LlamaTokenizer": "llama", "CodeLlamaTokenizer": "llama", "GemmaTokenizer": "gemma", "T5Tokenizer": "t5"}
FLAGS = [{}, {"add_bos_token": False}, {"add_bos_token": True}, {"add_eos_token": True},
         {"add_bos_token": False, "add_eos_token": True}, {"add_bos_token": True, "add_eos_token": True}]


def checkpoint(folder: Path, layout: str, **config) -> "spm.SentencePieceProcessor":
    sp = write_spm(folder, **LAYOUTS[layout])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return sp


def transformers_ids(folder: Path, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(folder).encode(text)


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k[4:7]}={v}" for k, v in f.items()) or "none")
@pytest.mark.parametrize("cls", CLASSES)
def test_bos_and_eos_as_transformers_class_adds_them(tmp_path, cls, flags):
    sp = checkpoint(tmp_path, CLASSES[cls], tokenizer_class=cls, **flags)
    tok = Tokenizer(tmp_path)
    for text in TEXTS:
        want = transformers_ids(tmp_path, text)
        if "add_bos_token" not in flags and cls in ("LlamaTokenizer", "GemmaTokenizer"):
            # transformers 5.24 built from a tokenizer.model alone adds no BOS here, against these classes'
            # documented add_bos_token default (True) and its 4.x classes, which added it: the documented one
            assert want[0] != sp.bos_id()
            want = [sp.bos_id(), *want]
        assert tok.encode(text) == want, text
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


def test_fast_names_and_the_remote_classes_take_their_defaults(tmp_path):
    sp = checkpoint(tmp_path / "t5", "t5", tokenizer_class="T5TokenizerFast")
    assert Tokenizer(tmp_path / "t5").encode("Hello") == [*sp.encode("Hello"), sp.eos_id()]
    # Baichuan's and InternLM2's remote classes default to add_bos_token=True, add_eos_token=False
    for name in ["BaichuanTokenizer", "InternLM2Tokenizer"]:
        sp = checkpoint(tmp_path / name, "llama", auto_map={"AutoTokenizer": [f"tokenization.{name}", None]})
        assert Tokenizer(tmp_path / name).encode("Hello") == [sp.bos_id(), *sp.encode("Hello")]


def test_an_unknown_class_is_refused_only_where_its_default_is_needed(tmp_path):
    sp = checkpoint(tmp_path, "llama", tokenizer_class="FancyTokenizer", add_bos_token=True)
    with pytest.raises(UnsupportedFeatureError, match="'FancyTokenizer'.*add_eos_token"):
        Tokenizer(tmp_path)
    checkpoint(tmp_path, "llama", tokenizer_class="FancyTokenizer", add_bos_token=True, add_eos_token=True)
    assert Tokenizer(tmp_path).encode("Hello") == [sp.bos_id(), *sp.encode("Hello"), sp.eos_id()]
    checkpoint(tmp_path, "llama", tokenizer_class="LlamaTokenizer", add_bos_token="yes")
    with pytest.raises(ConfigError, match="add_bos_token must be true or false, got 'yes'"):
        Tokenizer(tmp_path)


def _edit(folder: Path, **trainer_spec) -> "spm.SentencePieceProcessor":
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    for key, value in trainer_spec.items():
        setattr(proto.trainer_spec, key, value)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


@pytest.mark.parametrize("spec", [dict(bos_id=3, eos_id=0), dict(bos_piece="</s>"), dict(eos_piece="<s>")])
def test_bos_and_eos_are_the_pieces_sentencepiece_takes(tmp_path, spec):
    """By their text (bos_piece / eos_piece), whatever trainer_spec.bos_id / eos_id say."""
    checkpoint(tmp_path, "llama", add_bos_token=True, add_eos_token=True)
    sp = _edit(tmp_path, **spec)
    tok = Tokenizer(tmp_path)
    assert tok.encode("Hello") == sp.encode("Hello", add_bos=True, add_eos=True)
    assert tok.eos_token_ids == {sp.eos_id()}


@pytest.mark.parametrize("piece", ["<unk>", "\u2581t", "<nowhere>"])
def test_a_bos_piece_that_is_no_control_piece_is_no_bos(tmp_path, piece):
    """sentencepiece takes no BOS then (it refuses to add one); the unknown piece is never taken for it."""
    checkpoint(tmp_path, "llama")
    sp = _edit(tmp_path, bos_piece=piece)
    assert sp.bos_id() == -1
    with pytest.raises(ValueError, match="BOS token is not defined"):
        sp.encode("Hello", add_bos=True)
    with pytest.raises(ConfigError, match=r"to add BOS \(add_bos_token\) but its token None"):
        Tokenizer(tmp_path)
    checkpoint(tmp_path, "llama", add_bos_token=False)
    _edit(tmp_path, bos_piece=piece)
    tok = Tokenizer(tmp_path)
    assert tok.encode("Hello") == sp.encode("Hello") and tok.bos_token is None


def test_the_config_naming_the_unknown_piece_for_bos_is_refused(tmp_path):
    checkpoint(tmp_path, "llama", bos_token="<unk>")
    with pytest.raises(ConfigError, match="'<unk>' is the unknown piece"):
        Tokenizer(tmp_path)
