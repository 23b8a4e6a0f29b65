"""Dense bit packing of small unsigned integer codes into uint8 tensors.

Codes are packed little-endian along the last axis. 1-, 2- and 4-bit codes fill whole bytes
(code ``j`` of a byte at bit ``bits*j``); 3-bit codes are packed densely, eight consecutive codes in
exactly three bytes (code ``i`` of a run at bit ``3*i`` of the run's little-endian 24-bit word), so they
really take 3/8 of a byte each instead of being padded to 4 bits; 8-bit codes are stored as they are.
A last axis that does not fill whole bytes (whole runs, for 3 bits) is padded with zero codes, and
:func:`unpack` is told the true length to drop that padding again.

This module knows nothing about quantization or methods: it only moves bits.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported bit width {bits!r}: kvshrink packs codes of {', '.join(map(str, SUPPORTED_BITS))} bits; "
            "pick one of those (16 means no quantization: use the 'none' method)"
        )
    return bits


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy after :func:`pack`."""
    if bits == 3:
        return -(-n // 8) * 3
    return -(-n * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into uint8.

    Shape ``(..., n)`` -> ``(..., packed_size(n, bits))``.
    """
    check_bits(bits)
    if codes.dtype != torch.uint8:
        codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    *lead, n = codes.shape
    run = 8 // bits if bits in (1, 2, 4) else 8  # codes per byte, or per 3-byte run
    pad = (-n) % run
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    runs = codes.reshape(*lead, -1, run)
    if bits in (1, 2, 4):  # byte-aligned widths: no 64-bit words needed
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (runs << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)
    # 3 bits: 8 codes -> one 24-bit word -> 3 bytes
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=codes.device)
    word = (runs.to(torch.int64) << shifts).sum(-1)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=codes.device)
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., packed_size(n, bits))`` uint8 -> ``(..., n)`` uint8 codes."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"{packed.shape[-1]} packed bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed[..., :n]
    *lead, nbytes = packed.shape
    mask = (1 << bits) - 1
    if bits in (1, 2, 4):
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*lead, -1)[..., :n]
    runs = packed.reshape(*lead, -1, bits).to(torch.int64)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)
    word = (runs << byte_shifts).sum(-1)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    codes = ((word.unsqueeze(-1) >> shifts) & mask).to(torch.uint8)
    return codes.reshape(*lead, -1)[..., :n]
