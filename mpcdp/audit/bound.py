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
chosen after seeing the scores and the inclusion bits among candidates fixed in advance
(:func:`schedule`, a function of m only): candidate j is tested at level
``(1 - confidence) w_j`` with weights summing to 1 (weighted Bonferroni: the union bound
gives P[some candidate rejects a true null] <= sum_j (1 - confidence) w_j = 1 - confidence),
and the best bound is reported. The default schedule follows the paper's practice of
abstaining on all but the most confident guesses and picking the number of guesses that
maximises the bound, and puts most of the weight on the widest candidates: guessing on all
but about 4 sqrt(m) canaries, which a run that leaks each canary completely gets all right
(the number included is Binomial(m, 1/2), within 2 sqrt(m) of m / 2 but with probability
6e-5), then 90% and 80% of m; a quarter of the weight goes to narrow candidates (1% to 60%)
where an honest run's few confident guesses are.

The ceiling. Whatever the run does, a candidate with r guesses can at best get all r right;
the bound that gives is the largest any outcome can reach (:func:`ceiling`, computed from m,
delta, confidence and the schedule before the run). It is about log(r / log(1 / alpha_j))
while the binomial term dominates, and never above about log(alpha_j r / (2 m delta)): the
delta term is at least 2 m delta P[v - i <= Binom(r, p) < v] / i with i about r (1 - p), so it
stays above alpha_j until r (1 - p) exceeds 2 m delta / alpha_j. A claimed epsilon at or
above the ceiling cannot be refuted by this audit however broken the run is: more canaries
lift the binomial cap, and only a smaller audited delta (or a lower confidence) lifts the
delta cap (:func:`advise`).

The binomial tail is exact: log-pmf from ``math.lgamma``, summed in float64 (no scipy).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import ParameterError

__all__ = [
    "DEFAULT_GRID",
    "Advice",
    "Guess",
    "OneRunAudit",
    "advise",
    "audit",
    "ceiling",
    "count_correct",
    "epsilon_lower_bound",
    "p_value",
    "schedule",
]

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

#: an explicit ``grid`` of :func:`audit` (equal weights): k_plus = k_minus = k, and k_plus = k
#: with k_minus = 0, for each k here not above m / 2 (the default is :func:`schedule`)
DEFAULT_GRID: tuple[int, ...] = (
    5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000,
)  # fmt: skip
#: bisection steps on eps (the bracket is at most 64 wide: 2^-50 resolution)
_BISECTION_STEPS = 56
_EPS_CAP = 64.0


@dataclass(frozen=True)
class Guess:
    """A candidate of the schedule: guess "in" for the ``k_plus`` highest scores and "out"
    for the ``k_minus`` lowest, tested at level ``(1 - confidence) * weight``."""

    k_plus: int
    k_minus: int
    weight: float

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus


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
        ceiling: the largest bound any outcome could have given (all guesses of the best
            candidate correct, :func:`ceiling`); a claim at or above it was untestable.
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
    ceiling: float = math.inf

    @property
    def fraction_reached(self) -> float | None:
        """epsilon_lower_bound / claimed_epsilon (None without a claim)."""
        if self.claimed_epsilon is None or self.claimed_epsilon <= 0:
            return None
        return self.epsilon_lower_bound / self.claimed_epsilon

    @property
    def testable(self) -> bool | None:
        """Whether any outcome could have put the bound above the claim (None without one)."""
        if self.claimed_epsilon is None:
            return None
        return self.claimed_epsilon < self.ceiling


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


def _grid(m: int, grid: Sequence[int]) -> list[Guess]:
    pairs: list[tuple[int, int]] = []
    for k in grid:
        if 2 * k <= m:
            pairs.append((k, k))
        if k <= m:
            pairs.append((k, 0))
    if not pairs:
        pairs.append((1, 0))
    return [Guess(kp, km, 1.0 / len(pairs)) for kp, km in pairs]


#: the schedule's wide candidates (fractions of m guessed, half "in" and half "out") and their
#: weights; the widest, all but about 4 sqrt(m), comes first
_WIDE = ((0.9, 0.125), (0.8, 0.125))
_WIDEST_WEIGHT = 0.5
#: narrow candidates share the remaining quarter: symmetric fractions, then "in" only
_NARROW_SYMMETRIC = (0.05, 0.1, 0.2, 0.4, 0.6)
_NARROW_IN = (0.01, 0.02, 0.05, 0.1, 0.2)


