"""Empirical privacy audit: a statistically valid lower bound on epsilon by membership inference.

The accountant (mpcdp.dp.accountant) gives an *upper* bound on the privacy loss of training.
This module gives an empirical *lower* bound, to be printed next to it: if the lower bound ever
exceeds the accountant's epsilon, the implementation (clipping, noise, sampling, accounting)
is broken. It is a sanity check, not an estimate of the true privacy loss: a loss-threshold
attack is weak, so on a correctly trained DP model the bound is usually far below the
accountant's epsilon.

Method (Jagielski, Ullman, Oprea 2020, "Auditing differentially private machine learning:
how private is private SGD?", NeurIPS; Nasr, Song, Thakurta, Papernot, Carlini 2021,
"Adversary instantiation: lower bounds for differentially private machine learning",
IEEE S&P):

1. Score every example by its loss under the trained model; members are training examples,
   non-members are held-out examples from the same distribution. The attack is a threshold
   on the loss: guess "member" when ``loss <= tau``.
2. Split members and non-members at random (injected ``numpy.random.Generator``) into a
   selection half and an evaluation half. ``tau`` is chosen on the selection half only (the
   candidate maximising the bound below, with Wilson score bounds standing in for
   Clopper-Pearson so that all candidates are scored in one vectorised pass). Because the
   evaluation half is never looked at while choosing ``tau``, the confidence statement of
   step 3 holds for the chosen test.
3. On the evaluation half, count false positives (non-members guessed members) and false
   negatives (members guessed non-members) and take one-sided Clopper-Pearson upper
   confidence bounds ``FPR_ub`` and ``FNR_ub``, each at level ``1 - (1 - confidence) / 2``
   (Bonferroni), so both hold together with probability at least ``confidence``.
4. An (eps, delta)-DP mechanism makes every test satisfy ``FPR * e^eps + FNR >= 1 - delta``
   and, symmetrically, ``FNR * e^eps + FPR >= 1 - delta`` (Kairouz, Oh, Viswanath 2015,
   "The composition theorem for differential privacy", ICML; Wasserman-Zhou 2010). Solving
   for eps with the upper bounds (the right-hand side decreases in both rates) gives

       eps_lb = max(0, log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub))

   where a term with a non-positive numerator counts as 0. With probability at least
   ``confidence`` over the evaluation sample, the mechanism is not (eps, delta)-DP for any
   eps < eps_lb.

The Clopper-Pearson bound is computed exactly by bisection on the binomial CDF (log-pmf
sums with ``math.lgamma``, vectorised with numpy), so the runtime dependencies stay
numpy (+ torch for :func:`example_losses` and :func:`audit_model`); scipy is not needed.

Limitations:

- The binomial model treats the evaluation examples as independent trials of the DP
  guarantee. Jagielski et al. make that literally true by training many models; on one
  training run with fixed members it is the usual heuristic of loss-threshold audits
  (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run", make
  one-run audits rigorous by including each candidate example by an independent coin flip
  before training; this module does not do that).
- The guarantee audited is per example. Federated DP-SGD with user-level accounting is
  audited at example level here, which can only make the bound smaller (more conservative).
- Members and non-members must come from the same distribution; a distribution shift
  between them shows up as apparent leakage.

Importing this module imports torch; ``mpcdp`` itself never imports it, and nothing runs at
import time.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from numpy.typing import NDArray

from mpcdp.errors import ParameterError

__all__ = [
    "AuditResult",
    "audit_model",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "example_losses",
]

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

# Bisection steps for the Clopper-Pearson bound: the interval [0, 1] halves each step, and the
# loop also stops as soon as the midpoint no longer moves (float64 resolution).
_MAX_BISECTION_STEPS = 200


@dataclass(frozen=True)
class AuditResult:
    """Outcome of a membership-inference audit.

    Attributes:
        epsilon_lower_bound: eps such that, with probability >= ``confidence``, the trained
            mechanism is not (eps', delta)-DP for any eps' < eps. 0 when the attack shows
            nothing.
        threshold: loss threshold of the attack (guess "member" when ``loss <= threshold``),
            chosen on the selection half.
        tpr: true-positive rate of the attack on the evaluation half (point estimate).
        fpr: false-positive rate of the attack on the evaluation half (point estimate).
        fpr_upper: one-sided Clopper-Pearson upper bound on the FPR used in the bound.
        fnr_upper: one-sided Clopper-Pearson upper bound on the FNR used in the bound.
        members: number of members in the evaluation half.
        non_members: number of non-members in the evaluation half.
        confidence: joint confidence level of the two bounds.
        delta: delta of the (eps, delta) guarantee being audited.
    """

    epsilon_lower_bound: float
    threshold: float
    tpr: float
    fpr: float
    fpr_upper: float
    fnr_upper: float
    members: int
    non_members: int
    confidence: float
    delta: float


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _check_probability_open(name: str, value: float) -> None:
    if not _is_real(value) or not 0.0 < float(value) < 1.0:
        raise ParameterError(name, value, "must be a real number in (0, 1)")


def _check_delta(delta: float) -> None:
    if not _is_real(delta) or not 0.0 <= float(delta) < 1.0:
        raise ParameterError("delta", delta, "must be a real number in [0, 1)")


def _check_scores(name: str, scores: object) -> FloatArray:
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ParameterError(name, type(scores).__name__, "must be an array of numbers") from exc
    if array.ndim != 1:
        raise ParameterError(name, f"shape {array.shape}", "must be a 1-D array")
    if array.size < 2:
        raise ParameterError(name, f"{array.size} element(s)", "needs at least 2 scores")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ParameterError(
            name, f"{bad} non-finite of {array.size}", "every score must be finite (no NaN/inf)"
        )
    return array


def _log_binomial_coefficients(k: int, n: int) -> FloatArray:
    """log C(n, i) for i = 0..k."""
    return (
        math.lgamma(n + 1)
        - np.fromiter((math.lgamma(j + 1) for j in range(k + 1)), np.float64, k + 1)
        - np.fromiter((math.lgamma(n - j + 1) for j in range(k + 1)), np.float64, k + 1)
    )


def _binomial_log_cdf(log_binom: FloatArray, n: int, p: float) -> float:
    """log P(Binomial(n, p) <= k) for 0 < p < 1, with log_binom = log C(n, 0..k)."""
    i = np.arange(log_binom.size, dtype=np.float64)
    log_pmf = log_binom + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(np.max(log_pmf))
    return top + math.log(float(np.sum(np.exp(log_pmf - top))))


def clopper_pearson_upper(*, successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper confidence bound on a binomial proportion.

    Returns the p_u with ``P(Binomial(trials, p_u) <= successes) = alpha`` (1 when
    ``successes == trials``), i.e. the ``1 - alpha`` quantile of Beta(successes + 1,
    trials - successes). ``P(p <= p_u) >= 1 - alpha`` for every true p. Computed by bisection
    on the binomial CDF; the returned value is the upper end of the final bracket, so it is
    never below the exact bound by more than float rounding. Cost O(successes) per step.

    Args:
        successes: observed count k, 0 <= k <= trials.
        trials: number of trials n >= 1.
        alpha: one-sided error level in (0, 1).
    """
    if not isinstance(trials, int | np.integer) or isinstance(trials, bool) or trials < 1:
        raise ParameterError("trials", trials, "must be an int >= 1")
    if (
        not isinstance(successes, int | np.integer)
        or isinstance(successes, bool)
        or not 0 <= successes <= trials
    ):
        raise ParameterError("successes", successes, f"must be an int in [0, trials={trials}]")
    _check_probability_open("alpha", alpha)
    k, n = int(successes), int(trials)
    if k == n:
        return 1.0
    if k == 0:
        # Closed form, P(Bin(n, p) = 0) = (1 - p)^n = alpha.
        return float(-math.expm1(math.log(alpha) / n))
    log_alpha = math.log(alpha)
    log_binom = _log_binomial_coefficients(k, n)
    lo, hi = 0.0, 1.0
    for _ in range(_MAX_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if _binomial_log_cdf(log_binom, n, mid) > log_alpha:
            lo = mid
        else:
            hi = mid
    return hi


def _epsilon_from_rates(fpr: FloatArray, fnr: FloatArray, delta: float) -> FloatArray:
    """max(0, log((1-delta-fnr)/fpr), log((1-delta-fpr)/fnr)), with 0 for invalid terms."""
    with np.errstate(divide="ignore", invalid="ignore"):
        num_a = 1.0 - delta - fnr
        num_b = 1.0 - delta - fpr
        term_a = np.where((num_a > 0) & (fpr > 0), np.log(num_a / fpr), 0.0)
        term_b = np.where((num_b > 0) & (fnr > 0), np.log(num_b / fnr), 0.0)
        # A zero rate with a positive numerator would mean eps = inf; rates here are upper
        # confidence bounds, which are > 0 whenever they are used (n is finite).
        term_a = np.where((num_a > 0) & (fpr <= 0), np.inf, term_a)
        term_b = np.where((num_b > 0) & (fnr <= 0), np.inf, term_b)
    return np.maximum(0.0, np.maximum(term_a, term_b))


def _wilson_upper(successes: FloatArray, trials: int, z: float) -> FloatArray:
    p_hat = successes / trials
    z2 = z * z
    centre = p_hat + z2 / (2 * trials)
    spread = z * np.sqrt(p_hat * (1 - p_hat) / trials + z2 / (4 * trials * trials))
    return np.asarray(np.minimum(1.0, (centre + spread) / (1 + z2 / trials)), dtype=np.float64)


def _select_threshold(
    members: FloatArray, non_members: FloatArray, *, delta: float, alpha: float
) -> float:
    """Threshold maximising the (Wilson-approximated) bound on the selection half."""
    members = np.sort(members)
    non_members = np.sort(non_members)
    candidates = np.unique(np.concatenate([members, non_members]))
    true_pos = np.searchsorted(members, candidates, side="right").astype(np.float64)
    false_pos = np.searchsorted(non_members, candidates, side="right").astype(np.float64)
    z = NormalDist().inv_cdf(1.0 - alpha)
    fpr_ub = _wilson_upper(false_pos, non_members.size, z)
    fnr_ub = _wilson_upper(members.size - true_pos, members.size, z)
    objective = _epsilon_from_rates(fpr_ub, fnr_ub, delta)
    if objective.max() > 0:
        best = int(np.argmax(objective))
    else:
        # No candidate shows anything: report the most separating one (Youden's J).
        best = int(np.argmax(true_pos / members.size - false_pos / non_members.size))
    low = float(candidates[best])
    if best + 1 == candidates.size:
        return low
    # Midway to the next observed score: the same split of the selection half, but a margin
    # on both sides for the evaluation half.
    high = float(candidates[best + 1])
    middle = low / 2 + high / 2
    return middle if low <= middle < high else low


def epsilon_lower_bound(
    *,
    member_scores: NDArray[np.floating] | FloatArray,
    non_member_scores: NDArray[np.floating] | FloatArray,
    delta: float,
    confidence: float = 0.95,
    rng: np.random.Generator | None = None,
) -> AuditResult:
    """Lower bound on epsilon from a threshold attack on per-example scores.

    Members and non-members are each split at random into a selection half (``n // 2``
    examples) and an evaluation half (the rest). The threshold is chosen on the selection
    half; FPR/FNR Clopper-Pearson bounds (Bonferroni, ``(1 - confidence) / 2`` each) are taken
    on the evaluation half. See the module docstring for the method and its assumptions.

    Args:
        member_scores: 1-D finite scores (losses) of training examples; lower means more
            likely a member. At least 2.
        non_member_scores: 1-D finite scores of held-out examples of the same distribution.
            At least 2.
        delta: delta of the audited (eps, delta) guarantee, in [0, 1).
        confidence: joint confidence of the bound, in (0, 1).
        rng: generator of the selection/evaluation split (not a privacy secret);
            ``numpy.random.default_rng()`` when None.

    Returns:
        The bound with the threshold and the evaluation-half rates it rests on.

    Raises:
        ParameterError: an argument outside its domain (the message names it).
    """
    members = _check_scores("member_scores", member_scores)
    non_members = _check_scores("non_member_scores", non_member_scores)
    _check_delta(delta)
    _check_probability_open("confidence", confidence)
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        raise ParameterError("rng", type(rng).__name__, "must be a numpy.random.Generator")
    delta = float(delta)
    confidence = float(confidence)
    alpha = (1.0 - confidence) / 2.0

    members = members[rng.permutation(members.size)]
    non_members = non_members[rng.permutation(non_members.size)]
    m_sel, m_eval = members[: members.size // 2], members[members.size // 2 :]
    n_sel, n_eval = non_members[: non_members.size // 2], non_members[non_members.size // 2 :]

    threshold = _select_threshold(m_sel, n_sel, delta=delta, alpha=alpha)
    true_pos = int(np.count_nonzero(m_eval <= threshold))
    false_pos = int(np.count_nonzero(n_eval <= threshold))
    false_neg = m_eval.size - true_pos
    fpr_upper = clopper_pearson_upper(successes=false_pos, trials=n_eval.size, alpha=alpha)
    fnr_upper = clopper_pearson_upper(successes=false_neg, trials=m_eval.size, alpha=alpha)
    bound = float(_epsilon_from_rates(np.array([fpr_upper]), np.array([fnr_upper]), delta).item())
    result = AuditResult(
        epsilon_lower_bound=bound,
        threshold=threshold,
        tpr=true_pos / m_eval.size,
        fpr=false_pos / n_eval.size,
        fpr_upper=fpr_upper,
        fnr_upper=fnr_upper,
        members=int(m_eval.size),
        non_members=int(n_eval.size),
        confidence=confidence,
        delta=delta,
    )
    logger.debug("membership-inference audit: %s", result)
    return result


def example_losses(
    *,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int = 1024,
) -> FloatArray:
    """Per-example cross-entropy losses of ``model`` (float64, one per row of ``inputs``).

    The model runs in eval mode without gradients, batch by batch on the device of its first
    parameter (the inputs' device when it has none). Every submodule's training flag is
    restored afterwards, also when the forward pass raises.

    Args:
        model: classifier returning logits of shape (batch, classes).
        inputs: examples, first dimension = number of examples.
        targets: 1-D integer class indices, one per example.
        batch_size: examples per forward pass, >= 1.

    Raises:
        ParameterError: mismatched or malformed inputs/targets, bad batch size.
    """
    if not isinstance(model, torch.nn.Module):
        raise ParameterError("model", type(model).__name__, "must be a torch.nn.Module")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 1:
        raise ParameterError("inputs", type(inputs).__name__, "must be a tensor of >= 1 dim")
    if not isinstance(targets, torch.Tensor) or targets.ndim != 1:
        raise ParameterError("targets", type(targets).__name__, "must be a 1-D tensor")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ParameterError("targets", str(targets.dtype), "must hold integer class indices")
    if targets.shape[0] != inputs.shape[0]:
        raise ParameterError(
            "targets",
            f"{targets.shape[0]} targets",
            f"must have one per example ({inputs.shape[0]} inputs)",
        )
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ParameterError("batch_size", batch_size, "must be an int >= 1")

    first = next(model.parameters(), None)
    device = first.device if first is not None else inputs.device
    modes = [(module, module.training) for module in model.modules()]
    chunks: list[FloatArray] = []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                x = inputs[start : start + batch_size].to(device)
                y = targets[start : start + batch_size].to(device=device, dtype=torch.long)
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                chunks.append(loss.detach().to("cpu", torch.float64).numpy())
    finally:
        for module, training in modes:
            module.training = training
    if not chunks:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(chunks)


def _check_pair(name: str, pair: object) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        not isinstance(pair, tuple)
        or len(pair) != 2
        or not all(isinstance(t, torch.Tensor) for t in pair)
    ):
        raise ParameterError(name, type(pair).__name__, "must be a tuple (inputs, targets)")
    return pair[0], pair[1]


def audit_model(
    *,
    model: torch.nn.Module,
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    delta: float,
    confidence: float = 0.95,
    rng: np.random.Generator | None = None,
    batch_size: int = 1024,
) -> AuditResult:
    """Loss-threshold membership-inference audit of a trained classifier.

    Args:
        model: the trained classifier (logits out).
        members: (inputs, targets) of training examples.
        non_members: (inputs, targets) of held-out examples of the same distribution.
        delta: delta of the audited (eps, delta) guarantee, in [0, 1).
        confidence: joint confidence of the bound, in (0, 1).
        rng: generator of the selection/evaluation split; fresh when None.
        batch_size: examples per forward pass when computing losses.

    Returns:
        See :func:`epsilon_lower_bound`.
    """
    member_inputs, member_targets = _check_pair("members", members)
    other_inputs, other_targets = _check_pair("non_members", non_members)
    member_losses = example_losses(
        model=model, inputs=member_inputs, targets=member_targets, batch_size=batch_size
    )
    other_losses = example_losses(
        model=model, inputs=other_inputs, targets=other_targets, batch_size=batch_size
    )
    return epsilon_lower_bound(
        member_scores=member_losses,
        non_member_scores=other_losses,
        delta=delta,
        confidence=confidence,
        rng=rng,
    )
