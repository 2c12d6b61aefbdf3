"""The decoder families' top-k routers, one module over `DecoderConfig.router`: softmax top-k
(Mixtral, Qwen, OLMoE), DeepSeek-V3's and GLM's sigmoid scores with a correction bias and
group-limited choice, DeepSeek-V2's group-limited softmax, GPT-OSS's softmax over the selected
logits and Llama 4's sigmoid top-1. Scores in fp32 whatever the model's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


class Router(nn.Module):
    """Top-k router (`DecoderConfig.router`): softmax top-k, DeepSeek-V3's sigmoid scores with
    group-limited choice, or DeepSeek-V2's group-limited softmax."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        if config.router_bias:
            self.bias = nn.Parameter(torch.zeros(config.num_experts))
        if config.router == "sigmoid_group":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> expert indices [N, k] int64 and their weights [N, k] fp32.

        fp32 whatever the model dtype, as for Switch: bf16 near-ties flip the chosen experts.
        """
        c = self.config
        logits = F.linear(x.float(), self.weight.float(), self.bias.float() if c.router_bias else None)  # [N, E]
        if c.router in ("softmax_selected", "sigmoid_topk"):  # GPT-OSS, Llama 4: the top logits alone
            top, index = torch.topk(logits, c.top_k, dim=-1)
            return index, torch.softmax(top, dim=-1) if c.router == "softmax_selected" else torch.sigmoid(top)
        if c.router == "softmax_topk":
            weight, index = torch.topk(torch.softmax(logits, dim=-1), c.top_k, dim=-1)
            if c.norm_topk_prob:
                weight = weight / weight.sum(dim=-1, keepdim=True)
            return index, weight * c.routed_scaling_factor
        if c.router == "softmax_group":
            return self._softmax_group(torch.softmax(logits, dim=-1))
        scores = logits.sigmoid()
        biased = scores + self.e_score_correction_bias.float()  # chooses experts; weights leave it out
        groups = biased.view(-1, c.n_group, c.num_experts // c.n_group)
        group_score = groups.topk(min(2, groups.shape[-1]), dim=-1)[0].sum(dim=-1)  # [N, n_group]: its best two
        chosen = torch.zeros_like(group_score).scatter_(1, group_score.topk(c.topk_group, dim=-1)[1], 1.0)
        eligible = chosen.bool()[:, :, None].expand_as(groups).reshape(-1, c.num_experts)
        index = biased.masked_fill(~eligible, float("-inf")).topk(c.top_k, dim=-1)[1]
        weight = scores.gather(1, index)
        if c.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return index, weight * c.routed_scaling_factor

    def _softmax_group(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [N, E] fp32 (softmax) -> top-k among the `topk_group` groups with the highest
        single score. Other groups' scores become 0, not -inf, as in transformers: with fewer
        eligible experts than k a zero-weight expert fills the slot and adds nothing."""
        c = self.config
        groups = scores.view(-1, c.n_group, c.num_experts // c.n_group)
        chosen = torch.zeros_like(groups[..., 0]).scatter_(1, groups.amax(dim=-1).topk(c.topk_group, dim=-1)[1], 1.0)
        eligible = chosen.bool()[:, :, None].expand_as(groups).reshape(-1, c.num_experts)
        weight, index = scores.masked_fill(~eligible, 0.0).topk(c.top_k, dim=-1)
        return index, weight * c.routed_scaling_factor
