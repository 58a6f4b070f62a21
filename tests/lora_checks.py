"""Checks of LoRA adapters against PEFT shared by the adapter test files (latent attention's, shared experts')."""

from __future__ import annotations

import copy

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
    """The adapter at ``folder`` moves ``hf``'s logits, adapts ``adapted`` projections, and gives PEFT's merged
    model's in one pass and decoding, with a second slot loaded (each token must take its own); without it, the
    base model's."""
    want = reference_logits(merged, tokens)
    assert scaled_error(reference_logits(hf, tokens), want) > 0.1  # the adapter moves the logits
    model = DecoderOnlyLLM.from_pretrained(base, backend=backend, block_size=4, dtype="float32")
    assert model.adapters.load("a", folder).projections == adapted
    model.adapters.load("b", folder)
    assert scaled_error(adapted_logits(model, tokens, "a"), want) <= 1e-4
    model.forward([ForwardItem("steps", tokens[:5], 0, adapter="a")])
    for pos in range(5, len(tokens)):
        out = model.forward([ForwardItem("steps", [tokens[pos]], pos, adapter="a")])
        assert scaled_error(model.ops.to_numpy(out.logits)[0], want[pos]) <= 1e-4, pos
    assert scaled_error(adapted_logits(model, tokens, None), reference_logits(hf, tokens)) <= 1e-4


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
