"""Hugging Face repo ids (``org/name``, ``org/name/file.gguf``, ``org/name:Q4_K_M``) turned into local files.

Resolution goes through ``huggingface_hub``'s own cache, so a model another
tool downloaded is found again and ``HF_HUB_CACHE`` / ``HF_HOME`` /
``HF_HUB_OFFLINE`` / ``HF_TOKEN`` mean what they mean everywhere else. The
cache is asked first with ``local_files_only``; only a repo that is not
cached is downloaded, and then only the files Ferrum reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ferrum.checkpoint import WEIGHT_PICKLES
from ferrum.errors import CheckpointError
from ferrum.gguf_import.files import is_whole_or_first_part, part_names

#: ``org/name`` or ``org/name/path/in/repo.gguf``: Hugging Face's character set for ids.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[\w./-]+\.gguf))?$", re.IGNORECASE)

#: ``org/name:TAG``: one quantization of a GGUF repo, as llama.cpp's ``-hf`` and Ollama name it.
_TAGGED = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<tag>[\w.-]+)$")

#: What a safetensors checkpoint needs; skips duplicate PyTorch/ONNX/GGUF weights in the same repo.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "tokenizer.jsonl", "tiktoken.model",
                    "*.tiktoken", "*.txt"]


def parse_repo_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, gguf_file_or_None)`` when ``name`` is written like a repo id, else None."""
    match = _REPO_ID.match(name)
    if match is None or ".." in name or name.startswith(("./", "/", "~")):
        return None
    return match["repo"], match["file"]


def tagged_gguf(name: str) -> tuple[str, str] | None:
    """For ``org/name:Q4_K_M``, the repo and its one GGUF file of that quantization (the first part of a split
    one): the file whose name holds the tag after a separator and before ``-``, ``.`` or its end, case aside.
    None for names of other forms."""
    match = _TAGGED.match(name)
    if match is None or ".." in name:
        return None
    repo_id, tag = match["repo"], match["tag"]
    pattern = re.compile(rf"(^|[-._/]){re.escape(tag)}([-.]|$)", re.IGNORECASE)  # Q4_K is not Q4_K_M

    def matching(names: list[str]) -> list[str]:
        return sorted(n for n in names if pattern.search(n[: -len(".gguf")]) and is_whole_or_first_part(n))

    from huggingface_hub import constants

    listed = _gguf_files(repo_id, local_only=True)  # the cache first, as for every repo id
    found = matching(listed)
    if not found and not constants.HF_HUB_OFFLINE:
        listed = _gguf_files(repo_id, local_only=False) or listed
        found = matching(listed)
    if len(found) == 1:
        return repo_id, found[0]
    if found:
        raise CheckpointError(f"{name}: several GGUF files of {repo_id} match {tag!r} ({', '.join(found[:6])}); "
                              f"name one: {repo_id}/FILE.gguf")
    if not listed:
        why = ("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "neither the Hugging Face cache nor the hub could list its files")
        raise CheckpointError(f"{name}: no GGUF file of {repo_id} found for {tag!r}: {why}; download it where there "
                              f"is network (`hf download {repo_id}`), or name a local .gguf file")
    raise CheckpointError(f"{name}: {repo_id} has no GGUF file for {tag!r}; its GGUF files: {', '.join(listed[:8])}")


def _gguf_files(repo_id: str, local_only: bool) -> list[str]:
    """The repo's ``.gguf`` paths: those of its cached snapshot, or the hub's listing; [] when neither answers."""
    from huggingface_hub import HfApi, errors, snapshot_download

    try:
        if local_only:
            folder = Path(snapshot_download(repo_id, local_files_only=True))
            names = [str(p.relative_to(folder)) for p in folder.rglob("*.gguf")]
        else:
            names = [f for f in HfApi().list_repo_files(repo_id) if f.lower().endswith(".gguf")]
        return sorted(n for n in names if not _is_projector(n))
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as exc:
        raise _not_accessible(f"cannot list {repo_id}", exc) from exc
    except (errors.LocalEntryNotFoundError, FileNotFoundError, errors.HfHubHTTPError, OSError, ValueError):
        return []
    except Exception as exc:
        if _unreachable(exc):
            return []
        raise


def _unreachable(exc: Exception) -> bool:
    """Whether ``exc`` is the hub client's transport failing (no network, DNS, a timeout): huggingface_hub's
    listing lets its HTTP client's own errors through (httpx's ``TransportError``, under whichever module
    name the installed client has), where its downloads wrap them in LocalEntryNotFoundError."""
    return any(cls.__name__ == "TransportError" and cls.__module__.startswith("httpx") for cls in type(exc).__mro__)


def resolve_repo(repo_id: str, filename: str | None = None) -> Path:
    """The cached snapshot folder of ``repo_id`` (or one ``.gguf`` file in it), downloading if needed."""
    from huggingface_hub import constants, errors, hf_hub_download, snapshot_download

    def fetch(local_only: bool) -> Path:
        if filename is not None:  # the first part of a split model brings the other parts along
            parts = [hf_hub_download(repo_id, part, local_files_only=local_only) for part in part_names(filename)]
            return Path(parts[0])
        patterns = None if local_only else CHECKPOINT_FILES
        return Path(snapshot_download(repo_id, local_files_only=local_only, allow_patterns=patterns))

    what = f"{repo_id}/{filename}" if filename else repo_id
    missing = None
    try:
        cached = fetch(local_only=True)
        missing = None if filename is not None else _missing_weights(cached)
        if missing is None or constants.HF_HUB_OFFLINE and _holds_weight_pickles(cached):
            return cached
    except (errors.LocalEntryNotFoundError, FileNotFoundError):
        pass
    if constants.HF_HUB_OFFLINE:
        held = (f"{what} is in the Hugging Face cache ({constants.HF_HUB_CACHE}) without {missing}" if missing else
                f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})")
        raise CheckpointError(
            f"{held} and HF_HUB_OFFLINE is set; download it where there is network (`hf download {repo_id}`) "
            "and copy the cache here, or pass a local checkpoint folder"
        )
    try:
        fetched = fetch(local_only=False)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError) as exc:
        raise _not_accessible(f"cannot download {what}", exc) from exc
    except errors.EntryNotFoundError as exc:
        # LocalEntryNotFoundError, a subclass, is the hub not answering: no file is known missing
        if isinstance(exc, errors.LocalEntryNotFoundError) or filename is None:
            raise _download_failed(what, repo_id, constants.HF_HUB_CACHE, exc) from exc
        raise CheckpointError(f"{repo_id} has no file {filename!r}; list its files on huggingface.co") from exc
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise _download_failed(what, repo_id, constants.HF_HUB_CACHE, exc) from exc
    # huggingface_hub hands back the cached snapshot as it is when the hub does not answer
    still_missing = None if filename is not None else _missing_weights(fetched)
    if still_missing and not _holds_weight_pickles(fetched):
        raise CheckpointError(f"{what} is in the Hugging Face cache ({constants.HF_HUB_CACHE}) without "
                              f"{still_missing}, and downloading did not bring them; connect to the network and "
                              f"retry, or download it elsewhere (`hf download {repo_id}`)")
    return fetched


