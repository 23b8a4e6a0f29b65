"""Shared pieces of the quantization family (KVQuant, ZipCache, GEAR, MiKV).

* :class:`StateLayer`: a :class:`~kvshrink.layer.CompressedLayer` whose state may also hold per-layer
  constants (codebooks, calibrated per-channel ranges: ``shared_fields``, no batch axis) and lists of
  per-chunk tensors; every one of them is counted by ``nbytes()``.
* Dense-and-sparse outlier split with a fixed number of outliers per vector (fixed shapes keep the
  sparse part a plain ``(B, H, T, k)`` tensor that batch/beam operations can index).
* Weighted 1-D k-means (non-uniform codebooks) and nearest-centroid coding.
* Low-rank approximation by power iteration or SVD.
* :class:`QueryProbe`: forward pre-hooks on attention modules that recompute the queries of chosen
  positions (q_proj, q_norm, RoPE) so that methods needing attention scores work with SDPA/flash
  attention, which never materialise the attention matrix.
* Token gathering, causal attention probabilities with GQA aggregation.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from .hf_compat import cache_in, call_padding_mask
from .layer import CompressedLayer
from .layer import half_dtype  # noqa: F401  (re-exported)
from .storage import QuantizedTensor

# ----------------------------------------------------------------------------------------------
# layers with shared constants and chunk lists
# ----------------------------------------------------------------------------------------------


class StateLayer(CompressedLayer):
    """CompressedLayer with two extras, both counted in :meth:`nbytes`:

    * ``shared_fields``: per-layer constants without a batch axis (codebooks, calibrated ranges). Batch
      and beam operations leave them alone and :meth:`reset` keeps them (they are calibration, not
      context).
    * a state field may hold a ``list`` of tensors / QuantizedTensors (one per compressed chunk).
    """

    shared_fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        for name in self.shared_fields:
            if not hasattr(self, name):
                setattr(self, name, None)

    def stored(self) -> Iterator[torch.Tensor]:
        for name in self.state_fields + self.shared_fields:
            yield from _tensors_of(getattr(self, name, None))

    def map_state(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in self.state_fields:
            setattr(self, name, _map(getattr(self, name), fn))

    def reset(self) -> None:
        shared = {n: getattr(self, n, None) for n in self.shared_fields}
        super().reset()
        for n, v in shared.items():
            setattr(self, n, v)


def _tensors_of(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, QuantizedTensor):
        yield from value.tensors()
    elif isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_of(v)


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, QuantizedTensor):
        return value.map(fn)
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    return value


def storage_nbytes(*values: Any) -> int:
    """Sum of ``numel * element_size`` over every tensor in ``values`` (QuantizedTensors, lists)."""
    return sum(t.numel() * t.element_size() for v in values for t in _tensors_of(v))


# ----------------------------------------------------------------------------------------------
# dense-and-sparse split
# ----------------------------------------------------------------------------------------------


def index_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype that indexes ``n`` positions (uint8 up to 256, int16 up to 32768)."""
    if n <= 256:
        return torch.uint8
    if n <= 32768:
        return torch.int16
    return torch.int32


def outlier_count(fraction: float, n: int) -> int:
    """Outliers kept per vector of ``n`` values: ``round(fraction * n)``, at least 1 when fraction > 0."""
    if fraction <= 0:
        return 0
    return min(n, max(1, round(fraction * n)))


def split_outliers(x: torch.Tensor, k: int, center: torch.Tensor | None = None,
                   value_dtype: torch.dtype = torch.float16):
    """Per-vector dense-and-sparse split along the last axis.

    The ``k`` entries of each vector farthest from ``center`` (default: the vector's median, the
    recentering KVQuant uses so that outliers do not skew the range) are outliers: their values are kept
    in ``value_dtype`` with their position in the vector. In the returned dense part they are replaced by
    ``center`` so that they no longer widen the quantization range.

    Returns ``(dense, values (..., k), index (..., k))``; with ``k == 0`` values/index are ``None``.
    """
    if k == 0:
        return x, None, None
    xf = x.float()
    if center is None:
        center = xf.median(dim=-1, keepdim=True).values
    idx = (xf - center).abs().topk(k, dim=-1).indices
    vals = xf.gather(-1, idx)
    dense = xf.scatter(-1, idx, center.expand_as(xf).gather(-1, idx))
    return dense.to(x.dtype), vals.to(value_dtype), idx.to(index_dtype(x.shape[-1]))


