"""Models named by Hugging Face repo id resolve through a (fake, local) Hugging Face cache; no network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ferrum.errors import CheckpointError
from ferrum.hub import parse_repo_id
from support import write_text_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """Lay ``files`` out as huggingface_hub stores a downloaded snapshot (blobs + snapshot links + refs)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for i, source in enumerate(sorted(p for p in files.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_text_checkpoint(tmp_path_factory.mktemp("hub") / "tiny")


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "-m", "ferrum.cli", *args], capture_output=True, text=True,
                          env={**clean, **env, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_parse_repo_id():
    assert parse_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert parse_repo_id("org/name-GGUF/sub/model.Q4_0.gguf") == ("org/name-GGUF", "sub/model.Q4_0.gguf")
    for not_an_id in ("model", "./org/name", "/abs/path", "~/x/y", "a/b/c", "org/../x", "org/name/x.bin"):
        assert parse_repo_id(not_an_id) is None, not_an_id


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_generate_by_repo_id_from_the_cache(checkpoint, tmp_path, variable):
    cache = tmp_path / "hub" if variable == "HF_HUB_CACHE" else tmp_path / "home" / "hub"
    fake_hub_cache(cache, "acme/tiny-chat", checkpoint)
    root = cache if variable == "HF_HUB_CACHE" else cache.parent
    env = {variable: str(root), "FERRUM_CACHE_DIR": str(tmp_path / "ferrum")}
    done = run_cli("generate", "hello world", "--model", "acme/tiny-chat", "--no-chat", "--max-tokens", "4",
                   "--backend", "cpu", env=env)
    assert done.returncode == 0, done.stderr
    import ferrum

    expected = ferrum.load(checkpoint, backend="cpu").generate("hello world", max_tokens=4)
    assert done.stdout.rstrip("\n") == expected


def test_uncached_repo_offline_says_how_to_get_it(tmp_path):
    done = run_cli("generate", "hi", "--model", "acme/not-downloaded", env={"HF_HUB_CACHE": str(tmp_path)})
    assert done.returncode == 2
    assert "acme/not-downloaded is not in the Hugging Face cache" in done.stderr
    assert "hf download acme/not-downloaded" in done.stderr and "Traceback" not in done.stderr


def test_in_process_load_and_gguf_repos(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from ferrum.default_model import default_gguf_path
    from ferrum.sources import resolve_model

    gguf_dir = tmp_path / "gguf-files"
    gguf_dir.mkdir()
    (gguf_dir / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(default_gguf_path())
    (gguf_dir / "README.md").write_text("a GGUF-only repo")
    fake_hub_cache(tmp_path / "hub", "acme/smol-GGUF", gguf_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "ferrum"))

    whole = resolve_model("acme/smol-GGUF")  # the only .gguf of the repo, imported once
    named = resolve_model("acme/smol-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert whole == named and (whole / "config.json").exists()
    assert whole.name.startswith("SmolLM2-135M-Instruct.Q4_1-")  # named after the file, not its blob hash
    with pytest.raises(CheckpointError, match="no file|not in the Hugging Face cache"):
        resolve_model("acme/smol-GGUF/other.gguf")
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id|no checkpoint folder"):
        resolve_model(tmp_path / "missing")


def test_a_split_gguf_repo_resolves_through_its_first_part(tmp_path, monkeypatch):
    """Every part comes along with the first (by llama.cpp's part names), and a repo holding only the parts of
    one model is that model."""
    from huggingface_hub import constants
    from test_gguf_import import write_tiny_gguf

    from ferrum.sources import resolve_model

    parts = tmp_path / "parts"
    parts.mkdir()
    write_tiny_gguf(parts / "tiny.gguf", split_max_tensors=4)
    first = sorted(p.name for p in parts.iterdir())[0]
    fake_hub_cache(tmp_path / "hub", "acme/split-GGUF", parts)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "ferrum"))

    named = resolve_model(f"acme/split-GGUF/{first}")
    assert named == resolve_model("acme/split-GGUF") and (named / "config.json").exists()
    assert named.name.startswith("tiny-00001-of-")


def test_a_quantization_tag_names_one_gguf_of_a_repo(tmp_path, monkeypatch):
    """``org/name:Q4_1`` (llama.cpp's ``-hf`` form) picks the file with that tag between separators, the first
    part of a split one; an unknown or ambiguous tag says which files there are."""
    from huggingface_hub import constants

    from ferrum.default_model import default_gguf_path
    from ferrum.hub import tagged_gguf
    from ferrum.sources import resolve_model

    files = tmp_path / "files"
    files.mkdir()
    for name in ("SmolLM2-135M-Instruct-Q4_1.gguf", "SmolLM2-135M-Instruct-Q4_1_alt.gguf",
                 "SmolLM2-135M-Instruct-Q8_0-00001-of-00002.gguf", "SmolLM2-135M-Instruct-Q8_0-00002-of-00002.gguf",
                 "SmolLM2-135M-Instruct-UD-Q4_K_XL.gguf", "x-IQ4_XS.gguf", "y-IQ4_XS.gguf"):
        (files / name).symlink_to(default_gguf_path())
    fake_hub_cache(tmp_path / "hub", "acme/smol-GGUF", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "ferrum"))

    assert tagged_gguf("acme/smol-GGUF:q4_1") == ("acme/smol-GGUF", "SmolLM2-135M-Instruct-Q4_1.gguf")
    assert tagged_gguf("acme/smol-GGUF:Q8_0") == ("acme/smol-GGUF", "SmolLM2-135M-Instruct-Q8_0-00001-of-00002.gguf")
    assert tagged_gguf("acme/smol-GGUF:UD-Q4_K_XL")[1] == "SmolLM2-135M-Instruct-UD-Q4_K_XL.gguf"
    with pytest.raises(CheckpointError, match="no GGUF file for 'Q4_K'"):  # a prefix of Q4_K_XL is not its tag
        tagged_gguf("acme/smol-GGUF:Q4_K")
    assert tagged_gguf("acme/smol-GGUF") is None and tagged_gguf("acme/smol-GGUF/x.gguf") is None
    with pytest.raises(CheckpointError, match=r"no GGUF file for 'Q5_K_M'; its GGUF files: .*Q4_1.gguf"):
        tagged_gguf("acme/smol-GGUF:Q5_K_M")
    with pytest.raises(CheckpointError, match=r"several GGUF files .* match 'IQ4_XS' \(x-IQ4_XS.gguf, y-IQ4_XS"):
        tagged_gguf("acme/smol-GGUF:IQ4_XS")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        tagged_gguf("acme/never-downloaded-GGUF:Q4_1")
    folder = resolve_model("acme/smol-GGUF:Q4_1")
    assert (folder / "config.json").exists() and folder.name.startswith("SmolLM2-135M-Instruct-Q4_1-")


def test_a_vision_projector_beside_the_model_is_never_the_pick(tmp_path, monkeypatch):
    """llava-style repos ship ``mmproj-*.gguf`` beside the model: as llama.cpp, neither a tag nor the bare repo id
    takes it (both were refused as ambiguous); several models in a repo are named with the repo's own id."""
    from huggingface_hub import constants

    from ferrum.default_model import default_gguf_path
    from ferrum.hub import tagged_gguf
    from ferrum.sources import resolve_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "ferrum"))
    for repo, names in (("acme/vision-GGUF", ("model-F16.gguf", "mmproj-model-F16.gguf", "model-mmproj-f16.gguf")),
                        ("acme/two-GGUF", ("a-Q4_1.gguf", "b-Q8_0.gguf"))):
        files = tmp_path / repo.replace("/", "_")
        files.mkdir()
        for name in names:
            (files / name).symlink_to(default_gguf_path())
        fake_hub_cache(tmp_path / "hub", repo, files)
    assert tagged_gguf("acme/vision-GGUF:F16") == ("acme/vision-GGUF", "model-F16.gguf")
    assert resolve_model("acme/vision-GGUF").name.startswith("model-F16-")
    with pytest.raises(CheckpointError, match=r"several GGUF files \(a-Q4_1.gguf, b-Q8_0.gguf\); name one, e\.g\. "
                                              r"acme/two-GGUF/a-Q4_1.gguf"):
        resolve_model("acme/two-GGUF")


