"""The whole Switch model as one module, for models small enough to hold in memory.

Used for training the embedded tiny model and as the in-memory twin of the streamed runner
(`runtime.py`), which executes the very same `Block` code one block at a time. The state dict
uses Hugging Face's names, so `save_pretrained`-style files load into it directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...files import atomic_directory, save_tensors_atomic
from .config import SwitchConfig
from .layers import Block, RMSNorm, padding_bias, position_bias


class Stack(nn.Module):
    def __init__(self, config: SwitchConfig, stack: str):
        super().__init__()
        if not config.tie_word_embeddings:  # its own input embedding, as transformers 5 builds it
            self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.block = nn.ModuleList(Block(config, stack, i) for i in range(config.num_blocks(stack)))
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class SwitchModel(nn.Module):
    """Encoder-decoder Switch Transformer with a language-model head, in Hugging Face's layout:
    tied, one embedding `shared` serves both stacks and the head; untied, `shared` is kept but
    unused, each stack has its own `embed_tokens` and the head is `lm_head`."""

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, "encoder")
        self.decoder = Stack(config, "decoder")
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def _embedding(self, stack: Stack) -> nn.Embedding:
        return self.shared if self.config.tie_word_embeddings else stack.embed_tokens

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] int64, attention_mask [B, S] (1 = token) -> [B, S, d]."""
        x = self._embedding(self.encoder)(input_ids)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        bias = position_bias(table, self.config, x.shape[1], x.shape[1], bidirectional=True)
        bias = bias + padding_bias(attention_mask, x.shape[1]).to(bias.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_input_ids [B, T], memory [B, S, d] -> logits [B, T, vocab]."""
        x = self._embedding(self.decoder)(decoder_input_ids)
        table = self.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        self_bias = position_bias(table, self.config, x.shape[1], x.shape[1], bidirectional=False)
        cross_bias = padding_bias(attention_mask, x.shape[1]).to(x.device)
        for block in self.decoder.block:
            x = block(x, self_bias, memory, cross_bias)
        x = self.decoder.final_layer_norm(x)
        head = self.shared if self.config.tie_word_embeddings else self.lm_head
        return lm_logits(x, head.weight, self.config)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, config: SwitchConfig) -> torch.Tensor:
    """Final hidden states [..., d] and the head's matrix [vocab, d] -> logits [..., vocab].

    Tied, the hidden states are scaled by d_model^-0.5 first (Mesh TensorFlow's convention,
    which the checkpoints were trained with); an untied head is used as is.
    """
    if config.tie_word_embeddings:
        hidden = hidden * config.d_model ** -0.5
    return F.linear(hidden, weight)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs from labels [..., T]: start token, then labels[:-1] (-100 -> pad)."""
    shifted = labels.new_full(labels.shape, start_id)
    shifted[..., 1:] = labels[..., :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


def random_model(config: SwitchConfig, seed: int = 0) -> SwitchModel:
    """A freshly initialised model with router weights drawn at std 1, so tokens spread over
    every expert (the default init routes nearly all tokens alike): what tests and benchmarks
    compress when the weights need no training."""
    torch.manual_seed(seed)
    model = SwitchModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name:
                param.normal_(0, 1.0)
    return model


def save_pretrained(model: SwitchModel, directory: Path) -> None:
    """Write `model` in the Hugging Face layout (config.json + model.safetensors).

    `transformers` loads the result as `SwitchTransformersForConditionalGeneration`. The
    expert capacity is set high because our runtime never drops tokens; a lower value would
    make `transformers` drop some and disagree. Written to a temporary name, then renamed.
    """
    config = {
        **model.config.to_dict(),
        "model_type": "switch_transformers",
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "is_encoder_decoder": True,
        "dense_act_fn": "relu",
        "router_dtype": "float32",
        "expert_capacity": 1 << 20,
        "dropout_rate": 0.0,
    }
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_tensors_atomic(state, tmp / "model.safetensors")
