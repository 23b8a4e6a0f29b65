"""KVQuant: non-uniform, dense-and-sparse, pre-RoPE KV cache quantization.

Hooper, Kim, Mohammadzadeh, Mahoney, Shao, Keutzer, Gholami. "KVQuant: Towards 10 Million Context Length
LLM Inference with KV Cache Quantization", NeurIPS 2024 (arXiv 2401.18079). Implemented, per layer:

* Sec. 3.1 per-channel keys: each key channel is normalised by a range calibrated offline
  (``center ± range`` from the ``outliers/2`` and ``1 - outliers/2`` percentiles of calibration keys), so
  appending tokens needs no new key scales; values are normalised per token online (Sec. 3.6).
* Sec. 3.2 pre-RoPE keys: keys are rotated back before quantization and RoPE is re-applied to the
  dequantized keys at each token's position (positions stored as int32, counted).
* Sec. 3.3 nuq datatype: a ``2**bits``-entry codebook per layer (keys and values each) from k-means over
  the normalised calibration activations, weighted by the Fisher information (squared gradients of the
  LM loss); stored codes are bit-packed indices into it.
* Sec. 3.4 per-vector dense-and-sparse: the ``outliers`` fraction of each token vector farthest from the
  range (keys: largest ``|normalised key|``; values: farthest from the token's median) is kept exactly in
  fp16 with its uint8 channel index; the dense rest is normalised to ``[-1, 1]`` without them.
* Q-Norm (the paper's first arXiv version): the decoding codebook is affinely corrected so the dequantized
  calibration data has the original mean and standard deviation (one scale + offset per codebook, folded
  into a second, decoding codebook).
* Attention-sink-aware quantization (later arXiv versions): the first ``sink`` tokens are kept unquantized.

Calibration (``calibrate=``): ``fisher`` (default) runs one forward/backward pass over a short built-in
text when the cache is built for a model (``make_cache(model, "kvquant")``; the text is tokenised with the
model's tokenizer if it can be loaded offline, otherwise fixed pseudo-random tokens are used:
``KVQuant.calibration_source`` says which); ``prefill`` (or a cache built from a config only) calibrates
each layer lazily, unweighted, from the first chunk it receives, i.e. from the prompt itself.

Layout per layer (``nbytes()`` counts all): shared ``k_cb``/``v_cb`` (fp16 codebooks) and ``k_cbn``/``v_cbn``
(Q-Norm decoding codebooks), ``k_center``/``k_range`` (fp16, ``(H, D)``); per token ``k_codes``/``v_codes``
(``(B, H, T, ceil(D/8)*bits)`` uint8), ``v_center``/``v_range`` (fp16 ``(B, H, T, 1)``), ``k_oval``/``v_oval``
(fp16 ``(B, H, T, k)``) and ``k_oidx``/``v_oidx`` (uint8), ``pos`` (int32 ``(B, T)``, pre-RoPE only;
``(B, H, T)`` behind an eviction policy keeping different tokens per head),
``sink_k``/``sink_v`` (16-bit: the model's dtype if 16-bit, else fp16).

Deviation: the paper marks key outliers with calibrated per-channel thresholds (a variable number per
token); here each token keeps exactly ``round(outliers * head_dim)`` (at least 1), which keeps the sparse
part a fixed-shape tensor and its bytes predictable.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..hf_compat import cache_kw
from ..quant_utils import (StateLayer, gather_tokens, half_dtype, install_query_probes, merge_outliers, nearest_code, outlier_count,
                           split_outliers, weighted_kmeans_1d)
from ..rope import append_positions, apply_rope, check_rope_style, invert_rope, rotate_half
from ..registry import register
from ..storage import pack, unpack
from .base import Quantizer, check_choice, require

# Short English calibration text (written for kvshrink; plain prose, numbers, a little code).
CALIBRATION_TEXT = (
    "The library stood at the end of a quiet street, its windows lit long after the shops had closed. "
    "Inside, three volunteers sorted donated books into boxes marked history, science, fiction and "
    "reference. One of them, a retired engineer, kept a notebook of every title that arrived: 1,204 in "
    "March, 987 in April, and more than two thousand in May after a local school emptied its shelves. "
    "He liked to say that a catalogue is a promise to the next reader. When the council proposed to "
    "close the building, the volunteers printed the notebook, counted the visitors for a month, and "
    "showed that the reading room was full every afternoon. The decision was postponed, then reversed. "
    "Today the same notebook is a spreadsheet, and a short script checks it each night:\n"
    "def overdue(loans, today):\n    return [l for l in loans if l.due < today and not l.returned]\n"
    "Questions about the collection can be sent by letter or asked at the front desk, where a map "
    "shows which shelves hold maps, atlases, newspapers and the small collection of recorded music."
)

_CALIBRATIONS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_FILES: dict = {}


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------


def _stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x[mask].float()
    return x.mean(), x.std(unbiased=False).clamp_min(1e-12)


def _codebooks(norm: torch.Tensor, inlier: torch.Tensor, weight: torch.Tensor | None, bits: int,
               qnorm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k-means codebook over the normalised inliers (Fisher-weighted) and its Q-Norm decoding copy."""
    w = None if weight is None else weight[inlier]
    cb = weighted_kmeans_1d(norm[inlier], 2**bits, w)
    if not qnorm:
        return cb.half(), None
    m1, s1 = _stats(norm, inlier)
    q = cb[nearest_code(norm, cb).long()]
    m2, s2 = _stats(q, inlier)
    return cb.half(), (cb * (s1 / s2) + (m1 - m2 * s1 / s2)).half()


