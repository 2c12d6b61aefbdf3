"""Tiny random Switch checkpoints written by `transformers`, our reference implementation."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def save_hf_switch(directory: Path, *, num_experts: int = 4, sparse_step: int = 2, tied: bool = True,
                   layers: int = 2, d_model: int = 16, d_ff: int = 32, vocab: int = 96, seed: int = 0,
                   one_embedding: bool = False, safe_serialization: bool = True) -> Path:
    """Write a random `SwitchTransformersForConditionalGeneration` with `save_pretrained`
    (sparse blocks: every `sparse_step`-th, from block 1; every block for step 1).

    `one_embedding`: each stack's input embedding equal to `shared`, as transformers 4 wrote
    untied checkpoints (see `drop_stack_embeddings`).
    """
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    config = SwitchTransformersConfig(
        vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers,
        num_heads=2, num_experts=num_experts, encoder_sparse_step=sparse_step, decoder_sparse_step=sparse_step,
        expert_capacity=1 << 20, tie_word_embeddings=tied, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, dropout_rate=0.0, decoder_start_token_id=0,
    )
    model = SwitchTransformersForConditionalGeneration(config).eval()
    # Random init scales make every token pick the same expert; spread routers out so every
    # expert gets traffic and the parity check exercises the gather / scatter paths.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name:
                param.normal_(0, 2.0)
        if one_embedding:
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    # Untied, transformers 5 keeps four matrices (`shared`, each stack's `embed_tokens`,
    # `lm_head`), all different; tied, it stores `shared` alone.
    model.save_pretrained(directory)
    if not safe_serialization:  # transformers 5 writes safetensors only: make the legacy shard
        from safetensors.torch import load_file
        weights = directory / "model.safetensors"
        torch.save(load_file(weights), directory / "pytorch_model.bin")
        weights.unlink()
    return directory


def drop_stack_embeddings(source: Path, target: Path) -> Path:
    """A copy of checkpoint `source` without the stacks' own input embeddings: only `shared.weight`,
    as on the hub for switch-c-2048."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        del tensors[name]
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


# Tiny decoder-only MoE configs per family: 4 heads over 2 key/value heads (grouped queries),
# top-2 of 4 experts, 3 blocks. Qwen2-MoE has a gated shared expert and a dense block
# (`mlp_only_layers`); Mixtral a sliding window shorter than the longest test sample.
_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, initializer_range=0.2, num_experts_per_tok=2)
DECODER_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, sliding_window=9)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=24, head_dim=12, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, clip_qkv=3.0, eos_token_id=1, pad_token_id=0)),
    # A dense first block, one shared expert, 8 experts in 4 groups of which the best 2 are
    # eligible, multi-head latent attention with a low-rank query (MLA needs as many key/value
    # heads as query heads in transformers' implementation, as the real checkpoints have).
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=8, moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1,
                         n_group=4, topk_group=2, num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=8,
                         qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=6, routed_scaling_factor=2.5)),
    # Alternating sliding (window 5) and full blocks with sinks, router and expert biases,
    # YaRN with transformers' own defaults, a swiglu_limit low enough to clamp.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, intermediate_size=24, head_dim=8, sliding_window=5, swiglu_limit=1.5,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 8},
                     max_position_embeddings=64)),
    # 4 blocks: experts on blocks 1 and 3 (a dense MLP of its own width on 0 and 2), top-1
    # sigmoid routing onto the input, a shared expert, chunks of 6 on the rotary blocks, block 3
    # NoPE with a query temperature that moves within the samples (floor_scale 4), llama3 rope.
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(num_local_experts=4, intermediate_size=24, intermediate_size_mlp=40, head_dim=8,
                         num_hidden_layers=4, interleave_moe_layer_step=2, num_experts_per_tok=1,
                         attention_chunk_size=6, floor_scale=4, attn_scale=0.5, attention_bias=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16},
                         max_position_embeddings=64)),
}


# deepseek-ai/DeepSeek-V3's config.json (the fields the model reads; transformers 4 spelling).
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}


# GLM-4.5 as its real config has it: DeepSeek-V3's routing (8 experts in 4 groups, the best 2
# eligible, correction bias, times 2.5), a dense first block and a shared expert, over grouped
# queries with q/k/v biases, per-head q/k norms and RoPE on half of each 12-wide head.
# DeepSeek-V2 as DeepSeek-V2 (not Lite) has it: group-limited softmax routing (top-3 within the best
# 2 of 4 groups, so that the groups matter: top-2 would lie in the best 2 anyway) times 16, two
# shared experts, a dense first block, MLA with a low-rank query and DeepSeek's YaRN (mscale =
# mscale_all_dim: cos and sin unscaled, the softmax scale times 1.59) over an original context
# of 16 that longer test samples exceed.
DECODER_FAMILIES.update({
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(n_routed_experts=8, moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1,
                      n_group=4, topk_group=2, routed_scaling_factor=2.5, head_dim=12, partial_rotary_factor=0.5,
                      use_qk_norm=True, attention_bias=True, eos_token_id=[1, 2], pad_token_id=3)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(n_routed_experts=8, moe_intermediate_size=24, n_shared_experts=2, first_k_dense_replace=1,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
                         routed_scaling_factor=16.0,
                         num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=8,
                         qk_nope_head_dim=6, v_head_dim=6, max_position_embeddings=640,
                         rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})),
})


def save_hf_decoder(directory: Path, family: str, seed: int = 0, config_override: dict | None = None):
    """Write a random decoder-only MoE of `family` with `save_pretrained`; returns the model.
    `config_override`: config arguments that replace or add to the family's tiny ones."""
    import transformers

    config_name, model_name, extra = DECODER_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**_COMMON, **extra, **(config_override or {})})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # spread the routers so every expert gets tokens and top-k ties are rare
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and ".experts." not in name and "shared_expert_gate" not in name:
                param.normal_(0, 1.0)
        for name, param in model.named_parameters():
            # GPT-OSS: nonzero sinks and biases (transformers initialises the expert biases to 0),
            # a decisive router; Llama 4: a decisive router too (its own init is 0.2-wide).
            if name.endswith(("sinks", "_proj_bias", "router.bias")):
                param.normal_(0, 0.5)
            elif name.endswith("router.weight"):
                param.normal_(0, 1.0)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: nonzero, so it must be honoured
                buffer.normal_(0, 0.3)
    model.save_pretrained(directory)
    return model


def causal_lm_loss(model, sequences: list[list[int]]) -> float:
    """transformers' token-weighted mean next-token loss over `sequences` (each run alone)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            total += model(input_ids=ids, labels=ids).loss.double().item() * (len(seq) - 1)
            count += len(seq) - 1
    return total / count


def write_causal_tokenizer_json(directory: Path, vocab_size: int = 64):
    """A word-level `tokenizer.json` in `directory` over words w0, w1, ... (ids 4 on) after <unk>,
    <s>, </s>, <pad> (0-3), whose post-processor prepends <s> (as Mixtral's); returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = [f"w{i}" for i in range(vocab_size - 4)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    return tok
