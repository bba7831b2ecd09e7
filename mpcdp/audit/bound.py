"""The one-run audit's statistics: Steinke, Nasr, Jagielski 2023, "Privacy auditing with one
(1) training run" (NeurIPS), Section 3 (Theorem 3.1, pure DP) and Section 5 (Theorem 5.2 /
Corollary 5.4 for approximate DP; the computation of their Appendix D).

Setting. m canaries; before the run, each is included independently with probability 1/2
(S_i in {-1, +1}, secret to whoever includes it). After the run, an auditor who knows the
canaries' *content* but not S scores each canary, guesses "in" for the ``k_plus`` highest
scores and "out" for the ``k_minus`` lowest, and abstains on the rest: r = k_plus + k_minus
guesses, v of them correct.

Bound. When the run is (eps, delta)-DP with respect to each canary's inclusion,

    P[V >= v] <= P[Binom(r, p) >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= Binom(r, p) < v] / i

with p = e^eps / (1 + e^eps) (the accuracy of eps-randomized response). For delta = 0 the
second term vanishes (Theorem 3.1: the correct count is stochastically dominated by
Binom(r, p)). This right-hand side, capped at 1, is the p-value of the null "the run is
(eps, delta)-DP"; it increases with eps. The audit's lower bound is the largest eps whose
p-value is below ``1 - confidence`` (bisection): with probability at least ``confidence``
over the canaries' coin flips (and the run's own randomness), a run that *is*
(eps, delta)-DP reports a bound <= eps. A bound above the accountant's epsilon therefore
means, at that confidence, that the implementation is less private than claimed.

Choosing k_plus and k_minus. Either fixed by the caller (the bound above holds as it is), or
chosen over a grid after seeing the scores and the inclusion bits: then every grid point is
tested at level ``(1 - confidence) / G`` (Bonferroni over the G points) and the best bound is
reported, which keeps the statement valid at ``confidence`` (:func:`audit`'s docstring).

The binomial tail is exact: log-pmf from ``math.lgamma``, summed in float64 (no scipy).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import ParameterError

__all__ = [
    "DEFAULT_GRID",
    "OneRunAudit",
    "audit",
    "count_correct",
    "epsilon_lower_bound",
    "p_value",
]

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

#: the guess counts tried when the caller fixes none: k_plus = k_minus = k, and k_plus = k
#: with k_minus = 0, for each k here not above m / 2
DEFAULT_GRID: tuple[int, ...] = (
    5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000,
)  # fmt: skip
#: bisection steps on eps (the bracket is at most 64 wide: 2^-50 resolution)
_BISECTION_STEPS = 56
_EPS_CAP = 64.0


@dataclass(frozen=True)
class OneRunAudit:
    """The outcome of a one-run audit.

    Attributes:
        epsilon_lower_bound: with probability >= ``confidence``, the run is not
            (eps, delta)-DP for any eps < this value (0 when the audit shows nothing).
        m: canaries (each included with probability 1/2).
        guesses: r = k_plus + k_minus guesses made.
        correct: v, the correct ones.
        k_plus: canaries guessed "in" (the highest scores).
        k_minus: canaries guessed "out" (the lowest scores).
        confidence: the statement's confidence (Bonferroni over ``candidates`` included).
        delta: the audited delta.
        candidates: (score set, k_plus, k_minus) combinations tried, each at
            ``(1 - confidence) / candidates``.
        claimed_epsilon: the accountant's epsilon when given, else None.
        score_set: which row of a 2-D ``scores`` gave the bound (0 for 1-D scores).
    """

    epsilon_lower_bound: float
    m: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float
    candidates: int = 1
    claimed_epsilon: float | None = None
    score_set: int = 0

    @property
    def fraction_reached(self) -> float | None:
        """epsilon_lower_bound / claimed_epsilon (None without a claim)."""
        if self.claimed_epsilon is None or self.claimed_epsilon <= 0:
            return None
        return self.epsilon_lower_bound / self.claimed_epsilon


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _check_counts(m: object, guesses: object, correct: object) -> tuple[int, int, int]:
    if not _is_int(m) or int(m) < 1:  # type: ignore[call-overload]
        raise ParameterError("m", m, "must be an int >= 1")
    if not _is_int(guesses) or not 0 <= int(guesses) <= int(m):  # type: ignore[call-overload]
        raise ParameterError("guesses", guesses, f"must be an int in [0, m={m}]")
    if not _is_int(correct) or not 0 <= int(correct) <= int(guesses):  # type: ignore[call-overload]
        raise ParameterError("correct", correct, f"must be an int in [0, guesses={guesses}]")
    return int(m), int(guesses), int(correct)  # type: ignore[call-overload]


def _check_delta(delta: object) -> float:
    if not _is_real(delta) or not 0.0 <= float(delta) < 1.0:  # type: ignore[arg-type]
        raise ParameterError("delta", delta, "must be a real number in [0, 1)")
    return float(delta)  # type: ignore[arg-type]


def _check_confidence(confidence: object) -> float:
    if not _is_real(confidence) or not 0.0 < float(confidence) < 1.0:  # type: ignore[arg-type]
        raise ParameterError("confidence", confidence, "must be a real number in (0, 1)")
    return float(confidence)  # type: ignore[arg-type]


class _Binomial:
    """log C(r, k) for k = 0..r, reused across the eps of a bisection."""

    def __init__(self, r: int) -> None:
        self.r = r
        k = np.arange(r + 1, dtype=np.float64)
        lg = np.fromiter((math.lgamma(j + 1.0) for j in range(r + 1)), np.float64, r + 1)
        self.k = k
        self.log_choose = lg[r] - lg - lg[::-1]

    def pmf(self, p: float) -> FloatArray:
        """P[Binom(r, p) = k] for every k (underflows to 0 far in the tails)."""
        if p >= 1.0:
            out = np.zeros(self.r + 1)
            out[-1] = 1.0
            return out
        log_pmf = self.log_choose + self.k * math.log(p) + (self.r - self.k) * math.log1p(-p)
        return np.asarray(np.exp(log_pmf), dtype=np.float64)


def _p_value(binom: _Binomial, m: int, correct: int, epsilon: float, delta: float) -> float:
    # p = e^eps / (1 + e^eps), written so that large eps does not overflow
    p = 1.0 / (1.0 + math.exp(-epsilon))
    pmf = binom.pmf(p)
    tail = float(np.sum(pmf[correct:]))
    if delta > 0.0 and correct > 0:
        # P[v - i <= Binom < v] / i for i = 1..v: cumulative sums of pmf[v-1], pmf[v-2], ...
        below = np.cumsum(pmf[correct - 1 :: -1]) / np.arange(1, correct + 1)
        tail += 2.0 * m * delta * float(np.max(below))
    return min(1.0, tail)


def p_value(*, m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The p-value of "the run is (epsilon, delta)-DP" after ``correct`` of ``guesses``
    guesses on ``m`` canaries (module docstring; capped at 1)."""
    m, r, v = _check_counts(m, guesses, correct)
    if not _is_real(epsilon) or not 0.0 <= float(epsilon) < math.inf:
        raise ParameterError("epsilon", epsilon, "must be a finite real number >= 0")
    delta = _check_delta(delta)
    if r == 0:
        return 1.0
    return _p_value(_Binomial(r), m, v, float(epsilon), delta)


