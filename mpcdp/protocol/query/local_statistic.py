"""A party's local statistic for a release plan, encoded into ring words.

Each party computes its own share of the aggregate from its own rows only, already validated
(and, where its policy says so, clipped) to the declared bounds by mpcdp.config.datasets; vector
datasets are clipped here to the declared L2 bound. Tensors are encoded with
round-to-nearest fixed point (the plan's sensitivities include the rounding) and concatenated
in plan order.

A table with more rows than the query's public ``max_rows`` is not refused (a refusal would
tell the coordinator the row count, and ~30 free proposals would find it exactly): every
local aggregate is clamped to the plan's per-party bound ``max_abs`` (bound * max_rows for a
sum, max_rows for a count or a histogram cell). Clamping is 1-Lipschitz, so one row still
moves each aggregate by at most its sensitivity; the owner is warned in its own log.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import NDArray

from mpcdp.config.datasets import Table, Vector
from mpcdp.errors import ParameterError
from mpcdp.mpc import encoding, ring
from mpcdp.protocol.query.plan import ReleasePlan
from mpcdp.protocol.query.query_spec import Statistic

__all__ = ["add_local_words", "l2_clip_factor"]

log = logging.getLogger(__name__)

# Encode in slices of this many values: temporaries stay small whatever the vector length.
_SLICE = 1 << 18


def l2_clip_factor(x: NDArray[np.float64], bound: float) -> float:
    """The factor that scales x down to L2 norm <= bound (1 when already inside)."""
    norm = float(np.linalg.norm(x))
    return 1.0 if norm <= bound else bound / norm


def _values(plan: ReleasePlan, data: Table) -> list[NDArray[np.float64]]:
    spec = plan.spec
    st = spec.statistic
    if st is Statistic.COUNT:
        return [np.array([float(data.rows)])]
    if st is Statistic.HISTOGRAM:
        idx = data.categorical[spec.column]
        return [np.bincount(idx, minlength=len(spec.categories)).astype(np.float64)]
    col = data.numeric[spec.column]
    if st is Statistic.SUM:
        return [np.array([col.sum()])]
    mid = (spec.lower + spec.upper) / 2
    return [np.array([(col - mid).sum()]), np.array([float(data.rows)])]


def add_local_words(plan: ReleasePlan, data: Table | Vector, out: ring.AnyRingVector) -> None:
    """out += the party's encoded local tensors (in place, slice by slice, mod 2^64)."""
    if out.size != plan.length:
        raise ParameterError("out", f"len={out.size}", f"expected {plan.length}")
    if isinstance(data, Vector):
        if plan.spec.statistic is not Statistic.SUM or plan.spec.column:
            raise ParameterError("statistic", plan.spec.statistic.value, "vectors support sum only")
        # clip and encode in one pass: x * (clip factor * 2^f), rounded to nearest
        x = data.values
        scale = l2_clip_factor(x, plan.spec.l2_bound) * float(1 << plan.tensors[0].frac_bits)
        for start in range(0, x.size, _SLICE):
            seg = out[start : start + _SLICE]
            enc = np.rint(x[start : start + _SLICE] * scale).astype(np.int64).astype(out.dtype)
            np.add(seg, enc, out=seg)
        return
    offset = 0
    for v, t in zip(_values(plan, data), plan.tensors, strict=True):
        clamped = np.clip(v, -t.max_abs, t.max_abs)
        if not np.array_equal(clamped, v):
            log.warning(
                "dataset %s has more rows than max_rows=%d of query %s: its local %s is "
                "clamped to the query's public bound",
                data.path.name,
                plan.spec.max_rows,
                plan.spec.query_id,
                t.name,
            )
        v = clamped
        seg = out[offset : offset + t.length]
        enc = encoding.encode_fixed(v, frac_bits=t.frac_bits, ring_bits=plan.spec.ring_bits)
        np.add(seg, enc, out=seg)
        offset += t.length
