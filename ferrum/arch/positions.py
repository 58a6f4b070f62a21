"""Absolute position tables that checkpoints do not store: fairseq's sinusoids (XGLM)."""

from __future__ import annotations

import math

import numpy as np


def sinusoidal_table(positions: int, dim: int, offset: int) -> np.ndarray:
    """``[positions, dim]`` float32: row ``p`` is fairseq's sinusoid of position ``p + offset`` (XGLM counts from 2,
    its padding offset), the sines of ``dim // 2`` frequencies ``10000 ** (-i / (dim // 2 - 1))``, then their
    cosines (a zero column last where ``dim`` is odd), as transformers' XGLMSinusoidalPositionalEmbedding makes it."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
    angles = np.arange(offset, positions + offset, dtype=np.float32)[:, None] * freqs[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        table = np.concatenate([table, np.zeros((positions, 1), np.float32)], axis=1)
    return table.astype(np.float32)
