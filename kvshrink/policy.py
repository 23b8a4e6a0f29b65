"""Shared machinery of token policies (eviction, merging, channel pruning) that wrap a quantizer's layer.

A policy layer (:class:`PolicyLayer`) sits between transformers and the quantizer's
:class:`~kvshrink.layer.CompressedLayer` (``inner``). On every ``update(k, v)`` it

1. returns the held past (``inner.dense()``) followed by the new chunk, in full, so that this step's
   attention is exact (the pattern of transformers' sliding-window layer, see TRANSFORMERS_NOTES.md);
2. lets the method choose which of the held + new tokens stay (:meth:`PolicyLayer.choose`);
3. hands only those to ``inner`` (``inner.append``). When stored tokens are evicted too: plain tensors
   (``none``) drop them exactly; a quantizer's packed storage cannot drop single tokens (per-channel key
   groups span tokens), so it sits behind a :class:`DeferredEviction` that marks evicted tokens, gives
   attention only the kept ones, and compacts (stores the kept tokens again, quantizing them a second time)
   only once ``COMPACT_EVERY`` evicted tokens have piled up -- not at every decode step.
   Quantizers that keep per-token data captured for the whole chunk by hooks (pre-RoPE positions, sinks:
   rotatekv, kvquant; ``takes_index``) are told which chunk tokens each head keeps,
   ``append(k, v, index=(B, H, T'))``, and compact themselves (their ``select(idx)``), so that every kept
   key is re-RoPE'd at its own position.

``held() < seen`` once tokens are evicted; the base class's ``get_mask_sizes = (held + q, seen - held)``
keeps stock SDPA/eager masks right.

Attention statistics come from observation-window queries recomputed by a forward pre-hook on each
attention module (the approach of NVIDIA/kvpress): ``q_proj`` (+ ``q_norm``) + RoPE on the last ``w``
hidden states, so no layer is forced to eager attention. A pre-hook on the model records the 2-D
padding mask, from which left padding is tracked (see :meth:`PolicyLayer._valid`).

Left padding: padding tokens score ``-inf`` so they are evicted first, and kept tokens stay in text
order, so that any padding kept sits at the front where the stock mask (read at ``kv_idx + kv_offset``)
still masks it. Padding anywhere but on the left is refused.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .errors import SpecError
from .hf_compat import cache_in, call_padding_mask
from .layer import CompressedLayer
from .storage import check_finite

# -- budgets -------------------------------------------------------------------------------------
def check_budget(method: str, budget: float, name: str = "budget") -> None:
    """A budget is a fraction of the tokens seen (0 < b <= 1) or a whole token count (> 1)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise SpecError(f"{method}: {name}={budget!r} is not a number; give a fraction such as 0.25 or a token count such as 512")
    if budget <= 0:
        raise SpecError(f"{method}: {name}={budget} must be positive: a fraction of the tokens (0 < {name} <= 1) "
                        "or a token count (an integer > 1)")
    if budget > 1 and float(budget) != int(budget):
        raise SpecError(f"{method}: {name}={budget} is neither a fraction (0 < {name} <= 1) nor a whole token count; "
                        f"use e.g. {name}=0.25 or {name}={int(budget)}")


def resolve_budget(budget: float, total: int) -> int:
    """Tokens to keep out of ``total``: ``round(budget * total)`` for a fraction (at least 1), else the count."""
    if budget <= 1:
        return max(1, min(total, int(round(budget * total))))
    return int(budget)


def is_count(budget: float) -> bool:
    return budget > 1


# -- RoPE and window queries -----------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x (B, H, T, D)`` with ``cos/sin (B, T, R)``; a partial rotary (R < D) leaves the rest."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by the opposite angle)."""
    return apply_rope(x, cos, -sin)


