"""EMS: evict-then-merge with head-wise Global-Local importance.

Li, Li, Meng, Ma, Geng, Xia, Wang. "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache
Compression Based on Global-Local Importance" (arXiv 2412.08521, 2024).

Only the paper's abstract and reviews of it (OpenReview, ICLR 2025 submission) could be read here, not its
method section; what they state is listed under "Sources" at the end, the rest is kvshrink's reading,
chosen to fit it (see "Deviations"). Per layer, batch row and KV head, at prefill:

1. **Global-Local score.** Accumulated attention over *all* prompt queries (the global score, H2O-like) is
   biased towards early tokens, because under the causal mask token ``j`` is seen by ``n - j`` queries;
   attention of the last ``w`` queries only (the local score, SnapKV-like observation window) is biased
   towards recent tokens by RoPE's decay with distance. EMS combines both after aligning their means::

       s_Glo[j] = sum_{i=j}^{n-1} A[i, j]            s_Loc[j] = sum_{i=n-w}^{n-1} A[i, j]
       s_GL[j]  = s_Glo[j] * mean(s_Loc) / mean(s_Glo) + s_Loc[j]                                  (1)

   (means over the real prefix tokens of the head), so that neither bias dominates. GQA: ``A`` is averaged
   over the query heads that read the key head. Queries are recomputed by kvshrink's hook (SDPA stays on).
2. **Important tokens / class centres.** The last ``w`` tokens are kept as they are; of the rest (the
   prefix), the ``N_imp = cap - w`` tokens with the largest ``s_GL`` are kept: they are the class centres.
3. **Irrelevant vs to-be-merged (head-wise sparsity).** The other prefix tokens are candidates. Taken in
   order of score, candidates are *to-be-merged* until the important tokens and they hold a share ``mass``
   of the head's total prefix score; the tail is *irrelevant*. A head whose attention is concentrated
   (sparse) on its important tokens thus merges few tokens or none and evicts the rest; a head with flat
   attention merges many::

       N_tbm = min { k : sum_{important} s_GL + sum_{top k candidates} s_GL >= mass * sum_{prefix} s_GL }   (2)

4. **Merge into class centres (head-wise redundancy), zero class.** Each to-be-merged token ``i`` goes to
   the centre ``c`` most similar to it; redundancy is the product of key and value cosine similarities::

       sim(i, c) = max(0, cos(k_i, k_c)) * max(0, cos(v_i, v_c)),    c*(i) = argmax_c sim(i, c)      (3)

   If ``sim(i, c*) < threshold`` the token goes to the *zero class* instead. Irrelevant tokens go to the zero
   class too: eviction and merging are one scatter over ``N_imp + 1`` classes whose class 0 (the zero
   centre) is discarded, which is how EMS runs all heads in parallel although each head merges a different
   number of tokens. A class ``C`` (its centre and the tokens assigned to it) becomes one state, weighted by
   the Global-Local scores::

       v'_C = sum_{i in C} s_i v_i / sum_{i in C} s_i
       k'_C = r_C * u_C / ||u_C||,  u_C = sum_{i in C} s_i k_i / ||k_i||,  r_C = sum_{i in C} s_i ||k_i|| / sum_{i in C} s_i   (4)

   i.e. keys are merged in direction and norm separately (their score-weighted mean norm is kept, where a
   plain average would shrink it and starve the merged state of attention). A class with no merged token
   keeps its centre exactly.

Every head then holds exactly ``cap = budget`` states (``N_imp`` centres + ``w`` window tokens), stored
densely: no per-head padding, no index tensors; ``nbytes()`` is what the quantizer holds (plus the padding
counts). Decoded tokens are all kept (as SnapKV); a chunked prefill re-runs (1)-(4) on held + new tokens.

Sources (abstract and reviews): the Global-Local score adds up accumulated attention from the global
(all) and the local (recent) queries, to undo the bias that the causal mask and positional encoding give
accumulated attention; the two scores have their means aligned (a reviewer asks why); per
head, tokens fall in three classes, important / to-be-merged / irrelevant (``N_imp, N_tbm, N_irr`` differ by
head); irrelevant tokens are evicted, to-be-merged ones are merged into class centres by similarity, and a
token too dissimilar from every centre goes to a zero-class centre, which unifies eviction and merging and
lets all heads be compressed in parallel; redundancy is a product of key and value cosine similarities
(as a reviewer describes it); the compression ratio adapts per head to attention sparsity and KV
redundancy; main setting: budget 256.

Deviations and assumptions (where those sources give no detail):

* The exact forms of Eqs. (1)-(4) are ours: the sum in (1), the important tokens being the class centres,
  the cumulative-mass rule (2) for sparsity, the zero clamp in (3) (so that two tokens whose keys *and*
  values point in opposite directions do not count as redundant, an objection a reviewer raised), and the
  Global-Local scores as merge weights in (4) (a third-party summary describes EMS's merge as weighted by
  attention).
* Merging keys by direction and norm apart (4) follows that same summary (keys normalised, norms kept
  apart); ``keep_norm=false`` gives a plain score-weighted average of keys.
* ``window=32``, ``mass=0.9``, ``threshold=0.5`` are kvshrink's defaults, not the paper's (``mass`` and
  ``threshold`` picked on the default model's perplexity on the ``alice`` text at a 10% budget: threshold
  0.1 / 0.3 / 0.5 / 0.7 gave PPL 26.27 / 25.76 / 25.56 / 25.83, pure eviction (``mass=0``) 25.97, SnapKV
  26.01, full cache 25.17); ``budget=256`` is the paper's main LongBench setting. The window is kept unmerged (SnapKV's convention) and is not a merge
  target; there are no explicit sink tokens (the global score keeps them when they matter).
* The paper's fused kernel (scores computed inside FlashAttention) and its expansion of entries shared by
  uneven heads are replaced by recomputing the prompt's queries and probabilities in chunks (``O(n^2)``
  work at prefill, beside SDPA) and by dense storage: every head holds exactly the budget.
* Prefill only: decoded tokens are all kept. In a chunked prefill the global score covers the current
  chunk's queries (no score state kept between chunks). Behind a quantizer that keeps per-token positions
  (rotatekv, kvquant) a chunk arriving after tokens are already held is compressed by eviction only
  (centres kept unmerged), since such storage cannot take a modified state for a stored token; a prompt
  prefilled at once is merged as usual (each state stored at its centre's position).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..policy import (HookedPolicy, PolicyLayer, check_budget, clear_tokens, gather_tokens, is_count, push,
                      resolve_budget, select_held, topk_keep)
from ..registry import register
from .base import require


def global_local_score(glo: torch.Tensor, loc: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Eq. (1): ``s_Glo * mean(s_Loc) / mean(s_Glo) + s_Loc``, means per head over ``valid`` tokens."""
    m = torch.ones_like(glo) if valid is None else valid.to(glo.dtype)
    cnt = m.sum(-1, keepdim=True).clamp_min(1)
    mg = (glo * m).sum(-1, keepdim=True) / cnt
    ml = (loc * m).sum(-1, keepdim=True) / cnt
    return glo * (ml / mg.clamp_min(1e-30)) + loc


