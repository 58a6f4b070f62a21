"""End to end through Ferrum's public API: the JAX backend generates the numpy backend's tokens."""

from __future__ import annotations

import pytest

import ferrum
from ferrum.random_checkpoint import write_random_checkpoint

#: Llama-like with GQA 4:2, odd sizes, tied embeddings.
CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=96, intermediate_size=80,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
    max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
)
PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7], [12, 30, 30, 4, 88, 2, 19, 45, 70, 11, 6, 23, 50]]


def _greedy(folder, backend: str) -> list[tuple[int, ...]]:
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    outputs = llm.run(PROMPTS, max_tokens=24, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in outputs]


def test_greedy_tokens_equal_the_cpu_backends(tmp_path):
    folder = write_random_checkpoint(tmp_path / "tiny", CONFIG, dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert [len(t) for t in got] == [24, 24, 24]
    assert got == want


#: GLM-4.5's layout (grouped sigmoid routing, random correction biases, an ungated shared expert, a dense first
#: layer, rope on half of each head), routed by the plugin's own moe_route.
GLM4_MOE = dict(
    architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", hidden_size=64, intermediate_size=80,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True, partial_rotary_factor=0.5,
    max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
)



#: DeepSeek-V3's layout: Multi-head Latent Attention (low-rank q, the KV latent expanded per head, interleaved rope on
#: 8 of each head's 24 q/k dims, values of 12 dims padded in the cache, YaRN's mscale) over grouped sigmoid routing.
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=64, intermediate_size=80,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=101,
    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
    rope_scaling=dict(type="yarn", factor=4.0, mscale=0.707, mscale_all_dim=1.0, original_max_position_embeddings=64),
    rope_theta=10000.0, rms_norm_eps=1e-6,
)



#: DeepSeek-V2's layout: latent attention with a plain q_proj (V2-Lite's), rope in adjacent pairs, over softmax
#: routing limited to the 2 of 4 groups holding the best experts, weights times routed_scaling_factor.
DEEPSEEK_V2 = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=64, intermediate_size=80,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=101,
    q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
    num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=2,
    first_k_dense_replace=1, routed_scaling_factor=16.0, max_position_embeddings=256, tie_word_embeddings=False,
    rope_theta=10000.0, rms_norm_eps=1e-6,
)



#: GLM-4.7-Flash's layout: DeepSeek-V3's latent attention over GLM-4.5's routing, a dense layer between sparse ones
#: as mlp_layer_types lists them.
GLM4_MOE_LITE = dict(
    architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite", hidden_size=64, intermediate_size=80,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=101,
    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, mlp_layer_types=["sparse", "dense", "sparse"],
    routed_scaling_factor=1.8, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
    rope_theta=10000.0, rms_norm_eps=1e-5,
)


#: ERNIE 4.5 MoE's layout: softmax routing whose correction bias (``moe_statics``, ``[1, E]``) only chooses, biased
#: projections, LM head and shared experts, interleaved rope, sparse layers 1 and 3 of 0-3.
ERNIE4_5_MOE = dict(
    architectures=["Ernie4_5_MoeForCausalLM"], model_type="ernie4_5_moe", hidden_size=64, intermediate_size=80,
    moe_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
    moe_num_experts=8, moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=3,
    moe_layer_interval=2, use_bias=True, max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)


#: K-EXAONE's layout: EXAONE 4's attention (q/k norms, sliding rotated layers, a full NoPE one) over grouped sigmoid
#: routing whose correction bias sits beside the router, a dense first layer.
EXAONE_MOE = dict(
    architectures=["ExaoneMoeForCausalLM"], model_type="exaone_moe", hidden_size=64, intermediate_size=80,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
    vocab_size=101, num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, num_shared_experts=1,
    first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, sliding_window=4,
    sliding_window_pattern=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)


#: MiniMax-M2's layout: q and k normed over their whole projections, rope on rotary_dim of each head's dims, experts on
#: every layer chosen by sigmoid scores plus the sparse MLP's own correction bias (one group, unscaled).
MINIMAX_M2 = dict(
    architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", hidden_size=64, intermediate_size=24,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=8, vocab_size=101,
    num_local_experts=8, num_experts_per_tok=3, max_position_embeddings=256, rope_theta=10000.0,
    tie_word_embeddings=False, rms_norm_eps=1e-6,
)


