"""Checks of LoRA adapters against PEFT shared by the adapter test files (latent attention's, shared experts'), and
PEFT-format adapters of releases transformers has no class for, with their merged checkpoints as the reference."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np

from ferrum.model import DecoderOnlyLLM, ForwardItem
from support import reference_logits, scaled_error


def make_peft(hf, folder, targets, seed: int = 1, hide: bool = True, experts: str = r".*\.experts.*", **config):
    """A random PEFT LoRA of ``hf`` on ``targets`` saved in ``folder``; PEFT's merged model. ``hide``: the model type
    hidden from PEFT 0.21's transformers-5 MoE conversion (which would retarget gate_proj / up_proj / down_proj to
    the experts) and the modules matching ``experts`` excluded."""
    import peft
    import torch

    torch.manual_seed(seed)
    base = copy.deepcopy(hf)
    if hide:
        base.config.model_type = "llama"
        config = {"exclude_modules": experts, **config}
    options = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(base, peft.LoraConfig(**{**options, **config}))
    model.save_pretrained(folder)
    return model.merge_and_unload().eval()


def adapted_logits(model, tokens, adapter: str | None) -> np.ndarray:
    """One pass over ``tokens``, a fresh sequence each call."""
    out = model.forward([ForwardItem(object(), tokens, 0, adapter=adapter)], all_logits=True)
    return model.ops.to_numpy(out.logits)


def assert_adapter_matches_peft(base, folder, hf, merged, adapted: int, tokens, backend: str) -> None:
    """:func:`assert_adapter_gives` PEFT's merged model's logits, and transformers' without the adapter."""
    assert_adapter_gives(base, folder, reference_logits(merged, tokens), reference_logits(hf, tokens), adapted, tokens,
                         backend)


def assert_adapter_gives(base, folder, want: np.ndarray, plain: np.ndarray, adapted: int, tokens, backend: str) -> None:
    """The adapter at ``folder`` moves the base model's logits (``plain``), adapts ``adapted`` projections, and gives
    ``want`` (the merged model's) in one pass and decoding, with a second slot loaded (each token must take its own);
    without it, ``plain``."""
    assert scaled_error(plain, want) > 0.1  # the adapter moves the logits
    model = DecoderOnlyLLM.from_pretrained(base, backend=backend, block_size=4, dtype="float32")
    assert model.adapters.load("a", folder).projections == adapted
    model.adapters.load("b", folder)
    assert scaled_error(adapted_logits(model, tokens, "a"), want) <= 1e-4
    model.forward([ForwardItem("steps", tokens[:5], 0, adapter="a")])
    for pos in range(5, len(tokens)):
        out = model.forward([ForwardItem("steps", [tokens[pos]], pos, adapter="a")])
        assert scaled_error(model.ops.to_numpy(out.logits)[0], want[pos]) <= 1e-4, pos
    assert scaled_error(adapted_logits(model, tokens, None), plain) <= 1e-4


def assert_a_mixed_batch_gives_each_request_its_own(base, folder, hf, merged, tokens, backend: str) -> None:
    """Prefills then decodes of the adapter and of the base model in every pass, each as PEFT's or transformers'."""
    model = DecoderOnlyLLM.from_pretrained(base, backend=backend, block_size=4, dtype="float32")
    model.adapters.load("a", folder)
    plan = {"a1": ("a", tokens), "n": (None, tokens[2:]), "a2": ("a", tokens[4:])}
    want = {seq: reference_logits(merged if adapter else hf, part) for seq, (adapter, part) in plan.items()}
    out = model.forward([ForwardItem(seq, part[:6], 0, adapter=adapter) for seq, (adapter, part) in plan.items()],
                        all_logits=True)
    host = model.ops.to_numpy(out.logits)
    for seq in plan:
        first, count = out.rows[seq]
        assert scaled_error(host[first:first + count], want[seq][:6]) <= 1e-4, seq
    for pos in range(6, 9):
        out = model.forward([ForwardItem(seq, [part[pos]], pos, adapter=adapter)
                             for seq, (adapter, part) in plan.items()])
        host = model.ops.to_numpy(out.logits)
        for seq in plan:
            assert scaled_error(host[out.rows[seq][0]], want[seq][pos]) <= 1e-4, (seq, pos)


#: A stored layer tensor's module (``...layers.N....<leaf>``; Qwen's and Phixtral's ``h.N``, Talkie's ``blocks.N``,
#: AFM's ``kv_reuse_layers.N`` too) and its last name.
_LAYER_WEIGHT = re.compile(r"(?P<module>.*\.(?:layers|h|blocks|kv_reuse_layers)\.\d+\..*\.(?P<leaf>\w+))\.weight")


def release_adapter(folder: Path, dest: Path, leaves: set[str], seed: int = 1, zeroed: bool = False,
                    skip: str | None = None) -> Path:
    """A PEFT LoRA adapter (rank 4, alpha 8) of checkpoint ``folder`` written to ``dest``, as PEFT names a model of
    the release's modules: random factors on each layer matrix whose module's last name is in ``leaves`` (the experts'
    left out, as ``exclude_modules`` would leave them, and the modules matching ``skip``); B zero where ``zeroed``.
    Returns ``dest / "merged"``: the checkpoint with ``W + 2 * B @ A`` in place of each adapted ``W`` (what PEFT's
    ``merge_and_unload`` computes)."""
    from safetensors.numpy import load_file, save_file

    rank, alpha = 4, 8
    tensors = {name: value for file in sorted(folder.glob("*.safetensors")) for name, value in load_file(file).items()}
    rng = np.random.default_rng(seed)
    factors, merged, targets = {}, dict(tensors), set()
    for name, weight in sorted(tensors.items()):
        m = _LAYER_WEIGHT.fullmatch(name)
        if m is None or m["leaf"] not in leaves or weight.ndim != 2 or ".experts." in name or \
                skip is not None and re.fullmatch(skip, m["module"]):
            continue
        a = (rng.standard_normal((rank, weight.shape[1])) / np.sqrt(weight.shape[1])).astype(np.float32)
        b = (rng.standard_normal((weight.shape[0], rank)) * (0.0 if zeroed else 0.3)).astype(np.float32)
        factors.update({f"base_model.model.{m['module']}.lora_A.weight": a,
                        f"base_model.model.{m['module']}.lora_B.weight": b})
        merged[name] = (weight + alpha / rank * b @ a).astype(weight.dtype)
        targets.add(m["leaf"])
    (dest / "adapter").mkdir(parents=True)
    save_file(factors, str(dest / "adapter" / "adapter_model.safetensors"))
    (dest / "adapter" / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=sorted(targets), bias="none",
        **({} if skip is None else {"exclude_modules": skip}))))
    shutil.copytree(folder, dest / "merged", ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(merged, str(dest / "merged" / "model.safetensors"), metadata={"format": "pt"})
    return dest / "merged"
