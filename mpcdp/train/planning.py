"""The plan of a federated DP-SGD run: the sampling rate, the steps, the fixed-point scale and
the Skellam noise that meet a target (epsilon, delta), fixed before the first step and stored
in checkpoints (see mpcdp.train.federated for the loop). Nothing happens at import time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mpcdp.dp import accountant, rdp
from mpcdp.errors import ParameterError
from mpcdp.protocol.training import (
    CLIPPING_MODES,
    TrainSpec,
    choose_scale_bits,
    max_batch_size,
    sensitivities,
    step_event,
)
from mpcdp.protocol.training.evaluation import (
    eval_count,
    eval_event,
    eval_mechanism,
    eval_mu_for,
    eval_words,
)

# CLIPPING_MODES: re-exported for the command line (torch-free; cli/ may not import protocol/)
__all__ = ["CLIPPING_MODES", "TrainingPlan", "plan_training"]


@dataclass(frozen=True)
class TrainingPlan:
    """Everything fixed before the first step; stored in checkpoints (resume must match)."""

    dataset: str
    model: str
    parties: tuple[str, ...]
    examples: tuple[int, ...]  # per site, in party order
    colluders: int
    sample_rate: float
    steps: int
    steps_per_epoch: int
    max_grad_norm: float
    clipping: str
    bias_only: bool
    noise_multiplier: float  # Skellam std / Delta_2 (in integer units)
    scale_bits: int
    mu: float
    num_params: int
    target_epsilon: float
    target_delta: float
    ring_bits: int = 32
    audit_canaries: int = 0  # per site; an audit run (mpcdp.train.audit_run) when > 0
    audit_kind: str = ""
    #: evaluation at the sites (mpcdp.protocol.training.evaluation): every eval_every steps
    #: and after the last (0: never), with Skellam(eval_mu) noise (eval_noise_multiplier
    #: times its Delta_2) and losses clipped to eval_loss_bound
    eval_every: int = 0
    eval_mu: float = 0.0
    eval_noise_multiplier: float = 0.0
    eval_loss_bound: float = 0.0
    #: the words of each evaluation (mpcdp.protocol.training.evaluation.eval_words)
    eval_words: int = 0

    @property
    def total_examples(self) -> int:
        return sum(self.examples)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.total_examples

    @property
    def honest(self) -> int:
        return len(self.parties) - self.colluders

    @property
    def noise_std(self) -> float:
        """Std of the total noise in gradient units when every site adds its share."""
        n = len(self.parties)
        return math.sqrt(self.mu * n / self.honest) / 2.0**self.scale_bits

    def spec(self, *, run_id: str, start_step: int, steps: int) -> TrainSpec:
        return TrainSpec(
            run_id=run_id,
            dataset=self.dataset,
            model=self.model,
            parties=self.parties,
            colluders=self.colluders,
            sample_rate=self.sample_rate,
            steps=steps,
            start_step=start_step,
            steps_per_charge=self.steps_per_epoch,
            max_grad_norm=self.max_grad_norm,
            clipping=self.clipping,
            bias_only=self.bias_only,
            scale_bits=self.scale_bits,
            mu=self.mu,
            num_params=self.num_params,
            ring_bits=self.ring_bits,
            audit_canaries=self.audit_canaries,
            audit_kind=self.audit_kind,
            eval_every=self.eval_every,
            eval_mu=self.eval_mu,
            eval_loss_bound=self.eval_loss_bound,
        )

    @property
    def evaluations(self) -> int:
        """The evaluations at the sites the run makes (after every eval_every steps and
        after the last)."""
        return eval_count(eval_every=self.eval_every, start_step=0, end_step=self.steps)

    def epsilon_after(
        self, steps: int, *, evaluations: int = 0, delta: float | None = None
    ) -> float:
        """The accountant's epsilon (at ``delta``, default target_delta) after ``steps``
        steps and ``evaluations`` evaluations at the sites."""
        if steps <= 0 and evaluations <= 0:
            return 0.0
        ordinary = TrainingPlan(
            **{**asdict(self), "audit_canaries": 0, "audit_kind": "", "eval_every": 0,
               "eval_mu": 0.0, "eval_loss_bound": 0.0, "eval_words": 0}
        )  # fmt: skip
        event = step_event(ordinary.spec(run_id="plan", start_step=0, steps=1), steps=1)
        total = accountant.rdp_curve(event) * max(steps, 0)
        if evaluations > 0:
            total = total + accountant.rdp_curve(
                eval_event(self.eval_mu, words=self.eval_words, count=evaluations)
            )
        at = self.target_delta if delta is None else delta
        eps, _ = rdp.to_epsilon(orders=rdp.DEFAULT_ORDERS, rdp=total, delta=at)
        return eps


def plan_training(
    *,
    dataset: str,
    model: str,
    parties: Sequence[str],
    examples: Sequence[int],
    num_params: int,
    target_epsilon: float,
    target_delta: float,
    epochs: float,
    batch_size: int,
    max_grad_norm: float,
    colluders: int = 1,
    clipping: str = "flat",
    bias_only: bool = False,
    ring_bits: int = 32,
    audit_canaries: int = 0,
    audit_kind: str = "",
    site_eval_every: int = 0,
    site_eval_epsilon: float | None = None,
    site_eval_loss_bound: float = 4.0,
    loss: str = "cross_entropy",
) -> TrainingPlan:
    """Sampling rate, steps, gradient scale and Skellam mu for a target (eps, delta).

    q = batch_size / N (N = all sites' examples), an epoch is round(1 / q) steps and
    T = round(epochs * round(1 / q)), so the run ends on the epoch asked. The noise multiplier
    z is the smallest with eps(Skellam((z Delta_2)^2), q, T) <= target; Delta_2 depends on
    the scale 2^k, which the ring's headroom bounds given z, so the two are solved together.
    With ``audit_canaries`` per site, every site's batch bound counts them as examples.

    With ``site_eval_every`` epochs (0: none), the sites evaluate the model on their
    held-out splits after every that many epochs and after the last: the evaluations' noise
    is the smallest whose epsilon alone is at most ``site_eval_epsilon`` (default a tenth
    of the target), and the steps' noise is then calibrated so that steps and evaluations
    together meet the target (RDP composition: the two parts add up to a little more than
    the target, never less).
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ParameterError("target_epsilon", target_epsilon, "must be finite and > 0")
    if not 0 < target_delta < 1:
        raise ParameterError("target_delta", target_delta, "must be in (0, 1)")
    if not epochs > 0 or not math.isfinite(epochs):
        raise ParameterError("epochs", epochs, "must be finite and > 0")
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        raise ParameterError("max_grad_norm", max_grad_norm, "must be finite and > 0")
    if len(examples) != len(parties) or any(e < 1 for e in examples):
        raise ParameterError("examples", list(examples), "need >= 1 example at every site")
    total = sum(examples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size:
        raise ParameterError("batch_size", batch_size, "must be an int >= 1")
    if batch_size > total:
        raise ParameterError("batch_size", batch_size, f"exceeds the {total} examples")
    q = batch_size / total
    # an epoch is round(1/q) steps, and the run is exactly the epochs asked: 20 epochs end at
    # epoch 20 (ceil(epochs / q) made a 21st epoch of a step or two)
    steps_per_epoch = max(1, round(1 / q))
    steps = max(1, round(epochs * steps_per_epoch))
    n, h = len(parties), len(parties) - colluders
    max_total = sum(max_batch_size(examples=e + audit_canaries, sample_rate=q) for e in examples)
    evaluation = _evaluation(
        every=site_eval_every,
        epsilon=site_eval_epsilon,
        loss_bound=site_eval_loss_bound,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        words=eval_words(loss),
    )
    alongside = []
    if evaluation.count:
        try:  # the sites' samplers draw the shares exactly only within their range
            eval_mechanism(evaluation.mu, words=evaluation.words).check_range(honest=h)
        except ParameterError as exc:
            raise ParameterError(
                "site_eval_epsilon", site_eval_epsilon, f"needs too much noise: {exc}"
            ) from None
        alongside.append(eval_event(evaluation.mu, words=evaluation.words, count=evaluation.count))

    def z_for(k: int) -> float:
        l2, l1 = sensitivities(max_grad_norm=max_grad_norm, scale_bits=k, num_params=num_params)
        return accountant.get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=q,
            steps=steps,
            mechanism="skellam",
            l2_sensitivity=l2,
            l1_sensitivity=l1,
            alongside=alongside,
        )

    z = accountant.get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=q,
        steps=steps,
        alongside=alongside,
    )
    k = choose_scale_bits(
        max_grad_norm=max_grad_norm,
        num_params=num_params,
        max_total_batch=max_total,
        n_parties=n,
        honest=h,
        noise_multiplier=1.25 * z,
        ring_bits=ring_bits,
    )
    z = z_for(k)
    while k > 0:  # the Skellam z is a little above the Gaussian one: recheck the headroom
        fits = choose_scale_bits(
            max_grad_norm=max_grad_norm,
            num_params=num_params,
            max_total_batch=max_total,
            n_parties=n,
            honest=h,
            noise_multiplier=z,
            ring_bits=ring_bits,
        )
        if fits >= k:
            break
        k = fits
        z = z_for(k)
    l2, _ = sensitivities(max_grad_norm=max_grad_norm, scale_bits=k, num_params=num_params)
    return TrainingPlan(
        dataset=dataset,
        model=model,
        parties=tuple(parties),
        examples=tuple(int(e) for e in examples),
        colluders=colluders,
        sample_rate=q,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        max_grad_norm=float(max_grad_norm),
        clipping=clipping,
        bias_only=bias_only,
        noise_multiplier=z,
        scale_bits=k,
        mu=(z * l2) ** 2,
        num_params=num_params,
        target_epsilon=float(target_epsilon),
        target_delta=float(target_delta),
        ring_bits=ring_bits,
        audit_canaries=audit_canaries,
        audit_kind=audit_kind,
        eval_every=evaluation.every,
        eval_mu=evaluation.mu,
        eval_noise_multiplier=evaluation.noise_multiplier,
        eval_loss_bound=evaluation.loss_bound,
        eval_words=evaluation.words,
    )


