"""A site's training task as its party.toml declares it: the model factory, the Dataset, the
per-example loss and the collate function, imported by ``package.module:attribute`` paths
(mpcdp.config.training_config reads them; this module imports and checks them, at node start).

- ``model`` (or ``models``, several): ``factory(name, **model_options, **chosen)`` returns
  the ``nn.Module`` for the run's model name, with the options the run's coordinator chose
  within the site's ``model_choices``; the run's name is the import path itself. The
  coordinator imports the same path (``mpcdp train --model pkg.mod:factory``); no code
  crosses the wire, and every site checks the architecture's fingerprint at TrainOpen.
- ``data``: ``make(**data_options, **data_paths)`` (``data_paths`` resolved against
  party.toml's folder) returns a map-style ``torch.utils.data.Dataset`` whose
  items are ``(features, target)``: features tensor-like of one shape, finite; targets an
  integer class (``cross_entropy``; in ``[0, num_classes)`` when declared) or floats of one
  shape (``mse``).
- ``loss``: ``"cross_entropy"``, ``"mse"`` (per example: the mean over a target's elements)
  or ``fn(output, target) -> tensor of shape (B,)``.

Every error names the site, the key and the value. At start a node reads a few items spread
over the Dataset (:data:`PROBE_ITEMS`); ``mpcdp party check`` reads all of them. Nothing
happens at import time.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mpcdp.config.training_config import TrainingDeclaration, is_import_path
from mpcdp.errors import ConfigError, DataError, UserImportError

__all__ = [
    "PROBE_ITEMS",
    "DeclaredData",
    "LossFn",
    "import_object",
    "load_data",
    "model_factory",
    "resolve_loss",
]

log = logging.getLogger(__name__)

#: items of a declared Dataset read and checked when a node starts
PROBE_ITEMS = 16

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_PATH_LOCK = threading.Lock()


def _add_python_path(folders: Sequence[Path]) -> None:
    with _PATH_LOCK:
        for folder in reversed(folders):
            text = str(folder)
            if text not in sys.path:
                sys.path.insert(0, text)


def import_object(path: str, *, python_path: Sequence[Path] = (), where: str) -> Any:
    """The object at ``package.module:attribute`` (after prepending ``python_path`` to
    sys.path). ``where`` starts every error ("site 'alice': datasets.scans.model").

    The one importer of user code: a site's declarations, the coordinator's ``--model``,
    ``--loss`` and ``--metric`` and ``mpcdp check-model`` all import through it. A path
    that is not an import path is a ConfigError; a module that cannot be imported or has
    no such attribute a :class:`~mpcdp.errors.UserImportError` (a ConfigError) that keeps
    the cause."""
    if not is_import_path(path):
        raise ConfigError(f"{where} = {path!r}: not an import path 'package.module:attribute'")
    _add_python_path(python_path)
    module_name, _, attr = path.partition(":")
    try:
        module: Any = importlib.import_module(module_name)
    except Exception as exc:  # the site's own code: any failure is a declaration error
        hint = f" (python_path: {[str(p) for p in python_path]})" if python_path else ""
        raise UserImportError(
            f"{where} = {path!r}: cannot import module {module_name!r}: "
            f"{type(exc).__name__}: {exc}{hint}",
            path=path,
            where=where,
            module_name=module_name,
            attr=attr,
            cause=exc,
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserImportError(
                f"{where} = {path!r}: module {module_name!r} has no {attr!r}",
                path=path,
                where=where,
                module_name=module_name,
                attr=attr,
                cause=None,
                origin=getattr(module, "__file__", None),
            )
        obj = getattr(obj, part)
    return obj


def model_factory(
    path: str,
    *,
    options: Sequence[tuple[str, Any]] = (),
    python_path: Sequence[Path] = (),
    where: str,
) -> Callable[[str], nn.Module]:
    """The factory at ``path`` as ``name, **chosen -> nn.Module`` (called with ``options``
    and the options a coordinator ``chosen`` as keyword arguments when there are any); a
    result that is not a Module, or a factory that raises, is a ConfigError naming
    ``where`` and ``path``."""
    factory = import_object(path, python_path=python_path, where=where)
    if not callable(factory):
        raise ConfigError(f"{where} = {path!r}: {type(factory).__name__} is not callable")
    kwargs = dict(options)

    def build(name: str, **chosen: Any) -> nn.Module:
        try:
            model = factory(name, **kwargs, **chosen)
        except Exception as exc:
            raise ConfigError(
                f"{where} = {path!r}: the factory raised {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{where} = {path!r}: the factory returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        return model

    return build


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error (mean over each example's elements)."""
    target = target.to(output.dtype).reshape(output.shape)
    return F.mse_loss(output, target, reduction="none").reshape(output.shape[0], -1).mean(dim=1)


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, reduction="none")


def resolve_loss(loss: str, *, python_path: Sequence[Path] = (), where: str) -> LossFn:
    """``cross_entropy``, ``mse`` or the per-example loss function at an import path."""
    if loss == "cross_entropy":
        return _cross_entropy
    if loss == "mse":
        return _mse
    fn = import_object(loss, python_path=python_path, where=where)
    if not callable(fn):
        raise ConfigError(f"{where} = {loss!r}: {type(fn).__name__} is not callable")
    return fn  # type: ignore[no-any-return]


