"""Hadamard rotations (kvshrink.rotation) and RoPE helpers (kvshrink.rope)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.errors import UnsupportedModelError
from kvshrink.rope import apply_rope, check_rope_style, invert_rope, rotate_half
from kvshrink.rotation import (fwht, hadamard_matrix, hadamard_transform, inverse_hadamard_transform, is_supported,
                               split_order)

SIZES = [1, 2, 4, 8, 16, 64, 128, 12, 20, 28, 24, 40, 80, 96, 160, 192, 224, 320]


def _sylvester(n):
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 256])
def test_fwht_matches_explicit_sylvester_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    expected = x @ _sylvester(n) / math.sqrt(n)
    torch.testing.assert_close(fwht(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_is_orthonormal_with_pm1_entries(n):
    H = hadamard_matrix(n)
    torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close((H * math.sqrt(n)).abs(), torch.ones(n, n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_transform_matches_matrix_and_inverts(n):
    x = torch.randn(4, n, dtype=torch.float64)
    H = hadamard_matrix(n)
    torch.testing.assert_close(hadamard_transform(x), x @ H, rtol=0, atol=1e-12)
    torch.testing.assert_close(inverse_hadamard_transform(x), x @ H.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(inverse_hadamard_transform(hadamard_transform(x)), x, rtol=0, atol=1e-12)


def test_paley_order_12_is_not_symmetric_so_inverse_needs_transpose():
    H = hadamard_matrix(12)
    assert not torch.allclose(H, H.T)  # the inverse path is really exercised
    x = torch.randn(2, 12, dtype=torch.float64)
    assert not torch.allclose(hadamard_transform(hadamard_transform(x)), x)


@pytest.mark.parametrize("n", [3, 5, 36, 120, 0])
def test_unsupported_sizes_are_refused_with_the_list(n):
    assert not is_supported(n)
    with pytest.raises(ValueError, match="powers of two.*12, 20 or 28"):
        hadamard_transform(torch.zeros(1, n)) if n else split_order(n)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(0, 7), m=st.sampled_from([1, 12, 20, 28]), seed=st.integers(0, 2**16))
def test_rotation_preserves_norms_and_dot_products(k, m, seed):
    n = m * 2**k
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, n, generator=g, dtype=torch.float64)
    rx, ry = hadamard_transform(x), hadamard_transform(y)
    assert math.isclose(float(rx @ ry), float(x @ y), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(float(rx.norm()), float(x.norm()), rel_tol=1e-9)


def test_rotation_spreads_a_single_outlier_channel():
    x = torch.zeros(64)
    x[7] = 100.0
    r = hadamard_transform(x)
    assert torch.allclose(r.abs(), torch.full((64,), 100.0 / 8))


# -- RoPE helpers ---------------------------------------------------------------------------------
def _cos_sin(T, r, scale=1.0, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    f = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([f, f], -1)[None]
    return emb.cos() * scale, emb.sin() * scale


@pytest.mark.parametrize("scale", [1.0, 1.37])
@pytest.mark.parametrize("rot", [32, 16])
def test_invert_rope_is_exact_inverse(scale, rot):
    x = torch.randn(2, 3, 9, 32, dtype=torch.float64)
    cos, sin = _cos_sin(9, rot, scale)
    y = apply_rope(x, cos, sin)
    if rot < 32:
        torch.testing.assert_close(y[..., rot:], x[..., rot:])  # partial rotary leaves the tail alone
    torch.testing.assert_close(invert_rope(y, cos, sin), x, rtol=0, atol=1e-12)


def test_apply_rope_matches_transformers_formula():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = torch.randn(1, 2, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    cos, sin = (t.float() for t in _cos_sin(5, 16))
    _, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref)
    torch.testing.assert_close(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0]))


def test_interleaved_rope_models_are_refused():
    class Cfg:
        model_type = "gptj"

    with pytest.raises(UnsupportedModelError, match="interleaved"):
        check_rope_style(Cfg())

    class Llama:
        model_type = "llama"

    check_rope_style(Llama())
