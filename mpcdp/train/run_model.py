"""The coordinator's side of a declared model (mpcdp.train.declared): the factory a run's
``model`` names (``package.module:factory`` is imported, the built-in names stay), the
architecture and loss every site checks at TrainOpen, and the evaluation for any loss
(accuracy for cross-entropy, the mean loss always). Nothing happens at import time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mpcdp.config.training_config import BUILTIN_LOSSES, is_import_path
from mpcdp.errors import ParameterError
from mpcdp.protocol.training import TrainSpec
from mpcdp.protocol.training.fingerprint import fingerprint
from mpcdp.train.architecture import describe_factory
from mpcdp.train.declared import import_object, resolve_loss
from mpcdp.train.declared import model_factory as import_factory

__all__ = ["evaluate_any", "model_factory_for", "python_folders", "with_declared_model"]


def python_folders(python_path: str | Path | Sequence[str | Path]) -> tuple[Path, ...]:
    """``python_path`` (one folder or several) as absolute folders; ParameterError naming
    ``python_path`` for one that is not a folder."""
    items = [python_path] if isinstance(python_path, str | Path) else list(python_path)
    out = []
    for p in items:
        folder = Path(p).resolve()
        if not folder.is_dir():
            raise ParameterError("python_path", str(p), "is not a folder")
        out.append(folder)
    return tuple(out)


def model_factory_for(
    model: str,
    *,
    default: Callable[[str], nn.Module],
    python_path: str | Path | Sequence[str | Path] = (),
    model_options: Mapping[str, Any] | None = None,
) -> Callable[[str], nn.Module]:
    """``default`` for a built-in name, else the factory imported from ``model`` (an import
    path; ``python_path`` folders are searched first), called with ``model_options``."""
    if not is_import_path(model):
        if model_options:
            raise ParameterError("model_options", dict(model_options), "need an import-path model")
        return default
    return import_factory(
        model,
        options=tuple(sorted((model_options or {}).items())),
        python_path=python_folders(python_path),
        where="model",
    )


def with_declared_model(
    spec: TrainSpec, *, factory: Callable[[str], nn.Module], loss: str
) -> TrainSpec:
    """``spec`` with the architecture entries of ``factory(spec.model)`` (built afresh on
    torch's meta device, as every site builds it: before a clipper freezes anything), their
    fingerprint and the loss; every site compares them with what it declared and builds."""
    if loss not in BUILTIN_LOSSES and not is_import_path(loss):
        raise ParameterError("loss", loss, "must be 'cross_entropy', 'mse' or an import path")
    entries = describe_factory(factory, spec.model)
    return dataclasses.replace(
        spec, architecture=entries, fingerprint=fingerprint(entries), loss=loss
    )


def evaluate_any(
    model: nn.Module,
    data: tuple[Any, Any] | Dataset[Any],
    *,
    loss: str,
    python_path: str | Path | Sequence[str | Path] = (),
    batch_size: int = 1024,
) -> tuple[float | None, float]:
    """(accuracy or None, mean per-example loss) of ``model`` on ``data``: arrays (x, y) or
    a map-style Dataset of (x, y) items. Accuracy is argmax accuracy, for cross-entropy
    only."""
    loss_fn = resolve_loss(loss, python_path=python_folders(python_path), where="loss")
    device = next(model.parameters()).device
    if isinstance(data, tuple):
        x, y = np.asarray(data[0]), np.asarray(data[1])
        floats = y.dtype.kind == "f"
        xt = torch.as_tensor(x, dtype=torch.float32 if x.dtype.kind == "f" else None)
        yt = torch.as_tensor(y, dtype=torch.float32 if floats else torch.int64)
        batches: Any = (
            (xt[s : s + batch_size], yt[s : s + batch_size]) for s in range(0, len(yt), batch_size)
        )
    else:
        batches = DataLoader(data, batch_size=batch_size)
    was = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for bx, by in batches:
                if bx.is_floating_point():
                    bx = bx.float()
                by = by.float() if by.is_floating_point() else by.long()
                out = model(bx.to(device))
                by = by.to(device)
                total += float(loss_fn(out, by).sum())
                if loss == "cross_entropy":
                    correct += int((out.argmax(dim=1) == by).sum())
                count += int(by.shape[0])
    finally:
        model.train(was)
    n = max(count, 1)
    return (correct / n if loss == "cross_entropy" else None), total / n


def evaluate_metric(
    model: nn.Module,
    data: tuple[Any, Any] | Dataset[Any],
    *,
    metric: str,
    python_path: str | Path | Sequence[str | Path] = (),
    batch_size: int = 1024,
) -> float:
    """The user's metric (``pkg.module:fn``, called once as ``fn(outputs, targets)`` on the
    whole evaluation set, returning a number) of ``model`` on ``data``."""
    fn = import_object(metric, python_path=python_folders(python_path), where="metric")
    if not callable(fn):
        raise ParameterError("metric", metric, f"{type(fn).__name__} is not callable")
    device = next(model.parameters()).device
    if isinstance(data, tuple):
        x, y = np.asarray(data[0]), np.asarray(data[1])
        xt = torch.as_tensor(x, dtype=torch.float32 if x.dtype.kind == "f" else None)
        yt = torch.as_tensor(y, dtype=torch.float32 if y.dtype.kind == "f" else torch.int64)
        batches: Any = (
            (xt[s : s + batch_size], yt[s : s + batch_size]) for s in range(0, len(yt), batch_size)
        )
    else:
        batches = DataLoader(data, batch_size=batch_size)
    outputs, targets = [], []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for bx, by in batches:
                if bx.is_floating_point():
                    bx = bx.float()
                outputs.append(model(bx.to(device)).cpu())
                targets.append(by)
    finally:
        model.train(was)
    value = fn(torch.cat(outputs), torch.cat(targets))
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParameterError(
            "metric", metric, f"returned {type(value).__name__}, not a number"
        ) from None
    if not math.isfinite(number):
        raise ParameterError("metric", metric, f"returned {number}, not a finite number")
    return number
