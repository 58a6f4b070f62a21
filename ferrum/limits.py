"""Sizes a config or caller asks for, checked against the checkpoint and the machine before anything is allocated.

An absurd ``num_hidden_layers`` or ``num_kv_blocks`` must fail in
milliseconds with a message, not by MemoryError or minutes of swapping.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from ferrum.errors import CheckpointError, InvalidRequestError

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def physical_memory_bytes() -> int | None:
    """RAM of this machine, where the OS says (Linux, macOS)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_layer_count(num_layers: int, tensor_names: Iterable[str], where: str) -> None:
    """config.json's layer count against the layers the checkpoint holds (cheap: names only)."""
    present = {int(m.group(1)) for name in tensor_names if (m := _LAYER_INDEX.search(name))}
    if present and num_layers > max(present) + 1:
        raise CheckpointError(
            f"{where}: config.json says num_hidden_layers={num_layers} but the checkpoint holds "
            f"{max(present) + 1} layers; fix config.json or use the matching weights"
        )


def check_kv_pool(num_blocks: int, block_size: int, bytes_per_token: int, device: str) -> None:
    """A KV pool of ``num_blocks`` must be positive and, on the host, fit in RAM together with the
    decode mirrors (:mod:`ferrum.kv_mirror`), which the backends budget at up to the pool's size again."""
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
        raise InvalidRequestError(f"num_kv_blocks must be a positive integer, got {num_blocks!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise InvalidRequestError(f"block_size must be a positive integer, got {block_size!r}")
    pool = num_blocks * block_size * bytes_per_token
    ram = physical_memory_bytes()
    if device == "cpu" and ram is not None and 2 * pool > ram:
        raise InvalidRequestError(
            f"a KV cache of {num_blocks} blocks x {block_size} tokens needs {pool / 2**30:.1f} GiB, and decoding "
            f"keeps contiguous copies of up to as much again ({2 * pool / 2**30:.1f} GiB in all), but this "
            f"machine has {ram / 2**30:.1f} GiB of RAM; lower num_kv_blocks (or max_seq_len)"
        )