def test_an_unreachable_hub_is_named_not_taken_for_a_missing_file(tmp_path, monkeypatch):
    """huggingface_hub reports a failed connection as LocalEntryNotFoundError, a kind of EntryNotFoundError;
    the message must say the download failed, not that the repo lacks a file."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    from ferrum.hub import resolve_repo

    def unreachable(*args, **kwargs):
        raise errors.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nmore")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    for name, file in (("acme/model", None), ("acme/model-GGUF", "model.Q4_0.gguf")):
        with pytest.raises(CheckpointError) as caught:
            resolve_repo(name, file)
        message = str(caught.value)
        assert "downloading it failed" in message and "Name or service not known" in message, message
        assert "has no file" not in message


def test_a_snapshot_cached_without_its_weights_is_completed_or_named(checkpoint, tmp_path, monkeypatch):
    """A config or tokenizer fetched alone (``AutoTokenizer.from_pretrained``) leaves a snapshot folder with
    no weights: online, the rest is downloaded; offline, the error says which weights the cache lacks."""
    import huggingface_hub
    from huggingface_hub import constants

    from ferrum.hub import resolve_repo

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(checkpoint / name, partial / name)
    snapshot = fake_hub_cache(tmp_path / "hub", "acme/tiny", partial)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"acme/tiny is in the Hugging Face cache .* without its weights .*"
                                              r"HF_HUB_OFFLINE is set"):
        resolve_repo("acme/tiny")

    real_download, downloads = huggingface_hub.snapshot_download, []

    def download(repo_id, local_files_only=False, **kwargs):
        if not local_files_only:  # what the hub would bring: the files the snapshot lacks
            downloads.append(kwargs.get("allow_patterns"))
            for weights in checkpoint.glob("*.safetensors"):
                shutil.copyfile(weights, snapshot / weights.name)
        return real_download(repo_id, local_files_only=True)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_repo("acme/tiny") == snapshot and len(downloads) == 1
    assert "*.safetensors" in downloads[0]
    assert resolve_repo("acme/tiny") == snapshot and len(downloads) == 1  # complete now: the cache answers


def test_a_sharded_snapshot_missing_a_shard_names_it(checkpoint, tmp_path, monkeypatch):
    import json

    from huggingface_hub import constants

    from ferrum.hub import resolve_repo

    files = tmp_path / "files"
    files.mkdir()
    shutil.copyfile(checkpoint / "config.json", files / "config.json")
    (files / "model-00001-of-00002.safetensors").write_bytes(b"")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (files / "model.safetensors.index.json").write_text(json.dumps(index))
    fake_hub_cache(tmp_path / "hub", "acme/sharded", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"without 1 of its 2 weight files \(model-00002-of-00002"):
        resolve_repo("acme/sharded")


def test_a_missing_path_under_a_local_folder_is_named_as_one(tmp_path, monkeypatch):
    """``models/llama`` reads like a repo id too; where ``models/`` is a folder here, the typo is the likelier
    story, and the error says so before the hub's."""
    from huggingface_hub import constants

    from ferrum.sources import resolve_model

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"no 'llama' in the local folder models/ \(read as a Hugging Face"):
        resolve_model("models/llama")
    with pytest.raises(CheckpointError, match=r"^acme/llama is not in the Hugging Face cache"):
        resolve_model("acme/llama")


