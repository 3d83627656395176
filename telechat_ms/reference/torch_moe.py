"""Torch reference of the TeleChat2-39B-A12B MoE FFN (spec 12), written from the spec and MindFormers' routing
rule, independently of telechat_ms.model: per-expert loops over the tokens that chose each expert, no slot buffers.

Router: a bias-free hidden -> E linear in fp32, softmax, top-k, the k weights renormalized to sum to 1. Training
capacity (MindFormers' TopkRouterV2, k-major): choices are served in the order (1st choice of token 0, 1st choice
of token 1, ..., 2nd choice of token 0, ...); an expert keeps its first `capacity` choices, the others are dropped.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """One SwiGLU expert with the released names (gate_proj, up_proj, down_proj + bias)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def capacity_of(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """MindFormers' per-expert capacity: min(ceil(k * tokens * factor / E), tokens); factor <= 0: every token."""
    if capacity_factor <= 0:
        return tokens
    return min(math.ceil(top_k * tokens * capacity_factor / num_experts), tokens)


def kept_choices(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """bool [N, k]: which (token, choice) pairs fit their expert's capacity, served in k-major order."""
    n, k = experts.shape
    used = [0] * num_experts
    keep = torch.zeros(n, k, dtype=torch.bool)
    for j in range(k):
        for t in range(n):
            e = int(experts[t, j])
            if used[e] < capacity:
                used[e] += 1
                keep[t, j] = True
    return keep


class MoE(nn.Module):
    """The MoE FFN (HF names: router, local_experts.E.*)."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, norm_topk_prob: bool = True) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.local_experts = nn.ModuleList(Expert(hidden, ffn) for _ in range(num_experts))

    def route(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities [N, E] fp32, weights [N, k], experts [N, k]) of the tokens x2d [N, H]."""
        logits = F.linear(x2d.float(), self.router.weight.float())
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def forward(self, x: torch.Tensor, capacity_factor: float = 0.0) -> torch.Tensor:
        return self.forward_stats(x, capacity_factor)[0]

    def forward_stats(self, x: torch.Tensor, capacity_factor: float = 0.0, aux_factor: float = 0.0):
        """(output like x, aux loss, tokens routed per expert [E], dropped choices) of x [..., H]."""
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        probs, weights, experts = self.route(x2d)
        cap = capacity_of(x2d.shape[0], self.top_k, self.num_experts, capacity_factor)
        keep = kept_choices(experts, self.num_experts, cap)
        out = torch.zeros_like(x2d)
        for e, expert in enumerate(self.local_experts):
            rows, slots = torch.nonzero((experts == e) & keep, as_tuple=True)
            if rows.numel():
                y = expert(x2d[rows]) * weights[rows, slots, None].to(x2d.dtype)
                out.index_add_(0, rows, y)
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).float()
        share = counts / experts.numel()
        aux = aux_factor * self.num_experts * (probs.mean(dim=0) * share).sum()
        return out.reshape(shape), aux, counts, int((~keep).sum())