def evict_then_merge(K: torch.Tensor, V: torch.Tensor, score: torch.Tensor, valid: torch.Tensor | None, slots: int,
                     mass: float, threshold: float, keep_norm: bool = True, chunk: int = 1024):
    """Eqs. (2)-(4) on ``K, V (B, H, P, D)`` with Global-Local scores ``score (B, H, P)``.

    Returns the ``slots`` merged states ``K', V' (B, H, slots, D)`` (text order of their centres), the
    centres' token indices ``keep (B, H, slots)`` and each token's class ``cls (B, H, P)`` (0: zero class,
    i.e. evicted; ``c + 1``: merged into / is centre ``c``)."""
    B, H, P, D = K.shape
    dev = K.device
    real = valid if valid is not None else torch.ones(B, H, P, dtype=torch.bool, device=dev)
    s = score.float().masked_fill(~real, 0.0).clamp_min(0.0)
    keep = topk_keep(score.float(), slots, valid)  # (B, H, m): the important tokens, class centres
    m = keep.shape[-1]
    centre = torch.zeros(B, H, P, dtype=torch.bool, device=dev).scatter_(-1, keep, True)
    cand = real & ~centre
    # Eq. (2): best candidates first, until important + merged tokens hold `mass` of the head's prefix score
    cs = s.masked_fill(~cand, 0.0)
    order = cs.argsort(dim=-1, descending=True)
    sorted_s = cs.gather(-1, order)
    before = sorted_s.cumsum(-1) - sorted_s  # score mass of the better candidates
    need = mass * s.sum(-1, keepdim=True) - s.masked_fill(~centre, 0.0).sum(-1, keepdim=True)
    take = (before < need) & (sorted_s > 0)
    tbm = torch.zeros_like(cand).scatter_(-1, order, take) & cand
    # Eq. (3): redundancy with every centre
    kf, vf = K.float(), V.float()
    kn, vn = F.normalize(kf, dim=-1), F.normalize(vf, dim=-1)
    kc, vc = gather_tokens(kn, keep).transpose(-1, -2), gather_tokens(vn, keep).transpose(-1, -2)
    pad_centre = None if valid is None else ~valid.gather(-1, keep)[:, :, None, :]
    best = torch.empty(B, H, P, device=dev)
    arg = torch.empty(B, H, P, dtype=torch.long, device=dev)
    for a in range(0, P, chunk):  # (B, H, chunk, m) at a time
        e = min(P, a + chunk)
        sim = (kn[:, :, a:e] @ kc).clamp_min(0) * (vn[:, :, a:e] @ vc).clamp_min(0)
        if pad_centre is not None:  # a padding centre (kept only when a row is shorter than the budget) takes nothing
            sim = sim.masked_fill(pad_centre, -1.0)
        best[:, :, a:e], arg[:, :, a:e] = sim.max(dim=-1)
    merged = tbm & (best >= threshold)
    cls = torch.where(merged, arg + 1, torch.zeros_like(arg))
    cls = cls.scatter(-1, keep, torch.arange(1, m + 1, device=dev).expand(B, H, m))
    # Eq. (4): one scatter over the zero class + m centres; class 0 is dropped
    w = torch.where(centre & ~real, torch.ones_like(s), s) * (cls > 0)
    w = torch.where(centre & (w <= 0), torch.full_like(w, 1e-30), w)  # a centre always carries itself
    idx = cls.unsqueeze(-1).expand(B, H, P, D)
    den = torch.zeros(B, H, m + 1, device=dev).scatter_add_(-1, cls, w)[..., 1:]
    cnt = torch.zeros(B, H, m + 1, device=dev).scatter_add_(-1, cls, (cls > 0).float())[..., 1:]
    mv = torch.zeros(B, H, m + 1, D, device=dev).scatter_add_(2, idx, w[..., None] * vf)[:, :, 1:]
    mv = mv / den[..., None]
    if keep_norm:
        norm = kf.norm(dim=-1)
        u = torch.zeros(B, H, m + 1, D, device=dev).scatter_add_(2, idx, w[..., None] * kn)[:, :, 1:]
        r = torch.zeros(B, H, m + 1, device=dev).scatter_add_(-1, cls, w * norm)[..., 1:] / den
        mk = F.normalize(u, dim=-1) * r[..., None]
    else:
        mk = torch.zeros(B, H, m + 1, D, device=dev).scatter_add_(2, idx, w[..., None] * kf)[:, :, 1:]
        mk = mk / den[..., None]
    alone = (cnt <= 1)[..., None]  # nothing merged: the centre exactly
    mk = torch.where(alone, gather_tokens(kf, keep), mk)
    mv = torch.where(alone, gather_tokens(vf, keep), mv)
    return mk.to(K.dtype), mv.to(V.dtype), keep, cls


