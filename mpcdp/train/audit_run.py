"""The one-run privacy audit of a federated DP-SGD run (Steinke, Nasr, Jagielski 2023,
"Privacy auditing with one (1) training run", NeurIPS; Section 6, white-box and black-box
auditing of DP-SGD), the coordinator's side: score the run's canaries and bound epsilon.

An audit run is a training run of its own (``mpcdp train --audit-canaries N`` or
``mpcdp audit``, ``fed.train(..., audit_canaries=N)``): its TrainSpec declares N canaries per
site and their kind, every site checks and charges it like any other run, includes each of
its canaries with probability 1/2 from its CSPRNG, and reveals the inclusion bits with the
run's last step (mpcdp.audit.canaries, mpcdp.protocol.training). The coordinator scores each
canary from what it legitimately sees, the released noisy step sums (white-box,
:func:`white_box_scorer`) or the final model (black-box, :func:`black_box_scores`: minus the
loss), and :func:`finish` turns scores and bits into the paper's bound (mpcdp.audit.bound).

Before the run, :func:`preflight` computes the audit's ceiling (mpcdp.audit.bound.ceiling: the
bound if every guess were right, the most any outcome can show) and compares it with the
accountant's epsilon at the audited delta: a claim at or above the ceiling cannot be refuted
however broken the run is, and the advice says how many canaries, or which audited delta,
would make it testable (``mpcdp audit`` refuses such a run unless told to go on).

What it proves: with probability at least ``confidence``, the run is not (eps, delta)-DP for
any eps below the reported bound. So a bound above the accountant's epsilon means the
implementation (clipping, sampling, noise, accounting) releases more than it claims; a bound
below it proves nothing about the real data, only that this audit found no violation. It
never needs the sites' data.

The old loss-threshold membership test (train vs test examples) is gone: it could not detect
even a complete loss of privacy, its confidence treated the examples of one fixed run as
independent trials, and it needed the sites' training data.

Importing this module imports torch; nothing runs at import time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from mpcdp.audit import bound
from mpcdp.audit.canaries import (
    AUDIT_KINDS,
    MAX_CANARIES,
    SCORE_SETS,
    WhiteBoxScorer,
    gradient_coordinates,
    input_canaries,
)
from mpcdp.errors import ParameterError
from mpcdp.protocol.training import TrainSpec
from mpcdp.train.clipping import ClippingMode
from mpcdp.train.planning import TrainingPlan

__all__ = [
    "AuditPreflight",
    "UntestableAuditError",
    "audit_plan",
    "black_box_scores",
    "check_audit_options",
    "example_losses",
    "finish",
    "preflight",
    "white_box_scorer",
]

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class AuditPreflight:
    """An audit run's testability, known before its first step (:func:`preflight`).

    Attributes:
        m: canaries in all (sites x per site).
        claimed_epsilon: the accountant's epsilon at ``delta`` after the whole run.
        ceiling: the largest bound any outcome of the audit can give.
        delta, confidence: the audited delta and the bound's confidence.
        advice: what would make the claim testable (mpcdp.audit.bound.Advice).
        sites: sites taking canaries.
        coordinates: a white-box audit's trainable parameters (one per canary; 0 for
            black-box).
    """

    m: int
    claimed_epsilon: float
    ceiling: float
    delta: float
    confidence: float
    advice: bound.Advice
    sites: int
    coordinates: int = 0

    @property
    def testable(self) -> bool:
        return self.claimed_epsilon < self.ceiling

    def text(self) -> str:
        """The lines ``mpcdp audit`` prints before the run."""
        line = (
            f"audit ceiling {self.ceiling:.4f} (the bound if every guess were right: "
            f"{self.m} canaries, delta {self.delta:g}, confidence {self.confidence:g}); "
            f"claimed epsilon {self.claimed_epsilon:.4f} at that delta"
        )
        if self.testable:
            return line
        advice = self.advice.text(sites=self.sites)
        wanted = max(self.advice.canaries or 0, self.advice.delta_canaries or 0)
        if self.coordinates and wanted > self.coordinates:
            advice += (
                f" (white-box canaries need a coordinate each: the model has "
                f"{self.coordinates} trainable parameters)"
            )
        return f"{line}\nUNTESTABLE: {advice}"


def preflight(*, plan: TrainingPlan, delta: float | None, confidence: float) -> AuditPreflight:
    """The ceiling of ``plan``'s audit and the claim it would test, before any site is asked.

    Args:
        plan: an audit run's plan (``audit_canaries`` > 0).
        delta: the audited delta (None: the plan's target delta).
        confidence: the bound's confidence, in (0, 1).

    Raises:
        ParameterError: a plan without canaries, or a bad delta or confidence.
    """
    if plan.audit_canaries < 1 or plan.audit_kind not in SCORE_SETS:
        raise ParameterError("plan", plan.audit_kind or "no canaries", "is not an audit run")
    at = plan.target_delta if delta is None else delta
    if not isinstance(at, float | int) or not 0 < at < 1:
        raise ParameterError("delta", delta, "must be in (0, 1)")
    if not isinstance(confidence, float | int) or not 0 < confidence < 1:
        raise ParameterError("confidence", confidence, "must be in (0, 1)")
    sites = len(plan.parties)
    m = sites * plan.audit_canaries
    most = min(sites * MAX_CANARIES, 1 << 17)
    advice = bound.advise(
        claimed_epsilon=lambda d: plan.epsilon_after(plan.steps, delta=d),
        m=m,
        delta=float(at),
        confidence=float(confidence),
        score_sets=SCORE_SETS[plan.audit_kind],
        sites=sites,
        max_canaries=max(sites, most),
    )
    out = AuditPreflight(
        coordinates=plan.num_params if plan.audit_kind == "white-box" else 0,
        m=m,
        claimed_epsilon=advice.claimed_epsilon,
        ceiling=advice.ceiling,
        delta=float(at),
        confidence=float(confidence),
        advice=advice,
        sites=sites,
    )
    if not out.testable:
        logger.warning("one-run audit: %s", advice.text(sites=sites))
    return out


class UntestableAuditError(ParameterError):
    """An audit run whose claim no outcome could refute (the claimed epsilon at or above the
    audit's ceiling, :func:`preflight`), refused before any site is asked:
    nothing is charged. ``check`` holds the ceiling, the claim and the advice (how many
    canaries, or which audited delta, would make the claim testable)."""

    def __init__(self, check: AuditPreflight) -> None:
        self.check = check
        super().__init__(
            "audit_canaries",
            check.m // max(check.sites, 1),
            f"the claim cannot be tested: {check.text()}; refused before the run (nothing "
            "was charged); allow_untestable=True runs it anyway",
        )


def check_audit_options(
    *,
    audit_canaries: int,
    audit_kind: str,
    audit_confidence: float,
    audit_delta: float | None,
    feature_shape: tuple[int, ...],
    num_classes: int,
    stop_after: int | None,
    checkpoint: Path | None,
) -> None:
    """A run's audit options, checked before anything else (ParameterError naming the
    option): an audit run is one session, never stopped early nor resumed, and black-box
    canaries need the sites' declared shape and classes."""
    if (
        isinstance(audit_canaries, bool)
        or not isinstance(audit_canaries, int)
        or not 0 <= audit_canaries <= MAX_CANARIES
    ):
        raise ParameterError(
            "audit_canaries", audit_canaries, f"must be an int in [0, {MAX_CANARIES}]"
        )
    if audit_kind not in AUDIT_KINDS:
        raise ParameterError("audit_kind", audit_kind, f"must be one of {AUDIT_KINDS}")
    if not isinstance(audit_confidence, float | int) or not 0 < audit_confidence < 1:
        raise ParameterError("audit_confidence", audit_confidence, "must be in (0, 1)")
    if audit_delta is not None and (
        not isinstance(audit_delta, float | int) or not 0 < audit_delta < 1
    ):
        raise ParameterError("audit_delta", audit_delta, "must be in (0, 1)")
    if audit_canaries == 0:
        return
    if stop_after is not None:
        raise ParameterError("stop_after", stop_after, "an audit run is never stopped early")
    if checkpoint is not None and checkpoint.exists():
        raise ParameterError("checkpoint", str(checkpoint), "exists: an audit run is never resumed")
    if audit_kind == "black-box" and (not feature_shape or num_classes < 2):
        raise ParameterError(
            "feature_shape", feature_shape, "and num_classes >= 2 are needed for input canaries"
        )


def audit_plan(
    *,
    examples: Mapping[str, int],
    dataset: str,
    model: str,
    target_epsilon: float,
    target_delta: float,
    epochs: float,
    batch_size: int,
    max_grad_norm: float,
    audit_canaries: int,
    audit_kind: str,
    colluders: int = 1,
    clipping: ClippingMode = "flat",
    bias_only: bool = False,
    python_path: str | Path | Sequence[str | Path] = (),
    model_options: Mapping[str, Any] | None = None,
) -> TrainingPlan:
    """The plan mpcdp.train.federated.train will make for this audit run (the model is built
    on the CPU to count its trainable parameters), for :func:`preflight`. ``examples``: each
    site's example count, in federation order (Describe)."""
    from mpcdp.train.clipping import PerSampleClipper
    from mpcdp.train.models import build_model
    from mpcdp.train.planning import plan_training
    from mpcdp.train.run_model import model_factory_for

    factory = model_factory_for(
        model, default=build_model, python_path=python_path, model_options=model_options
    )
    with torch.random.fork_rng(devices=[]):
        net = factory(model).cpu()
    clipper = PerSampleClipper(
        net, max_grad_norm=max_grad_norm, clipping=clipping, bias_only=bias_only
    )
    return plan_training(
        dataset=dataset,
        model=model,
        parties=tuple(examples),
        examples=list(examples.values()),
        num_params=clipper.num_params,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        epochs=epochs,
        batch_size=batch_size,
        max_grad_norm=max_grad_norm,
        colluders=colluders,
        clipping=clipping,
        bias_only=bias_only,
        audit_canaries=audit_canaries,
        audit_kind=audit_kind,
    )


def white_box_scorer(*, spec: TrainSpec) -> WhiteBoxScorer:
    """The scorer of a white-box audit run's gradient canaries, every site's in party order.

    The noise std it assumes is the public one of the spec: Skellam(mu) shares sized for h
    honest sites, added by all n (variance mu n / h), plus at most 1/4 per site of rounding.
    """
    if spec.audit_kind != "white-box" or spec.audit_canaries < 1:
        raise ParameterError("spec", spec.audit_kind or "no canaries", "is not a white-box audit")
    n = len(spec.parties)
    coords = gradient_coordinates(
        run_id=spec.run_id, num_params=spec.num_params, sites=n, per_site=spec.audit_canaries
    )
    return WhiteBoxScorer(
        coordinates=coords.reshape(-1),
        canary_units=spec.max_grad_norm * 2.0**spec.scale_bits,
        noise_std=math.sqrt(spec.mu * n / spec.honest + n / 4),
        sample_rate=spec.sample_rate,
    )


def black_box_scores(
    *,
    model: torch.nn.Module,
    spec: TrainSpec,
    feature_shape: tuple[int, ...],
    num_classes: int,
) -> FloatArray:
    """Minus the final model's cross-entropy on every site's input canaries (party order)."""
    if spec.audit_kind != "black-box" or spec.audit_canaries < 1:
        raise ParameterError("spec", spec.audit_kind or "no canaries", "is not a black-box audit")
    parts = []
    for i in range(len(spec.parties)):
        x, y = input_canaries(
            run_id=spec.run_id,
            site_index=i,
            count=spec.audit_canaries,
            feature_shape=feature_shape,
            num_classes=num_classes,
        )
        parts.append(
            -example_losses(model=model, inputs=torch.from_numpy(x), targets=torch.from_numpy(y))
        )
    return np.concatenate(parts)


def finish(
    *,
    scores: FloatArray,
    included: dict[str, NDArray[np.bool_]],
    spec: TrainSpec,
    delta: float,
    confidence: float,
    claimed_epsilon: float,
) -> bound.OneRunAudit:
    """The bound from the canaries' scores (1-D, or one row per score set) and the sites'
    revealed bits (score set and guess counts chosen over mpcdp.audit.bound's grid,
    Bonferroni-corrected)."""
    bits = np.concatenate([included[p] for p in spec.parties])
    if bits.shape != scores.shape[-1:]:
        raise ParameterError(
            "scores", f"{scores.size} scores", f"need one per canary ({bits.size})"
        )
    return bound.audit(
        scores=scores,
        included=bits,
        delta=delta,
        confidence=confidence,
        claimed_epsilon=claimed_epsilon,
    )


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