def merge_outliers(dense: torch.Tensor, values: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
    """Put the sparse outliers back at their positions (exactly their stored values)."""
    if values is None:
        return dense
    return dense.scatter(-1, index.long(), values.to(dense.dtype))


# ----------------------------------------------------------------------------------------------
# non-uniform codebooks
# ----------------------------------------------------------------------------------------------


def weighted_kmeans_1d(x: torch.Tensor, k: int, weight: torch.Tensor | None = None, iters: int = 50,
                       max_samples: int = 1 << 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on scalars, each sample weighted (KVQuant: weights = Fisher information).

    Initialised at weighted quantiles, so it is deterministic; samples above ``max_samples`` are
    subsampled with a fixed seed. Returns ``k`` sorted float32 centroids.
    """
    x = x.detach().reshape(-1).float()
    w = torch.ones_like(x) if weight is None else weight.detach().reshape(-1).float().clamp_min(0)
    if x.numel() > max_samples:
        g = torch.Generator(device="cpu").manual_seed(seed)
        sel = torch.randperm(x.numel(), generator=g)[:max_samples].to(x.device)
        x, w = x[sel], w[sel]
    if float(w.sum()) <= 0:
        w = torch.ones_like(x)
    order = x.argsort()
    xs, cw = x[order], w[order].cumsum(0)
    targets = (torch.arange(k, device=x.device, dtype=torch.float32) + 0.5) / k * cw[-1]
    c = xs[torch.searchsorted(cw, targets).clamp_max(xs.numel() - 1)]
    for _ in range(iters):
        codes = nearest_code(xs, c)
        num = torch.zeros(k, device=x.device).index_add_(0, codes.long(), w[order] * xs)
        den = torch.zeros(k, device=x.device).index_add_(0, codes.long(), w[order])
        new = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        new = new.sort().values
        if torch.allclose(new, c):
            break
        c = new
    return c


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest entry of a sorted 1-D ``codebook`` for every element of ``x``."""
    cb = codebook.float().to(x.device)
    mid = (cb[1:] + cb[:-1]) / 2
    return torch.bucketize(x.float().contiguous(), mid).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# low rank
# ----------------------------------------------------------------------------------------------


def low_rank(r: torch.Tensor, rank: int, method: str = "power", iters: int = 2, seed: int = 0):
    """Rank-``rank`` factors ``A (..., m, rank)``, ``B (..., rank, n)`` with ``A @ B ≈ r``.

    ``power``: randomized subspace (power) iteration, as GEAR (Kang et al. 2024, Alg. 1) uses for speed;
    ``svd``: the truncated SVD (the best rank-``rank`` approximation in Frobenius norm).
    """
    rf = r.float()
    m, n = rf.shape[-2:]
    rank = min(rank, m, n)
    if method == "svd":
        u, s, vh = torch.linalg.svd(rf, full_matrices=False)
        return u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, rank, generator=g).to(rf.device)
    y = rf @ omega
    for _ in range(iters):
        q, _ = torch.linalg.qr(y)
        y = rf @ (rf.transpose(-1, -2) @ q)
    q, _ = torch.linalg.qr(y)
    return q, q.transpose(-1, -2) @ rf


# ----------------------------------------------------------------------------------------------
# tokens and attention scores
# ----------------------------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(..., T)`` -> 1 bit per token, ``(..., ceil(T/8))`` uint8."""
    from .storage import pack

    return pack(mask.to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    from .storage import unpack

    return unpack(packed, 1, n).bool()


def mask_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted positions ``(B, H, count)`` of the True entries of ``mask (B, H, T)``; every row must hold
    exactly ``count`` of them (per-head budgets are equal, so the rows stay rectangular)."""
    B, H, T = mask.shape
    if count == 0:
        return torch.zeros(B, H, 0, dtype=torch.long, device=mask.device)
    # stable sort of "not selected" puts the selected positions first, in increasing order
    order = (~mask).to(torch.uint8).argsort(dim=-1, stable=True)
    return order[..., :count]


def scatter_tokens(out: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write ``rows (B, H, n, D)`` into ``out (B, H, T, D)`` at token positions ``pos (B, H, n)``."""
    if pos.shape[-1] == 0:
        return out
    return out.scatter(2, pos.long().unsqueeze(-1).expand(*pos.shape, out.shape[-1]), rows.to(out.dtype))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx (B, H, n)`` of ``x (B, H, T, ...)`` along the token axis."""
    shape = idx.shape + x.shape[3:]
    index = idx.long().reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(shape)
    return x.gather(2, index)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, q_pos: torch.Tensor,
                    softcap: float | None = None, chunk: int = 256,
                    key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of queries ``q (B, Hq, n, D)`` at absolute positions ``q_pos (n,)`` over
    keys ``k (B, Hkv, T, D)`` at positions ``0..T-1``; summed over the query heads sharing a KV head
    (GQA), returned as ``(B, Hkv, n, T)`` float32. Queries are processed ``chunk`` at a time to bound
    memory (this is the cost SDPA avoids; callers use few probe queries). ``key_valid (B, T)`` (False at
    padding) masks keys as the model's attention mask does; a query that sees no valid key (a padding
    position of a left-padded row) gets all-zero probabilities."""
    B, Hq, n, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    kf = k.float().repeat_interleave(rep, dim=1)
    out = []
    for s in range(0, n, chunk):
        qs = q[:, :, s:s + chunk].float()
        logits = qs @ kf.transpose(-1, -2) * scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        mask = torch.arange(T, device=k.device)[None, :] > q_pos[s:s + chunk, None].to(k.device)
        if key_valid is not None:
            mask = mask[None, None] | ~key_valid.to(k.device)[:, None, None, :]
        logits = logits.masked_fill(mask, float("-inf"))
        p = logits.softmax(-1)
        if key_valid is not None:  # rows with no valid key: softmax of all -inf is NaN
            p = p.nan_to_num(0.0)
        out.append(p.reshape(B, Hkv, rep, -1, T).sum(2))
    return torch.cat(out, dim=2)


# ----------------------------------------------------------------------------------------------
# query recomputation (probe tokens) from a pre-hook on the attention module
# ----------------------------------------------------------------------------------------------


def find_attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder self-attention modules by ``layer_idx`` (those with q_proj or a fused qkv_proj)."""
    found: dict[int, torch.nn.Module] = {}
    for _, mod in model.named_modules():
        idx = getattr(mod, "layer_idx", None)
        if idx is None or not (hasattr(mod, "q_proj") or hasattr(mod, "qkv_proj")):
            continue
        if idx not in found:
            found[idx] = mod
    return found


class QueryProbe:
    """What the attention module saw on its last call, enough to recompute queries at chosen positions.

    Recomputing queries (q_proj, optional q_norm, RoPE) for a few probe positions is how kvpress and
    ZipCache obtain attention scores without materialising the attention matrix, so the methods work
    with SDPA and flash attention.
    """

    def __init__(self) -> None:
        self.module: torch.nn.Module | None = None
        self.hidden: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None
        # (position_ids, dtype) -> (cos, sin) of this layer's RoPE (kvshrink.rope.RopeSource), to rotate
        # stored pre-RoPE keys again; set on the first capture when the probe was installed with rope=True
        self.rope_fn: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.rope_source: Any = None
        # the model call's 2-D attention mask (B, past + new; 0 = padding), set by a model pre-hook
        self.padding_mask: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.hidden is not None

    def capture(self, module: torch.nn.Module, hidden: torch.Tensor, pos_emb: Any,
                position_ids: torch.Tensor | None = None) -> None:
        self.module, self.hidden, self.position_ids = module, hidden, position_ids
        self.cos, self.sin = pos_emb if isinstance(pos_emb, (tuple, list)) and len(pos_emb) == 2 else (None, None)
        if self.rope_fn is None and self.rope_source is not None and self.cos is not None:
            self.rope_fn = self.rope_source.recompute_fn(self.cos)

    def clear(self) -> None:
        self.hidden = self.cos = self.sin = self.position_ids = None

    def key_valid(self, tokens: int) -> torch.Tensor | None:
        """``(B, tokens)`` bool, False at the padding of the held + new tokens, or None without padding (or
        with a mask that does not cover them: a cache fed without the model's attention mask)."""
        pm = self.padding_mask
        if pm is None or pm.shape[-1] != tokens or bool(pm.all()):
            return None
        return pm.bool()

    @property
    def scaling(self) -> float:
        m = self.module
        return float(getattr(m, "scaling", None) or 1.0 / math.sqrt(getattr(m, "head_dim")))

    @property
    def softcap(self) -> float | None:
        return getattr(self.module, "attn_logit_softcapping", None) or getattr(
            getattr(self.module, "config", None), "attn_logit_softcapping", None)

    @torch.no_grad()
    def queries(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Post-RoPE queries ``(B, Hq, n, D)`` of the chunk's positions ``idx`` (all when None)."""
        m, h = self.module, self.hidden
        if idx is not None:
            h = h[:, idx.to(h.device)]
        D = m.head_dim
        if hasattr(m, "q_proj"):
            q = m.q_proj(h)
        else:  # fused projection (Phi-3): queries come first
            q = m.qkv_proj(h)[..., : m.config.num_attention_heads * D]
        q = q.view(*h.shape[:-1], -1, D)
        if getattr(m, "q_norm", None) is not None:
            q = m.q_norm(q)
        q = q.transpose(1, 2)
        if self.cos is not None:
            from .rope import apply_rope

            cos, sin = self.cos, self.sin
            if idx is not None:
                cos, sin = cos[:, idx.to(cos.device)], sin[:, idx.to(sin.device)]
            q = apply_rope(q, cos, sin)
        return q


def install_query_probes(model: torch.nn.Module, cache: Any, want: type, rope: bool = False) -> list:
    """Give every cache layer of type ``want`` (looked up through policy wrappers via ``.inner``) a
    :class:`QueryProbe` fed by a forward pre-hook on its attention module, and the call's 2-D padding mask by
    a pre-hook on the model; both capture only calls that use this ``cache``. With ``rope``, forward hooks on the
    rotary modules (:class:`kvshrink.rope.RopeSource`) let the probe recompute (cos, sin) for stored positions.
    Returns hook handles."""
    import weakref

    from .rope import RopeSource, rotary_modules

    modules = find_attention_modules(model)
    handles = []
    source = None
    if rope:
        source = RopeSource()
        handles = [m.register_forward_hook(source.hook, with_kwargs=True) for m in rotary_modules(model)]
    cache_ref = weakref.ref(cache)
    probes: list[QueryProbe] = []
    for idx, layer in enumerate(cache.layers):
        target = layer
        while target is not None and not isinstance(target, want):
            target = getattr(target, "inner", None)
        if target is None or idx not in modules:
            continue
        probe = QueryProbe()
        probe.rope_source = source
        target.probe = probe
        probes.append(probe)

        def hook(module, args, kwargs, probe=probe):
            pkv = cache_in(kwargs)
            if pkv is not None and pkv is not cache_ref():
                return  # another cache on the same model: not ours to capture
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            pos = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            if hidden is not None:
                probe.capture(module, hidden, pos, kwargs.get("position_ids"))

        handles.append(modules[idx].register_forward_pre_hook(hook, with_kwargs=True))

    def model_hook(module, args, kwargs):  # the call's 2-D padding mask, for every probe of this cache
        if cache_in(kwargs) is not cache_ref():
            return
        mask = call_padding_mask(kwargs)
        for probe in probes:
            probe.padding_mask = mask

    handles.append(model.register_forward_pre_hook(model_hook, with_kwargs=True))
    return handles


__all__ = ["StateLayer", "storage_nbytes", "index_dtype", "outlier_count", "split_outliers", "merge_outliers",
           "weighted_kmeans_1d", "nearest_code", "low_rank", "gather_tokens", "half_dtype", "pack_mask",
           "unpack_mask", "mask_positions", "scatter_tokens", "attention_probs",
           "find_attention_modules", "QueryProbe", "install_query_probes"]
