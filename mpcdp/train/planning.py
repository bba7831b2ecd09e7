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
        )

    def epsilon_after(self, steps: int, *, delta: float | None = None) -> float:
        """The accountant's epsilon (at ``delta``, default target_delta) after ``steps``
        steps."""
        if steps <= 0:
            return 0.0
        ordinary = TrainingPlan(**{**asdict(self), "audit_canaries": 0, "audit_kind": ""})
        event = step_event(ordinary.spec(run_id="plan", start_step=0, steps=1), steps=1)
        one = accountant.rdp_curve(event)
        at = self.target_delta if delta is None else delta
        eps, _ = rdp.to_epsilon(orders=rdp.DEFAULT_ORDERS, rdp=one * steps, delta=at)
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
) -> TrainingPlan:
    """Sampling rate, steps, gradient scale and Skellam mu for a target (eps, delta).

    q = batch_size / N (N = all sites' examples), an epoch is round(1 / q) steps and
    T = round(epochs * round(1 / q)), so the run ends on the epoch asked. The noise multiplier
    z is the smallest with eps(Skellam((z Delta_2)^2), q, T) <= target; Delta_2 depends on
    the scale 2^k, which the ring's headroom bounds given z, so the two are solved together.
    With ``audit_canaries`` per site, every site's batch bound counts them as examples.
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
        )

    z = accountant.get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=q, steps=steps
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
    )
