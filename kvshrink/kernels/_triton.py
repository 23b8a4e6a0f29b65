"""Import Triton once, and say whether kernels can run here.

On a machine without CUDA, Triton kernels run only under its interpreter (``TRITON_INTERPRET=1``, set
before Triton is imported), which the test-suite uses on small shapes; library code never sets it.
"""
from __future__ import annotations

import os

try:  # Triton is optional: the CPU path is the torch reference
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_usable(device) -> bool:
    """Triton kernels can run on tensors of ``device``: CUDA with Triton, or anything under the interpreter."""
    import torch

    if not HAS_TRITON:
        return False
    dev = torch.device(device)
    return dev.type == "cuda" or INTERPRET


KERNEL_CHOICES = ("auto", "on", "off")


def kernels_for(choice: str, device) -> bool:
    """Whether to serve caches with the kernels, for a user's ``--kernels`` choice on ``device``: ``auto`` on CUDA
    with Triton, ``on`` likewise but an error where they cannot run, ``off`` never (the torch path)."""
    import torch

    from ..errors import KVShrinkError

    if choice not in KERNEL_CHOICES:
        raise KVShrinkError(f"unknown --kernels {choice!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    if choice == "off":
        return False
    usable = torch.device(device).type == "cuda" and HAS_TRITON
    if choice == "on" and not usable:
        raise KVShrinkError(f"--kernels on needs a CUDA device and Triton (device {device}, Triton "
                            f"{'installed' if HAS_TRITON else 'missing'}); use --device cuda, or --kernels auto/off")
    return usable


def device_guard(device):
    """Make ``device`` current while kernels launch: Triton launches on the *current* CUDA device, so tensors of a
    model split over GPUs (layers on cuda:1 while cuda:0 is current) need it; a no-op off CUDA."""
    import contextlib

    import torch

    dev = torch.device(device)
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def dot_in_f32(dtype) -> bool:
    """Whether kernels multiply in IEEE fp32 for inputs of ``dtype``: fp32 models, and bf16 under Triton's
    interpreter (numpy has no bf16, so it multiplies bf16 matrices wrongly); else fp16/bf16 matrix units."""
    import torch

    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