def key_ranges(keys: torch.Tensor, outliers: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``center, range`` (fp16, ``(H, D)``) from calibration keys ``(N, H, D)``: the
    ``outliers/2`` and ``1 - outliers/2`` percentiles over tokens (min/max when outliers is 0)."""
    k = keys.float()
    if outliers > 0 and k.shape[0] > 1:
        lo = torch.quantile(k, outliers / 2, dim=0)
        hi = torch.quantile(k, 1 - outliers / 2, dim=0)
    else:
        lo, hi = k.amin(0), k.amax(0)
    center = ((hi + lo) / 2).half()
    rng = ((hi - lo) / 2).clamp_min(1e-6).half()
    return center, rng


def normalise_values(v: torch.Tensor, k: int):
    """Per-token dense-and-sparse split and normalisation of values ``(..., D)`` (Sec. 3.4/3.6)."""
    dense, oval, oidx = split_outliers(v.float(), k)
    mx, mn = dense.amax(-1, keepdim=True), dense.amin(-1, keepdim=True)
    center = ((mx + mn) / 2).half()
    rng = ((mx - mn) / 2).clamp_min(1e-6).half()
    norm = (dense - center.float()) / rng.float()
    return norm, center, rng, oval, oidx


def calibrate_layer(keys: torch.Tensor, values: torch.Tensor, bits: int, outliers: float, qnorm: bool,
                    key_fisher: torch.Tensor | None = None, value_fisher: torch.Tensor | None = None) -> dict:
    """Calibration tables of one layer from keys/values ``(N, H, D)`` (pre-RoPE keys if used) and,
    optionally, their Fisher weights (squared gradients, same shapes)."""
    D = keys.shape[-1]
    k_out = outlier_count(outliers, D)
    center, rng = key_ranges(keys, outliers)
    kn = (keys.float() - center.float()) / rng.float()
    kmask = torch.ones_like(kn, dtype=torch.bool)
    if k_out:
        kmask.scatter_(-1, kn.abs().topk(k_out, dim=-1).indices, False)
    k_cb, k_cbn = _codebooks(kn.clamp(-1, 1), kmask, key_fisher, bits, qnorm)
    vn, _, _, _, vidx = normalise_values(values, k_out)
    vmask = torch.ones_like(vn, dtype=torch.bool)
    if vidx is not None:
        vmask.scatter_(-1, vidx.long(), False)
    v_cb, v_cbn = _codebooks(vn, vmask, value_fisher, bits, qnorm)
    return {"k_cb": k_cb, "k_cbn": k_cbn, "v_cb": v_cb, "v_cbn": v_cbn, "k_center": center, "k_range": rng}


class _Recorder:
    """Keeps what the model gives a cache layer (with gradients) during calibration."""

    def __init__(self) -> None:
        self.k = self.v = None

    def __call__(self, k, v):
        if k.requires_grad:
            k.retain_grad()
            v.retain_grad()
        self.k, self.v = k, v
        return k, v


def calibration_ids(model: Any, max_tokens: int = 256) -> tuple[torch.Tensor, str]:
    """Token ids of :data:`CALIBRATION_TEXT` with the model's own tokenizer when it loads offline;
    otherwise fixed pseudo-random ids (seed 0). Returns ``(ids (1, T), source description)``."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    if name:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            ids = tok(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :max_tokens]
            if ids.shape[1] >= 16:
                return ids, f"built-in text ({ids.shape[1]} tokens, tokenizer of {name})"
        except Exception:  # no tokenizer saved with the model: fall through
            pass
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, max_tokens), generator=g)
    return ids, f"{max_tokens} pseudo-random tokens (no tokenizer found offline for this model)"


