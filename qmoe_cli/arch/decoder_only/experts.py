"""Routed experts beyond plain SwiGLU, and experts stored fused.

GPT-OSS's expert is a clamped SwiGLU with biases: `down(act(gate(x) + b_g, up(x) + b_u)) + b_d`,
act(g, u) = (clamp(u, -L, L) + 1) * g' * sigmoid(alpha * g'), g' = min(g, L). Its weights map onto
our gated-expert layout as three matrices: gate [ff, d] and up [ff, d] (the alternating columns
of the checkpoint's gate_up_proj [E, d, 2 ff], transposed) share the input's Hessian, then down
[d, ff]. The biases are not matrices: they stay full precision as block parameters
(`ExpertBiases`, stored with the block's other non-expert tensors in every checkpoint kind), and
a block binds expert j's to the expert module it runs (`DecoderBlock.bind_expert`), so a bank of
any kind (original, quantized, packed) supplies only the matrices.

Fused layouts (`DecoderConfig.expert_layout`): GPT-OSS and Llama 4 store a block's experts as
gate_up_proj [E, d, 2 ff] and down_proj [E, ff, d] (`x @ W`, not `W x`); `fused_source` names the
tensor and the row-j view that gives one of our matrices.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from .config import DecoderConfig


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's activation of the gate and up outputs [n, ff] -> [n, ff]: the gate clamped from
    above, the up both ways (and + 1), as transformers' `GptOssExperts._apply_gate`."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class ClampedSwiGLU(nn.Module):
    """A GPT-OSS expert from three linear modules (weights or decode-matmuls) and, once bound,
    its biases (gate [ff], up [ff], down [d]; None: an unbound expert, as a bank hands it out)."""

    def __init__(self, names: tuple[str, str, str], parts: Mapping[str, nn.Module], alpha: float, limit: float,
                 biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.names, self.alpha, self.limit, self.biases = names, alpha, limit, biases
        for name in names:
            self.add_module(name, parts[name])

    def with_biases(self, biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> "ClampedSwiGLU":
        """The same matrices with expert j's biases (a new module: banks may keep the unbound one)."""
        return ClampedSwiGLU(self.names, {n: getattr(self, n) for n in self.names}, self.alpha, self.limit, biases)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, d] -> the down projection's input [n, ff]."""
        gate, up, _ = (getattr(self, n) for n in self.names)
        g, u = gate(x), up(x)
        if self.biases is not None:
            g, u = g + self.biases[0], u + self.biases[1]
        return clamped_swiglu(g, u, self.alpha, self.limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, d] -> [n, d]."""
        out = getattr(self, self.names[2])(self.hidden(x))
        return out if self.biases is None else out + self.biases[2]

    @classmethod
    def from_parts(cls, config: DecoderConfig, parts: Mapping[str, torch.Tensor | nn.Module]) -> "ClampedSwiGLU":
        """An unbound expert from weights ([rows, cols], used without a copy) or modules."""
        modules = {}
        for name in config.expert_matrices:
            part = parts[name]
            if isinstance(part, torch.Tensor):
                with torch.device("meta"):
                    linear = nn.Linear(1, 1, bias=False)
                linear.weight = nn.Parameter(part, requires_grad=False)
                part = linear
            modules[name] = part
        return cls(config.expert_matrices, modules, config.swiglu_alpha, config.swiglu_limit)


class ExpertBiases(nn.Module):
    """All routed experts' biases of one block, named as GPT-OSS stores them under
    `mlp.experts.`: gate_up_proj_bias [E, 2 ff] (gate and up alternating) and down_proj_bias [E, d]."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(config.num_experts, 2 * config.moe_intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def of(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert j's gate [ff], up [ff] and down [d] biases."""
        both = self.gate_up_proj_bias[j]
        return both[0::2], both[1::2], self.down_proj_bias[j]


def fused_source(config: DecoderConfig, prefix: str, matrix: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Where expert matrix `matrix` lives in a fused layout: the tensor's name under the block's
    MoE `prefix` ("model.layers.3.mlp.") and a function from that tensor's row j (gate_up
    [d, 2 ff] or down [ff, d]) to the matrix [rows, cols] (a view)."""
    gate, up, down = config.expert_matrices
    ff = config.moe_intermediate_size
    if matrix == down:
        return f"{prefix}experts.down_proj", lambda t: t.T
    first = matrix == gate
    if config.expert_layout == "fused_interleaved":
        select = (lambda t: t[:, 0::2].T) if first else (lambda t: t[:, 1::2].T)
    else:
        select = (lambda t: t[:, :ff].T) if first else (lambda t: t[:, ff:].T)
    assert matrix in (gate, up), matrix
    return f"{prefix}experts.gate_up_proj", select
