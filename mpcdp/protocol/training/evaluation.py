"""Evaluation at the sites: each site scores the coordinator's current model on its own
held-out split, and only the noisy total over all sites is revealed, through the same secure
sum as a training step (docs/training.md, "Evaluation at the sites"). Nothing happens at
import time.

What one site adds, for its held-out examples i (each a different person from the others of
that split), is three integers in units of 1/S (S = :data:`EVAL_SCALE`):

    ( sum_i R(S * c_i),  sum_i S,  sum_i R(S * min(max(l_i, 0), B) / B) )

with c_i in [0, 1] the example's accuracy (argmax == target for a classifier trained with
cross-entropy; the fraction of correct positions for a sequence target; 0 for other losses),
l_i its per-example loss under the run's declared loss (NaN counts as B), B the run's
``eval_loss_bound`` and R the unbiased randomized rounding floor(x) + [u < frac(x)]. Every
term of one example lies in [0, S], so adding or removing one example changes the vector by
at most S per coordinate: Delta_2 = sqrt(3) S and Delta_1 = 3 S, the sensitivities of the
Skellam mechanism's RDP bound (Agarwal, Kairouz and Liu 2021, as for a training step: see the
package docstring) with the run's ``eval_mu``, without subsampling (every held-out example
counts at every evaluation). The h = n - t honest sites' shares add up to Skellam(eval_mu),
as for a step.

Masks: the session's pairwise keys, with tensor id :data:`EVAL_TENSOR_ID` and the step index
as the round id, so an evaluation's masks never repeat a step's (tensor id 0) and a site
evaluates at most once per step index of a session (a second masked vector under the same
masks would reveal the difference of one site's two values, noised by its own share only).
The words are in Z_2^64 (:data:`EVAL_RING_BITS`) whatever the step's ring: n sites of at most
2^40 examples each stay far below 2^63.

When: before step s of a session, for s a multiple of ``eval_every`` in (start_step,
end_step), and after the session's last step (s = end_step); never before a session's first
step (the model the coordinator starts a session from is one it could have evaluated
before, in the session that made it). A site counts these points
when the session opens, and the whole run, its evaluations included, must fit its budget
then; each evaluation is charged when it is made (reserved first, charged once its vector
is ready). The privacy cost is conservative: the held-out examples are other people than
the training examples, yet each evaluation is charged to the dataset's one budget (an
example in both would be covered too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp import events as ev
from mpcdp.dp.mechanisms import Skellam
from mpcdp.errors import ParameterError

__all__ = [
    "EVAL_RING_BITS",
    "EVAL_SCALE",
    "EVAL_TENSOR_ID",
    "EVAL_WORDS",
    "MAX_EVAL_EXAMPLES",
    "EvaluationTotal",
    "check_eval_fields",
    "decode_total",
    "eval_event",
    "eval_mechanism",
    "eval_mu_for",
    "eval_points",
    "eval_sensitivities",
    "is_eval_point",
]

#: integer units per example: every term of one example is in [0, EVAL_SCALE]
EVAL_SCALE = 1 << 12
#: the evaluation's words: accuracy, examples, clipped loss
EVAL_WORDS = 3
#: the ring of an evaluation's words, whatever the step's
EVAL_RING_BITS = 64
#: the masks' tensor id (a step's is 0)
EVAL_TENSOR_ID = 1
#: the most held-out examples a site may hold (2^40: n sites stay far inside Z_2^64)
MAX_EVAL_EXAMPLES = 1 << 40


def eval_sensitivities() -> tuple[float, float]:
    """(Delta_2, Delta_1) of one site's evaluation vector, in integer units."""
    return math.sqrt(EVAL_WORDS) * EVAL_SCALE, float(EVAL_WORDS * EVAL_SCALE)