def window_queries(module: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   w: int) -> torch.Tensor:
    """Post-RoPE queries ``(B, Hq, w, D)`` of the last ``w`` positions, recomputed as the attention module
    does (``q_proj`` or the query part of a fused ``qkv_proj``, optional per-head ``q_norm``, RoPE)."""
    cfg = module.config
    d = module.head_dim
    h = hidden[:, -w:]
    if hasattr(module, "q_proj"):
        q = module.q_proj(h)
    elif hasattr(module, "qkv_proj"):
        q = module.qkv_proj(h)[..., : cfg.num_attention_heads * d]
    else:
        raise SpecError(f"{type(module).__name__} has neither q_proj nor qkv_proj: kvshrink cannot recompute its queries "
                        "for attention-based eviction; use a position-based policy (streamingllm) on this model")
    q = q.view(h.shape[0], h.shape[1], -1, d)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)  # per-head RMSNorm before RoPE (Qwen3, Gemma3)
    q = q.transpose(1, 2)
    return apply_rope(q, cos[:, -w:], sin[:, -w:])


def attention_mass(q: torch.Tensor, K: torch.Tensor, scaling: float, valid: torch.Tensor | None, q_pos0: int,
                   softcap: float | None = None, chunk: int = 256, squares: bool = False):
    """Sum over queries of softmax attention probabilities, per query head: ``(B, Hkv, G, T)`` in fp32
    (with ``squares=True`` also the sum of squared probabilities, for variances over queries).

    ``q (B, Hq, w, D)``: query ``i`` sits at key index ``q_pos0 + i`` (causal: it sees keys ``<=`` that).
    ``K (B, Hkv, T, D)``; ``valid (B, Hkv, T)`` masks padding. GQA: query heads ``h*G .. h*G+G-1`` read
    key head ``h`` (transformers' ``repeat_kv`` order). Computed in chunks of queries to bound memory.
    """
    B, Hq, w, D = q.shape
    H, T = K.shape[1], K.shape[2]
    G = Hq // H
    qg = q.float().view(B, H, G, w, D)
    Kf = K.float()
    out = torch.zeros(B, H, G, T, dtype=torch.float32, device=K.device)
    sq = torch.zeros_like(out) if squares else None
    key_idx = torch.arange(T, device=K.device)
    for s in range(0, w, chunk):
        e = min(w, s + chunk)
        logits = torch.einsum("bhgwd,bhtd->bhgwt", qg[:, :, :, s:e], Kf) * scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        qpos = q_pos0 + torch.arange(s, e, device=K.device)
        mask = key_idx[None, :] > qpos[:, None]  # (w, T) future keys
        logits = logits.masked_fill(mask, float("-inf"))
        if valid is not None:
            logits = logits.masked_fill(~valid[:, :, None, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out += p.sum(dim=3)
        if squares:
            sq += p.pow(2).sum(dim=3)
    return (out, sq) if squares else out


def pool1d(scores: torch.Tensor, kernel: int, pooling: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV's clustering: 1-D pooling over tokens (stride 1, same length) of ``(B, H, T)`` scores.
    Averages are over real tokens only (padding and the ends of the sequence do not count)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    B, H, T = scores.shape
    x = scores.reshape(B * H, 1, T)
    if pooling == "maxpool":
        y = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
        return y[..., :T].reshape(B, H, T)
    m = torch.ones_like(x) if valid is None else valid.reshape(B * H, 1, T).to(x.dtype)
    num = F.avg_pool1d(x * m, kernel, stride=1, padding=kernel // 2)
    den = F.avg_pool1d(m, kernel, stride=1, padding=kernel // 2)
    return (num / den.clamp_min(1e-12))[..., :T].reshape(B, H, T)


def topk_keep(scores: torch.Tensor, count: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Indices ``(B, H, count)`` of the ``count`` best-scoring tokens, in text order; padding last."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    count = min(count, scores.shape[-1])
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, H, T, D)`` at token indices ``idx (B, H, T')``."""
    return x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


# -- moving tokens in and out of any layer ---------------------------------------------------------
def push(layer: CompressedLayer, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None = None) -> None:
    """Store ``k, v`` in ``layer`` (a quantizer's layer or a nested policy layer); no attention output.

    ``index (B, H, T')``: the positions within the model's current chunk of the tokens given (None: the whole
    chunk), passed on to layers that keep per-token data captured for the chunk (``takes_index``)."""
    n = k.shape[-2]
    if n == 0:
        return
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    if isinstance(layer, PolicyLayer):
        layer.store(k, v, index)
    elif index is not None and layer.takes_index:
        layer.append(k, v, index=index)
    else:
        layer.append(k, v)
    layer.seen += n


def clear_tokens(layer: CompressedLayer) -> None:
    """Forget every held token of ``layer`` but keep its configuration (dtype, a policy's channel set...)."""
    if isinstance(layer, (PolicyLayer, DeferredEviction)):
        layer.clear_tokens()
        return
    for name in layer.state_fields:
        setattr(layer, name, None)
    layer.seen = 0


def select_held(layer: CompressedLayer, idx: torch.Tensor) -> None:
    """Keep only held tokens ``idx (B, H, T')`` of ``layer``.

    Exact for a plain tensor layer (``none``). Packed storage cannot drop single tokens (per-channel key
    groups span tokens), so a quantizer's layer is rebuilt from its dequantized kept tokens: the kept
    tokens are quantized a second time (policies put quantizers behind :class:`DeferredEviction`, which
    does this rarely). A layer with its own ``select(idx)`` (rotatekv, kvquant: positions and sinks kept
    consistent; DeferredEviction) does it itself.
    """
    if isinstance(layer, PolicyLayer):
        layer.select(idx)
        return
    if callable(getattr(layer, "select", None)):
        # the layer drops tokens itself (e.g. rotatekv: keeps its stored positions and exact sinks consistent)
        layer.select(idx)
        layer.seen = idx.shape[-1]
        return
    keys = getattr(layer, "keys", None)
    if set(layer.state_fields) == {"keys", "values"} and isinstance(keys, torch.Tensor):
        layer.keys, layer.values = gather_tokens(layer.keys, idx), gather_tokens(layer.values, idx)
        layer.seen = idx.shape[-1]
        return
    K, V = layer.dense()
    clear_tokens(layer)
    push(layer, gather_tokens(K, idx), gather_tokens(V, idx))


# -- evicting from quantized storage ---------------------------------------------------------------
#: evicted-but-stored tokens a :class:`DeferredEviction` tolerates before it compacts its quantizer's layer
COMPACT_EVERY = 32


class DeferredEviction(CompressedLayer):
    """A quantizer's layer behind a policy that evicts stored tokens: evict by marking, compact rarely.

    Packed storage cannot drop single tokens (per-channel key groups span tokens), so compacting rebuilds the
    layer from its kept tokens, which quantizes them again (or the layer's own ``select``). A policy that
    evicts at every decode step (H2O, StreamingLLM, LM-Infinite) would re-quantize its whole held set at
    every step, and the error would pile up step after step. Here evicted tokens are only marked (``live``,
    one bool per stored token and head, counted in :meth:`nbytes`); attention reads the live tokens only
    (:meth:`dense` gathers them), so what the model sees is exactly the policy's choice; the layer is
    compacted once ``every`` evicted tokens have piled up, so each token is re-quantized about once per
    ``every`` evictions instead of at each one. The price: up to ``every`` evicted tokens per head still
    held in storage between compactions (in the bytes reported).
    """

    def __init__(self, inner: CompressedLayer, every: int = COMPACT_EVERY) -> None:
        super().__init__()
        self.inner, self.every = inner, every
        self.live: torch.Tensor | None = None  # (B, H, stored) bool; None: every stored token is held
        self._idx: torch.Tensor | None = None  # held -> stored indices (derived from live)

    @property
    def takes_index(self) -> bool:  # type: ignore[override]
        return self.inner.takes_index

    def __getattr__(self, name: str):  # read the quantizer's own attributes through the wrapper
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if not self.inner.is_initialized:
            self.inner.lazy_initialization(key_states, value_states)

    def append(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None = None) -> None:
        push(self.inner, k, v, index)
        if self.live is not None:
            B, H, n = self.live.shape[0], self.live.shape[1], k.shape[-2]
            self.live = torch.cat([self.live, self.live.new_ones(B, H, n)], dim=-1)
            self._idx = None

    def held(self) -> int:
        return self.inner.held() if self.live is None else int(self.live[0, 0].sum())

    def _held_idx(self) -> torch.Tensor:
        if self._idx is None:
            B, H, T = self.live.shape
            self._idx = self.live.nonzero()[:, 2].reshape(B, H, -1)  # row-major: per head, in text order
        return self._idx

    def dense(self):
        K, V = self.inner.dense()
        if self.live is None or K is None:
            return K, V
        idx = self._held_idx()
        return gather_tokens(K, idx), gather_tokens(V, idx)

    def select(self, idx: torch.Tensor) -> None:
        keep = idx if self.live is None else self._held_idx().gather(2, idx)  # indices into stored tokens
        stored = self.inner.held()
        if stored - keep.shape[-1] >= self.every or keep.shape[-1] == 0:
            select_held(self.inner, keep)  # compact: quantize the kept tokens again, once
            self.live = self._idx = None
        elif keep.shape[-1] < stored:
            B, H = keep.shape[:2]
            self.live = torch.zeros(B, H, stored, dtype=torch.bool, device=keep.device).scatter_(2, keep, True)
            self._idx = None

    def clear_tokens(self) -> None:
        clear_tokens(self.inner)
        self.live = self._idx = None
        self.seen = 0

    def stored(self) -> Iterator[torch.Tensor]:
        yield from self.inner.stored()
        if self.live is not None:
            yield self.live

    def compact(self) -> None:
        self.inner.compact()

    def map_state(self, fn) -> None:
        self.inner.map_state(fn)
        if self.live is not None:
            self.live, self._idx = fn(self.live), None

    def reset(self) -> None:
        super().reset()
        self.inner.reset()
        self.live = self._idx = None


def _rebuilds_on_evict(layer: CompressedLayer) -> bool:
    """Whether dropping stored tokens from ``layer`` means storing the kept ones again (packed storage)."""
    if isinstance(layer, (PolicyLayer, DeferredEviction)):
        return False
    return set(layer.state_fields) != {"keys", "values"}


# -- the policy layer --------------------------------------------------------------------------------
class PolicyLayer(CompressedLayer):
    """A layer that decides which tokens stay, storing them in ``inner`` (any CompressedLayer).

    The current chunk always attends to the held past plus itself in full precision (the ``simulated``
    flag of quantizers does not apply to the policy's own decisions: eviction cannot be simulated on the
    chunk that is being evicted from, since the mask size was fixed before ``update``).

    Subclasses implement :meth:`choose` (and :meth:`queries_needed` when they score with attention);
    per-token metadata of their own goes in ``token_fields`` (batch at dim 0, tokens at dim 2) so that it
    is gathered along with the tokens; every tensor in ``state_fields`` is counted in :meth:`nbytes`.
    """

    state_fields: tuple[str, ...] = ("npad",)
    token_fields: tuple[str, ...] = ()

    def __init__(self, inner: CompressedLayer, layer_idx: int, info: Any) -> None:
        super().__init__()
        if _rebuilds_on_evict(inner):
            inner = DeferredEviction(inner)
        self.inner, self.layer_idx, self.info = inner, layer_idx, info
        self.active = True  # False: store new tokens as they come (e.g. a question after a compressed context)
        self.queries: torch.Tensor | None = None  # window queries of the current chunk (set by the hook)
        self.scaling: float = 1.0
        self.softcap: float | None = None
        self.padding_mask: torch.Tensor | None = None  # 2-D mask of the current forward (set by the hook)
        self.positions: torch.Tensor | None = None  # position ids of the current chunk (set by the hook)

    # -- to implement ---------------------------------------------------------------------------
    def queries_needed(self, n: int) -> int:
        """How many of the chunk's last queries :meth:`choose` needs (0: none)."""
        return 0

    def choose(self, K: torch.Tensor, V: torch.Tensor, n: int, valid: torch.Tensor | None) -> torch.Tensor | None:
        """Indices ``(B, H, T')`` (text order) of the held + new tokens ``K, V (B, H, held+n, D)`` to keep,
        or None to keep them all. ``valid`` is False at padding (None: no padding)."""
        return None

    # -- composition with the inner layer -----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.num_kv_groups = self.info.num_heads // self.info.num_kv_heads

    def held(self) -> int:
        return self.inner.held()

    def dense(self):
        return self.inner.dense()

    def stored(self) -> Iterator[torch.Tensor]:
        yield from super().stored()
        yield from self.inner.stored()

    def compact(self) -> None:
        self.inner.compact()

    def map_state(self, fn) -> None:
        super().map_state(fn)
        self.inner.map_state(fn)

    def reset(self) -> None:
        super().reset()
        self.inner.reset()

    def clear_tokens(self) -> None:
        for name in (*self.token_fields, "npad"):
            setattr(self, name, None)
        clear_tokens(self.inner)
        self.seen = 0

    def select(self, idx: torch.Tensor) -> None:
        """Keep held tokens ``idx`` (used when an outer policy evicts from this one)."""
        self._gather_meta(idx, None)
        select_held(self.inner, idx)
        self.seen = idx.shape[-1]

    def _gather_meta(self, idx: torch.Tensor, valid: torch.Tensor | None) -> None:
        for name in self.token_fields:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.gather(2, idx) if t.dim() == 3 else gather_tokens(t, idx))
        if valid is not None:
            npad = (~valid).gather(2, idx).sum(-1)
            self.npad = npad if bool(npad.any()) else None
        elif self.npad is not None:
            self.npad = (torch.arange(self.held(), device=idx.device) < self.npad[..., None]).gather(2, idx).sum(-1)
            if not bool(self.npad.any()):
                self.npad = None

    # -- the update path ------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.check_finite and (key_states.device.type == "cpu" or key_states.shape[-2] > 1):
            check_finite(key_states, "keys given to the cache")
            check_finite(value_states, "values given to the cache")
        # This step attends to the whole held past plus the new chunk in full precision.
        out = self.attention_inputs(key_states, value_states)
        self._store(out[0], out[1], key_states, value_states)
        self.seen += key_states.shape[-2]
        return out

    def store(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Store a chunk without producing attention inputs (when nested in another policy); ``index``: the
        chunk positions of ``k, v`` when an outer policy already kept a subset (see :func:`push`)."""
        pk, pv = self.dense()
        K = k if pk is None else torch.cat([pk, k], dim=-2)
        V = v if pv is None else torch.cat([pv, v], dim=-2)
        self._store(K, V, k, v, index)

    def _store(self, K: torch.Tensor, V: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               index: torch.Tensor | None = None) -> None:
        held, n = self.held(), k.shape[-2]
        valid = self._valid(held, n, K.shape[0], K.device)
        # Protocol: after choose(), per-token metadata in token_fields covers the held + n tokens.
        keep = self.choose(K, V, n, valid) if self.active else self._extend_meta(n, K)
        if keep is None:
            self._count_padding(valid)
            push(self.inner, k, v, index)
            return
        self._gather_meta(keep, valid)
        ar = torch.arange(held, device=K.device)
        if held == 0 or (keep.shape[-1] >= held and bool((keep[..., :held] == ar).all())):
            # every held token stays: only new tokens are dropped, nothing stored is touched
            new = keep[..., held:] - held
            push(self.inner, gather_tokens(k, new), gather_tokens(v, new), new if index is None else index.gather(2, new))
        elif self.inner.takes_index or isinstance(self.inner, DeferredEviction):
            # stored tokens are evicted too: store the whole chunk (with its per-token data, e.g. positions, for
            # layers that take an index), then drop tokens: marked by DeferredEviction, compacted now and then
            push(self.inner, k, v, index)
            select_held(self.inner, keep)
        else:
            clear_tokens(self.inner)
            push(self.inner, gather_tokens(K, keep), gather_tokens(V, keep))

    def _count_padding(self, valid: torch.Tensor | None) -> None:
        """All held + new tokens stay: remember how many of each row/head are left padding (``npad``)."""
        if valid is not None:
            npad = (~valid).sum(-1)
            self.npad = npad if bool(npad.any()) else None

    def _extend_meta(self, n: int, K: torch.Tensor) -> None:
        """Compression off: give per-token metadata entries for ``n`` new tokens (subclasses with metadata)."""
        return None

    def _valid(self, held: int, n: int, batch: int, device) -> torch.Tensor | None:
        """``(B, H, held + n)`` bool, False at left padding; None when there is none."""
        new_valid = None
        pm = self.padding_mask
        if pm is not None and pm.shape[-1] >= n and not bool(pm[:, -n:].all()):
            chunk = pm[:, -n:].bool()
            if self.seen > 0:
                raise SpecError(
                    "kvshrink policies support left padding of the first chunk only; this chunk has padding after "
                    "tokens were cached: pad prompts on the left (tokenizer.padding_side='left') and prefill them at once")
            first_real = chunk.float().argmax(-1)
            expect = torch.arange(n, device=chunk.device)[None, :] >= first_real[:, None]
            if not bool((expect == chunk).all()) and bool(chunk.any(-1).all()):
                raise SpecError("kvshrink policies support left padding only (tokenizer.padding_side='left'); "
                                "this attention mask has padding on the right or inside the prompt")
            new_valid = chunk.to(device)[:, None, :].expand(batch, self.num_heads, n)
        if self.npad is None and new_valid is None:
            return None
        old = torch.ones(batch, self.num_heads, held, dtype=torch.bool, device=device)
        if self.npad is not None:
            old = torch.arange(held, device=device) >= self.npad[..., None]
        if new_valid is None:
            new_valid = torch.ones(batch, self.num_heads, n, dtype=torch.bool, device=device)
        return torch.cat([old, new_valid], dim=-1)

    # -- helpers for methods ------------------------------------------------------------------------
    def require_queries(self, method: str) -> torch.Tensor:
        if self.queries is None:
            raise SpecError(
                f"{method} scores tokens with the model's queries, which kvshrink captures with hooks on the model: "
                "build the cache with make_cache(model, ...) (not from a config) and run that model with it")
        return self.queries

    def group_mass(self, K: torch.Tensor, valid: torch.Tensor | None, n: int, w: int) -> torch.Tensor:
        """Attention mass ``(B, H, T)`` that the chunk's last ``w`` queries give each key, averaged over the
        query heads sharing a key head (GQA) and summed over the queries."""
        q = self.require_queries(type(self).__name__)[:, :, -w:]
        T = K.shape[-2]
        mass = attention_mass(q, K, self.scaling, valid, T - q.shape[2], self.softcap)
        return mass.mean(dim=2)


# -- hooks ----------------------------------------------------------------------------------------------
def _chain(layer: Any) -> list[PolicyLayer]:
    out = []
    while isinstance(layer, PolicyLayer):
        out.append(layer)
        layer = layer.inner
    return out


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Attention modules of the decoder by ``layer_idx`` (modules with ``layer_idx`` and a query projection)."""
    found: dict[int, torch.nn.Module] = {}
    for _, mod in model.named_modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and (hasattr(mod, "q_proj") or hasattr(mod, "qkv_proj")) and idx not in found:
            found[idx] = mod
    return found


def install_policy_hooks(model: torch.nn.Module, cache: Any) -> list:
    """Install, once per cache, the hooks every policy layer of ``cache`` relies on:

    * a pre-hook on the model recording the 2-D ``attention_mask`` (left padding) on each policy layer;
    * a pre-hook on each attention module recomputing the window queries its policy chain asks for,
      plus the module's ``scaling`` (and Gemma2's logit soft-cap).

    Hooks act only when the call's cache (``cache``, ``past_key_values`` before transformers 5.25) is this cache
    (a weak reference: no cycle keeps it alive).
    """
    if getattr(cache, "_kvshrink_policy_hooks", False):
        return []
    cache._kvshrink_policy_hooks = True
    ref = weakref.ref(cache)
    handles = []

    def model_hook(module, args, kwargs):
        c = ref()
        if c is None or cache_in(kwargs) is not c:
            return
        mask = call_padding_mask(kwargs)
        for layer in c.layers:
            for p in _chain(layer):
                p.padding_mask = mask

    handles.append(model.register_forward_pre_hook(model_hook, with_kwargs=True))
    mods = attention_modules(model)
    for idx, mod in mods.items():
        if idx >= len(cache.layers) or not _chain(cache.layers[idx]):
            continue

        def attn_hook(module, args, kwargs, idx=idx):
            c = ref()
            if c is None or cache_in(kwargs) is not c:
                return
            chain = _chain(c.layers[idx])
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            n = hidden.shape[1]
            w = max(min(p.queries_needed(n), n) for p in chain)
            q = None
            if w > 0:
                pe = kwargs.get("position_embeddings")
                if pe is None:
                    raise SpecError(f"{type(module).__name__} did not receive position_embeddings: kvshrink cannot "
                                    "recompute its queries; this architecture is not supported by attention-scored policies")
                with torch.no_grad():
                    q = window_queries(module, hidden, pe[0], pe[1], w)
            softcap = getattr(module.config, "attn_logit_softcapping", None)
            pos = kwargs.get("position_ids")
            for p in chain:
                p.queries, p.scaling, p.softcap = q, float(module.scaling), softcap
                p.positions = pos if isinstance(pos, torch.Tensor) else None
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] != chain[0].held() + n:
                # transformers builds one mask per layer type, sized from the first such layer; a policy whose
                # layers hold different token counts (PyramidKV, CAKE) needs its own: rebuild it the same way.
                kwargs["attention_mask"] = layer_mask(mask, chain[0], n)
                return args, kwargs

        handles.append(mod.register_forward_pre_hook(attn_hook, with_kwargs=True))
    return handles


def layer_mask(like: torch.Tensor, layer: PolicyLayer, n: int) -> torch.Tensor:
    """The 4-D mask of ``layer`` for a chunk of ``n`` queries, in the dtype/convention of ``like``: held token
    ``j`` sits at text position ``j + seen - held`` (kept padding is at the front, see the module doc)."""
    held, seen, dev = layer.held(), layer.seen, like.device
    kvpos = torch.arange(held + n, device=dev) + (seen - held)
    qpos = seen + torch.arange(n, device=dev)
    allowed = (kvpos[None, :] <= qpos[:, None])[None, None]
    pm = layer.padding_mask
    if pm is not None and pm.shape[-1] > int(kvpos.max()):
        allowed = allowed & pm.to(dev).bool()[:, kvpos][:, None, None, :]
    allowed = allowed.expand(like.shape[0], 1, n, held + n)
    if like.dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=like.dtype, device=dev)
    return torch.where(allowed, zero, torch.finfo(like.dtype).min)


@contextlib.contextmanager
def compression(cache: Any, active: bool):
    """Temporarily turn a cache's policies on or off (off: new tokens are stored as they come)."""
    layers = [p for layer in cache.layers for p in _chain(layer)]
    before = [p.active for p in layers]
    for p in layers:
        p.active = active
    try:
        yield cache
    finally:
        for p, a in zip(layers, before):
            p.active = a


def force(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores where tokens under ``mask`` outrank every other token (later ones first among themselves)."""
    T = scores.shape[-1]
    top = scores.max().clamp_min(0) + 1 if scores.numel() else 1.0
    idx = torch.arange(T, device=scores.device, dtype=scores.dtype)
    return torch.where(mask, top + 1 + idx, scores)


# -- the Policy base every kvshrink policy method uses ----------------------------------------------------
from .methods.base import Policy  # noqa: E402  (after the helpers: methods import this module)


class HookedPolicy(Policy):
    """A Policy whose layers are :class:`PolicyLayer`s: installs the shared hooks through ``attach``."""

    def attach(self, model: Any, cache: Any) -> list:
        return install_policy_hooks(model, cache)

    def full_layer_position(self, layer_idx: int, info: Any) -> tuple[int, int]:
        """(position of ``layer_idx`` among the full-attention layers, number of them)."""
        full = [i for i, k in enumerate(info.layer_kinds) if k == "full"]
        return full.index(layer_idx), len(full)
