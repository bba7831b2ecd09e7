"""Precision of per-sample clipping: norms that neither round below the truth nor leave the
floating-point range, and clipped sums in IEEE float32 (at least).

Half-precision tensors are upcast (:func:`upcast`), float32 matmuls and convolutions run at
IEEE precision inside a process-wide guard (:func:`ieee_float32`), and squared norms are
float64 sums of float64 squares (:func:`sq_norms`; float64 values scaled per example by an
exact power of two first, as a BLAS ``nrm2`` scales), handed to the clipper rounded upwards
(:func:`norm_out`). The error analysis (Higham 2002, "Accuracy and stability of numerical
algorithms", Sec. 3.1 and 4.2) sets the relative margin by which clip factors keep each
example strictly inside the bound (:func:`norm_margin`). Nothing happens at import time
beyond defining names.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import torch


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: min and max in one reduction (NaN propagates to both), one
    host sync. ``torch.isfinite(t).all()`` allocates a mask of t's size and, on a CPU, takes
    ~20x longer on a 10^7-vector."""
    if t.numel() == 0:
        return True
    if t.is_complex():
        return all_finite(torch.view_as_real(t))
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """Mask (B,) of the rows ``t[j]`` with no NaN or inf. A NaN or inf always makes a row's
    sum non-finite, so only rows whose sum is not finite (overflow, or a non-finite value)
    are looked at element by element: one reduction, no mask of ``t``'s size."""
    rows = t.reshape(t.shape[0], -1)
    ok = torch.isfinite(rows.sum(dim=1))
    if not bool(ok.all()):
        ok = ok.clone()
        ok[~ok] = torch.isfinite(rows[~ok]).all(dim=1)
    return ok


#: One process-wide guard (module docstring of :func:`ieee_float32`): how many clipping
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
def ieee_float32(device: torch.device) -> Iterator[None]:
    """Clip factors and clipped sums in IEEE float32: autocast off, and TF32 / bf16 off for
    float32 matmuls and convolutions (oneDNN, cuBLAS, cuDNN) while a step is inside.

    The norms' error bounds (:func:`norm_margin`) assume IEEE arithmetic, and a
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


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision norms and sums are computed in: at least IEEE float32.

    A bf16/fp16 model, or autocast in or around its forward, leaves layer inputs and output
    gradients in half precision; norms and clipped sums computed there would round the
    batch sum by ~2^-9 of its size (several C for a batch of aligned gradients), far more
    than one example's bound. Upcast, every per-sample term is exactly the product of the
    values the norm was taken of, and the sum rounds at float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


#: Squared norms are reduced in float64 over chunks of about this many values, so that the
#: float64 copy stays small (1 MiB, within the caches) and is reused (:func:`sq_norms`).
_NORM_CHUNK = 1 << 17


def norm_margin(dtype: torch.dtype) -> float:
    """Relative margin ``kappa`` of the clip factors for norms computed from ``dtype`` values.

    Every squared per-sample norm is a float64 sum of non-negative float64 products of the
    working-precision values (:func:`sq_norms`; the ghost norms of :mod:`.rules` add a
    rigorous bound on their own rounding). A sum of n non-negative terms in any order is
    within ``gamma_n = n u / (1 - n u)`` of its value relatively (Higham 2002, "Accuracy and
    stability of numerical algorithms", Sec. 4.2), u the unit roundoff: in float64
    ``gamma_n < 2^-30`` for any layer below 2^23 values per example. The squared norms go to
    the clipper in float32 rounded upwards (:func:`norm_out`), where layers add at most a few
    thousand terms and one square root is taken; so a computed norm is below the norm of the
    values it was taken of by less than ``2^-13`` relatively, and clip factors aiming at
    ``C (1 - kappa)`` with ``kappa = 2^-12`` leave room for the products ``c_j g_j`` of the
    clipped sum. An absolute margin (``+1e-6`` in the denominator) does not, for norms above
    ~10. Float64 models: ``kappa = 2^-40``.

    No under- or overflow: float32 values squared in float64 cannot leave float64's normal
    range (a float32 square lies in [2^-298, 2^256]), and float64 values are first scaled by
    an exact power of two per example (as a BLAS ``nrm2`` does). The range of the result is
    the clipper's float32 accumulator's: a squared norm above float32's range becomes ``inf``
    (the example then contributes 0, with a warning), one below it the smallest positive
    float32 (never 0, so never "not clipped" by underflow).
    """
    return 2.0**-40 if dtype == torch.float64 else 2.0**-12


def pow2_scale(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows * 2^-e, e)`` with ``e`` (float64, one per row) the binary exponent of the
    row's largest magnitude: the scaled rows have their largest magnitude in [0.5, 1), so
    their squares neither over- nor underflow (values that underflow are below 2^-1074 of the
    largest, below any rounding of the sum). Multiplying by a power of two is exact."""
    flat = rows.reshape(rows.shape[0], -1)
    if flat.shape[1] == 0:
        return rows, torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    lo, hi = torch.aminmax(flat, dim=1)
    amax = torch.maximum(-lo, hi)
    _, e = torch.frexp(amax)  # 0 for 0, inf and NaN (kept as they are)
    shape = (-1,) + (1,) * (rows.dim() - 1)
    scaled = torch.ldexp(rows, (-e).view(shape).to(rows.dtype))
    return scaled, e.to(torch.float64)


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared norm of each x[j], float64 (B,), without under- or overflow
    (:func:`norm_margin`): float32 values are converted to float64 in chunks of about
    :data:`_NORM_CHUNK` values (no float64 copy of x), float64 values scaled per row by a
    power of two first; a float64 sum of squares is within ``gamma_n`` (< 2^-30 here) of
    its value."""
    rows = x.reshape(x.shape[0], -1)
    batch, n = rows.shape
    if x.dtype == torch.float64:
        scaled, e = pow2_scale(rows)
        sq: torch.Tensor = torch.linalg.vector_norm(scaled, dim=1).square()
        return sq * torch.exp2(2 * e)
    out = torch.empty(batch, dtype=torch.float64, device=x.device)
    step = min(batch, max(1, _NORM_CHUNK // max(n, 1)))
    # one float64 buffer for every chunk: a new one per chunk is a fresh allocation of
    # several MB each time, whose page faults cost more than the pass itself
    buf = torch.empty(step, n, dtype=torch.float64, device=x.device)
    for start in range(0, batch, step):
        k = min(step, batch - start)
        part = buf[:k]
        part.copy_(rows[start : start + k])
        torch.linalg.vector_norm(part, dim=1, out=out[start : start + k])
    return out.square_()


def norm_out(norm2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 squared norms for the clipper's accumulator of ``dtype``: unchanged for
    float64; for float32 rounded upwards (a positive value below float32's range becomes its
    smallest positive value, one above it ``inf``), so the clip factor is set by an upper
    bound whatever the magnitude."""
    if dtype == torch.float64:
        return norm2
    low = norm2.to(torch.float32)
    up = torch.nextafter(low, torch.full_like(low, math.inf))
    return torch.where(low.to(torch.float64) < norm2, up, low)


def mm_into(x: torch.Tensor, y: torch.Tensor, dest: torch.Tensor) -> None:
    """dest = x @ y, computed in place when dest has x's dtype (dest is a contiguous view)."""
    if dest.dtype == x.dtype:
        torch.mm(x, y, out=dest)
    else:
        dest.copy_(torch.mm(x, y))


def cat1(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat that does not copy a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)
