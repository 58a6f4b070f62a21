"""Importing a GGUF file (llama.cpp's format) as a Hugging Face-style checkpoint folder.

Architectures: llama (Mixtral too), qwen2, qwen2moe, qwen3, qwen3moe, phi3, phimoe, smollm3, granite, granitemoe
(GraniteMoeShared too), olmo, olmo2, olmoe, exaone4, ernie4_5, arcee, seed_oss, hunyuan-dense, nemotron, gpt-oss,
gemma, gemma2, gemma3, gemma4, gemma3n, the Gated DeltaNet hybrids qwen35, qwen35moe and qwen3next, Granite 4.0-H
(granitehybrid), LFM2 (lfm2, lfm2moe), Nemotron-H (nemotron_h, nemotron_h_moe), and more
(:data:`SUPPORTED_ARCHITECTURES`). The rooms: ``files`` reads a file safely, ``architectures`` maps each
architecture onto its Hugging Face family (``gated_delta``, ``gemma4``, ``gemma3n``, ``granite_hybrid``, ``lfm2``,
``nemotron_h``, ``apertus``, ``mimo2``, ``kimi_linear``, ``glm_dsa`` (GLM-5's and DeepSeek-V3.2's DSA
indexers), ``qwen1``, ``rwkv7``, ``openelm`` and ``bailing`` (Ling v1 / 2.0, Sarvam-MoE) what theirs store their
own way),
``config``, ``tensors`` and ``tokenizer`` write the three parts of the folder.

Ferrum loads safetensors folders. A GGUF file (llama.cpp's format) holds the same
model in another layout, so :func:`convert_gguf` rewrites it once:

* ``config.json`` from the ``<architecture>.*`` metadata (:mod:`~ferrum.gguf_import.architectures` maps each onto its
  Hugging Face family);
* ``model.safetensors`` with Hugging Face tensor names. Quantized matrices stay
  packed: :mod:`ferrum.quant.gguf` rewrites their blocks into the affine form
  (``X.weight`` uint32, ``X.scales``, ``X.biases``) without going through float,
  so the folder is about the GGUF's size and dequantizes to exactly llama.cpp's
  values; ``config.json`` gets mlx-lm's ``quantization`` section. Dense tensors
  (norms, F16/BF16/F32 matrices) are kept as they are. ``dequantize_to`` turns
  everything into one float dtype instead;
* ``tokenizer.json`` rebuilt with the ``tokenizers`` library from
  ``tokenizer.ggml.*`` (an RWKV world vocabulary as the release's ``rwkv_vocab_v20230424.txt``), plus
  ``tokenizer_config.json`` (chat template, special tokens) and ``generation_config.json`` (stop token ids).

Three details of the GGUF layout matter:

* GGUF lists a tensor's dimensions fastest-first (``ne0, ne1, ...``), the reverse
  of numpy / PyTorch order; a ``[576, 49152]`` GGUF embedding is ``(49152, 576)``
  here. The reader's ``data`` is already row-major, one row per outer index.
* for Llama, llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` so that its
  rope rotates adjacent pairs ``(2j, 2j+1)`` of each head (Qwen's it leaves alone); Hugging Face's Llama
  rotates the two halves ``(j, j + d/2)``. :func:`unpermute_qk` undoes it; it
  moves whole rows, so it applies to packed words, scales and biases alike.
* for Gemma and Nemotron, the converter stores every norm weight as ``1 + w`` (Gemma's RMSNorm and Nemotron's
  LayerNorm1P scale by ``1 + w``; llama.cpp's norms by the stored value); the import subtracts the 1 again.

The ``gguf`` package (llama.cpp's own reader) is needed: ``pip install 'ferrum[gguf]'``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ferrum.config import ModelConfig
from ferrum.errors import CheckpointError, ConfigError
from ferrum.gguf_import.architectures import SUPPORTED_ARCHITECTURES
from ferrum.gguf_import.config import build_config
from ferrum.gguf_import.files import Metadata, read_model
from ferrum.gguf_import.tensors import (
    DEQUANTIZE_DTYPES, ProgressFn, check_finite, check_padded_heads, choose_forms, plan_tensors, quantization_section,
    torch_dtype, unpermute_qk, write_safetensors,
)
from ferrum.gguf_import.tokenizer import build_tokenizer, stop_token_ids

__all__ = ["DEQUANTIZE_DTYPES", "SUPPORTED_ARCHITECTURES", "convert_gguf", "unpermute_qk"]


def _import_gguf() -> Any:
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "reading GGUF files needs the 'gguf' package: pip install 'ferrum[gguf]' (or pip install gguf)"
        ) from exc
    return gguf


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    progress: ProgressFn | None = None,
    *,
    dequantize_to: str | None = None,
) -> Path:
    """Write ``gguf_path`` (an architecture of :data:`SUPPORTED_ARCHITECTURES`) into ``out_dir`` as a Hugging Face
    checkpoint.

    By default quantized matrices stay packed, exactly (see the module
    docstring); GGUF types without an exact packed form are refused by name.
    ``dequantize_to`` ("float32", "float16" or "bfloat16") instead stores every
    tensor dequantised to that dtype: float32 keeps the values exactly at 4-8x
    the size, and accepts every type the ``gguf`` package can dequantize.
    ``progress(done, total, name)`` is called after each tensor. Everything is
    checked (architecture, shapes, quant types, tokenizer) before the first file
    is written. Returns ``out_dir``.
    """
    gguf = _import_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    where = str(gguf_path)
    if dequantize_to is not None and dequantize_to not in DEQUANTIZE_DTYPES:
        raise ConfigError(f"dequantize_to must be one of {', '.join(DEQUANTIZE_DTYPES)} or None, got {dequantize_to!r}")
    if not gguf_path.is_file():
        raise CheckpointError(f"no GGUF file at {gguf_path}")
    reader = read_model(gguf, gguf_path, where)
    meta = Metadata(reader, where)
    tokens = meta.get("tokenizer.ggml.tokens")
    config = build_config(meta, reader, tokens)
    if not tokens:
        raise CheckpointError(f"{where}: GGUF metadata has no tokenizer.ggml.tokens; cannot build a tokenizer")
    tokenizer_files, tokenizer_config = build_tokenizer(meta, tokens)
    tokenizer_config["model_max_length"] = ModelConfig.from_dict(config, where).max_seq_len
    plan = plan_tensors(reader, config, where, meta.get("general.architecture"))
    choose_forms(plan, dequantize_to, where)
    check_padded_heads(plan, config, where)
    check_finite(plan, where)
    config["torch_dtype"] = torch_dtype(plan)
    quantization = quantization_section(plan)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)

    generation: dict[str, Any] = {}
    if "bos_token_id" in config:
        generation["bos_token_id"] = config["bos_token_id"]
    stops = stop_token_ids(meta, tokens)
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if "pad_token_id" in config:
        generation["pad_token_id"] = config["pad_token_id"]
    config["ferrum_gguf_source"] = {
        "file": gguf_path.name,
        "name": meta.get("general.name"),
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "parts": len(reader.files),
    }

    _write_folder(out_dir, {
        "model.safetensors": lambda path: write_safetensors(path, plan, dequantize_to, where, progress),
        **tokenizer_files,
        "tokenizer_config.json": lambda path: path.write_text(
            json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"),
        "generation_config.json": lambda path: path.write_text(json.dumps(generation, indent=2) + "\n"),
        "config.json": lambda path: path.write_text(json.dumps(config, indent=2) + "\n"),
    })
    return out_dir


def _write_folder(out_dir: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Write ``files`` into ``out_dir``; on any failure (a full disk, an interrupt) remove what was written,
    and ``out_dir`` itself if it did not exist, so no half-written checkpoint is ever left."""
    created = not out_dir.exists()
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, write in files.items():
            written.append(out_dir / name)
            write(out_dir / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