def _lower_bound(binom: _Binomial, m: int, correct: int, delta: float, alpha: float) -> float:
    if binom.r == 0 or _p_value(binom, m, correct, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while _p_value(binom, m, correct, hi, delta) < alpha:
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_CAP:
            return lo  # the p-value stays below alpha even at this eps: report the cap
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if _p_value(binom, m, correct, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo  # p-value(lo) < alpha always holds: never above the exact bound


def epsilon_lower_bound(
    *, m: int, guesses: int, correct: int, delta: float, confidence: float
) -> float:
    """The largest eps (within 2^-50, rounded down) whose p-value is below ``1 -
    confidence``; 0 when even eps = 0 is not rejected.

    Args:
        m: canaries, each included with probability 1/2 (>= 1).
        guesses: guesses made, 0 <= guesses <= m.
        correct: correct guesses, 0 <= correct <= guesses.
        delta: the audited delta, in [0, 1).
        confidence: in (0, 1).
    """
    m, r, v = _check_counts(m, guesses, correct)
    delta = _check_delta(delta)
    alpha = 1.0 - _check_confidence(confidence)
    return _lower_bound(_Binomial(r), m, v, delta, alpha)


def count_correct(
    *, scores: FloatArray, included: NDArray[np.bool_], k_plus: int, k_minus: int
) -> int:
    """Correct guesses when the ``k_plus`` highest scores are guessed "in" and the
    ``k_minus`` lowest "out" (ties broken by canary index, which the inclusion bits do not
    depend on)."""
    order = np.argsort(-scores, kind="stable")  # highest first; equal scores by index
    top = order[:k_plus]
    bottom = order[scores.size - k_minus :] if k_minus > 0 else order[:0]
    return int(np.count_nonzero(included[top]) + np.count_nonzero(~included[bottom]))


def _grid(m: int, grid: Sequence[int]) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    for k in grid:
        if 2 * k <= m:
            pairs.append((k, k))
        if k <= m:
            pairs.append((k, 0))
    if not pairs:
        pairs.append((1, 0))
    return pairs


def audit(
    *,
    scores: Sequence[float] | FloatArray,
    included: Sequence[bool] | NDArray[np.bool_],
    delta: float,
    confidence: float = 0.95,
    k_plus: int | None = None,
    k_minus: int | None = None,
    grid: Sequence[int] = DEFAULT_GRID,
    claimed_epsilon: float | None = None,
) -> OneRunAudit:
    """The one-run audit's lower bound from canary scores and their inclusion bits.

    Higher scores mean "more likely included". ``scores`` may be 2-D, shape (S, m): S
    different scores of the same canaries, all tried, each combination of a score set and a
    guess pair counting as one Bonferroni candidate. With ``k_plus`` and ``k_minus`` both given,
    those guesses are made and the bound is the plain one at ``confidence``. With neither
    given, every pair of :data:`DEFAULT_GRID` (or ``grid``) that fits m is tried (k, k) and
    (k, 0), each at level ``(1 - confidence) / G`` for G pairs (Bonferroni), and the best
    bound is returned: the pair is chosen *after* looking at the inclusion bits, and the
    correction is what keeps the reported bound valid at ``confidence``.

    Args:
        scores: one finite score per canary (m >= 1), or S rows of them.
        included: the canaries' inclusion bits, in the same order.
        delta: the audited delta, in [0, 1).
        confidence: in (0, 1).
        k_plus, k_minus: fixed guess counts (both or neither), k_plus + k_minus <= m.
        grid: guess counts to try when they are not fixed (ints >= 1).
        claimed_epsilon: the accountant's epsilon, recorded in the result (finite, >= 0).

    Raises:
        ParameterError: an argument outside its domain (the message names it).
    """
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ParameterError("scores", type(scores).__name__, "must be numbers") from exc
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.size < 1:
        raise ParameterError("scores", f"shape {s.shape}", "must be a non-empty 1-D or 2-D array")
    if not np.all(np.isfinite(s)):
        raise ParameterError("scores", "non-finite", "every score must be finite")
    inc = np.asarray(included)
    if inc.dtype != np.bool_ or inc.shape != s.shape[1:]:
        raise ParameterError(
            "included",
            f"{inc.dtype} of shape {inc.shape}",
            f"must be bools of shape {s.shape[1:]}",
        )
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    if claimed_epsilon is not None and (
        not _is_real(claimed_epsilon) or not 0 <= float(claimed_epsilon) < math.inf
    ):
        raise ParameterError("claimed_epsilon", claimed_epsilon, "must be a finite number >= 0")
    m = int(s.shape[1])
    if (k_plus is None) != (k_minus is None):
        raise ParameterError(
            "k_minus" if k_minus is None else "k_plus", None, "give both or neither"
        )
    if k_plus is not None and k_minus is not None:
        if not _is_int(k_plus) or k_plus < 0:
            raise ParameterError("k_plus", k_plus, "must be an int >= 0")
        if not _is_int(k_minus) or k_minus < 0:
            raise ParameterError("k_minus", k_minus, "must be an int >= 0")
        if k_plus + k_minus > m:
            raise ParameterError("k_plus", k_plus, f"k_plus + k_minus={k_minus} exceeds m={m}")
        pairs = [(int(k_plus), int(k_minus))]
    else:
        if (
            isinstance(grid, str | bytes)
            or not grid
            or not all(_is_int(k) and k >= 1 for k in grid)
        ):
            raise ParameterError("grid", grid, "must be a non-empty sequence of ints >= 1")
        pairs = _grid(m, grid)
    trials = [(row, kp, km) for row in range(s.shape[0]) for kp, km in pairs]
    alpha = (1.0 - confidence) / len(trials)
    best: OneRunAudit | None = None
    binoms: dict[int, _Binomial] = {}
    for row, kp, km in trials:
        v = count_correct(scores=s[row], included=inc, k_plus=kp, k_minus=km)
        r = kp + km
        binom = binoms.setdefault(r, _Binomial(r))
        bound = _lower_bound(binom, m, v, delta, alpha)
        if best is None or bound > best.epsilon_lower_bound:
            best = OneRunAudit(
                epsilon_lower_bound=bound,
                m=m,
                guesses=r,
                correct=v,
                k_plus=kp,
                k_minus=km,
                confidence=confidence,
                delta=delta,
                candidates=len(trials),
                claimed_epsilon=None if claimed_epsilon is None else float(claimed_epsilon),
                score_set=row,
            )
    assert best is not None
    log.info(
        "one-run audit: m=%d, %d of %d guesses correct, epsilon >= %.4g at confidence %g",
        best.m,
        best.correct,
        best.guesses,
        best.epsilon_lower_bound,
        best.confidence,
    )
    return best