class EMSLayer(PolicyLayer):
    def __init__(self, inner, layer_idx, info, budget, window, mass, threshold, keep_norm) -> None:
        super().__init__(inner, layer_idx, info)
        self.budget, self.window, self.mass, self.threshold, self.keep_norm = budget, window, mass, threshold, keep_norm

    def queries_needed(self, n: int) -> int:
        return n if (n > 1 and self.active) else 0  # the global score needs every query of the chunk

    def scores(self, K: torch.Tensor, valid: torch.Tensor | None, n: int, w: int, pre: int) -> torch.Tensor:
        """Eq. (1) for the first ``pre`` of the held + new tokens ``K (B, H, T, D)``: ``(B, H, pre)`` fp32, from
        all ``n`` queries of the chunk (global) and its last ``w`` (local)."""
        glo = self.group_mass(K, valid, n, n)
        loc = self.group_mass(K, valid, n, w)
        vp = None if valid is None else valid[..., :pre]
        return global_local_score(glo[..., :pre], loc[..., :pre], vp)

    def _store(self, K, V, k, v, index=None):
        n, held, T = k.shape[-2], self.held(), K.shape[-2]
        valid = self._valid(held, n, K.shape[0], K.device)
        cap = resolve_budget(self.budget, self.seen + n)
        if not self.active or n <= 1 or T <= cap:
            self._count_padding(valid)
            push(self.inner, k, v, index)
            return
        w = min(self.window, n, cap - 1)
        pre = T - w
        score = self.scores(K, valid, n, max(w, 1), pre)  # (a budget of 1 keeps no window, but still scores)
        vp = None if valid is None else valid[..., :pre]
        mk, mv, keep, _ = evict_then_merge(K[:, :, :pre], V[:, :, :pre], score, vp, cap - w, self.mass,
                                           self.threshold, self.keep_norm)
        B, H = K.shape[:2]
        slots = torch.cat([keep, torch.arange(pre, T, device=K.device).expand(B, H, w)], dim=-1)  # (B, H, cap)
        if valid is not None:  # kept padding (a row shorter than the budget) sits at the front, in text order
            npad = (~valid).gather(-1, slots).sum(-1)
            self.npad = npad if bool(npad.any()) else None
        K2, V2 = torch.cat([mk, K[:, :, pre:]], dim=2), torch.cat([mv, V[:, :, pre:]], dim=2)
        if not self.inner.takes_index:
            clear_tokens(self.inner)
            push(self.inner, K2, V2)
        elif held == 0:
            # quantizers keeping per-token positions: each state is stored at its centre's position (a merged
            # post-RoPE key un-RoPE'd there comes back exactly when re-RoPE'd there)
            push(self.inner, K2, V2, slots if index is None else index.gather(2, slots))
        else:  # see the module doc: such storage cannot take a modified state for a held token
            push(self.inner, k, v, index)
            select_held(self.inner, slots)


