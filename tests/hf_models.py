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
