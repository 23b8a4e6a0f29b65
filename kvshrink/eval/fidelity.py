"""Fidelity metrics: how far a compressed cache's next-token distributions drift from the uncompressed
model's on the same tokens (KL divergence and top-1 agreement), and perplexity bookkeeping."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(P_ref || P) in nats from log-probabilities ``(..., V)``; returns ``(...)``.

    Computed in float32 whatever the inputs' dtype. Positions where the reference gives a token zero
    probability contribute nothing for that token (0 * log 0 = 0), as the definition says.
    """
    ref_logp, logp = ref_logp.float(), logp.float()
    p = ref_logp.exp()
    terms = p * (ref_logp - logp)
    terms = torch.where(p > 0, terms, torch.zeros_like(terms))
    return terms.sum(-1).clamp_min(0.0)  # clamp: float rounding can give -1e-9 for identical rows


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position bool: do both distributions put their highest score on the same token?"""
    return ref_logits.argmax(-1) == logits.argmax(-1)


def token_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``targets (...)`` under log-probabilities ``(..., V)``."""
    return -logp.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass
class Accumulator:
    """Running sums over scored tokens (across windows) for perplexity, KL and top-1."""

    nll_sum: float = 0.0
    tokens: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    top1_hits: int = 0
    compared: int = 0
    window_nlls: list[float] = field(default_factory=list)

    def add(self, nll: torch.Tensor, kl: torch.Tensor | None = None, top1: torch.Tensor | None = None) -> None:
        self.nll_sum += float(nll.double().sum())
        self.tokens += nll.numel()
        if kl is not None:
            self.kl_sum += float(kl.double().sum())
            self.kl_max = max(self.kl_max, float(kl.max())) if kl.numel() else self.kl_max
            self.top1_hits += int(top1.sum())
            self.compared += kl.numel()

    @property
    def ppl(self) -> float | None:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else None

    @property
    def kl(self) -> float | None:
        return self.kl_sum / self.compared if self.compared else None

    @property
    def top1(self) -> float | None:
        return self.top1_hits / self.compared if self.compared else None