def calibrate_model(model: Any, bits: int, outliers: float, qnorm: bool, prerope: bool, fisher: bool = True,
                    input_ids: torch.Tensor | None = None, skip: int = 1) -> tuple[dict[int, dict], str]:
    """Run ``model`` on calibration tokens, capture every full-attention layer's K/V (pre-RoPE keys when
    asked) and, with ``fisher``, their squared gradients of the next-token loss; fit each layer's tables.

    Parameters are frozen during the pass (only activation gradients are computed) and restored after.
    The first ``skip`` tokens (the attention sink, stored exactly) are left out of the statistics."""
    from transformers.cache_utils import Cache, DynamicCache

    from ..layer import PassthroughLayer
    from ..model_info import model_info
    from ..quant_utils import find_attention_modules

    info = model_info(model)
    source = "given input_ids"
    if input_ids is None:
        input_ids, source = calibration_ids(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    stock = DynamicCache(config=info.config).layers
    recorders: dict[int, _Recorder] = {}

    class Rec(PassthroughLayer):
        def __init__(self, rec):
            super().__init__()
            self.rec = rec
            self.check_finite = False

        def update(self, k, v, *a, **kw):
            if not self.is_initialized:
                self.lazy_initialization(k, v)
            self.seen += k.shape[-2]
            return self.rec(k, v)

    layers = []
    for i, kind in enumerate(info.layer_kinds):
        if kind == "full":
            recorders[i] = _Recorder()
            layers.append(Rec(recorders[i]))
        else:
            layers.append(stock[i])
    cache = Cache(layers=layers)
    pos_emb: dict[int, tuple] = {}
    handles = []
    for idx, mod in find_attention_modules(model).items():
        def hook(module, args, kwargs, idx=idx):
            pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            pos_emb[idx] = pe
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            emb = model.get_input_embeddings()(input_ids).detach().requires_grad_(fisher)
            out = model(inputs_embeds=emb, **cache_kw(model, cache), use_cache=True)
            if fisher:
                logits = out.logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         input_ids[:, 1:].reshape(-1))
                loss.backward()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        for h in handles:
            h.remove()
    tables = {}
    for i, rec in recorders.items():
        k, v = rec.k.detach(), rec.v.detach()
        gk = rec.k.grad if fisher else None
        gv = rec.v.grad if fisher else None
        if prerope and pos_emb.get(i) is not None:
            cos, sin = pos_emb[i]
            k = invert_rope(k.float(), cos, sin)
            if gk is not None:  # d/dk_pre = R^T d/dk_post: rotate the gradient back by the same angles
                c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
                d = c.shape[-1]
                g = gk.float()
                gk = torch.cat([g[..., :d] * c - rotate_half(g[..., :d]) * s, g[..., d:]], -1)

        def flat(x):  # (B, H, T, D) -> (B*(T-skip), H, D)
            if x is None:
                return None
            x = x[:, :, min(skip, x.shape[2] - 1):]
            return x.float().transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])

        fk = None if gk is None else flat(gk) ** 2
        fv = None if gv is None else flat(gv) ** 2
        tables[i] = calibrate_layer(flat(k).cpu(), flat(v).cpu(), bits, outliers, qnorm,
                                    None if fk is None else fk.cpu(), None if fv is None else fv.cpu())
    what = "Fisher-weighted" if fisher else "unweighted"
    return tables, f"{what} k-means on {source}"