def schedule(m: int) -> tuple[Guess, ...]:
    """The default candidates for m canaries (a function of m alone, fixed before the run):
    weights sum to 1 (module docstring). Duplicates are merged, their weights added."""
    if not _is_int(m) or int(m) < 1:
        raise ParameterError("m", m, "must be an int >= 1")
    m = int(m)
    found: dict[tuple[int, int], float] = {}

    def add(kp: int, km: int, w: float) -> None:
        if kp + km >= 1 and kp + km <= m:
            found[(kp, km)] = found.get((kp, km), 0.0) + w

    widest = max(0, (m - 4 * math.ceil(math.sqrt(m))) // 2)
    add(widest, widest, _WIDEST_WEIGHT)
    for fraction, w in _WIDE:
        k = int(fraction * m) // 2
        add(k, k, w)
    narrow = 1.0 - _WIDEST_WEIGHT - sum(w for _, w in _WIDE)
    share = narrow / (len(_NARROW_SYMMETRIC) + len(_NARROW_IN))
    for fraction in _NARROW_SYMMETRIC:
        k = max(1, int(fraction * m) // 2)
        add(k, k, share)
    for fraction in _NARROW_IN:
        add(max(1, int(fraction * m)), 0, share)
    if not found:  # pragma: no cover - m >= 1 always admits (1, 0)
        found[(1, 0)] = 1.0
    total = sum(found.values())  # candidates that did not fit give their weight to the rest
    return tuple(Guess(kp, km, w / total) for (kp, km), w in found.items())


def ceiling(
    *,
    m: int,
    delta: float,
    confidence: float,
    score_sets: int = 1,
    grid: Sequence[int] | None = None,
) -> float:
    """The largest lower bound any outcome of an audit of m canaries can give: the best
    candidate's bound with all its guesses correct, each candidate at its level
    ``(1 - confidence) * weight / score_sets`` (:func:`audit`'s levels). A claimed epsilon
    at or above it cannot be refuted by that audit, whatever the run releases.

    Args:
        m: canaries in all (>= 1).
        delta: the audited delta, in [0, 1).
        confidence: in (0, 1).
        score_sets: score rows the audit will try (white-box: 2, black-box: 1).
        grid: an explicit grid of :func:`audit` (None: :func:`schedule`).
    """
    if not _is_int(m) or int(m) < 1:
        raise ParameterError("m", m, "must be an int >= 1")
    if not _is_int(score_sets) or not 1 <= int(score_sets) <= 64:
        raise ParameterError("score_sets", score_sets, "must be an int in [1, 64]")
    delta = _check_delta(delta)
    alpha = 1.0 - _check_confidence(confidence)
    cands = schedule(int(m)) if grid is None else _grid(int(m), _check_grid(grid))
    best = 0.0
    for g in cands:
        binom = _Binomial(g.guesses)
        best = max(
            best, _lower_bound(binom, int(m), g.guesses, delta, alpha * g.weight / score_sets)
        )
    return best


@dataclass(frozen=True)
class Advice:
    """What would make a claim testable (:func:`advise`).

    Attributes:
        claimed_epsilon: the claim at the audited delta.
        ceiling: the audit's ceiling as configured.
        canaries: the fewest canaries in all (a multiple of ``sites``, at most
            ``max_canaries``) whose ceiling exceeds the claim at the same delta, or None.
        delta: the largest audited delta of the form 10^-k (at most the configured one) at
            which some canary count up to ``max_canaries`` makes the claim (at that delta)
            testable, or None; ``delta_canaries`` is the fewest canaries there.
        claimed_at_delta: the claim at ``delta``.
    """

    claimed_epsilon: float
    ceiling: float
    canaries: int | None
    delta: float | None
    delta_canaries: int | None
    claimed_at_delta: float | None

    @property
    def testable(self) -> bool:
        return self.claimed_epsilon < self.ceiling

    def text(self, *, sites: int = 1) -> str:
        """One paragraph for the operator (empty when the claim is testable)."""
        if self.testable:
            return ""
        out = (
            f"the audit cannot refute the claimed epsilon {self.claimed_epsilon:.4g}: its "
            f"ceiling (the bound if every guess were right) is {self.ceiling:.4g}"
        )
        if self.canaries is not None:
            out += (
                f"; {self.canaries} canaries in all ({self.canaries // sites} per site) "
                "would make it testable at the same delta"
            )
        else:
            out += "; no number of canaries does at this delta (the delta term caps it)"
        if self.delta is not None and self.delta_canaries is not None:
            out += (
                f"; at audit delta {self.delta:g} (where the claim is "
                f"{self.claimed_at_delta:.4g}) {self.delta_canaries} canaries "
                f"({self.delta_canaries // sites} per site) would"
            )
        return out


def _fewest(
    *, claim: float, delta: float, confidence: float, score_sets: int, sites: int, most: int
) -> int | None:
    """The fewest canaries (multiple of sites, doubling then bisecting) whose ceiling exceeds
    ``claim``; None up to ``most``."""

    def ok(total: int) -> bool:
        c = ceiling(m=total, delta=delta, confidence=confidence, score_sets=score_sets)
        return c > claim

    hi = sites
    while not ok(hi):
        if hi >= most:
            return None
        hi = min(most, 2 * hi)
    lo = hi // 2  # lo fails (or is below one per site), hi works
    while hi - lo > max(sites, hi // 64):  # within 1/64: advice, not a bound
        mid = (lo + hi) // 2 // sites * sites
        if mid <= lo:
            break
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def advise(
    *,
    claimed_epsilon: float | Callable[[float], float],
    m: int,
    delta: float,
    confidence: float,
    score_sets: int = 1,
    sites: int = 1,
    max_canaries: int = 1 << 17,
) -> Advice:
    """Whether an audit of m canaries can refute a claim, and what would make it able to.

    Args:
        claimed_epsilon: the claim, or a function giving the claim at an audited delta (the
            accountant's epsilon grows as delta shrinks).
        m: canaries in all; delta, confidence, score_sets: as :func:`ceiling`.
        sites: canaries come in multiples of this (one share per site).
        max_canaries: the most canaries in all the advice considers.
    """
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    if not _is_int(sites) or int(sites) < 1:
        raise ParameterError("sites", sites, "must be an int >= 1")
    if not _is_int(max_canaries) or int(max_canaries) < int(sites):
        raise ParameterError("max_canaries", max_canaries, f"must be an int >= sites={sites}")
    claim_at = claimed_epsilon if callable(claimed_epsilon) else (lambda _: claimed_epsilon)  # type: ignore[misc]
    claim = float(claim_at(delta))
    if not math.isfinite(claim) or claim < 0:
        raise ParameterError("claimed_epsilon", claim, "must be a finite number >= 0")
    cap = ceiling(m=m, delta=delta, confidence=confidence, score_sets=score_sets)
    if claim < cap:
        return Advice(claim, cap, m, None, None, None)
    kw = dict(confidence=confidence, score_sets=score_sets, sites=int(sites), most=max_canaries)
    same = _fewest(claim=claim, delta=delta, **kw)  # type: ignore[arg-type]
    found: tuple[float, int, float] | None = None
    if same is None:
        k = math.floor(-math.log10(delta)) + 1 if delta > 0 else 31
        while k <= 30 and found is None:
            d = 10.0**-k
            at = float(claim_at(d))
            n = _fewest(claim=at, delta=d, **kw)  # type: ignore[arg-type]
            if n is not None:
                found = (d, n, at)
            k += 1
    return Advice(
        claimed_epsilon=claim,
        ceiling=cap,
        canaries=same,
        delta=None if found is None else found[0],
        delta_canaries=None if found is None else found[1],
        claimed_at_delta=None if found is None else found[2],
    )


def _check_grid(grid: object) -> Sequence[int]:
    if (
        isinstance(grid, str | bytes)
        or not isinstance(grid, Sequence)
        or not grid
        or not all(_is_int(k) and k >= 1 for k in grid)
    ):
        raise ParameterError("grid", grid, "must be a non-empty sequence of ints >= 1")
    return grid


def audit(
    *,
    scores: Sequence[float] | FloatArray,
    included: Sequence[bool] | NDArray[np.bool_],
    delta: float,
    confidence: float = 0.95,
    k_plus: int | None = None,
    k_minus: int | None = None,
    grid: Sequence[int] | None = None,
    claimed_epsilon: float | None = None,
) -> OneRunAudit:
    """The one-run audit's lower bound from canary scores and their inclusion bits.

    Higher scores mean "more likely included". ``scores`` may be 2-D, shape (S, m): S
    different scores of the same canaries, all tried, each combination of a score set and a
    guess pair counting as one Bonferroni candidate. With ``k_plus`` and ``k_minus`` both given,
    those guesses are made and the bound is the plain one at ``confidence``. With neither
    given, every candidate of :func:`schedule` (or, with ``grid``, every pair (k, k) and
    (k, 0) of it that fits m, weighted equally) is tried on every score set, candidate j at
    level ``(1 - confidence) * w_j / S`` (weighted Bonferroni), and the best bound is
    returned: the candidate is chosen *after* looking at the inclusion bits, and the
    correction is what keeps the reported bound valid at ``confidence``. The result also
    carries the audit's :func:`ceiling`.

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
        pairs: Sequence[Guess] = [Guess(int(k_plus), int(k_minus), 1.0)]
    else:
        pairs = schedule(m) if grid is None else _grid(m, _check_grid(grid))
    trials = [(row, g) for row in range(s.shape[0]) for g in pairs]
    alpha = 1.0 - confidence
    best: OneRunAudit | None = None
    binoms: dict[int, _Binomial] = {}
    top = 0.0
    for row, g in trials:
        kp, km, r = g.k_plus, g.k_minus, g.guesses
        v = count_correct(scores=s[row], included=inc, k_plus=kp, k_minus=km)
        binom = binoms.setdefault(r, _Binomial(r))
        level = alpha * g.weight / s.shape[0]
        bound = _lower_bound(binom, m, v, delta, level)
        if row == 0:
            top = max(top, _lower_bound(binom, m, r, delta, level))
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
    best = replace(best, ceiling=top)
    log.info(
        "one-run audit: m=%d, %d of %d guesses correct, epsilon >= %.4g at confidence %g "
        "(ceiling %.4g)",
        best.m,
        best.correct,
        best.guesses,
        best.epsilon_lower_bound,
        best.confidence,
        best.ceiling,
    )
    if best.testable is False:
        log.warning(
            "one-run audit: the claimed epsilon %.4g is at or above the audit's ceiling "
            "%.4g: no outcome of this audit could have refuted it (mpcdp.audit.bound.advise)",
            best.claimed_epsilon,
            best.ceiling,
        )
    return best