@dataclass(frozen=True)
class DeclaredData:
    """A declared Dataset and what its probed items show (public: a shape and a kind)."""

    dataset: Dataset[Any]
    count: int
    feature_shape: tuple[int, ...]
    integer_features: bool
    target_shape: tuple[int, ...]
    integer_targets: bool
    collate: Callable[[list[Any]], Any] | None
    num_classes: int = 0


def _call_factory(make: Any, options: dict[str, Any], where: str, path: str) -> Any:
    try:
        return make(**options)
    except Exception as exc:
        raise ConfigError(
            f"{where} = {path!r}: the factory raised {type(exc).__name__}: {exc}"
        ) from None


def load_data(
    decl: TrainingDeclaration,
    *,
    where: str,
    num_classes: int,
    probe: int | None = PROBE_ITEMS,
) -> DeclaredData:
    """Import and call ``decl.data``, then read ``probe`` items spread over the Dataset
    (None: all) and check them. ConfigError for the declaration, DataError for the items
    (both name ``where``, the key and the value; never sent to a coordinator)."""
    key = f"{where}.data"
    make = import_object(decl.data, python_path=decl.python_path, where=key)
    dataset = _call_factory(make, decl.data_arguments(), key, decl.data)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigError(
            f"{key} = {decl.data!r}: returned {type(dataset).__name__}, not a map-style "
            "Dataset (__getitem__ and __len__)"
        )
    try:
        count = len(dataset)
    except Exception as exc:
        raise DataError(f"{key} = {decl.data!r}: len() raised {type(exc).__name__}") from None
    if count < 1:
        raise DataError(f"{key} = {decl.data!r}: the Dataset is empty")
    collate = None
    if decl.collate:
        collate = import_object(
            decl.collate, python_path=decl.python_path, where=f"{where}.collate"
        )
    n = count if probe is None else min(count, probe)
    picks = sorted({int(i) for i in np.linspace(0, count - 1, n).round()})
    items = [_item(dataset, i, key, decl.data) for i in picks]
    checked = [
        _check_item(x, y, i, key=key, path=decl.data, loss=decl.loss, num_classes=num_classes)
        for i, (x, y) in zip(picks, items, strict=True)
    ]
    x0, y0 = checked[0]
    for i, (x, y) in zip(picks, checked, strict=True):
        if collate is None and (x.shape != x0.shape or y.shape != y0.shape):
            raise DataError(
                f"{key} = {decl.data!r}: item {i} has features {tuple(x.shape)} and target "
                f"{tuple(y.shape)}; item {picks[0]} has {tuple(x0.shape)} and {tuple(y0.shape)}"
            )
    if collate is not None:
        try:
            batch = collate(items[:2])
            bx, by = batch
            if not isinstance(bx, torch.Tensor) or not isinstance(by, torch.Tensor):
                raise TypeError("collate must return (inputs tensor, targets tensor)")
        except Exception as exc:
            raise DataError(
                f"{where}.collate = {decl.collate!r}: on items {picks[:2]}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    return DeclaredData(
        dataset=dataset,
        count=count,
        feature_shape=tuple(x0.shape),
        integer_features=not x0.is_floating_point(),
        target_shape=tuple(y0.shape),
        integer_targets=not y0.is_floating_point(),
        collate=collate,
        num_classes=num_classes,
    )


def _item(dataset: Any, i: int, key: str, path: str) -> tuple[Any, Any]:
    try:
        item = dataset[i]
    except Exception as exc:
        raise DataError(
            f"{key} = {path!r}: reading item {i} raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DataError(
            f"{key} = {path!r}: item {i} is {type(item).__name__}"
            f"{f' of length {len(item)}' if isinstance(item, tuple | list) else ''}, "
            "not a (features, target) pair"
        )
    return item[0], item[1]


def _tensor(value: Any) -> torch.Tensor | None:
    try:
        return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    except Exception:
        return None


def _check_item(
    x: Any, y: Any, i: int, *, key: str, path: str, loss: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    xt, yt = _tensor(x), _tensor(y)
    if xt is None or xt.dtype == torch.bool or xt.is_complex():
        raise DataError(
            f"{key} = {path!r}: item {i}'s features are {type(x).__name__}, not tensor-like numbers"
        )
    if xt.is_floating_point() and not bool(torch.isfinite(xt).all()):
        raise DataError(f"{key} = {path!r}: item {i} has a non-finite feature (NaN or inf)")
    if yt is None or yt.dtype == torch.bool or yt.is_complex():
        raise DataError(f"{key} = {path!r}: item {i}'s target is {type(y).__name__}, not a number")
    if loss == "cross_entropy":
        if yt.is_floating_point() or yt.dim() != 0:
            raise DataError(
                f"{key} = {path!r}: item {i}'s target is {yt.dtype} of shape "
                f"{tuple(yt.shape)}; loss 'cross_entropy' needs one integer class"
            )
        if num_classes and not 0 <= int(yt) < num_classes:
            raise DataError(
                f"{key} = {path!r}: item {i} has label {int(yt)}, outside [0, num_classes="
                f"{num_classes})"
            )
    elif loss == "mse" and not yt.is_floating_point():
        raise DataError(
            f"{key} = {path!r}: item {i}'s target is {yt.dtype}; loss 'mse' needs float targets"
        )
    if yt.is_floating_point() and not bool(torch.isfinite(yt).all()):
        raise DataError(f"{key} = {path!r}: item {i} has a non-finite target")
    return xt, yt
