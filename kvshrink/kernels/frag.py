"""The *fragment* order of 2-bit KV codes: each GPU lane's 16-byte load is exactly its share of a tensor-core tile.

Same codes, scales and bytes as KIVI's layout (keys quantized per channel over token groups, values per token);
only the place of each 2-bit code differs. Ordered so that a decode kernel over it needs no layout conversion
between the load and the matrix units (``decode_frag.py``), where KIVI's order sends every code tile through
shared memory (docs/KERNELS.md, "The two numbers").

The kernel computes ``S^T = K Q'^T`` and ``O^T = V^T P'^T`` with ``mma.m16n8k16``: keys ``(tokens, channels)`` and
values ``(channels, tokens)`` are the *A* operands, so lane ``l = 4g + q`` holds, per 16x16 tile, rows ``g, g+8``
and columns ``2q, 2q+1, 2q+8, 2q+9``. One 32-bit word holds the 16 codes a lane turns into eight ``half2`` A-operand
registers: the pair's two codes sit at bits ``2*f`` and ``16 + 2*f`` (one field ``f`` per register). Fields 0-3 lie
in the low byte of each 16-bit half, 4-7 in the high byte, so ``(w >> 8*(f // 4)) & (3 << 2*(f % 4))`` ORed into
fp16 1024.0 reads ``1024 + code * 4**(f % 4)``: one shift per word, and the factor ``4**(f % 4)`` depends on
channels only for keys and on tokens only for values, so it folds into the query and the probabilities.

* Keys, per 16-token tile: ``(32 lanes, D/32 words)`` int32. Token ``t = 8*t8 + g``, channel
  ``c = 32*w + 16*c4 + 8*c3 + 2*q + c0``: word ``w`` of lane ``4g + q``, bit ``16*c0 + 2*(c3 + 2*c4 + 4*t8)``.
* Values, per 32-token tile: ``(32 lanes, D/16 words)`` int32. Channel ``c = 16*w + 8*c3 + g``, token
  ``t = 16*t4 + 8*t3 + 2*q + t0``: word ``w`` of lane ``4g + q``, bit ``16*t0 + 2*(t3 + 2*t4 + 4*c3)``.

Pure torch (the reference the kernel is tested against); bit-exact inverse pairs. 2-bit codes, head_dim a
multiple of 32.
"""
from __future__ import annotations

import functools

import torch

KEY_TILE = 16    # tokens per key tile
VALUE_TILE = 32  # tokens per value tile


def _check(codes: torch.Tensor, tile: int) -> None:
    if codes.dim() != 4:
        raise ValueError(f"expected (batch, heads, tokens, head_dim) codes, got shape {tuple(codes.shape)}")
    T, D = codes.shape[-2:]
    if T % tile:
        raise ValueError(f"fragment order packs whole tiles of {tile} tokens, got {T}: pad or keep the rest in 16 bits")
    if D % 32:
        raise ValueError(f"fragment order needs head_dim a multiple of 32, got {D}")


@functools.lru_cache(maxsize=None)
def _key_map(D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (token in tile, channel): flat word index ``lane * (D/32) + w`` and bit position."""
    t = torch.arange(KEY_TILE)[:, None]
    c = torch.arange(D)[None, :]
    g, t8 = t % 8, t // 8
    q, c0, c3, c4, w = (c >> 1) & 3, c & 1, (c >> 3) & 1, (c >> 4) & 1, c >> 5
    word = (4 * g + q) * (D // 32) + w
    bit = 16 * c0 + 2 * (c3 + 2 * c4 + 4 * t8)
    return word.expand(KEY_TILE, D).reshape(-1), bit.expand(KEY_TILE, D).reshape(-1)


@functools.lru_cache(maxsize=None)
def _value_map(D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (token in tile, channel): flat word index ``lane * (D/16) + w`` and bit position."""
    t = torch.arange(VALUE_TILE)[:, None]
    c = torch.arange(D)[None, :]
    t0, q, t3, t4 = t & 1, (t >> 1) & 3, (t >> 3) & 1, (t >> 4) & 1
    g, c3, w = c & 7, (c >> 3) & 1, c >> 4
    word = (4 * g + q) * (D // 16) + w
    bit = 16 * t0 + 2 * (t3 + 2 * t4 + 4 * c3)
    return word.expand(VALUE_TILE, D).reshape(-1), bit.expand(VALUE_TILE, D).reshape(-1)


def _pack(codes: torch.Tensor, tile: int, words: int, word_bit: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    B, H, T, D = codes.shape
    word, bit = (x.to(codes.device) for x in word_bit)
    c = codes.to(torch.int64).reshape(B, H, T // tile, tile * D) << bit
    out = torch.zeros(B, H, T // tile, 32 * words, dtype=torch.int64, device=codes.device)
    out.scatter_add_(-1, word.expand_as(c), c)  # 2-bit fields never overlap: the sum is the OR
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out)  # uint32 bits as int32
    return out.to(torch.int32).reshape(B, H, T // tile, 32, words)


def _unpack(packed: torch.Tensor, tile: int, D: int, word_bit: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    B, H, n = packed.shape[:3]
    word, bit = (x.to(packed.device) for x in word_bit)
    w = packed.reshape(B, H, n, -1).to(torch.int64) & 0xFFFFFFFF
    c = (w.index_select(-1, word) >> bit) & 3
    return c.to(torch.uint8).reshape(B, H, n * tile, D)


def pack_keys(codes: torch.Tensor) -> torch.Tensor:
    """2-bit key codes ``(B, H, T, D)`` (T a multiple of 16) -> ``(B, H, T/16, 32, D/32)`` int32 words."""
    _check(codes, KEY_TILE)
    return _pack(codes, KEY_TILE, codes.shape[-1] // 32, _key_map(codes.shape[-1]))


def unpack_keys(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_keys`: ``(B, H, T, D)`` uint8 codes."""
    D = packed.shape[-1] * 32
    return _unpack(packed, KEY_TILE, D, _key_map(D))


def pack_values(codes: torch.Tensor) -> torch.Tensor:
    """2-bit value codes ``(B, H, T, D)`` (T a multiple of 32) -> ``(B, H, T/32, 32, D/16)`` int32 words."""
    _check(codes, VALUE_TILE)
    return _pack(codes, VALUE_TILE, codes.shape[-1] // 16, _value_map(codes.shape[-1]))


def unpack_values(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_values`: ``(B, H, T, D)`` uint8 codes."""
    D = packed.shape[-1] * 16
    return _unpack(packed, VALUE_TILE, D, _value_map(D))