#: FlexOlmo's layout: OLMo 2's blocks (norms after attention and the MLP, q and k normed over their projections) with
#: OLMoE's softmax-routed experts, renormalized.
FLEX_OLMO = dict(
    architectures=["FlexOlmoForCausalLM"], model_type="flex_olmo", hidden_size=64, intermediate_size=24,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101, num_experts=7,
    num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=256, rope_theta=10000.0,
    tie_word_embeddings=False, rms_norm_eps=1e-6,
)


#: Solar Open's layout: Llama's attention with q/k/v biases, DeepSeek-V3's grouped sigmoid routing (two groups, one
#: kept, scaled) and a shared expert on every layer.
SOLAR_OPEN = dict(
    architectures=["SolarOpenForCausalLM"], model_type="solar_open", hidden_size=64, moe_intermediate_size=24,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
    routed_scaling_factor=2.5, attention_bias=True, max_position_embeddings=256, rope_theta=10000.0,
    tie_word_embeddings=False, rms_norm_eps=1e-5,
)


#: Mellum's layout: Qwen3-MoE's attention, sliding layers (a window of 4) under a full one, each kind with its own rope,
#: a dense first layer, softmax-routed experts on the others.
MELLUM = dict(
    architectures=["MellumForCausalLM"], model_type="mellum", hidden_size=64, intermediate_size=48,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=101, num_experts=8, num_experts_per_tok=2, sliding_window=4,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse"],
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
    max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
)


#: Hy3's layout: Qwen 3's attention, a dense first layer, sigmoid routing with the sparse MLP's own correction bias
#: (expert_bias), renormalized and scaled, and a shared MLP.
HY_V3 = dict(
    architectures=["HYV3ForCausalLM"], model_type="hy_v3", hidden_size=64, intermediate_size=48,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=101, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, router_scaling_factor=2.5,
    max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
)


#: Mistral 4's layout: DeepSeek-V3's latent attention with Llama 4's query scaling (from position 4 here), softmax
#: routing limited to the best of 2 groups by each group's two best probabilities, fused experts as transformers saves.
MISTRAL4 = dict(
    architectures=["Mistral4ForCausalLM"], model_type="mistral4", hidden_size=64, intermediate_size=80,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=101,
    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
    routed_scaling_factor=1.5, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                         original_max_position_embeddings=4, llama_4_scaling_beta=0.1),
    rms_norm_eps=1e-6,
)


#: DBRX's layout: biasless LayerNorms, q/k/v in one matrix clipped once projected, softmax-routed experts under ffn
#: (renormalized), its config's sizes nested in attn_config and ffn_config.
DBRX = dict(
    architectures=["DbrxForCausalLM"], model_type="dbrx", d_model=64, n_heads=4, n_layers=2, vocab_size=101,
    max_seq_len=256, attn_config=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=10000.0),
    ffn_config=dict(ffn_hidden_size=24, moe_num_experts=8, moe_top_k=3), tie_word_embeddings=False,
)


#: Gemma 4 26B-A4B's layout: sliding layers padded to the full layers' wider heads, k_eq_v full layers, and on every
#: layer the dense GeGLU MLP beside GeGLU experts routed by softmax times per-expert scales (the plugin's moe_route).
GEMMA4_MOE = dict(
    architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", hidden_size=64, intermediate_size=80,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
    num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
    sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"], vocab_size=101,
    enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24, final_logit_softcapping=30.0,
    max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6,
)


#: Kolibri-1's layout: sigmoid experts chosen by their logits plus correction biases (API 1.23), sliding layers.
KOLIBRI1 = dict(architectures=["Kolibri1ForCausalLM"], model_type="kolibri1", hidden_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=3, sliding_window=4,
                layer_types=["full_attention", "sliding_attention", "full_attention"], vocab_size=101,
                max_position_embeddings=256)
#: A.X-K2's layout: gated latent attention over DeepSeek-V3's grouped routing with the dropped groups masked by 0 (API
#: 1.28), four groups of two experts, three kept (these random biases choose no dropped expert: test_api_1_28.py's
#: cases do).
AXK2 = dict(architectures=["AXK2ForCausalLM"], model_type="axk2", hidden_size=64, intermediate_size=80,
            moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
            num_experts_per_tok=4, n_group=4, topk_group=3, n_shared_experts=1, index_topk=64, index_head_dim=16,
            index_n_heads=2, gated_norm_rank=6, vocab_size=101, max_position_embeddings=256)

