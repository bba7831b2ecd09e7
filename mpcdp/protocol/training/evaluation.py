"""Evaluation at the sites: each site scores the coordinator's current model on its own
held-out split, and only the noisy total over all sites is revealed, through the same secure
sum as a training step (docs/training.md, "Evaluation at the sites"). Nothing happens at
import time.

What one site adds, for its held-out examples i (each a different person from the others of
that split), is :func:`eval_words` integers in units of 1/S (S = :data:`EVAL_SCALE`):

    ( sum_i R(S * c_i),  sum_i R(S * min(max(l_i, 0), B) / B) )

for a run trained with cross-entropy, and the second word alone for any other loss: c_i in [0,
1] is the example's accuracy (argmax of the output == its label; an output with further
positions averages them, in [0, 1] still), l_i its per-example loss under the run's declared
loss (NaN counts as B), B the run's ``eval_loss_bound`` and R the unbiased randomized rounding
floor(x) + [u < frac(x)]. Every term of one example lies in [0, S], so adding or removing one
example changes the vector by at most S per word: Delta_2 = sqrt(w) S and Delta_1 = w S for w
words, the sensitivities of the Skellam mechanism's RDP bound (Agarwal, Kairouz and Liu 2021,
as for a training step: see the package docstring) with the run's ``eval_mu``, without
subsampling (every held-out example counts at every evaluation). The h = n - t honest sites'
shares add up to Skellam(eval_mu), as for a step.

The number of examples is not released: each site's held-out count is public (Describe, as
its training count is; an evaluation's time grows with it), so the coordinator divides the
noisy sums by the exact total of the sites that took part, which halves what the noise costs
against a noisy count in the denominator and drops a word from the sensitivity.

Masks: the session's pairwise keys, with tensor id :data:`EVAL_TENSOR_ID` and the step index
as the round id, so an evaluation's masks never repeat a step's (tensor id 0) and a site
evaluates at most once per step index of a session (a second masked vector under the same
masks would reveal the difference of one site's two values, noised by its own share only).
The words are in Z_2^64 (:data:`EVAL_RING_BITS`) whatever the step's ring: n sites of at most
2^40 examples each stay far below 2^63.

When: before step s of a session, for s a multiple of ``eval_every`` in (start_step,
end_step), and after the session's last step (s = end_step); never before a session's first
step (the model the coordinator starts a session from is one it could have evaluated
before, in the session that made it). A site counts these points when the session opens,
and the whole run, its evaluations included, must fit its budget then; each evaluation is
charged when it is made (reserved first, charged once its words are ready). The privacy cost
is conservative: the held-out examples are other people than the training examples, yet
each evaluation is charged to the dataset's one budget (an example in both would be covered
too).
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
    "MAX_EVAL_EXAMPLES",
    "EvaluationTotal",
    "check_eval_fields",
    "decode_total",
    "eval_count",
    "eval_event",
    "eval_mechanism",
    "eval_mu_for",
    "eval_points",
    "eval_sensitivities",
    "eval_words",
    "is_eval_point",
    "reports_accuracy",
]

#: integer units per example: every term of one example is in [0, EVAL_SCALE]
EVAL_SCALE = 1 << 12
#: the ring of an evaluation's words, whatever the step's
EVAL_RING_BITS = 64
#: the masks' tensor id (a step's is 0)
EVAL_TENSOR_ID = 1
#: the most held-out examples a site may hold (2^40: n sites stay far inside Z_2^64)
MAX_EVAL_EXAMPLES = 1 << 40


def reports_accuracy(loss: str) -> bool:
    """Whether a run with this loss releases the accuracy (cross-entropy: a classifier)."""
    return loss == "cross_entropy"


def eval_words(loss: str) -> int:
    """The words of an evaluation of a run with this loss: accuracy and clipped loss, or
    the clipped loss alone."""
    return 2 if reports_accuracy(loss) else 1


def eval_sensitivities(words: int) -> tuple[float, float]:
    """(Delta_2, Delta_1) of one site's evaluation of ``words`` words, in integer units."""
    return math.sqrt(words) * EVAL_SCALE, float(words * EVAL_SCALE)


def eval_mu_for(noise_multiplier: float, *, words: int) -> float:
    """The Skellam variance of an evaluation's total noise for ``noise_multiplier`` (noise
    std / Delta_2): a noise std of noise_multiplier * sqrt(words) examples on each sum."""
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, int | float)
        or not math.isfinite(noise_multiplier)
        or not noise_multiplier > 0
    ):
        raise ParameterError("noise_multiplier", noise_multiplier, "must be a finite number > 0")
    l2, _ = eval_sensitivities(words)
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


def eval_count(*, eval_every: int, start_step: int, end_step: int) -> int:
    """How many points :func:`eval_points` lists, counted without listing them (a spec's
    steps may be up to 2^40)."""
    if eval_every == 0 or end_step <= start_step:
        return 0
    multiples = end_step // eval_every - start_step // eval_every
    return multiples + (0 if end_step % eval_every == 0 else 1)


def is_eval_point(*, eval_every: int, start_step: int, end_step: int, step: int) -> bool:
    """Whether a session may evaluate before step ``step`` (see :func:`eval_points`)."""
    if eval_every == 0 or not start_step < step <= end_step:
        return False
    return step % eval_every == 0 or step == end_step


def eval_mechanism(eval_mu: float, *, words: int) -> Skellam:
    """The noise of one evaluation: Skellam(eval_mu) in the honest sites' total."""
    l2, l1 = eval_sensitivities(words)
    return Skellam(mu=eval_mu, l1_sensitivity=l1, l2_sensitivity=l2)


def eval_event(eval_mu: float, *, words: int, count: int = 1) -> ev.Skellam:
    """The privacy event of ``count`` evaluations (for one site's held-out examples)."""
    l2, l1 = eval_sensitivities(words)
    return ev.Skellam(mu=eval_mu, l1_sensitivity=l1, l2_sensitivity=l2, steps=count)


@dataclass(frozen=True)
class EvaluationTotal:
    """The revealed evaluation of the sites that took part, over their ``examples`` held-out
    examples (the public counts): the noisy number right (None without accuracy) and the
    noisy clipped-loss sum, in the loss's own units."""

    correct: float | None
    loss_sum: float
    examples: int

    def accuracy(self) -> float | None:
        """Noisy right over the examples, clamped to [0, 1] (post-processing)."""
        if self.correct is None:
            return None
        return min(1.0, max(0.0, self.correct / max(self.examples, 1)))

    def mean_loss(self, *, bound: float) -> float:
        """Noisy clipped-loss sum over the examples, clamped to [0, bound]."""
        return min(bound, max(0.0, self.loss_sum / max(self.examples, 1)))


def decode_total(
    total: NDArray[np.int64], *, eval_loss_bound: float, loss: str, examples: int
) -> EvaluationTotal:
    """The revealed words (signed, integer units) of a run with ``loss``, over the sites'
    ``examples`` held-out examples in all."""
    words = eval_words(loss)
    if total.shape != (words,):
        raise ParameterError("total", f"shape {total.shape}", f"must have {words} words")
    values = [float(v) / EVAL_SCALE for v in total.tolist()]
    return EvaluationTotal(
        correct=values[0] if words == 2 else None,
        loss_sum=values[-1] * eval_loss_bound,
        examples=int(examples),
    )