def calibrate(model: Any, method: "KVQuant", input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fisher-weighted calibration on ``input_ids``, as tensors for a calibration file
    (``layers.{i}.{k_cb,k_cbn,v_cb,v_cbn,k_center,k_range}``); pair with :meth:`KVQuant.calib_params`."""
    tables, _ = calibrate_model(model, method.bits, method.outliers, method.qnorm, method.prerope,
                                fisher=method.calibrate == "fisher", input_ids=input_ids, skip=method.sink)
    return {f"layers.{i}.{name}": t for i, tab in tables.items() for name, t in tab.items() if t is not None}


# ----------------------------------------------------------------------------------------------
# the cache layer
# ----------------------------------------------------------------------------------------------


class KVQuantLayer(StateLayer):
    shared_fields = ("k_cb", "k_cbn", "v_cb", "v_cbn", "k_center", "k_range")
    state_fields = ("sink_k", "sink_v", "k_codes", "k_oval", "k_oidx", "v_codes", "v_center", "v_range",
                    "v_oval", "v_oidx", "pos")

    def __init__(self, bits: int, outliers: float, sink: int, prerope: bool, qnorm: bool) -> None:
        super().__init__()
        self.bits, self.outliers, self.sink, self.prerope, self.qnorm = bits, outliers, sink, prerope, qnorm
        self.probe = None
        self.calibrated_from: str | None = None

    @property
    def calibrated(self) -> bool:
        return self.k_cb is not None

    def set_calibration(self, tables: dict, source: str) -> None:
        for name in self.shared_fields:
            t = tables.get(name)
            setattr(self, name, None if t is None else t.clone())
        self.calibrated_from = source

    def _to_device(self, device) -> None:
        for name in self.shared_fields:
            t = getattr(self, name)
            if t is not None and t.device != device:
                setattr(self, name, t.to(device))

    def _positions(self, n: int, batch: int, device) -> torch.Tensor:
        pid = None if self.probe is None else self.probe.position_ids
        if pid is not None and pid.shape[-1] == n:
            return pid.to(device=device, dtype=torch.int32).expand(batch, n)
        return (torch.arange(n, device=device, dtype=torch.int32) + self.seen).expand(batch, n)

    def _rope(self, positions: torch.Tensor, like: torch.Tensor):
        """(cos, sin) at ``positions`` (B, T) -> (B, T, R), or per head (B, H, T) -> (B, H, T, R)."""
        if self.probe is None or self.probe.rope_fn is None:
            raise RuntimeError(
                "kvquant: prerope=true needs the model's RoPE (cos, sin), captured by hooks on the model: build the "
                "cache with make_cache(model, ...) (not from a config) and run it through that model, or use "
                "prerope=false to quantize post-RoPE keys")
        if positions.dim() == 2:
            return self.probe.rope_fn(positions.long(), torch.float32)
        B, H, T = positions.shape
        cos, sin = self.probe.rope_fn(positions.reshape(B, H * T).long(), torch.float32)
        return cos.reshape(B, H, T, -1), sin.reshape(B, H, T, -1)

    takes_index = True  # pre-RoPE: the chunk's (cos, sin) and positions are gathered at the kept tokens

    def append(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Store ``k, v (B, H, n, D)``: the model's whole chunk (``index`` None) or, behind an eviction policy,
        the tokens at chunk positions ``index (B, H, n)`` (per head), whose captured RoPE and positions are
        gathered there so that keys are stored pre-RoPE and re-RoPE'd at their true positions."""
        B, H, n, D = k.shape
        pos = cos = sin = None
        if self.prerope:
            probe = self.probe
            m = probe.cos.shape[-2] if (probe is not None and probe.cos is not None) else None
            if m is None or (index is None and m != n):
                pos = self._positions(n, B, k.device)
                self._rope(pos, k)  # raises the explanation when no hooks are installed
                raise RuntimeError(f"kvquant: the model computed RoPE for {m} tokens but {n} were given to the "
                                   "cache without an index saying which (a merging policy in front of it?); a "
                                   "policy must pass append(k, v, index=...), or use prerope=false")
            pos, cos, sin = self._positions(m, B, k.device), probe.cos, probe.sin
            if index is not None:
                index = index.to(device=k.device, dtype=torch.long)
                pos = pos[:, None].expand(B, H, m).gather(2, index)
                R = cos.shape[-1]
                g = index[..., None].expand(B, H, n, R)
                cos = cos.expand(B, m, R)[:, None].expand(B, H, m, R).gather(2, g)
                sin = sin.expand(B, m, R)[:, None].expand(B, H, m, R).gather(2, g)
            probe.clear()  # do not keep the layer's hidden states alive between steps
        self._store(k, v, pos, cos, sin)

    def select(self, idx: torch.Tensor) -> None:
        """Keep held tokens ``idx (B, H, T')`` (decode-time eviction by a policy in front): the kept tokens are
        dequantized and stored again (quantized a second time) at their own positions (kept per head)."""
        K, V = self.dense()
        if K is None:
            return
        idx = idx.to(device=K.device, dtype=torch.long)
        B, H, T2 = idx.shape
        kk, vv = gather_tokens(K, idx), gather_tokens(V, idx)
        pos = None
        if self.prerope:
            nsink = 0 if self.sink_k is None else self.sink_k.shape[2]
            p = self.pos if self.pos is not None else torch.zeros(B, 0, dtype=torch.int32, device=K.device)
            p = p if p.dim() == 3 else p[:, None].expand(B, H, p.shape[-1])
            # sinks hold no position: they are the first tokens and stay sinks (kept tokens are in text order)
            full = torch.cat([p.new_full((B, H, nsink), -1), p], dim=-1)
            pos = full.gather(2, idx)
        for name in self.state_fields:
            setattr(self, name, None)
        self._store(kk, vv, pos, None, None)

    def _add_pos(self, pos: torch.Tensor) -> None:
        self.pos = append_positions(self.pos, pos, self.num_heads)

    def _store(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None, cos: torch.Tensor | None,
               sin: torch.Tensor | None) -> None:
        """Store post-RoPE ``k, v`` at positions ``pos`` ((B, n) or (B, H, n); pre-RoPE only) with their RoPE
        ``cos/sin`` (None: recomputed from ``pos``)."""
        B, H, n, D = k.shape
        held_sink = 0 if self.sink_k is None else self.sink_k.shape[2]
        take = min(n, max(0, self.sink - held_sink))
        if take:  # attention sink: the very first tokens stay unquantized (post-RoPE, 16-bit)
            sk, sv = k[:, :, :take].to(half_dtype(k.dtype)), v[:, :, :take].to(half_dtype(k.dtype))
            self.sink_k = sk.clone() if self.sink_k is None else torch.cat([self.sink_k, sk], 2)
            self.sink_v = sv.clone() if self.sink_v is None else torch.cat([self.sink_v, sv], 2)
        if take == n:
            return
        k, v = k[:, :, take:], v[:, :, take:]
        if self.prerope:
            pos = pos[..., take:]
            if cos is None:
                cos, sin = self._rope(pos, k)
            else:
                cos, sin = cos[..., take:, :], sin[..., take:, :]
            k = invert_rope(k.float(), cos.float(), sin.float())
            self._add_pos(pos)
        if not self.calibrated:  # lazy calibration from this (first) chunk: unweighted k-means
            flat = lambda x: x.float().transpose(1, 2).reshape(-1, H, D)  # noqa: E731
            self.set_calibration(calibrate_layer(flat(k), flat(v), self.bits, self.outliers, self.qnorm),
                                 f"unweighted k-means on the first {k.shape[2]} tokens given to the cache")
        self._to_device(k.device)
        kk = outlier_count(self.outliers, D)
        kn = (k.float() - self.k_center.float()[:, None]) / self.k_range.float()[:, None]
        kd, _, kidx = split_outliers(kn, kk, center=torch.zeros_like(kn[..., :1]))
        kcodes = pack(nearest_code(kd, self.k_cb), self.bits)
        vn, vc, vr, voval, voidx = normalise_values(v, kk)
        vcodes = pack(nearest_code(vn, self.v_cb), self.bits)
        koval = None if kidx is None else k.gather(-1, kidx.long()).half()
        new = {"k_codes": kcodes, "k_oval": koval, "k_oidx": kidx, "v_codes": vcodes, "v_center": vc,
               "v_range": vr, "v_oval": voval, "v_oidx": voidx}
        for name, t in new.items():
            if t is not None:
                old = getattr(self, name)
                setattr(self, name, t if old is None else torch.cat([old, t], 2))

    def _decode(self, codes: torch.Tensor, cb: torch.Tensor, cbn: torch.Tensor | None, D: int) -> torch.Tensor:
        book = (cbn if cbn is not None else cb).float()
        return book[unpack(codes, self.bits, D).long()]

    def dense(self):
        if self.k_codes is None:
            if self.sink_k is None:
                return None, None
            return self.sink_k.to(self.dtype), self.sink_v.to(self.dtype)
        D = self.head_dim
        k = self._decode(self.k_codes, self.k_cb, self.k_cbn, D)
        k = k * self.k_range.float()[:, None] + self.k_center.float()[:, None]
        k = merge_outliers(k, self.k_oval, self.k_oidx)
        if self.prerope:
            cos, sin = self._rope(self.pos, k)
            k = apply_rope(k, cos.float(), sin.float())
        v = self._decode(self.v_codes, self.v_cb, self.v_cbn, D) * self.v_range.float() + self.v_center.float()
        v = merge_outliers(v, self.v_oval, self.v_oidx)
        k, v = k.to(self.dtype), v.to(self.dtype)
        if self.sink_k is not None:
            k, v = torch.cat([self.sink_k.to(k.dtype), k], 2), torch.cat([self.sink_v.to(v.dtype), v], 2)
        return k, v


@register
@dataclass
class KVQuant(Quantizer):
    """Non-uniform (k-means) codes, pre-RoPE per-channel keys, fp16 sparse outliers, Q-Norm, sink token.

    Per-token values; codebooks Fisher-weighted on a calibration text (see the module docstring)."""

    name = "kvquant"
    paper = ("Hooper et al. 2024, KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache "
             "Quantization (arXiv 2401.18079)")

    bits: int = field(default=3, metadata={"help": "bits per code: 2, 3 or 4 (nuq2/nuq3/nuq4)"})
    outliers: float = field(default=0.01, metadata={
        "help": "fraction of each vector kept as fp16 sparse outliers (paper: 1%)"})
    sink: int = field(default=1, metadata={"help": "first tokens kept unquantized (attention sink)"})
    prerope: bool = field(default=True, metadata={
        "help": "quantize keys before RoPE (needs the model: make_cache(model, ...))"})
    qnorm: bool = field(default=True, metadata={
        "help": "Q-Norm: match the dequantized mean/std (paper: helps at 2 bits)"})
    calibrate: str = field(default="fisher", metadata={
        "help": "fisher: Fisher-weighted k-means on a built-in text when built for a model; prefill: unweighted, "
                "from each layer's first chunk"})
    calib_tokens: int = field(default=256, metadata={"help": "tokens of the built-in calibration pass (fisher)"})
    calib: str | None = field(default=None, metadata={
        "help": "calibration file (safetensors + JSON, see kvshrink.calibration) with every layer's codebooks and "
                "key ranges; none: calibrate as `calibrate` says"})

    # how the codebooks of the last cache built were obtained (set by attach)
    calibration_source: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_choice("kvquant", "bits", self.bits, (2, 3, 4))
        check_choice("kvquant", "calibrate", self.calibrate, ("fisher", "prefill"))
        require(0 <= self.outliers < 0.5,
                f"kvquant: outliers={self.outliers} must be a fraction in [0, 0.5) (paper: 0.01); 0 disables them")
        require(self.sink >= 0, f"kvquant: sink={self.sink} must be >= 0 tokens")
        require(self.calib_tokens >= 16, f"kvquant: calib_tokens={self.calib_tokens} is too few; use at least 16")

    def validate(self, info) -> None:
        if self.prerope and info.config is not None:
            check_rope_style(info.config)
        if self.calib:
            self._file_tables(info)

    def calib_params(self, info=None) -> dict[str, Any]:
        """The parameters the calibration tables depend on (a calibration file must match them)."""
        return {"bits": self.bits, "outliers": self.outliers, "qnorm": self.qnorm, "prerope": self.prerope,
                "sink": self.sink}

    def _file_tables(self, info) -> dict[int, dict]:
        from ..calibration import check_calibration, load_calibration

        key = (os.path.abspath(self.calib), os.path.getmtime(self.calib) if os.path.exists(self.calib) else None)
        if key not in _FILES:  # read once, not once per layer
            _FILES[key] = load_calibration(self.calib)
        tensors, meta = _FILES[key]
        check_calibration(meta, self.calib, self.name, self.calib_params(info), info.identity())
        tables: dict[int, dict] = {}
        for key, t in tensors.items():
            _, idx, name = key.split(".", 2)
            tables.setdefault(int(idx), {})[name] = t
        missing = [i for i, kind in enumerate(info.layer_kinds) if kind == "full" and i not in tables]
        require(not missing, f"kvquant: calibration file {self.calib} has no tables for layers {missing[:5]}; "
                             "recalibrate for this model")
        return tables

    def make_layer(self, layer_idx, info):
        layer = KVQuantLayer(self.bits, self.outliers, self.sink, self.prerope, self.qnorm)
        if self.calib:
            layer.set_calibration(self._file_tables(info)[layer_idx], f"calibration file {self.calib}")
        return layer

    def attach(self, model, cache) -> list:
        handles = install_query_probes(model, cache, KVQuantLayer, rope=True) if self.prerope else []
        layers = {i: l for i, l in enumerate(cache.layers) if isinstance(l, KVQuantLayer)}
        if self.calib:
            self.calibration_source = f"calibration file {self.calib}"
        elif self.calibrate == "fisher" and layers:
            key = (self.bits, self.outliers, self.qnorm, self.prerope, self.sink, self.calib_tokens)
            memo = _CALIBRATIONS.setdefault(model, {})
            if key not in memo:  # once per model and setting: reused by every later cache
                ids, source = calibration_ids(model, self.calib_tokens)
                tables, how = calibrate_model(model, self.bits, self.outliers, self.qnorm, self.prerope,
                                              input_ids=ids, skip=self.sink)
                memo[key] = tables, how.replace("given input_ids", source)
            tables, source = memo[key]
            for i, layer in layers.items():
                layer.set_calibration(tables[i], source)
            self.calibration_source = source
        else:
            self.calibration_source = "unweighted k-means on each layer's first chunk (the prompt)"
        return handles