#: LongCat-Flash-Lite's layout: LongCat-Flash's two latent-attention sub-blocks a layer and shortcut MoE with zero
#: experts, its token embedding summing hashed 4-gram embeddings that read each sequence's earlier tokens.
LONGCAT_FLASH_NGRAM = dict(
    architectures=["LongcatFlashNgramForCausalLM"], model_type="longcat_flash_ngram", hidden_size=64, num_layers=2,
    num_attention_heads=4, ffn_hidden_size=80, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, head_dim=8, v_head_dim=12, n_routed_experts=4, zero_expert_num=3, moe_topk=3,
    expert_ffn_hidden_size=24, routed_scaling_factor=2.0, vocab_size=101, max_position_embeddings=256,
    rope_theta=10000.0, ngram_vocab_size_ratio=3, emb_neighbor_num=4, emb_split_num=2)


@pytest.mark.parametrize("config", [GLM4_MOE, DEEPSEEK_V3, DEEPSEEK_V2, GLM4_MOE_LITE, ERNIE4_5_MOE, EXAONE_MOE,
                                    MINIMAX_M2, FLEX_OLMO, SOLAR_OPEN, MELLUM, HY_V3,
                                    MISTRAL4, DBRX, GEMMA4_MOE, KOLIBRI1, AXK2, LONGCAT_FLASH_NGRAM],
                         ids=lambda c: c["model_type"])
def test_moe_families_greedy_tokens_equal_the_cpu_backends(tmp_path, config):
    folder = write_random_checkpoint(tmp_path / config["model_type"], config, dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert got == want


_HYBRID = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, vocab_size=101, max_position_embeddings=256, linear_conv_kernel_dim=4,
               linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
               full_attention_interval=2, tie_word_embeddings=False)
#: Hybrid linear-attention layouts: Gated DeltaNet layers carrying a state per sequence (the plugin's own recurrent
#: ops), gated attention; Qwen3-Next's grouped projections over experts with a gated shared expert.
QWEN3_5 = dict(architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", **_HYBRID)
QWEN3_NEXT = dict(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40, **_HYBRID)


#: Granite 4.0-H's layout: Mamba-2 layers (the core's reference scan on the host) with two B/C groups and a biased
#: convolution, a NoPE attention layer, Granite's multipliers, experts beside the shared MLP.
GRANITE_H = dict(architectures=["GraniteMoeHybridForCausalLM"], model_type="granitemoehybrid", hidden_size=64,
                 intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=101, max_position_embeddings=256, layer_types=["mamba", "attention", "mamba"],
                 mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4,
                 num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=40, embedding_multiplier=3.0,
                 residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5, position_embedding_type="nope",
                 tie_word_embeddings=False)


#: Nemotron Nano 2's layout: blocks of one norm and one module, Mamba-2 (two B/C groups, heads narrower than the
#: width's share), attention without rope, squared-ReLU MLPs alone, in the releases' pattern string.
NEMOTRON_H = dict(architectures=["NemotronHForCausalLM"], model_type="nemotron_h", hidden_size=64,
                  intermediate_size=48, num_hidden_layers=6, hybrid_override_pattern="M-*-M-", num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=256, mamba_num_heads=8,
                  mamba_head_dim=12, n_groups=2, ssm_state_size=16, conv_kernel=4, tie_word_embeddings=False)


#: Nemotron 3 Nano's layout: Nemotron-H's blocks with MoE blocks ('E') of ungated squared-ReLU experts (the core's
#: experts on the plugin's ops: it has no moe_experts) routed in groups by corrected sigmoid scores, routed on the
#: device, and a squared-ReLU shared expert.
NEMOTRON_3 = dict(NEMOTRON_H, num_hidden_layers=7, hybrid_override_pattern="ME*E-ME", n_routed_experts=8,
                  num_experts_per_tok=3, moe_intermediate_size=24, moe_shared_expert_intermediate_size=40, n_group=2,
                  topk_group=1, routed_scaling_factor=2.5)


#: Falcon-H1's layout: attention and Mamba-2 side by side in every layer (K/V and a state per layer), two B/C
#: groups and the gated norm, muP multipliers folded at load. Bamba's: Mamba-2 and half-rotary attention layers.
#: Pure Mamba-2: no attention and no KV at all.
FALCON_H1 = dict(architectures=["FalconH1ForCausalLM"], model_type="falcon_h1", hidden_size=64, intermediate_size=48,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                 max_position_embeddings=256, mamba_d_ssm=96, mamba_n_heads=6, mamba_n_groups=2, mamba_d_state=8,
                 mamba_d_conv=4, mamba_rms_norm=True, mamba_norm_before_gate=False, embedding_multiplier=2.0,
                 lm_head_multiplier=0.5, key_multiplier=0.4, ssm_in_multiplier=1.25, ssm_out_multiplier=0.3,
                 mlp_multipliers=[0.8, 0.6], ssm_multipliers=[0.35, 0.25, 0.4, 0.5, 0.3], tie_word_embeddings=False)
BAMBA = dict(architectures=["BambaForCausalLM"], model_type="bamba", hidden_size=64, intermediate_size=48,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
             max_position_embeddings=256, attn_layer_indices=[1], mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16,
             mamba_d_conv=4, tie_word_embeddings=False)
MAMBA2 = dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", hidden_size=64, num_hidden_layers=3,
              num_heads=8, head_dim=16, n_groups=2, state_size=16, conv_kernel=4, vocab_size=101,
              tie_word_embeddings=False)

