"""MiKV: mixed-precision KV cache — evicted tokens are kept at low precision instead of dropped.

Yang, Kim, Bae, Kwon, Jeong, Lee, Park, Kang, Kim, Lee. "No Token Left Behind: Reliable KV Cache Compression
via Importance-Aware Mixed Precision Quantization" (arXiv 2402.18096). Implemented:

* Importance (following H2O): a token's importance is the attention it has received, accumulated over
  every query so far (summed over the query heads sharing its KV head). The queries are recomputed from a
  forward pre-hook on the attention module, so the model keeps running SDPA/flash attention.
* Importance-aware mixed precision: per KV head, the ``recent`` fraction of newest tokens and the ``heavy`` fraction
  of tokens with the highest accumulated importance ("heavy hitters") stay at high precision (``hi_bits``:
  16 = 16-bit, or 8/4-bit per-token quantization); every other token is *demoted* to ``lo_bits`` per-token
  quantization rather than evicted. Demotion is final (the high-precision copy is freed).
* Outlier-aware balancing of the low-precision part: key outlier channels make per-token low-bit
  quantization coarse, so the low-precision keys are divided per channel by a balancer
  ``s = sqrt(max|K| / max|Q|)`` (the SmoothQuant α = 0.5 split between queries and keys), computed once from
  the first chunk's keys and queries and stored; dequantized keys are multiplied by ``s`` again, so attention
  sees the original scale. On SmolLM2-135M it is what makes 2-bit keys usable at all (perplexity 35 with it,
  256 without, on lcet10).

Budgets are fractions of the tokens seen, so the high-precision part grows with the context (20% by default:
10% recent + 10% heavy hitters, as in the paper's H2O-based setting); demotions happen every step, a token at a
time, as the recent window moves and heavy hitters change.

Layout per layer, all counted by ``nbytes()``: ``hi_k``/``hi_v`` (``(B, H, Th, D)`` 16-bit, or packed per-token
codes + fp16 scale/zero), ``hi_score`` (fp32 importance of the high-precision tokens; demoted tokens can never
come back, so theirs is dropped), ``lo_k``/``lo_v`` (packed per-token codes + fp16 scale/zero per ``group``
channels; 32 by default where it divides head_dim), ``balance`` (fp16 ``(B, H, 1, D)``), ``mask`` (1 bit per
token and head: high precision or not).
Rows are kept in position order within each class; the mask puts them back in place.

Needs the model (``make_cache(model, "mikv")``): importance comes from the model's queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..quant_utils import (QueryProbe, StateLayer, attention_probs, gather_tokens, half_dtype, install_query_probes,
                           mask_positions, pack_mask, scatter_tokens, unpack_mask)
from ..registry import register
from ..storage import QuantizedTensor, quantize
from .base import Quantizer, check_choice, require

Rows = torch.Tensor | QuantizedTensor


def _take(rows: Rows, idx: torch.Tensor) -> Rows:
    if isinstance(rows, QuantizedTensor):
        return replace(rows.map(lambda t: gather_tokens(t, idx)), tokens=idx.shape[-1])
    return gather_tokens(rows, idx)


def _join(a: Rows | None, b: Rows | None) -> Rows | None:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, QuantizedTensor):
        return a.cat(b)
    return torch.cat([a, b], 2)


def _count(rows: Rows | None) -> int:
    if rows is None:
        return 0
    return rows.tokens if isinstance(rows, QuantizedTensor) else rows.shape[2]


def _deq(rows: Rows) -> torch.Tensor:
    return rows.dequantize().float() if isinstance(rows, QuantizedTensor) else rows.float()


class MiKVLayer(StateLayer):
    state_fields = ("hi_k", "hi_v", "hi_score", "lo_k", "lo_v", "balance", "mask")

    def __init__(self, hi_bits: int, lo_bits: int, recent: float, heavy: float, group: int, balance: bool) -> None:
        super().__init__()
        self.hi_bits, self.lo_bits, self.recent, self.heavy = hi_bits, lo_bits, recent, heavy
        self.group, self.use_balance = group, balance
        self.probe: QueryProbe | None = None
        self._keys_now: torch.Tensor | None = None

    def attention_inputs(self, k_new, v_new):
        out = super().attention_inputs(k_new, v_new)
        self._keys_now = out[0] if k_new is not None else None
        return out

    def _hi_rows(self, x: torch.Tensor) -> Rows:
        if self.hi_bits == 16:
            return x.to(half_dtype(x.dtype))
        return quantize(x.float(), self.hi_bits, "channel", x.shape[-1])

    def _lo_rows(self, k: torch.Tensor, v: torch.Tensor) -> tuple[QuantizedTensor, QuantizedTensor]:
        if self.balance is not None:
            k = k / self.balance.float()
        return (quantize(k.float(), self.lo_bits, "channel", self.group),
                quantize(v.float(), self.lo_bits, "channel", self.group))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        probe = self.probe
        if probe is None or not probe.ready:
            raise RuntimeError("mikv needs the model's queries to rank tokens: build the cache with "
                               "make_cache(model, 'mikv') (not from a config) and run it through that model")
        B, H, n, D = k.shape
        seen = self.seen
        keys = self._keys_now
        self._keys_now = None
        if keys is None or keys.shape[2] != seen + n:
            past, _ = self.dense()
            keys = k if past is None else torch.cat([past, k.to(past.dtype)], 2)
        q = probe.queries()
        probe.clear()
        if q.shape[2] != n:
            raise RuntimeError(f"mikv: the attention module saw {q.shape[2]} tokens but the cache was given {n} (an "
                               "eviction policy composed in front of it?); mikv keeps every token by design, so use "
                               "it without an evicting policy")
        valid = probe.key_valid(seen + n)  # (B, T) False at padding, or None
        acc = attention_probs(q, keys, probe.scaling, seen + torch.arange(n), probe.softcap,
                              key_valid=valid).sum(2)  # (B,H,T); padding receives and gives nothing
        if self.use_balance and self.balance is None:
            k_real = 1.0 if valid is None else valid[:, None, seen:, None].to(k.device, torch.float32)  # (B,1,n,1)
            q_real = 1.0 if valid is None else k_real[:, :, None]  # (B,1,1,n,1) over q's (B,H,G,n,D)
            qmax = (q.float().abs().reshape(B, H, -1, n, D) * q_real).amax(dim=(2, 3)).clamp_min(1e-5)
            kmax = (k.float().abs() * k_real).amax(dim=2).clamp_min(1e-5)
            self.balance = (kmax / qmax).sqrt().unsqueeze(2).to(torch.float16)
        # the importance of tokens already at high precision grows; new tokens join the high-precision part
        mask = unpack_mask(self.mask, seen) if self.mask is not None else torch.zeros(B, H, 0, dtype=torch.bool,
                                                                                     device=k.device)
        n_hi = _count(self.hi_k)
        if n_hi:
            self.hi_score = self.hi_score + gather_tokens(acc[..., :seen], mask_positions(mask, n_hi))
        self.hi_k, self.hi_v = _join(self.hi_k, self._hi_rows(k)), _join(self.hi_v, self._hi_rows(v))
        self.hi_score = _join(self.hi_score, acc[..., seen:].float())
        mask = torch.cat([mask, torch.ones(B, H, n, dtype=torch.bool, device=mask.device)], 2)
        self._demote(mask, seen + n)

    def _demote(self, mask: torch.Tensor, total: int) -> None:
        n_hi = _count(self.hi_k)
        n_recent = min(n_hi, round(self.recent * total))
        # the total budget is rounded once, so recent + heavy = 1 keeps every token
        n_heavy = min(n_hi - n_recent, max(0, round((self.recent + self.heavy) * total) - n_recent))
        n_cand = n_hi - n_recent
        n_drop = n_cand - n_heavy
        if n_drop <= 0:
            self.mask = pack_mask(mask)
            return
        # the newest hi rows are the recent window (rows are in position order); heavy hitters among the rest
        cand_score = self.hi_score[..., :n_cand]
        keep = cand_score.topk(n_heavy, dim=-1).indices.sort(dim=-1).values
        drop_sel = torch.ones_like(cand_score, dtype=torch.bool).scatter_(-1, keep, False)
        drop = mask_positions(drop_sel, n_drop)  # indices into the hi rows, in position order
        B, H = cand_score.shape[:2]
        recent_idx = torch.arange(n_cand, n_hi, device=keep.device).expand(B, H, n_recent)
        keep_all = torch.cat([keep, recent_idx], -1)
        hi_pos = mask_positions(mask, n_hi)  # token positions of the hi rows
        drop_pos = gather_tokens(hi_pos, drop)
        dk, dv = _deq(_take(self.hi_k, drop)), _deq(_take(self.hi_v, drop))
        self.hi_k, self.hi_v = _take(self.hi_k, keep_all), _take(self.hi_v, keep_all)
        self.hi_score = gather_tokens(self.hi_score, keep_all)
        new_k, new_v = self._lo_rows(dk, dv)
        n_lo = _count(self.lo_k)
        lo_pos = mask_positions(~mask, n_lo)
        mask = mask.scatter(-1, drop_pos, False)
        lk, lv = _join(self.lo_k, new_k), _join(self.lo_v, new_v)
        if n_lo:  # merge the demoted rows into the low-precision rows, in position order
            order = torch.cat([lo_pos, drop_pos], -1).argsort(dim=-1)
            lk, lv = _take(lk, order), _take(lv, order)
        self.lo_k, self.lo_v = lk, lv
        self.mask = pack_mask(mask)

    def dense(self):
        if self.mask is None:
            return None, None
        mask = unpack_mask(self.mask, self.seen)
        B, H, T = mask.shape
        D = self.head_dim
        k = torch.zeros(B, H, T, D, device=mask.device)
        v = torch.zeros(B, H, T, D, device=mask.device)
        n_hi, n_lo = _count(self.hi_k), _count(self.lo_k)
        if n_hi:
            pos = mask_positions(mask, n_hi)
            k, v = scatter_tokens(k, pos, _deq(self.hi_k)), scatter_tokens(v, pos, _deq(self.hi_v))
        if n_lo:
            pos = mask_positions(~mask, n_lo)
            lk = _deq(self.lo_k)
            if self.balance is not None:
                lk = lk * self.balance.float()
            k, v = scatter_tokens(k, pos, lk), scatter_tokens(v, pos, _deq(self.lo_v))
        return k.to(self.dtype), v.to(self.dtype)

    def high_precision_mask(self) -> torch.Tensor | None:
        """Which held tokens are at high precision (bool ``(B, H, T)``), for inspection."""
        return None if self.mask is None else unpack_mask(self.mask, self.seen)


@register
@dataclass
class MiKV(Quantizer):
    """Recent and heavy-hitter tokens at high precision, all others kept at low precision, not evicted.

    Low-precision keys are channel-balanced against outlier channels (see the module docstring)."""

    name = "mikv"
    paper = ("Yang et al. 2024, No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed "
             "Precision Quantization (arXiv 2402.18096)")

    hi_bits: int = field(default=16, metadata={"help": "bits of important tokens: 16 (16-bit), 8 or 4"})
    lo_bits: int = field(default=2, metadata={"help": "bits of the other tokens (paper: 2-4)"})
    recent: float = field(default=0.1, metadata={"help": "fraction of newest tokens kept at high precision"})
    heavy: float = field(default=0.1, metadata={
        "help": "fraction of heavy hitters (accumulated attention) at high precision"})
    group: int = field(default=0, metadata={
        "help": "channels per low-precision group; 0 = auto: 32 where it divides head_dim, else the whole head"})
    balance: bool = field(default=True, metadata={"help": "outlier-aware key channel balancer for low precision"})

    def __post_init__(self) -> None:
        check_choice("mikv", "hi_bits", self.hi_bits, (4, 8, 16))
        check_choice("mikv", "lo_bits", self.lo_bits, (1, 2, 3, 4, 8))
        require(self.lo_bits < self.hi_bits,
                f"mikv: lo_bits={self.lo_bits} must be below hi_bits={self.hi_bits}")
        require(0 <= self.recent <= 1 and 0 <= self.heavy <= 1 and self.recent + self.heavy <= 1,
                f"mikv: recent={self.recent} and heavy={self.heavy} must be fractions summing to at most 1")
        require(self.group >= 0, f"mikv: group={self.group} must be >= 0 (0 = auto)")

    def effective_group(self, head_dim: int) -> int:
        # 2-bit per-token codes with one scale per 64+ channels lose too much (SmolLM2-135M, lcet10: +10.9 PPL
        # with whole-head groups vs +4.5 with 32), hence KIVI's 32 where it fits
        if self.group:
            return self.group
        return 32 if head_dim % 32 == 0 else head_dim

    def validate(self, info) -> None:
        g = self.effective_group(info.head_dim)
        require(info.head_dim % g == 0,
                f"mikv: group={g} does not divide head_dim={info.head_dim}; use a divisor of it or 0 (auto)")

    def make_layer(self, layer_idx, info):
        return MiKVLayer(self.hi_bits, self.lo_bits, self.recent, self.heavy, self.effective_group(info.head_dim),
                         self.balance)

    def attach(self, model, cache) -> list:
        return install_query_probes(model, cache, MiKVLayer)
