"""Precision of per-sample clipping: IEEE float32 (at least) for norms and clipped sums.

Half-precision tensors are upcast (:func:`_work`), float32 matmuls and convolutions run at
IEEE precision inside a process-wide guard (:func:`_ieee_float32`), and squared norms are
reduced in blocks whose float32 error is bounded (:func:`_sq_norms`), which sets the relative
margin by which clip factors keep each example strictly inside the bound
(:data:`NORM_MARGIN`). Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: min and max in one reduction (NaN propagates to both), one
    host sync. ``torch.isfinite(t).all()`` allocates a mask of t's size and, on a CPU, takes
    ~20x longer on a 10^7-vector."""
    if t.numel() == 0:
        return True
    if t.is_complex():
        return _all_finite(torch.view_as_real(t))
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


#: One process-wide guard (module docstring of :func:`_ieee_float32`): how many clipping
#: steps are inside it, and the settings it found when the first one entered.
_GUARD_LOCK = threading.Lock()
_guard_users = 0
_guard_saved: dict[tuple[int, str], tuple[Any, str, Any]] = {}


def _precision_switches(device: torch.device) -> list[tuple[Any, str, Any]]:
    """(object, attribute, IEEE value) for every switch that lets float32 matmuls or
    convolutions run at reduced precision on ``device``'s backends.

    torch's ``fp32_precision`` API is used where it exists (mixing it with the legacy
    ``allow_tf32`` flags raises in recent torch); the legacy flags otherwise.
    ``torch.set_float32_matmul_precision("high")`` sets the former to "tf32" (oneDNN on the
    CPU, cuBLAS on CUDA)."""
    switches: list[tuple[Any, str, Any]] = []
    mkldnn = getattr(torch.backends, "mkldnn", None)
    for backend in (getattr(mkldnn, "matmul", None), getattr(mkldnn, "conv", None)):
        if backend is not None and hasattr(backend, "fp32_precision"):
            switches.append((backend, "fp32_precision", "ieee"))
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):
            switches.append((matmul, "fp32_precision", "ieee"))
        else:  # pragma: no cover - torch before the fp32_precision API
            switches.append((matmul, "allow_tf32", False))
        cudnn = torch.backends.cudnn
        for backend in (getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None)):
            if backend is not None and hasattr(backend, "fp32_precision"):
                switches.append((backend, "fp32_precision", "ieee"))
        if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # pragma: no cover
            switches.append((cudnn, "allow_tf32", False))
    return switches


@contextlib.contextmanager
def _ieee_float32(device: torch.device) -> Iterator[None]:
    """Clip factors and clipped sums in IEEE float32: autocast off, and TF32 / bf16 off for
    float32 matmuls and convolutions (oneDNN, cuBLAS, cuDNN) while a step is inside.

    The ghost-norm error bound (:func:`_ghost_slack`) assumes float32 arithmetic, and a
    Conv2d's clipped sum (cuDNN's weight-gradient kernel, TF32 by default on Ampere and
    later) must be computed at the precision of the norm that scaled it: with 10-bit
    mantissas a crafted sample contributes far more than C.

    The precision switches are process-wide, and a party runs several sessions at once, so
    the guard is process-wide and reference-counted: the first step in saves every switch
    and sets it to IEEE, the last one out restores exactly what it found (the user's own
    ``set_float32_matmul_precision`` included). While any step is inside, float32 matmuls
    elsewhere in the process run at IEEE precision too: slower, never less accurate.
    """
    global _guard_users
    with _GUARD_LOCK:
        for obj, attr, ieee in _precision_switches(device):
            # saved the first time any step in touches it (a CUDA step may join CPU ones)
            _guard_saved.setdefault((id(obj), attr), (obj, attr, getattr(obj, attr)))
            setattr(obj, attr, ieee)
        _guard_users += 1
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        with _GUARD_LOCK:
            _guard_users -= 1
            if _guard_users == 0:
                for obj, attr, value in _guard_saved.values():
                    setattr(obj, attr, value)
                _guard_saved.clear()


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision norms and sums are computed in: at least IEEE float32.

    A bf16/fp16 model, or autocast in or around its forward, leaves layer inputs and output
    gradients in half precision; norms and clipped sums computed there would round the
    batch sum by ~2^-9 of its size (several C for a batch of aligned gradients), far more
    than one example's bound. Upcast, every per-sample term is exactly the product of the
    values the norm was taken of, and the sum rounds at float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


#: Squared norms are reduced in blocks of this many values, in the working precision, and
#: the block sums are added in float64 (:func:`_sq_norms`).
_NORM_BLOCK = 2048


def norm_margin(dtype: torch.dtype) -> float:
    """Relative margin ``kappa`` of the clip factors for norms computed in ``dtype``.

    A sum of n non-negative terms in any order is within ``gamma_n = n u / (1 - n u)`` of its
    value relatively (Higham 2002, "Accuracy and stability of numerical algorithms", Sec.
    4.2), u the unit roundoff. A squared norm here is a float64 sum of blocks of at most
    :data:`_NORM_BLOCK` squares each reduced in ``dtype`` (``gamma_2048 < 2^-13`` in float32);
    the T = 1 branch multiplies two such sums and layers add at most a few thousand terms in
    float32, so a computed norm is below the norm of the values it was taken of by less than
    ``2^-13`` relatively (half the squared norm's error, plus a few u for the square root and
    the products ``c_j g_j``). Clip factors aim at ``C (1 - kappa)`` with ``kappa = 2^-12``,
    so every example's contribution stays strictly inside ``C``; an absolute margin (``+1e-6``
    in the denominator) does not, for norms above ~10. Float64: ``kappa = 2^-40``.
    """
    return 2.0**-40 if dtype == torch.float64 else 2.0**-12


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared norm of each x[j] (no squared copy of x), to the error :func:`norm_margin`
    allows: blocks of :data:`_NORM_BLOCK` values reduced in x's precision (>= float32), block
    sums added in float64. The result is float32 (float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.reshape(x.shape[0], -1)
    n = rows.shape[1]
    if n <= _NORM_BLOCK:
        whole: torch.Tensor = torch.linalg.vector_norm(rows, dim=1, dtype=acc)
        return whole.square()
    full = n - n % _NORM_BLOCK
    blocks = rows[:, :full].reshape(rows.shape[0], -1, _NORM_BLOCK)
    block_norms: torch.Tensor = torch.linalg.vector_norm(blocks, dim=2, dtype=acc)
    parts = block_norms.to(torch.float64).square().sum(1)
    if full < n:
        tail = torch.linalg.vector_norm(rows[:, full:], dim=1, dtype=acc).to(torch.float64)
        parts = parts + tail.square()
    return parts.to(acc)


def _mm_into(x: torch.Tensor, y: torch.Tensor, dest: torch.Tensor) -> None:
    """dest = x @ y, computed in place when dest has x's dtype (dest is a contiguous view)."""
    if dest.dtype == x.dtype:
        torch.mm(x, y, out=dest)
    else:
        dest.copy_(torch.mm(x, y))


def _cat1(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat that does not copy a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)
