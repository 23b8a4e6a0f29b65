"""StreamingLLM: attention sinks plus a window of recent tokens.

Xiao, Tian, Chen, Han, Lewis. "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv 2309.17453), Sec. 3.2: keep the KV of the first ``sinks`` tokens (4 in the paper) and of the most
recent tokens; evict everything in between, at prefill and at every decoding step.

Here keys are stored after RoPE, so kept tokens keep their positions in the text (the paper re-assigns
positions inside the cache so that a model can run past its trained length: that is ``lminfinite``'s job
in kvshrink). Left padding is never counted as a sink.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policy import HookedPolicy, PolicyLayer, check_budget, is_count, resolve_budget, topk_keep
from ..registry import register
from .base import require


class StreamingLayer(PolicyLayer):
    def __init__(self, inner, layer_idx, info, sinks: int, budget: float) -> None:
        super().__init__(inner, layer_idx, info)
        self.sinks, self.budget = sinks, budget

    def choose(self, K, V, n, valid):
        T = K.shape[-2]
        cap = resolve_budget(self.budget, self.seen + n)
        if T <= cap:
            return None
        B, H = K.shape[:2]
        real = valid if valid is not None else torch.ones(B, H, T, dtype=torch.bool, device=K.device)
        rank = real.cumsum(-1) - 1  # position among real (non-padding) tokens
        sink = real & (rank < self.sinks)
        # recency is the score; sinks outrank everything (earlier sinks first if the cap is below `sinks`)
        score = torch.arange(T, device=K.device, dtype=torch.float32).expand(B, H, T)
        score = torch.where(sink, 2.0 * T + (T - score), score)
        return topk_keep(score, cap, valid)


@register
@dataclass
class StreamingLLM(HookedPolicy):
    """Attention sinks + recent window (Xiao et al. 2024): the first `sinks` tokens and the newest ones."""

    name = "streamingllm"
    paper = "Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks (arXiv 2309.17453)"

    sinks: int = field(default=4, metadata={"help": "initial tokens always kept (attention sinks; paper: 4)"})
    budget: float = field(default=2004, metadata={
        "help": "tokens held per layer and head, sinks included: a count (> 1) or a fraction of tokens seen "
                "(paper's reference code: 4 sinks + 2000 recent)"})

    def __post_init__(self) -> None:
        require(self.sinks >= 0, f"streamingllm: sinks={self.sinks} must be >= 0")
        check_budget("streamingllm", self.budget)
        if is_count(self.budget):
            require(self.budget > self.sinks,
                    f"streamingllm: budget={int(self.budget)} leaves no room for recent tokens after {self.sinks} sinks; "
                    f"use budget > {self.sinks}")

    def wrap(self, inner, layer_idx, info):
        return StreamingLayer(inner, layer_idx, info, self.sinks, self.budget)
