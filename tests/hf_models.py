"""Tiny random Switch checkpoints written by `transformers`, our reference implementation."""

from __future__ import annotations

from pathlib import Path

import torch


def save_hf_switch(directory: Path, *, num_experts: int = 4, sparse_step: int = 2, tied: bool = True,
                   layers: int = 2, d_model: int = 16, d_ff: int = 32, vocab: int = 96, seed: int = 0,
                   safe_serialization: bool = True) -> Path:
    """Write a random `SwitchTransformersForConditionalGeneration` with `save_pretrained`."""
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
        # Switch checkpoints have ONE input embedding (`shared`); transformers 5 unties the
        # encoder/decoder copies from it when the head is untied, so tie them back by value.
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(directory)
    if not safe_serialization:  # transformers 5 writes safetensors only: make the legacy shard
        from safetensors.torch import load_file
        weights = directory / "model.safetensors"
        torch.save(load_file(weights), directory / "pytorch_model.bin")
        weights.unlink()
    return directory
