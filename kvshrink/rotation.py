"""Orthonormal Hadamard rotations: the fast Walsh–Hadamard transform (FWHT) and Kronecker extensions.

RotateKV (Su et al. 2025, arXiv 2501.16383, Sec. 3) rotates keys and values with a normalized Hadamard
matrix before quantizing them: an orthogonal rotation spreads the energy of outlier channels over all
channels, so a low-bit grid fits every channel. Applied with the FWHT, the rotation of an ``n``-vector
costs ``O(n log n)`` additions instead of an ``n x n`` matrix product.

Sizes
-----
* ``n = 2**k``: Sylvester's Hadamard matrix, applied with the FWHT (butterfly, ``log2 n`` stages).
* ``n = m * 2**k`` with ``m`` in 12, 20, 28: ``H_m ⊗ H_{2**k}`` (Kronecker product), with ``H_m`` a Paley
  Hadamard matrix (Paley I for 12 = 11+1 and 20 = 19+1, Paley II for 28 = 2(13+1)). This covers
  head dims 80 = 20*4 and 96 = 12*8, and head groups such as 192 = 12*16 (3 heads of 64) or 320 = 20*16
  (4 heads of 80). Other sizes (36, 120, 5*64, ...) are refused with a :class:`ValueError` listing the
  sizes that work.

Index convention: channel ``i = a * 2**k + b`` (``a`` indexes ``H_m``, ``b`` the power-of-two part), so
``hadamard_transform(x) == x @ hadamard_matrix(n)`` for the explicit matrix built here, and
``inverse_hadamard_transform`` multiplies by its transpose (the inverse: the matrix is orthonormal).
Paley matrices are not symmetric, so the inverse needs the transpose; Sylvester's matrix is its own
inverse.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

#: Orders of the non-power-of-two Hadamard matrices built here (times any power of two).
KNOWN_ORDERS = (1, 12, 20, 28)


def _legendre(a: int, q: int) -> int:
    """Quadratic character of ``a`` modulo the odd prime ``q`` (0, 1 or -1)."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    return torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)


@lru_cache(maxsize=None)
def _paley(m: int) -> torch.Tensor:
    """A (non-normalized, +-1) Hadamard matrix of order ``m`` in 12, 20, 28 by Paley's constructions."""
    if m in (12, 20):  # Paley I: q = m - 1 prime, q = 3 (mod 4)
        q = m - 1
        Q = _jacobsthal(q)
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = Q
        return torch.eye(m, dtype=torch.float64) + S
    if m == 28:  # Paley II: q = 13 prime, q = 1 (mod 4), order 2(q+1)
        q = 13
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:] = 1
        C[1:, 0] = 1
        C[1:, 1:] = _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        blocks = [[zero if C[i, j] == 0 else C[i, j] * one for j in range(q + 1)] for i in range(q + 1)]
        return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
    raise ValueError(f"no built-in Hadamard matrix of order {m}")


def split_order(n: int) -> tuple[int, int]:
    """``n = m * p`` with ``m`` in :data:`KNOWN_ORDERS` and ``p`` a power of two, or ValueError."""
    if n >= 1:
        for m in KNOWN_ORDERS:
            if n % m == 0:
                p = n // m
                if p & (p - 1) == 0:
                    return m, p
    raise ValueError(
        f"no Hadamard rotation of size {n}: supported sizes are powers of two (64, 128, 256, ...) and "
        "12, 20 or 28 times a power of two (e.g. 96 = 12*8, 160 = 20*8, 192 = 12*16, 224 = 28*8); "
        "choose a head group (heads per rotation) whose size is one of these, or turn the rotation off"
    )


def is_supported(n: int) -> bool:
    try:
        split_order(n)
        return True
    except ValueError:
        return False


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized fast Walsh–Hadamard transform along the last axis (length a power of two).

    Equals ``x @ H / sqrt(n)`` with ``H`` Sylvester's Hadamard matrix, in ``log2 n`` butterfly stages.
    """
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    shape = x.shape
    # ping-pong between two buffers: each stage writes sums and differences of pairs h apart
    y = x.reshape(-1, n).clone()
    out = torch.empty_like(y)
    h = 1
    while h < n:
        a = y.view(-1, n // (2 * h), 2, h)
        o = out.view(-1, n // (2 * h), 2, h)
        torch.add(a[:, :, 0], a[:, :, 1], out=o[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=o[:, :, 1])
        y, out = out, y
        h *= 2
    return y.reshape(shape) * (1.0 / math.sqrt(n))


def _small(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (_paley(m) / math.sqrt(m)).to(device=device, dtype=dtype)


def hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last axis of ``x`` by the orthonormal Hadamard matrix of its size (or its inverse)."""
    n = x.shape[-1]
    m, p = split_order(n)
    if m == 1:
        return fwht(x)  # Sylvester's matrix is symmetric: its own inverse
    y = fwht(x.reshape(*x.shape[:-1], m, p))  # (..., m, p)
    Hm = _small(m, x.device, y.dtype)
    # forward: y[c,d] = sum_a x'[a,d] Hm[a,c]; inverse uses Hm^T
    y = torch.einsum("...ap,ac->...cp", y, Hm.T if inverse else Hm)
    return y.reshape(x.shape)


def inverse_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    return hadamard_transform(x, inverse=True)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The explicit orthonormal ``n x n`` matrix that :func:`hadamard_transform` multiplies by (tests)."""
    m, p = split_order(n)
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    if m > 1:
        H = torch.kron(_paley(m), H)
    return (H / math.sqrt(n)).to(dtype)


__all__ = ["KNOWN_ORDERS", "fwht", "hadamard_transform", "inverse_hadamard_transform", "hadamard_matrix",
           "split_order", "is_supported"]
