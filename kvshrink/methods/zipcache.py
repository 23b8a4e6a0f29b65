"""ZipCache: mixed-precision KV quantization driven by normalised attention saliency, probe-token estimated.

He, Zhang, Wu, Liu, Zhou, Zhuang. "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification", NeurIPS 2024 (arXiv 2405.14256). Implemented:

* Channel-separable tokenwise quantization (CSTQuant, the paper's Algorithm 1) for values: each channel is divided
  by ``c_i = sqrt(max|X_i|)`` (shared by the tokens quantized together), then every token is quantized with
  its own scale/zero point; keys are quantized channel-wise (one scale/zero per channel), as in the authors'
  configuration.
* Normalised attention score (saliency metric): a token's saliency is the attention it receives summed over the
  queries that can see it, divided by how many queries can, which removes the causal mask's bias
  towards early tokens.
* Efficient approximation with probe tokens: only probe queries are scored, ``probe_recent`` of the newest positions
  plus ``probe_random`` random others (the paper's hybrid probe strategy, 5% + 5%); the probe queries are
  recomputed from a forward pre-hook on the attention module (q_proj, q_norm, RoPE), so the model keeps
  running SDPA/flash attention and the full attention matrix is never built.
* Mixed precision: per chunk and per KV head, the ``salient`` fraction of tokens with the highest saliency is
  stored at ``hi_bits``, the rest at ``lo_bits``; each class is quantized separately (its own channel
  ranges).
* Streaming (authors' ``streaming_gap``): the prompt (any multi-token chunk) is compressed at once; decoded
  tokens wait in a 16-bit buffer, their saliency accumulated exactly from each decoding query (one query per
  step, no probes needed), and are compressed every ``stream`` tokens.

Defaults are the authors' demo configuration: 4-bit salient / 2-bit regular tokens, 40% regular
(``salient=0.6``), re-compression every 100 tokens.

Layout per layer, all counted by ``nbytes()``: per chunk ``k_hi``/``k_lo`` (packed codes, fp16 scale/zero per
channel), ``v_hi``/``v_lo`` (packed codes, fp16 scale/zero per token) with ``v_hi_c``/``v_lo_c`` (fp16 channel
normalisers ``(B, H, 1, D)``), ``mask`` (1 bit per token and head: salient or not); ``k_buf``/``v_buf``
(16-bit) and ``buf_score`` (fp32 accumulated attention of buffered tokens).

Needs the model (``make_cache(model, "zipcache")``): saliency comes from the model's queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant_utils import (QueryProbe, StateLayer, attention_probs, gather_tokens, half_dtype, install_query_probes,
                           mask_positions, pack_mask, scatter_tokens, unpack_mask)
from ..registry import register
from ..storage import QuantizedTensor, quantize
from .base import Quantizer, check_choice, require


def cst_quantize(x: torch.Tensor, bits: int) -> tuple[QuantizedTensor, torch.Tensor]:
    """CSTQuant (Alg. 1): channel normaliser ``c = sqrt(max_t |x|)`` then per-token quantization of ``x / c``."""
    c = x.float().abs().amax(dim=2, keepdim=True).sqrt().clamp_min(1e-4).to(torch.float16)
    return quantize(x.float() / c.float(), bits, "channel", x.shape[-1]), c


def cst_dequantize(q: QuantizedTensor, c: torch.Tensor) -> torch.Tensor:
    return q.dequantize().float() * c.float()


class ZipCacheLayer(StateLayer):
    state_fields = ("k_hi", "k_lo", "v_hi", "v_lo", "v_hi_c", "v_lo_c", "mask", "k_buf", "v_buf", "buf_score")

    def __init__(self, hi_bits: int, lo_bits: int, salient: float, probe_recent: float, probe_random: float,
                 stream: int, layer_idx: int) -> None:
        super().__init__()
        self.hi_bits, self.lo_bits, self.salient = hi_bits, lo_bits, salient
        self.probe_recent, self.probe_random, self.stream = probe_recent, probe_random, stream
        self.layer_idx = layer_idx
        self.probe: QueryProbe | None = None
        self.chunk_lens: list[int] = []  # tokens of each compressed chunk (bookkeeping, no tensor)
        self._keys_now: torch.Tensor | None = None
        self.keep_scores = False  # inspection: keep the last chunk's saliency in ``last_score`` (not counted)
        self.last_score: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.chunk_lens = []

    # the dense keys attention is about to use: the saliency of new tokens is scored against them
    def attention_inputs(self, k_new, v_new):
        out = super().attention_inputs(k_new, v_new)
        self._keys_now = out[0] if k_new is not None else None
        return out

    def _need_probe(self) -> QueryProbe:
        if self.probe is None or not self.probe.ready:
            raise RuntimeError("zipcache needs the model's queries to score tokens: build the cache with "
                               "make_cache(model, 'zipcache') (not from a config) and run it through that model")
        return self.probe

    def _check_chunk(self, probe: QueryProbe, n: int) -> None:
        if probe.hidden.shape[1] != n:
            raise RuntimeError(f"zipcache: the attention module saw {probe.hidden.shape[1]} tokens but the cache "
                               f"was given {n} (an eviction policy composed in front of it?); zipcache scores the "
                               "tokens it receives against their own queries, so use it without an evicting policy")

    def _all_keys(self, k: torch.Tensor) -> torch.Tensor:
        keys = self._keys_now
        self._keys_now = None
        if keys is None or keys.shape[2] != self.seen + k.shape[2]:
            past, _ = self.dense()
            keys = k if past is None else torch.cat([past, k.to(past.dtype)], 2)
        return keys

    def probe_positions(self, n: int) -> torch.Tensor:
        """Hybrid probes (the paper's best probe strategy): the newest ``probe_recent`` fraction of the chunk
        plus ``probe_random`` of it drawn from the rest (fixed seed per layer)."""
        recent = max(1, round(self.probe_recent * n))
        rest = n - recent
        n_rand = min(rest, round(self.probe_random * n))
        g = torch.Generator().manual_seed(1000 + self.layer_idx)
        rand = torch.randperm(rest, generator=g)[:n_rand] if n_rand else torch.zeros(0, dtype=torch.long)
        return torch.cat([rand.sort().values, torch.arange(rest, n)])

    def _compress(self, k: torch.Tensor, v: torch.Tensor, score: torch.Tensor) -> None:
        B, H, T, D = k.shape
        if self.keep_scores:
            self.last_score = score
        n_hi = min(T, round(self.salient * T))
        top = score.topk(n_hi, dim=-1).indices if n_hi else score[..., :0].long()
        mask = torch.zeros(B, H, T, dtype=torch.bool, device=k.device).scatter_(-1, top, True)
        parts = {}
        for name, sel, count, bits in (("hi", mask, n_hi, self.hi_bits), ("lo", ~mask, T - n_hi, self.lo_bits)):
            if count == 0:
                parts[name] = (None, None, None)
                continue
            pos = mask_positions(sel, count)
            kq = quantize(gather_tokens(k, pos).float(), bits, "token", count)
            vq, vc = cst_quantize(gather_tokens(v, pos), bits)
            parts[name] = (kq, vq, vc)
        for name in ("hi", "lo"):
            kq, vq, vc = parts[name]
            setattr(self, f"k_{name}", (getattr(self, f"k_{name}") or []) + [kq])
            setattr(self, f"v_{name}", (getattr(self, f"v_{name}") or []) + [vq])
            setattr(self, f"v_{name}_c", (getattr(self, f"v_{name}_c") or []) + [vc])
        self.mask = (self.mask or []) + [pack_mask(mask)]
        self.chunk_lens.append(T)

    def _flush(self) -> None:
        if self.k_buf is None:
            return
        n = self.k_buf.shape[2]
        counts = torch.arange(n, 0, -1, device=self.buf_score.device, dtype=torch.float32)  # queries that saw each
        kb, vb, score = self.k_buf, self.v_buf, self.buf_score / counts
        self.k_buf = self.v_buf = self.buf_score = None
        self._compress(kb, vb, score)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        probe = self._need_probe()
        self._check_chunk(probe, k.shape[2])
        keys = self._all_keys(k)
        n, T_all = k.shape[2], keys.shape[2]
        if n > 1:  # a prompt chunk: probe-estimated normalised attention, compressed at once
            self._flush()  # the buffer's tokens stay among the keys scored against (same tokens)
            idx = self.probe_positions(n)
            q = probe.queries(idx)
            q_pos = (T_all - n) + idx
            p = attention_probs(q, keys, probe.scaling, q_pos, probe.softcap,
                                key_valid=probe.key_valid(T_all))[..., T_all - n:]  # (B,H,P,n); padding: 0
            seen_by = (idx[:, None] >= torch.arange(n)[None, :]).sum(0).clamp_min(1).to(p.device)
            score = p.sum(2) / seen_by
            self._compress(k, v, score)
            probe.clear()
            return
        # decoding: exact attention of this one query over the held tokens; keep the buffer's part
        q = probe.queries()
        p = attention_probs(q, keys, probe.scaling, torch.tensor([T_all - 1]), probe.softcap,
                            key_valid=probe.key_valid(T_all))[:, :, 0]  # (B,H,T)
        nb = 0 if self.k_buf is None else self.k_buf.shape[2]
        tail = p[..., T_all - nb - 1:]
        kk, vv = k.to(half_dtype(k.dtype)), v.to(half_dtype(v.dtype))
        if self.k_buf is None:
            self.k_buf, self.v_buf, self.buf_score = kk, vv, tail.float()
        else:
            self.k_buf = torch.cat([self.k_buf, kk], 2)
            self.v_buf = torch.cat([self.v_buf, vv], 2)
            self.buf_score = torch.cat([self.buf_score, tail[..., -1:].float()], 2)
            self.buf_score[..., :-1] += tail[..., :-1]
        probe.clear()
        if self.k_buf.shape[2] >= self.stream:
            self._flush()

    def dense(self):
        ks, vs = [], []
        for i, T in enumerate(self.chunk_lens):
            mask = unpack_mask(self.mask[i], T)
            B, H = mask.shape[:2]
            D = self.head_dim
            k = torch.zeros(B, H, T, D, device=mask.device)
            v = torch.zeros(B, H, T, D, device=mask.device)
            for name, sel in (("hi", mask), ("lo", ~mask)):
                kq = getattr(self, f"k_{name}")[i]
                if kq is None:
                    continue
                pos = mask_positions(sel, kq.tokens)
                k = scatter_tokens(k, pos, kq.dequantize().float())
                vq, vc = getattr(self, f"v_{name}")[i], getattr(self, f"v_{name}_c")[i]
                v = scatter_tokens(v, pos, cst_dequantize(vq, vc))
            ks.append(k.to(self.dtype))
            vs.append(v.to(self.dtype))
        if self.k_buf is not None:
            ks.append(self.k_buf.to(self.dtype))
            vs.append(self.v_buf.to(self.dtype))
        if not ks:
            return None, None
        return torch.cat(ks, 2), torch.cat(vs, 2)

    def salient_mask(self) -> torch.Tensor | None:
        """Which compressed tokens are stored at ``hi_bits`` (bool ``(B, H, T)``), for inspection."""
        if not self.chunk_lens:
            return None
        return torch.cat([unpack_mask(m, T) for m, T in zip(self.mask, self.chunk_lens)], 2)


@register
@dataclass
class ZipCache(Quantizer):
    """Salient tokens (normalised attention, probe-estimated) at high bits, the rest at low bits; CSTQuant values."""

    name = "zipcache"
    paper = ("He et al. 2024, ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token "
             "Identification (arXiv 2405.14256)")

    hi_bits: int = field(default=4, metadata={"help": "bits of salient tokens"})
    lo_bits: int = field(default=2, metadata={"help": "bits of the other tokens"})
    salient: float = field(default=0.6, metadata={"help": "fraction of tokens (per chunk and head) kept at hi_bits"})
    probe_recent: float = field(default=0.05, metadata={"help": "fraction of newest positions used as probe queries"})
    probe_random: float = field(default=0.05, metadata={"help": "fraction of random positions used as probe queries"})
    stream: int = field(default=100, metadata={"help": "decoded tokens buffered in 16 bits, then compressed together"})

    def __post_init__(self) -> None:
        check_choice("zipcache", "hi_bits", self.hi_bits, (2, 3, 4, 8))
        check_choice("zipcache", "lo_bits", self.lo_bits, (1, 2, 3, 4, 8))
        require(self.lo_bits <= self.hi_bits,
                f"zipcache: lo_bits={self.lo_bits} exceeds hi_bits={self.hi_bits}; salient tokens get the higher width")
        require(0 <= self.salient <= 1, f"zipcache: salient={self.salient} must be a fraction in [0, 1]")
        require(0 < self.probe_recent <= 1 and 0 <= self.probe_random <= 1,
                f"zipcache: probe_recent={self.probe_recent} must be in (0, 1] and probe_random={self.probe_random} "
                "in [0, 1] (paper: 0.05 each)")
        require(self.stream >= 1, f"zipcache: stream={self.stream} must be >= 1 token")

    def make_layer(self, layer_idx, info):
        return ZipCacheLayer(self.hi_bits, self.lo_bits, self.salient, self.probe_recent, self.probe_random,
                             self.stream, layer_idx)

    def attach(self, model, cache) -> list:
        return install_query_probes(model, cache, ZipCacheLayer)
