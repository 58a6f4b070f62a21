"""LoRA adapters: PEFT and mlx-lm files loaded next to a base model, many resident, mixed in one batched forward."""

from ferrum.adapters.files import LoraAdapter, read_adapter
from ferrum.adapters.registry import AdapterInfo, AdapterRegistry

__all__ = ["AdapterInfo", "AdapterRegistry", "LoraAdapter", "read_adapter"]
