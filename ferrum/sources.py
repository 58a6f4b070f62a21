"""What a user names as a model, turned into a checkpoint folder Ferrum loads.

A folder is used as it is. A Hugging Face repo id (``org/name``, or
``org/name/file.gguf`` or ``org/name:Q4_K_M`` for one file of a GGUF repo) that is not a local path
is resolved through the Hugging Face cache (:mod:`ferrum.hub`). A GGUF file is imported once (weights kept packed,
see :mod:`ferrum.gguf_import`) into Ferrum's cache, in a folder named after
the file and its size and modification time (a split model's: all its parts'), so a changed file is
imported again. Imports are written into a staging folder and renamed into place when
complete: an interrupted run never leaves half a model, and two processes
racing both end with a whole one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from ferrum.errors import CheckpointError, InvalidRequestError

ProgressFn = Callable[[int, int, str], None]

#: Written last into a finished import; a folder without it is not used.
DONE_MARKER = ".ferrum-converted"
#: Bump when an import's output changes, so old caches are redone.
#: 1: every tensor dequantized to float32; 2: quantized weights kept packed; 3: llama.cpp's stop tokens, BOS
#: defaults, default pre-tokenizer, Phi-3 whitespace and legacy rope scale; 4: unknown tokens matched whole and
#: written for characters no sentencepiece piece spells, merges that make no token left out, llama.cpp's
#: default special ids.
IMPORT_FORMAT = "4"


def cache_root() -> Path:
    """``$FERRUM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ferrum``, else ``~/.cache/ferrum``."""
    explicit = os.environ.get("FERRUM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ferrum"


def resolve_model(path: str | Path, progress: ProgressFn | None = None) -> Path:
    """The checkpoint folder for ``path``: a folder itself, a GGUF file's cached import, or a repo id's snapshot."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidRequestError(f"a model is named by a folder, a .gguf file or a repo id (a str or a path), "
                                  f"not {type(path).__name__}")
    if not str(path).strip():  # Path("") is the working directory, which was loaded when it held a checkpoint
        raise InvalidRequestError("the model path is empty; name a checkpoint folder, a .gguf file or a repo id")
    named = path
    path = Path(path).expanduser()
    if isinstance(named, str) and not path.exists():
        from ferrum import hub

        repo = hub.parse_repo_id(named) or hub.tagged_gguf(named)
        if repo is not None:
            try:
                path = hub.resolve_repo(*repo)
            except CheckpointError as exc:
                if path.parent.is_dir() and path.parent != Path("."):  # more likely a local path with a typo
                    raise CheckpointError(f"no {path.name!r} in the local folder {path.parent}/ (read as a Hugging "
                                          f"Face repo id instead: {exc})") from None
                raise
            gguf = path if path.is_file() else hub.single_gguf(path, repo[0])
            if gguf is not None:
                return gguf_checkpoint(gguf, progress)
            if not (path / "config.json").exists():
                raise CheckpointError(
                    f"{named} has no config.json; if it is a GGUF repo, name one of its files: {named}/FILE.gguf"
                )
            return path
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_checkpoint(path, progress)
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file; Ferrum loads a checkpoint folder (config.json + *.safetensors) or a .gguf file"
        )
    raise CheckpointError(
        f"no checkpoint folder (config.json + *.safetensors) or .gguf file at {path}, "
        "and it is not a Hugging Face repo id (org/name)"
    )


def gguf_checkpoint(gguf_path: str | Path, progress: ProgressFn | None = None) -> Path:
    """The cached import of a GGUF file, imported on first use."""
    gguf_path = Path(gguf_path).expanduser().absolute()  # named as given: hub snapshots link to hashed blobs
    if not gguf_path.is_file():
        raise CheckpointError(f"no GGUF file at {gguf_path}")
    from ferrum.gguf_import.files import part_names

    parts = [gguf_path.with_name(name) for name in part_names(gguf_path.name)]  # a split model's, by their names
    stats = [part.stat() for part in parts if part.is_file()]
    size, mtime = sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)
    # where it is, too: two files of one name, size and time (cp -p, rsync -t, tar) are not taken for one
    where = hashlib.sha1(str(gguf_path).encode()).hexdigest()[:8]
    # the name cut short: its lock and staging folder add ~45 characters to a name, which may have 255
    target = cache_root() / "models" / "gguf" / f"{gguf_path.stem[:120]}-{size:x}-{mtime:x}-{where}"
    return imported_gguf(gguf_path, target, progress)


def is_complete(folder: Path) -> bool:
    try:
        return (folder / DONE_MARKER).read_text().strip() == IMPORT_FORMAT
    except OSError:
        return False


def imported_gguf(gguf_path: Path, target: Path, progress: ProgressFn | None = None) -> Path:
    """``target`` holding the import of ``gguf_path``, importing it unless a complete one is there."""
    if is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create the cache folder {target.parent} ({exc.strerror or exc}); "
            "set FERRUM_CACHE_DIR to a writable folder"
        ) from None
    try:
        with cache_lock(target):
            if is_complete(target):  # another process imported it while this one waited
                return target
            _import(gguf_path, target, progress)
    except OSError as exc:  # a full disk, a read-only or foreign cache: name the folder and the way out
        raise CheckpointError(
            f"importing {gguf_path.name} into {target.parent} failed ({exc.strerror or exc}); free space there or "
            "set FERRUM_CACHE_DIR to a writable folder with room"
        ) from None
    return target


def cache_lock(target: Path) -> ContextManager[None]:
    """Held while ``target``, a folder of the cache, is written: concurrent first runs write it once, in turn."""
    return _exclusive(_lock_path(target))


def _lock_path(target: Path) -> Path:
    """Lock files live apart from the models, one per target folder; they are left in place on purpose
    (deleting a lock file others wait on would let two holders in)."""
    digest = hashlib.sha1(str(target.resolve()).encode()).hexdigest()[:16]
    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{target.name}-{digest}.lock"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An inter-process lock (flock), so concurrent first runs import once; a no-op where flock is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: the staging + rename below still keeps the result whole
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import(gguf_path: Path, target: Path, progress: ProgressFn | None) -> None:
    from ferrum.gguf_import import convert_gguf

    _remove_stale_staging(target)
    # made as the umask says, as any folder (mkdtemp's are the owner's alone: a cache warmed by one user, in an
    # image build say, was unreadable to the others)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        convert_gguf(gguf_path, staging, progress=progress)
        (staging / DONE_MARKER).write_text(IMPORT_FORMAT + "\n")
        if target.exists() and not is_complete(target):
            # Left by an older format or by hand; replace it.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (the target is a non-empty folder now).
            if not is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete staging folders a killed import left (imports take seconds; an hour-old one is dead)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