def eval_mu_for(noise_multiplier: float) -> float:
    """The Skellam variance of an evaluation's total noise for ``noise_multiplier`` (noise
    std / Delta_2): a noise std of noise_multiplier * sqrt(3) examples on each total."""
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, int | float)
        or not math.isfinite(noise_multiplier)
        or not noise_multiplier > 0
    ):
        raise ParameterError("noise_multiplier", noise_multiplier, "must be a finite number > 0")
    l2, _ = eval_sensitivities()
    return (float(noise_multiplier) * l2) ** 2


def check_eval_fields(*, eval_every: int, eval_mu: float, eval_loss_bound: float) -> None:
    """A spec's evaluation fields: all unset (no evaluation), or all set and in range."""
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or not 0 <= eval_every:
        raise ParameterError("eval_every", eval_every, "must be an int >= 0")
    if eval_every > 2**40:
        raise ParameterError("eval_every", eval_every, "must be at most 2^40")
    for name, value in (("eval_mu", eval_mu), ("eval_loss_bound", eval_loss_bound)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParameterError(name, value, "must be a number")
        if eval_every == 0:
            if value != 0:
                raise ParameterError(name, value, "must be 0 when eval_every is 0")
        elif not (math.isfinite(value) and value > 0):
            raise ParameterError(name, value, "must be finite and > 0 when eval_every > 0")
    if eval_every and not eval_loss_bound <= 1e12:
        raise ParameterError("eval_loss_bound", eval_loss_bound, "must be at most 1e12")


def eval_points(*, eval_every: int, start_step: int, end_step: int) -> tuple[int, ...]:
    """The step indices before which a session evaluates: the multiples of ``eval_every`` in
    (start_step, end_step], and end_step (after the last step). Empty when eval_every is 0."""
    if eval_every == 0:
        return ()
    first = (start_step // eval_every + 1) * eval_every
    points = list(range(first, end_step + 1, eval_every))
    if not points or points[-1] != end_step:
        points.append(end_step)
    return tuple(points)


def is_eval_point(*, eval_every: int, start_step: int, end_step: int, step: int) -> bool:
    """Whether a session may evaluate before step ``step`` (see :func:`eval_points`)."""
    if eval_every == 0 or not start_step < step <= end_step:
        return False
    return step % eval_every == 0 or step == end_step


def eval_mechanism(eval_mu: float) -> Skellam:
    """The noise of one evaluation: Skellam(eval_mu) in the honest sites' total."""
    l2, l1 = eval_sensitivities()
    return Skellam(mu=eval_mu, l1_sensitivity=l1, l2_sensitivity=l2)


def eval_event(eval_mu: float, *, count: int = 1) -> ev.Skellam:
    """The privacy event of ``count`` evaluations (for one site's held-out examples)."""
    l2, l1 = eval_sensitivities()
    return ev.Skellam(mu=eval_mu, l1_sensitivity=l1, l2_sensitivity=l2, steps=count)


@dataclass(frozen=True)
class EvaluationTotal:
    """The revealed evaluation of all sites that took part: noisy totals, in examples (the
    clipped loss in the loss's own units)."""

    correct: float
    examples: float
    loss_sum: float

    def accuracy(self) -> float:
        """Noisy correct over noisy examples, clamped to [0, 1] (post-processing)."""
        return min(1.0, max(0.0, self.correct / max(self.examples, 1.0)))

    def mean_loss(self, *, bound: float) -> float:
        """Noisy clipped-loss sum over noisy examples, clamped to [0, bound]."""
        return min(bound, max(0.0, self.loss_sum / max(self.examples, 1.0)))


def decode_total(total: NDArray[np.int64], *, eval_loss_bound: float) -> EvaluationTotal:
    """The revealed words (signed, integer units) as totals in examples and loss units."""
    if total.shape != (EVAL_WORDS,):
        raise ParameterError("total", f"shape {total.shape}", f"must have {EVAL_WORDS} words")
    correct, count, loss = (float(v) / EVAL_SCALE for v in total.tolist())
    return EvaluationTotal(correct=correct, examples=count, loss_sum=loss * eval_loss_bound)
