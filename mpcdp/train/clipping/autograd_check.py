"""The first-use probe's comparison of the per-layer rules' sums with autograd's gradient
(mpcdp.train.clipping.probe): for one example, the book-keeping sum of each parameter must
equal autograd's gradient of the same weighted loss, to :data:`SUMS_RTOL`.

Each parameter is compared through three numbers, ``||S||^2``, ``||A||^2`` and ``<S, A>``
(:data:`SumStats`), so no temporary of the parameter's size is written; a linear layer's sum
``S = G^T X`` is never formed where its Gram matrices are smaller (:func:`matmul_sum_stats`).
Statistics that over- or underflow the working precision are recomputed exactly in float64
(:func:`exact_sum_stats`): a model cannot scale its values out of float32's range to have a
comparison skipped. A difference is seen down to float32's smallest normal number, 2^-126 in
norm, below which autograd's own float32 gradient cannot resolve one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mpcdp.train.clipping.checks import refuse
from mpcdp.train.clipping.rules import module_at

__all__ = [
    "SUMS_RTOL",
    "SumStats",
    "compare_sum_stats",
    "compare_sums",
    "exact_sum_stats",
    "matmul_sum_stats",
    "sum_stats",
]


#: relative tolerance of :func:`compare_sums`. Loose on purpose: the defects it finds are
#: gross (a missing path, a scaled output: tens of percent), while an honest gradient whose
#: positions cancel can differ between two float32 computations by far more than 2^-10 of
#: its (small) norm (3% measured on a crafted cancellation of 2^-20), and half-precision
#: autograd sums by a few 2^-8.
SUMS_RTOL = 2.0**-4


#: one parameter's comparison: (||bookkeeping||^2, ||autograd||^2, <bookkeeping, autograd>)
SumStats = tuple[float, float, float]


#: below this, a squared norm taken in float32 may have underflowed (values under ~1e-19
#: square to 0); it, and any non-finite statistic of finite tensors (a float32 dot above
#: ~3.4e38 overflows), is recomputed exactly: see :func:`exact_sum_stats`
_SMALL_STAT = 2.0**-100
#: values per float64 chunk of :func:`exact_sum_stats` (no float64 copy of a parameter)
_EXACT_CHUNK = 1 << 20


def _trusted(stats: SumStats) -> bool:
    """Whether statistics computed in the working precision can be used as they are: finite,
    and the squared norms not small enough to have underflowed (0 included: a tensor of
    values under ~1e-19 squares to 0 in float32)."""
    aa, bb, _ = stats
    return all(map(math.isfinite, stats)) and aa >= _SMALL_STAT and bb >= _SMALL_STAT


def exact_sum_stats(bookkeeping: torch.Tensor | None, autograd: torch.Tensor | None) -> SumStats:
    """:data:`SumStats` without over- or underflow: float32 (or half) values are taken to
    float64 in chunks, where the product of any two and the sum of up to 2^40 such products
    are finite and normal (float32's range squared is within float64's); float64 values are
    first scaled by one power of two, the exponent of their largest magnitude (exact), and
    the statistics scaled back. Non-finite values give non-finite statistics."""
    a = None if bookkeeping is None else bookkeeping.detach().reshape(-1)
    b = None if autograd is None else autograd.detach().reshape(-1)
    tensors = [t for t in (a, b) if t is not None]
    if not tensors:
        return (0.0, 0.0, 0.0)
    shift = 0
    if any(t.dtype == torch.float64 for t in tensors):
        top = max(float(t.abs().max()) if t.numel() else 0.0 for t in tensors)
        if math.isfinite(top) and top > 0:
            shift = math.frexp(top)[1]
    factor = 2.0**-shift  # exact: a power of two within float64's range

    def chunk(t: torch.Tensor | None, start: int) -> torch.Tensor | None:
        return None if t is None else t[start : start + _EXACT_CHUNK].double() * factor

    aa = bb = ab = 0.0
    for start in range(0, tensors[0].numel(), _EXACT_CHUNK):
        ca, cb = chunk(a, start), chunk(b, start)
        if ca is not None:
            aa += float(ca.dot(ca))
        if cb is not None:
            bb += float(cb.dot(cb))
        if ca is not None and cb is not None:
            ab += float(ca.dot(cb))
    scale = 2.0 ** (2 * shift)
    return (aa * scale, bb * scale, ab * scale)


def sum_stats(bookkeeping: torch.Tensor | None, autograd: torch.Tensor | None) -> SumStats:
    """:data:`SumStats` of two tensors of a parameter's size (None: zero), in three
    reductions and no temporary of the parameter's size (its cancellation in
    :func:`compare_sum_stats` costs ~sqrt(u) of the norms, far below the tolerance).
    Statistics that over- or underflowed in the working precision are recomputed by
    :func:`exact_sum_stats` (a crafted scale cannot turn a comparison into a skipped one)."""
    if bookkeeping is None and autograd is None:
        return (0.0, 0.0, 0.0)
    if bookkeeping is None or autograd is None:
        t = bookkeeping if autograd is None else autograd
        assert t is not None
        v = t.detach().reshape(-1)
        sq = float(v.dot(v))
        stats = (sq, 0.0, 0.0) if autograd is None else (0.0, sq, 0.0)
    else:
        a = bookkeeping.detach().reshape(-1)
        b = autograd.detach().reshape(-1).to(a.dtype)
        aa, bb, ab = torch.stack([a.dot(a), b.dot(b), a.dot(b)]).double().tolist()
        stats = (aa, bb, ab)
    return stats if _trusted(stats) else exact_sum_stats(bookkeeping, autograd)


def matmul_sum_stats(
    grads: torch.Tensor, inputs: torch.Tensor, autograd: torch.Tensor | None
) -> SumStats:
    """:data:`SumStats` of the weight sum ``S = G^T X`` of a linear map (``grads`` G:
    (T, p), the output gradients of one example's T positions; ``inputs`` X: (T, d)) against
    autograd's (p, d) gradient, without writing ``S``: ``||S||^2 = <G G^T, X X^T>`` (two
    T x T Gram matrices, float64), ``<S, A> = <G, X A^T>`` (one product that reads ``A``
    once) and ``||A||^2``. Where the two Gram matrices would be larger than ``S`` (4 T^2 >
    p d, counting float64 against float32), ``S`` itself is formed. Rounding: the
    terms of ``<G, X A^T>`` are those of ``<S, A>`` regrouped, so its error is that of the
    dense comparison, far below :data:`SUMS_RTOL`."""
    t, p = grads.shape
    d = inputs.shape[1]
    work = torch.float64 if torch.float64 in (grads.dtype, inputs.dtype) else torch.float32
    if autograd is not None and autograd.dtype == torch.float64:
        work = torch.float64
    g, x = grads.to(work), inputs.to(work)
    if 4 * t * t > p * d:
        return sum_stats(g.t().mm(x), autograd)
    g64, x64 = g.double(), x.double()
    aa = float(((g64 @ g64.t()) * (x64 @ x64.t())).sum())
    if autograd is None:
        stats: SumStats = (aa, 0.0, 0.0)
    else:
        a = autograd.detach().reshape(p, d)
        a = a if a.dtype == work else a.to(work)
        xa = x.mm(a.t())  # (T, p): reads A once
        flat_a = a.reshape(-1)
        bb, ab = torch.stack([flat_a.dot(flat_a).double(), (g64 * xa.double()).sum()]).tolist()
        stats = (aa, bb, ab)
    if _trusted(stats):
        return stats
    # a product that over- or underflowed in the working precision (an entry of X A^T above
    # ~3.4e38 makes <S, A> non-finite, and the comparison would be skipped): S formed in
    # float64, exactly
    return exact_sum_stats(g64.t().mm(x64), autograd)


def compare_sum_stats(
    *,
    names: Sequence[tuple[str, str]],
    stats: Sequence[SumStats],
    rtol: float = SUMS_RTOL,
) -> None:
    """Refuse unless the book-keeping sum of each parameter (``names``: its layer path and
    full name) equals autograd's gradient of the same weighted loss, to relative ``rtol``,
    given their :data:`SumStats`."""
    rows: list[tuple[str, str, float, float]] = []  # path, name, scale, difference
    for (path, name), (aa, bb, ab) in zip(names, stats, strict=True):
        if not all(map(math.isfinite, (aa, bb, ab))):
            continue  # a non-finite gradient: the example contributes 0 and is not compared
        rows.append(
            (path, name, math.sqrt(aa) + math.sqrt(bb), math.sqrt(max(aa + bb - 2 * ab, 0)))
        )
    # the statistics are exact in float64 at any scale (exact_sum_stats), so a gradient of
    # tiny norm is compared like any other down to float32's smallest normal number, 2^-126
    # (~1.2e-38): below it autograd's own float32 gradient cannot resolve a difference. What
    # this lets pass moves an example's clipped contribution by less than 2^-126 in L2
    floor = 1e-6 * max((r[2] for r in rows), default=0.0) + 2.0**-126
    for path, name, scale, diff in rows:
        if diff > rtol * scale + floor:
            off = diff / max(scale / 2, 1e-30)
            raise refuse(
                path,
                f"the gradient of parameter {name!r} that per-sample clipping computes from "
                f"{module_at(path)}'s inputs and output gradients differs from autograd's gradient "
                f"of the same loss by {off:.1%}: something changes the gradient outside the "
                "module's own forward (a forward hook that replaces the module's output, the "
                "parameter read through a tensor derived from it and used outside the module, "
                "a hook on the parameter's gradient); remove it, or call the module for every "
                "use of its parameters",
            )


def compare_sums(
    *,
    names: Sequence[tuple[str, str]],
    bookkeeping: Sequence[torch.Tensor],
    autograd: Sequence[torch.Tensor | None],
    rtol: float = SUMS_RTOL,
) -> None:
    """:func:`compare_sum_stats` of dense book-keeping sums (one tensor per parameter)."""
    stats = [sum_stats(s, t) for s, t in zip(bookkeeping, autograd, strict=True)]
    compare_sum_stats(names=names, stats=stats, rtol=rtol)
