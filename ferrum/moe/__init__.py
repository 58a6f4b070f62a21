"""Mixture-of-experts MLPs (Mixtral, Qwen, OLMoE, GraniteMoE, gpt-oss, GLM-4.5, DeepSeek-V3, Gemma 4 26B-A4B...):
routing, stacked experts, loading.

Modules: :mod:`~ferrum.moe.spec` (config keys, which layers are sparse),
:mod:`~ferrum.moe.routing` (the softmax and grouped sigmoid rules), :mod:`~ferrum.moe.experts`
(stacked host forms, placing them), :mod:`~ferrum.moe.loading` (checkpoint
layouts), :mod:`~ferrum.moe.block` (the sparse MLP the model calls),
:mod:`~ferrum.moe.kind` (its MLP slot kind) and :mod:`~ferrum.moe.beside` (Gemma 4's
dense MLP and sparse MLP side by side, another kind). Nothing is imported here: the
family table imports :mod:`~ferrum.moe.spec` while the config module loads.
"""
