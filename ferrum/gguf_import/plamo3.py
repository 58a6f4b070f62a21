"""PLaMo 3 files (``plamo3``) back into Preferred Networks' release config, as Ferrum's ``plamo3`` family (mlx-lm's)
reads it: PLaMo 2's attention blocks alone (:mod:`ferrum.gguf_import.plamo2`'s names and norm offsets; the q/k norms
shifted by 1 too), every ``attention.sliding_window_pattern``-th layer full at ``rope.freq_base``, the others sliding
at ``rope.freq_base_swa``, as llama.cpp's set_swa_pattern places them; no window: every layer full.

The window is the release's ``window_size`` (the converter's ``sliding_window``), which mlx-lm's prompt pass (and
Ferrum) attends as ``window_size + 1`` keys where llama.cpp attends ``sliding_window`` keys: past the window, llama.cpp
reads one key fewer than the release runs. A per-layer pattern list (llama.cpp's plamo3 reads a period) and rope
scaling (PLaMo 3 has none) are refused by name.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, float32_value


def plamo3_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The release's window, its period and the two rope bases."""
    where = meta.where
    if cfg["rope_scaling"] is not None:
        raise UnsupportedFeatureError(f"{where}: {cfg['rope_scaling']['rope_type']} rope scaling in a plamo3 file is "
                                      "not supported (PLaMo 3 has none)")
    window = int(meta.get(p + "attention.sliding_window") or 0)
    period = meta.get(p + "attention.sliding_window_pattern", 8) if window else 1
    if isinstance(period, list) or not period:
        raise UnsupportedFeatureError(f"{where}: {p}attention.sliding_window_pattern {period!r:.80} is not supported "
                                      "(llama.cpp's plamo3 reads a period: every period-th layer full)")
    local = meta.get(p + "rope.freq_base_swa")
    return {"window_size": window or cfg["max_position_embeddings"], "sliding_window": None,
            "sliding_window_pattern": int(period),
            "rope_local_theta": cfg["rope_theta"] if local is None else float32_value(local)}
