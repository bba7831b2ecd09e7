"""A party's local statistic for a release plan, encoded into ring words.

Each party computes its own share of the aggregate from its own rows only, already validated
(and, where its policy says so, clipped) to the declared bounds by mpcdp.datasets; vector
datasets are clipped here to the declared L2 bound. Tensors are encoded with
round-to-nearest fixed point (the plan's sensitivities include the rounding) and concatenated
in plan order.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mpcdp import encoding, ring
from mpcdp.datasets import Table, Vector
from mpcdp.errors import ParameterError
from mpcdp.protocol.plan import ReleasePlan
from mpcdp.protocol.spec import Statistic

__all__ = ["clip_l2", "local_words"]


def clip_l2(x: NDArray[np.float64], bound: float) -> NDArray[np.float64]:
    """x scaled down to L2 norm <= bound (unchanged when already inside)."""
    norm = float(np.linalg.norm(x))
    return x if norm <= bound else x * (bound / norm)


def _values(plan: ReleasePlan, data: Table | Vector) -> list[NDArray[np.float64]]:
    spec = plan.spec
    st = spec.statistic
    if isinstance(data, Vector):
        if st is not Statistic.SUM or spec.column:
            raise ParameterError("statistic", st.value, "vector datasets support sum only")
        return [clip_l2(data.values, spec.l2_bound)]
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


def local_words(plan: ReleasePlan, data: Table | Vector) -> ring.RingVector:
    """The party's encoded local tensors, concatenated in plan order."""
    parts = [
        encoding.encode_fixed(v, frac_bits=t.frac_bits)
        for v, t in zip(_values(plan, data), plan.tensors, strict=True)
    ]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]