def _missing_weights(snapshot: Path) -> str | None:
    """What a cached snapshot lacks of its weights (a config or tokenizer fetched alone leaves a snapshot
    folder behind), or None when they are all there: every shard its safetensors index names, else a
    safetensors or GGUF file."""
    index = snapshot / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # loading names what is wrong with the index
        absent = [name for name in shards if not (snapshot / name).exists()]
        return f"{len(absent)} of its {len(shards)} weight files ({', '.join(absent[:3])})" if absent else None
    if any(snapshot.glob("*.safetensors")) or any(snapshot.rglob("*.gguf")):
        return None
    return "its weights (no *.safetensors or *.gguf file)"


def _holds_weight_pickles(snapshot: Path) -> bool:
    """Whether the snapshot holds a model's weights as PyTorch pickles, which Ferrum neither reads nor fetches:
    where no safetensors come, loading says what they are and what to do (not "download it")."""
    return any(p for pattern in WEIGHT_PICKLES for p in snapshot.glob(pattern))


def _not_accessible(what: str, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{what}: {type(exc).__name__}; check the repo id, and for gated or private repos "
                           "accept the license on huggingface.co and log in (`hf auth login` or HF_TOKEN)")


def _download_failed(what: str, repo_id: str, cache: str, exc: Exception) -> CheckpointError:
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(
        f"{what} is not in the Hugging Face cache ({cache}) and downloading it failed "
        f"({type(exc).__name__}: {reason}); connect to the network, or download it elsewhere "
        f"(`hf download {repo_id}`) and copy the cache here, or pass a local checkpoint folder"
    )


def single_gguf(folder: Path, repo_id: str) -> Path | None:
    """The only model ``.gguf`` file (or first part of a split one) of ``repo_id``'s snapshot ``folder`` that has
    no ``config.json``."""
    if (folder / "config.json").exists():
        return None
    ggufs = sorted(p for p in folder.rglob("*.gguf") if not _is_projector(p.name))
    names = [str(p.relative_to(folder)) for p in ggufs]
    if len(ggufs) > 1 and names != part_names(names[0]):  # not the parts of one split model
        raise CheckpointError(
            f"{folder} holds several GGUF files ({', '.join(names[:6])}); name one, e.g. {repo_id}/{names[0]}"
        )
    return ggufs[0] if ggufs else None


def _is_projector(name: str) -> bool:
    """A vision model's projector (``mmproj-*.gguf``, ``*-mmproj-f16.gguf``) that sits beside the language model it
    feeds: never the model a repo id or a quantization tag picks, as llama.cpp skips any name holding "mmproj"."""
    return "mmproj" in Path(name).name.lower()