#: Kimi Linear's layout as released: Kimi Delta Attention layers (API 1.20's per-key-channel gate on the plugin's
#: gated_delta_rule, three convolutions per layer) around NoPE latent attention, DeepSeek-V3's grouped routing (random
#: correction biases) with a shared expert, a dense first layer.
KIMI_LINEAR = dict(architectures=["KimiLinearForCausalLM"], model_type="kimi_linear", hidden_size=64,
                   intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=101, max_position_embeddings=256, kv_lora_rank=16,
                   q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_experts=8,
                   num_experts_per_token=2, num_expert_group=2, topk_group=1, num_shared_experts=1,
                   first_k_dense_replace=1, routed_scaling_factor=2.5, mla_use_nope=True, tie_word_embeddings=False,
                   linear_attn_config={"head_dim": 8, "num_heads": 3, "short_conv_kernel_size": 4, "kda_layers": [1, 3],
                                       "full_attn_layers": [2]})
#: OLMo Hybrid's layout: Gated DeltaNet layers with one projection each and beta doubled (API 1.20's beta_scale), OLMo
#: 3's attention layer (norms after attention and MLP, q/k normed whole), rope.
OLMO_HYBRID = dict(architectures=["OlmoHybridForCausalLM"], model_type="olmo_hybrid", hidden_size=64,
                   intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=101, max_position_embeddings=256, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=8, linear_value_head_dim=12, tie_word_embeddings=False,
                   layer_types=["linear_attention", "full_attention", "linear_attention"])


#: RecurrentGemma's layout: RG-LRU blocks (API 1.25; random weights leave its decay near 0, where the reset hardly
#: shows: test_api_1_28.py's cases test it) and a local MQA attention block. Ling 3's: Gated DeltaNet layers with the
#: log-decay bounded below (API 1.27), latent attention, grouped sigmoid routing.
RECURRENT_GEMMA = dict(architectures=["RecurrentGemmaForCausalLM"], model_type="recurrent_gemma", hidden_size=64,
                       intermediate_size=96, num_attention_heads=4, conv1d_width=4, num_hidden_layers=3,
                       num_key_value_heads=1, attention_window_size=6, vocab_size=101)
BAILING_HYBRID = dict(architectures=["BailingHybridForCausalLM"], model_type="bailing_hybrid", hidden_size=64,
                      intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=12, num_local_experts=8, num_experts_per_tok=2, n_group=2,
                      topk_group=1, head_dim=8, short_conv_kernel_size=4, layer_group_size=4, first_k_dense_replace=1,
                      num_mtp_layers=0, vocab_size=101, max_position_embeddings=256)

#: Ring-linear 2.0's: lightning attention (ssd_update) with q/k norms, partial rope and grouped output norms between
#: Ling's attention layers, grouped sigmoid routing.
BAILING_MOE_LINEAR = dict(architectures=["BailingMoeLinearV2ForCausalLM"], model_type="bailing_moe_linear",
                          hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_shared_experts=1,
                          num_experts_per_tok=2, norm_topk_prob=True, first_k_dense_replace=1, layer_group_size=3,
                          group_norm_size=2, use_qk_norm=True, partial_rotary_factor=0.5, score_function="sigmoid",
                          moe_router_enable_expert_bias=True, n_group=2, topk_group=1, rms_norm_eps=1e-6,
                          rope_theta=10000.0, vocab_size=101, max_position_embeddings=256)


@pytest.mark.parametrize("config", [QWEN3_5, QWEN3_NEXT, GRANITE_H, NEMOTRON_H, NEMOTRON_3, FALCON_H1, BAMBA, MAMBA2,
                                    KIMI_LINEAR, OLMO_HYBRID, RECURRENT_GEMMA, BAILING_HYBRID, BAILING_MOE_LINEAR],
                         ids=lambda c: c["model_type"] + ("_moe" if "n_routed_experts" in c else ""))
