"""H2O: Heavy-Hitter Oracle.

Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen. "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models", NeurIPS 2023 (arXiv 2306.14048), Sec. 3 /
Alg. 1: each token's score is the attention it has received, accumulated over all queries so far
(the prompt's queries at prefill, then each decoded query); the cache keeps the ``recent`` newest tokens
and fills the rest of the budget with the highest-scoring ("heavy hitter") tokens, evicting at prefill
and at every decoding step. Paper setting: 20% budget, half heavy hitters, half recent.

Scores are per key head (mean over the query heads of a GQA group) and are state held by the cache:
``acc`` is fp32 per held token and head, counted in ``nbytes()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policy import HookedPolicy, PolicyLayer, check_budget, force, resolve_budget, topk_keep
from ..registry import register
from .base import require


class H2OLayer(PolicyLayer):
    state_fields = ("npad", "acc")
    token_fields = ("acc",)

    def __init__(self, inner, layer_idx, info, budget: float, recent: float) -> None:
        super().__init__(inner, layer_idx, info)
        self.budget, self.recent = budget, recent
        self.acc = None

    def queries_needed(self, n: int) -> int:
        return n if self.active else 0

    def _extend_meta(self, n, K):
        if self.acc is not None:
            self.acc = torch.cat([self.acc, self.acc.new_zeros(*self.acc.shape[:2], n)], dim=-1)
        return None

    def choose(self, K, V, n, valid):
        T = K.shape[-2]
        mass = self.group_mass(K, valid, n, n)  # attention each key gets from the n new queries
        acc = self.acc if self.acc is not None else mass.new_zeros(*mass.shape[:2], 0)
        pad = T - acc.shape[-1]
        self.acc = torch.cat([acc, acc.new_zeros(*acc.shape[:2], pad)], dim=-1) + mass
        cap = resolve_budget(self.budget, self.seen + n)
        if T <= cap:
            return None
        r = min(cap, int(round(self.recent * cap)))
        recent = (torch.arange(T, device=K.device) >= T - r).expand_as(self.acc)
        return topk_keep(force(self.acc, recent), cap, valid)


@register
@dataclass
class H2O(HookedPolicy):
    """Heavy hitters (accumulated attention) + recent tokens, evicted at prefill and every step (Zhang et al. 2023)."""

    name = "h2o"
    paper = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (arXiv 2306.14048)"

    budget: float = field(default=0.2, metadata={
        "help": "tokens held per layer and head: a fraction of tokens seen (paper: 0.2) or a count (> 1)"})
    recent: float = field(default=0.5, metadata={"help": "share of the budget given to the newest tokens (paper: 0.5)"})

    def __post_init__(self) -> None:
        check_budget("h2o", self.budget)
        require(0.0 <= self.recent <= 1.0, f"h2o: recent={self.recent} is the share of the budget for recent tokens; use 0..1")

    def wrap(self, inner, layer_idx, info):
        return H2OLayer(inner, layer_idx, info, self.budget, self.recent)
