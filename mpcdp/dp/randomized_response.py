"""Randomized response: the poll of docs/salary_example.md, with its debiased estimator.

Each respondent with bit x tells the truth with probability q and otherwise reports a fair
coin: P[report = x] = (1 + q)/2, P[report != x] = (1 - q)/2, so each report is
eps-DP with eps = ln((1 + q)/(1 - q)) (Warner 1965; Dwork-Roth 2014, Sec. 3.2). The article's
two-coin version is q = 1/2, eps = ln 3: E[N/n] = p/2 + 1/4 and p_hat = 2N/n - 1/2.
In general E[N/n] = q p + (1 - q)/2 and p_hat = (N/n - (1 - q)/2) / q, unbiased, with
Var[p_hat] = f(1 - f) / (n q^2) where f = E[N/n].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mpcdp.errors import ParameterError
from mpcdp.mpc.rng import ensure_rng

__all__ = ["RandomizedResponseEstimate", "estimate", "randomize", "truth_probability"]


def truth_probability(*, epsilon: float) -> float:
    """q = (e^eps - 1)/(e^eps + 1) = tanh(eps/2): the chance of answering truthfully."""
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ParameterError("epsilon", epsilon, "must be finite and > 0")
    return math.tanh(epsilon / 2)


def randomize(
    bits: ArrayLike, *, epsilon: float, rng: np.random.Generator | None = None
) -> NDArray[np.uint8]:
    """Each respondent's randomized report (0/1) for its true ``bits``."""
    arr = np.asarray(bits)
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = arr.reshape(-1)[~np.isin(arr.reshape(-1), (0, 1))][0]
        raise ParameterError("bits", bad.item(), "every answer must be 0 or 1")
    q = truth_probability(epsilon=epsilon)
    gen = ensure_rng(rng)
    truthful = gen.random(arr.shape) < q
    coins = gen.integers(0, 2, size=arr.shape)
    return np.where(truthful, arr, coins).astype(np.uint8)


@dataclass(frozen=True)
class RandomizedResponseEstimate:
    """Debiased fraction of 1s, its standard error and the per-respondent epsilon."""

    fraction: float
    std_error: float
    epsilon: float
    respondents: int


def estimate(*, ones: int, respondents: int, epsilon: float) -> RandomizedResponseEstimate:
    """p_hat from N = ``ones`` reports of 1 among ``respondents`` reports."""
    if not isinstance(respondents, int) or respondents < 1:
        raise ParameterError("respondents", respondents, "must be an int >= 1")
    if not isinstance(ones, int) or not 0 <= ones <= respondents:
        raise ParameterError("ones", ones, f"must be an int in [0, {respondents}]")
    q = truth_probability(epsilon=epsilon)
    f = ones / respondents
    p_hat = (f - (1 - q) / 2) / q
    return RandomizedResponseEstimate(
        fraction=p_hat,
        std_error=math.sqrt(f * (1 - f) / respondents) / q,
        epsilon=epsilon,
        respondents=respondents,
    )
