"""What a federated DP-SGD run leaves a user: progress records (with the sites' noisy
evaluation decoded into them, over the public held-out counts), the result, checkpoints (read
with torch's weights-only loader) and the metrics JSON and plot. Nothing happens at import
time.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpcdp.audit.bound import OneRunAudit
from mpcdp.errors import ParameterError
from mpcdp.protocol.training.evaluation import decode_total
from mpcdp.protocol.training.roster import RosterChange, RosterEvaluation
from mpcdp.train.models import build_model
from mpcdp.train.planning import TrainingPlan
from mpcdp.train.run_model import (
    model_factory_for,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "EpochRecord",
    "StepInfo",
    "TrainingResult",
    "held_out_counts",
    "load_checkpoint",
    "plan_from",
    "read_checkpoint",
    "record_from",
    "save_checkpoint",
    "site_evaluation_fields",
    "write_metrics",
]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class StepInfo:
    """Progress after one step (for progress bars)."""

    step: int
    steps: int
    epsilon: float
    seconds: float


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    step: int
    epsilon: float
    test_accuracy: float | None
    test_loss: float | None
    seconds: float
    test_metric: float | None = None  # the user's metric (train's ``metric``), when given
    #: site -> the steps of this epoch whose sum had its gradient (a site that failed or fell
    #: behind is left out of a step, which is re-run among the others)
    participation: dict[str, int] = field(default_factory=dict)
    #: site -> its epsilon so far (at the plan's delta): the steps it took part in, counted
    #: by its own accountant (a step re-run after a failure counts for every site whose upload
    #: of the failed attempt left it)
    site_epsilon: dict[str, float] = field(default_factory=dict)
    #: evaluation at the sites after this epoch (None: none made): the noisy accuracy (None
    #: unless the loss is cross-entropy) and mean clipped loss over the held-out examples
    #: of every site that took part (``site_eval_parties``; ``site_examples``, their public
    #: count), post-processing of one charged release (mpcdp.protocol.training.evaluation)
    site_accuracy: float | None = None
    site_loss: float | None = None
    site_examples: int | None = None
    site_eval_parties: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingResult:
    plan: TrainingPlan
    run_id: str
    steps_done: int
    epsilon: float
    delta: float
    history: tuple[EpochRecord, ...]
    final_accuracy: float | None
    public_accuracy: float | None  # after the warm start, before DP (None without one)
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    audit: OneRunAudit | None = None  # an audit run's bound (mpcdp.train.audit_run)
    #: site -> steps whose sum had its gradient, over the whole run
    participation: dict[str, int] = field(default_factory=dict)
    #: site -> its epsilon at the plan's delta (``epsilon`` is the largest of them)
    site_epsilon: dict[str, float] = field(default_factory=dict)
    #: site -> the steps whose upload left it, each charged to its ledger (a step re-run
    #: after another site failed counts twice for a site whose upload of the failed attempt
    #: left it); a site's own ledger is the authority (docs/training.md, "When a site fails")
    steps_charged: dict[str, int] = field(default_factory=dict)
    #: the roster's changes: a site left out (with why) or back, at which step
    roster_changes: tuple[RosterChange, ...] = ()
    #: site -> the evaluations at the sites whose upload left it (each charged)
    evaluations_charged: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        audit = None
        if self.audit is not None:
            audit = {
                **asdict(self.audit),
                "kind": self.plan.audit_kind,
                "fraction_reached": self.audit.fraction_reached,
            }
        return {
            "audit": audit,
            "run_id": self.run_id,
            "plan": {**asdict(self.plan), "noise_std": self.plan.noise_std},
            "steps_done": self.steps_done,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "final_accuracy": self.final_accuracy,
            "public_accuracy": self.public_accuracy,
            "history": [asdict(r) for r in self.history],
            "participation": self.participation,
            "site_epsilon": self.site_epsilon,
            "steps_charged": self.steps_charged,
            "evaluations_charged": self.evaluations_charged,
            "roster_changes": [asdict(c) for c in self.roster_changes],
        }


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint


def load_checkpoint(
    path: Path,
    *,
    python_path: str | Path | Sequence[str | Path] = (),
    model_options: Mapping[str, Any] | None = None,
    model_factory: Callable[[str], torch.nn.Module] = build_model,
) -> tuple[torch.nn.Module, TrainingPlan, int]:
    """(model with the checkpoint's parameters, its plan, steps done). A model named by
    import path is rebuilt from that factory (``python_path`` folders searched first), a
    built-in name with ``model_factory``."""
    state = read_checkpoint(path)
    plan = plan_from(state["plan"])
    net = model_factory_for(
        plan.model, default=model_factory, python_path=python_path, model_options=model_options
    )(plan.model)
    net.load_state_dict(state["model"])
    return net, plan, int(state["step"])


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, unpickled with torch's weights-only loader (tensors, numbers,
    strings and containers only: a file from elsewhere cannot run code)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ParameterError(
            "checkpoint",
            str(path),
            "is not a file of tensors and plain values (nothing else is unpickled)",
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ParameterError("checkpoint", str(path), f"cannot be read: {first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ParameterError("checkpoint", str(path), "is not an mpcdp checkpoint")
    return state


def plan_from(obj: dict[str, Any]) -> TrainingPlan:
    return TrainingPlan(
        **{**obj, "parties": tuple(obj["parties"]), "examples": tuple(obj["examples"])}
    )


def record_from(obj: dict[str, Any]) -> EpochRecord:
    """An epoch record as a checkpoint holds it (tuples come back as lists)."""
    return EpochRecord(**{**obj, "site_eval_parties": tuple(obj.get("site_eval_parties", ()))})


def write_metrics(
    result: TrainingResult,
    *,
    json_path: Path | None = None,
    plot_path: Path | None = None,
    metric_name: str = "",
) -> None:
    """The metrics JSON (``json_path``) and/or a PNG (``plot_path``, needs matplotlib;
    drawn by :func:`mpcdp.train.plot.plot_metrics`: test accuracy auto-scaled, the test loss
    and the user's metric, labelled ``metric_name``, when present, epsilon on its own axis
    with the target, whole epochs)."""
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if plot_path is not None:
        from mpcdp.train.plot import plot_metrics

        plot_metrics(result, path=plot_path, metric_name=metric_name)


def held_out_counts(held_out: Mapping[str, int] | None, parties: Sequence[str]) -> dict[str, int]:
    """Every site's held-out count (public), checked: ParameterError naming ``held_out``."""
    if held_out is None or set(held_out) != set(parties):
        raise ParameterError(
            "held_out",
            None if held_out is None else dict(held_out),
            f"evaluation at the sites needs the held-out count of every site {list(parties)} "
            "(Describe; Federation.train fills it in)",
        )
    bad = {p: n for p, n in held_out.items() if isinstance(n, bool) or not isinstance(n, int)
           or n < 1}  # fmt: skip
    if bad:
        raise ParameterError(
            "held_out", bad, "must be >= 1 at every site (a site without a split cannot evaluate)"
        )
    return dict(held_out)


def site_evaluation_fields(
    outcome: RosterEvaluation | None,
    *,
    plan: TrainingPlan,
    loss: str,
    held_out: Mapping[str, int] | None,
) -> dict[str, Any]:
    """An epoch record's fields for the evaluation at the sites (none: no fields)."""
    if outcome is None or held_out is None:
        return {}
    examples = sum(held_out[p] for p in outcome.parties)
    totals = decode_total(
        outcome.total, eval_loss_bound=plan.eval_loss_bound, loss=loss, examples=examples
    )
    return {
        "site_accuracy": totals.accuracy(),
        "site_loss": totals.mean_loss(bound=plan.eval_loss_bound),
        "site_examples": examples,
        "site_eval_parties": outcome.parties,
    }