@register
@dataclass
class EMS(HookedPolicy):
    """Evict-then-merge by Global-Local score: irrelevant tokens evicted, redundant ones merged into class centres (Li et al. 2024)."""

    name = "ems"
    paper = ("Li et al. 2024, EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on "
             "Global-Local Importance (arXiv 2412.08521)")

    budget: float = field(default=256, metadata={
        "help": "prompt states kept per layer and head, window included: a count (> 1; paper: 256) or a fraction of the prompt"})
    window: int = field(default=32, metadata={
        "help": "observation window: last prompt tokens, kept unmerged; their queries give the local score"})
    mass: float = field(default=0.9, metadata={
        "help": "share of a head's score mass that kept + merged tokens must hold; the rest is evicted (head-wise sparsity)"})
    threshold: float = field(default=0.5, metadata={
        "help": "least redundancy cos(k)*cos(v) with a class centre to merge into it (below: zero class, evicted)"})
    keep_norm: bool = field(default=True, metadata={
        "help": "merge keys by direction with their score-weighted mean norm (false: plain weighted average)"})

    def __post_init__(self) -> None:
        check_budget(self.name, self.budget)
        require(self.window >= 1, f"{self.name}: window={self.window} must be >= 1")
        require(0.0 <= self.mass <= 1.0, f"{self.name}: mass={self.mass} is a share of the score mass; use 0..1")
        require(self.threshold >= 0.0,
                f"{self.name}: threshold={self.threshold} is a least similarity; use 0..1 (above 1: never merge)")
        if is_count(self.budget):
            require(self.budget > self.window,
                    f"{self.name}: budget={int(self.budget)} must exceed window={self.window} "
                    "(the window is always kept); raise the budget or lower the window")

    def wrap(self, inner, layer_idx, info):
        return EMSLayer(inner, layer_idx, info, self.budget, self.window, self.mass, self.threshold, self.keep_norm)