def test_hybrid_families_greedy_tokens_equal_the_cpu_backends(tmp_path, config):
    folder = write_random_checkpoint(tmp_path / config["model_type"], config, dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert got == want


#: Gemma 4 E2B's layout: per-layer inputs, the last three layers reading layers 2, 4 and 2's keys and values (two
#: layers on one pool layer) with MLPs twice as wide, sliding layers' heads padded to the full layers' at load.
GEMMA4_E = dict(
    architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", hidden_size=64, intermediate_size=80,
    num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
    vocab_size=101, hidden_size_per_layer_input=16, vocab_size_per_layer_input=101, num_kv_shared_layers=3,
    use_double_wide_mlp=True, sliding_window=6, final_logit_softcapping=30.0,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention",
                                                                                   "full_attention"],
    max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6,
)


def test_gemma4_e_greedy_tokens_equal_the_cpu_backends(tmp_path):
    folder = write_random_checkpoint(tmp_path / "gemma4_e", GEMMA4_E, dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert got == want


#: LFM2's layout: gated short convolutions (the core's causal_conv1d on the host) carrying their last inputs per
#: sequence between attention layers with q/k norms, tied embeddings.
LFM2 = dict(architectures=["Lfm2ForCausalLM"], model_type="lfm2", hidden_size=64, intermediate_size=120,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
            max_position_embeddings=256, conv_L_cache=3, block_multiple_of=16,
            layer_types=["conv", "full_attention", "conv"])


def test_lfm2_greedy_tokens_equal_the_cpu_backends(tmp_path):
    folder = write_random_checkpoint(tmp_path / "lfm2", LFM2, dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert got == want


#: LFM2-MoE's layout: LFM2's layers over sigmoid routing with a per-expert bias (random here), a dense first layer.
LFM2_MOE = dict(architectures=["Lfm2MoeForCausalLM"], model_type="lfm2_moe", hidden_size=64, intermediate_size=96,
                moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=101, max_position_embeddings=256, num_experts=8, num_experts_per_tok=3, num_dense_layers=1,
                routed_scaling_factor=1.5, layer_types=["conv", "full_attention", "conv"])


def test_lfm2_moe_greedy_tokens_equal_the_cpu_backends(tmp_path):
    folder = write_random_checkpoint(tmp_path / "lfm2_moe", LFM2_MOE, dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert got == want


#: Mamba-1 layouts (the plugin's own selective_scan, API 1.19): Mamba's blocks alone, Falcon Mamba's step / B / C
#: norms, Jamba's Mamba-1 and rope-less attention layers over dense and unrenormalized expert MLPs.
MAMBA = dict(architectures=["MambaForCausalLM"], model_type="mamba", hidden_size=64, num_hidden_layers=3,
             vocab_size=101, state_size=8, conv_kernel=4, time_step_rank=6)
FALCON_MAMBA = dict(MAMBA, architectures=["FalconMambaForCausalLM"], model_type="falcon_mamba", use_bias=True,
                    use_conv_bias=False, tie_word_embeddings=False)
JAMBA = dict(architectures=["JambaForCausalLM"], model_type="jamba", hidden_size=64, intermediate_size=48,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
             max_position_embeddings=256, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
             expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, tie_word_embeddings=False)


@pytest.mark.parametrize("config", [MAMBA, FALCON_MAMBA, JAMBA], ids=lambda c: c["model_type"])
def test_mamba1_families_greedy_tokens_equal_the_cpu_backends(tmp_path, config):
    folder = write_random_checkpoint(tmp_path / config["model_type"], config, dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert got == want


#: ALiBi's layouts (plugin API 1.21): BLOOM's (six heads, the embeddings normed, q/k/v grouped by head) and MPT's
#: (q/k/v clipped), their positions only in the biases attention adds, here in the plugin's own kernel.
ALIBI = {
    "bloom": dict(architectures=["BloomForCausalLM"], model_type="bloom", hidden_size=96, n_layer=2, n_head=6,
                  vocab_size=101, tie_word_embeddings=True),
    "mpt": dict(architectures=["MptForCausalLM"], model_type="mpt", d_model=64, n_heads=4, n_layers=2,
                vocab_size=101, max_seq_len=256, attn_config={"clip_qkv": 0.8}),
}


@pytest.mark.parametrize("family", sorted(ALIBI))
def test_alibi_greedy_tokens_equal_the_cpu_backends(tmp_path, family):
    folder = write_random_checkpoint(tmp_path / family, ALIBI[family], dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert got == want
