"""Unbiased randomized rounding of a float32 tensor to integers, exactly and in place.

A site scales its clipped gradient sum by 2^k and rounds every coordinate x to
floor(x) + [u < frac(x)] with u uniform on [0, 1), so E[result] = x (Kairouz-Liu-Steinke 2021,
Sec. 4, "randomized rounding"; protocol.training's sensitivity bound holds for any dither u,
because the result is always floor(x) or floor(x) + 1).

Every result is floor(x) or floor(x) + 1, and every floating-point step is exact except one
case, bounded below:
- ``low = floor(x)``: exact.
- ``f = x - low``: exact for x >= 0 and for x <= -1 (f is then a multiple of ulp(x) below
  1). For x in (-1, 0), f = 1 + x is rounded to float32 (error <= 2^-25), so P(+1) is off
  by at most 2^-25 there.
- ``fl(f - u)``: rounding to nearest keeps the sign of f - u (and is 0 only when f == u), and
  f - u lies in (-1, 1); so ``ceil(fl(f - u))`` is 1 exactly when u < f and 0 otherwise.
- ``low + that``: an integer of at most x's magnitude + 1; exact below 2^24, and above 2^24
  every float32 is already an integer (f = 0, nothing is added).
- the cast to the integer dtype is exact for an integer-valued float inside its range.

Why not ``floor(x + u)``: it needs one pass less, but ``fl(x + u)`` rounds to x's grid, which
biases the result by up to ulp(x)/2 (a quarter of a unit at |x| ~ 2^22).

No temporary the size of x is allocated: the caller owns ``low`` and ``out`` (one of each per
site), because on a CPU a fresh 10^7-element tensor costs more in page faults than the pass
that fills it.
"""

from __future__ import annotations

import torch

from mpcdp.errors import ParameterError

__all__ = ["randomized_round_"]


def randomized_round_(
    scaled: torch.Tensor, *, dither: torch.Tensor, low: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Write floor(x) + [dither < frac(x)] for every x of ``scaled`` into ``out`` and return
    it. ``scaled`` (float32) is overwritten; ``dither`` (float32, values in [0, 1)) and
    ``low`` (float32 work space) have its shape and device; ``out`` is an integer tensor of
    that shape on the same device. Values must be finite and fit ``out``'s dtype (the
    caller's headroom check); neither is re-checked here, as both cost a pass."""
    for name, t in (("dither", dither), ("low", low), ("out", out)):
        if t.shape != scaled.shape or t.device != scaled.device:
            raise ParameterError(
                name,
                f"shape {tuple(t.shape)} on {t.device}",
                f"must match scaled: shape {tuple(scaled.shape)} on {scaled.device}",
            )
    for name, t in (("scaled", scaled), ("dither", dither), ("low", low)):
        if t.dtype != torch.float32:
            raise ParameterError(name, str(t.dtype), "must be torch.float32")
    if out.dtype not in (torch.int32, torch.int64):
        raise ParameterError("out", str(out.dtype), "must be torch.int32 or torch.int64")
    torch.floor(scaled, out=low)
    frac = scaled.sub_(low)  # exact, in [0, 1)
    up = frac.sub_(dither).ceil_()  # 1.0 where dither < frac, else 0.0 (or -0.0)
    out.copy_(up.add_(low))  # integer-valued floats: the cast is exact
    return out
