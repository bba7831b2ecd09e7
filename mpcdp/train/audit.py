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

import numpy as np
import torch
from numpy.typing import NDArray

from mpcdp.audit import bound
from mpcdp.audit.canaries import WhiteBoxScorer, gradient_coordinates, input_canaries
from mpcdp.errors import ParameterError
from mpcdp.protocol.training import TrainSpec

__all__ = [
    "black_box_scores",
    "example_losses",
    "finish",
    "white_box_scorer",
]

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]


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