def _sharded_copy(checkpoint: Path, folder: Path) -> Path:
    """``checkpoint`` with its weights in two shards and an index."""
    import json

    from safetensors.numpy import load_file, save_file

    shutil.copytree(checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / shard)
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_a_sharded_snapshot_loads_through_the_caches_links(checkpoint, tmp_path, monkeypatch):
    """A snapshot's shards are links into the cache's blobs/ folder: they were refused as "outside the checkpoint
    folder", so no sharded model loaded by repo id. A name leading out of the folder still is."""
    from huggingface_hub import constants

    import ferrum

    files = _sharded_copy(checkpoint, tmp_path / "files")
    fake_hub_cache(tmp_path / "hub", "acme/sharded", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    expected = ferrum.load(checkpoint, backend="cpu").generate("hello", max_tokens=6, ignore_eos=True)
    assert ferrum.load("acme/sharded", backend="cpu").generate("hello", max_tokens=6, ignore_eos=True) == expected

    index = files / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"model-00002', '"../files/model-00002'))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        ferrum.load(files, backend="cpu")


def test_a_snapshot_of_pytorch_pickles_is_named_as_such_not_as_incomplete(checkpoint, tmp_path, monkeypatch):
    """Offline, or once a download brought no safetensors, the pickled weights are named with what to do (the
    error was "download it where there is network"); a training_args.bin is no model's weights."""
    from huggingface_hub import constants

    import ferrum

    files = tmp_path / "files"
    files.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(checkpoint / name, files / name)
    (files / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read")
    fake_hub_cache(tmp_path / "hub", "acme/pickled", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a PyTorch pickle") as refused:
        ferrum.load("acme/pickled", backend="cpu")
    assert "network" not in str(refused.value)

    import huggingface_hub

    real = huggingface_hub.snapshot_download  # online, the hub has nothing more to give (no safetensors)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, local_files_only=False, **kw: real(repo_id, local_files_only=True))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a PyTorch pickle"):
        ferrum.load("acme/pickled", backend="cpu")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    (files / "pytorch_model.bin").rename(files / "training_args.bin")  # a pickle, but not of the weights
    fake_hub_cache(tmp_path / "hub", "acme/weightless", files)
    with pytest.raises(CheckpointError, match=r"without its weights \(no \*.safetensors"):
        ferrum.load("acme/weightless", backend="cpu")


def test_an_unreachable_hub_listing_a_tagged_repo_is_named(tmp_path, monkeypatch):
    """Resolving ``org/name:TAG`` lists the repo's files, where huggingface_hub lets its HTTP client's connection
    error through (it wraps it for downloads): the answer is the same CheckpointError as offline, not that error."""
    httpx = pytest.importorskip("httpx2")
    import huggingface_hub
    from huggingface_hub import constants

    import ferrum

    def unreachable(self, *args, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(CheckpointError, match="no GGUF file of acme/model-GGUF found for 'Q4_K_M'.*could list"):
        ferrum.load("acme/model-GGUF:Q4_K_M")