@dataclass(frozen=True)
class _Evaluation:
    every: int = 0  # steps
    count: int = 0
    mu: float = 0.0
    noise_multiplier: float = 0.0
    loss_bound: float = 0.0
    words: int = 0


def _evaluation(
    *,
    every: int,
    epsilon: float | None,
    loss_bound: float,
    steps: int,
    steps_per_epoch: int,
    target_epsilon: float,
    target_delta: float,
    words: int,
) -> _Evaluation:
    """The evaluations at the sites of a plan: their interval in steps, how many, and their
    noise (the smallest whose epsilon alone is at most ``epsilon``)."""
    if isinstance(every, bool) or not isinstance(every, int) or not 0 <= every <= 2**20:
        raise ParameterError("site_eval_every", every, "must be a whole number of epochs >= 0")
    if every == 0:
        if epsilon is not None:
            raise ParameterError("site_eval_epsilon", epsilon, "needs site_eval_every >= 1")
        return _Evaluation()
    if isinstance(loss_bound, bool) or not isinstance(loss_bound, int | float):
        raise ParameterError("site_eval_loss_bound", loss_bound, "must be a number")
    if not (math.isfinite(loss_bound) and 0 < loss_bound <= 1e12):
        raise ParameterError("site_eval_loss_bound", loss_bound, "must be in (0, 1e12]")
    share = 0.1 * target_epsilon if epsilon is None else epsilon
    if isinstance(share, bool) or not isinstance(share, int | float):
        raise ParameterError("site_eval_epsilon", share, "must be a number")
    if not (math.isfinite(share) and 0 < share < target_epsilon):
        raise ParameterError(
            "site_eval_epsilon", share, f"must be in (0, target_epsilon={target_epsilon:g})"
        )
    interval = every * steps_per_epoch
    count = eval_count(eval_every=interval, start_step=0, end_step=steps)

    def eps(z: float) -> float:
        event = eval_event(eval_mu_for(z, words=words), words=words, count=count)
        return accountant.compose([event], delta=target_delta).epsilon

    z = accountant.calibrate(eps, target_epsilon=float(share))
    return _Evaluation(
        every=interval,
        count=count,
        mu=eval_mu_for(z, words=words),
        noise_multiplier=z,
        loss_bound=float(loss_bound),
        words=words,
    )
