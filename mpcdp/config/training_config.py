"""A training dataset's declarations in party.toml (see mpcdp.config.party_config's
docstring): the model, data, loss and collate function as import paths, the folders to
import them from, and the site's resource limits. Only read here: mpcdp.train.declared imports
them when the node starts. Nothing happens at import time.

Several models per data: ``models = ["pkg.mod:small", "pkg.mod:wide"]`` lists the factories
a coordinator may name (``model`` is the one-factory form), and ``[...model_choices]`` the
options a coordinator may set, each within a declared range (``{ min = 16, max = 512 }``,
integers or floats by the bounds' type) or among declared values (``{ choices = [...] }``).
``model_options`` stay fixed. A site checks a run's model and options against these before
anything is reserved, and the architecture fingerprint as before.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpcdp.config.reader import Reader

__all__ = [
    "BUILTIN_LOSSES",
    "TRAINING_KEYS",
    "ModelChoice",
    "TrainingDeclaration",
    "is_import_path",
    "read_training",
]

#: the per-example losses known by name (any other loss is an import path)
BUILTIN_LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class ModelChoice:
    """An option of the model a coordinator may set: a number in [minimum, maximum]
    (``integer``: an int), or one of ``choices``."""

    name: str
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    choices: tuple[str | int | float | bool, ...] = ()

    def refusal(self, value: object) -> str:
        """Why ``value`` is not allowed ("" when it is)."""
        if self.choices:
            ok = any(type(value) is type(c) and value == c for c in self.choices)
            return "" if ok else f"must be one of {list(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if self.integer and not isinstance(value, int):
            return "must be an integer"
        assert self.minimum is not None and self.maximum is not None
        if not self.minimum <= value <= self.maximum:
            return f"must be in [{self.minimum:g}, {self.maximum:g}]"
        return ""


@dataclass(frozen=True)
class TrainingDeclaration:
    """How a site trains on one dataset, as its party.toml declares it (import paths are
    ``package.module:attribute``; nothing is imported when the config is read)."""

    #: the model factory; "" for the built-in names (mlp:..., linear:..., mlpln:...)
    model: str = ""
    #: the model factories a coordinator may name (``model`` alone: that one)
    models: tuple[str, ...] = ()
    #: the options a coordinator may set, within their declared ranges or values
    model_choices: tuple[ModelChoice, ...] = ()
    #: the map-style Dataset factory; "" for the .npz form (path + num_classes)
    data: str = ""
    #: "cross_entropy", "mse" or an import path of a per-example loss
    loss: str = "cross_entropy"
    collate: str = ""
    #: folders prepended to sys.path before importing (absolute)
    python_path: tuple[Path, ...] = ()
    max_physical_batch: int = 1024
    num_workers: int = 0
    #: None: pinned when the party trains on a GPU
    pin_memory: bool | None = None
    model_options: tuple[tuple[str, Any], ...] = ()
    data_options: tuple[tuple[str, Any], ...] = ()
    #: keyword arguments of the Dataset factory that are paths: party.toml's
    #: ``data_paths``, each resolved against the file's folder (absolute, as str)
    data_paths: tuple[tuple[str, str], ...] = ()

    #: the held-out split a run may evaluate on (mpcdp.protocol.training.evaluation): an
    #: .npz like the training one (``eval_path``, absolute), or, for a declared Dataset, the
    #: factory's keyword arguments that differ for the split (``eval_data_options``,
    #: ``eval_data_paths``: over ``data_options`` and ``data_paths``)
    eval_path: str = ""
    eval_data_options: tuple[tuple[str, Any], ...] = ()
    eval_data_paths: tuple[tuple[str, str], ...] = ()

    @property
    def evaluation(self) -> bool:
        """Whether a held-out split is declared."""
        return bool(self.eval_path or self.eval_data_options or self.eval_data_paths)

    def eval_declaration(self) -> TrainingDeclaration:
        """This declaration with the held-out split's Dataset arguments in place of the
        training data's (the same factory, loss and collate function)."""
        options = {**dict(self.data_options), **dict(self.eval_data_options)}
        paths = {**dict(self.data_paths), **dict(self.eval_data_paths)}
        for key in self.eval_data_options:  # an option given for the split replaces a path
            paths.pop(key[0], None)
        for key in self.eval_data_paths:
            options.pop(key[0], None)
        return dataclasses.replace(
            self,
            data_options=tuple(sorted(options.items())),
            data_paths=tuple(sorted(paths.items())),
            eval_path="",
            eval_data_options=(),
            eval_data_paths=(),
        )

    def factories(self) -> tuple[str, ...]:
        """Every model factory a run may name here (empty: the built-in names)."""
        return self.models or ((self.model,) if self.model else ())

    def data_arguments(self) -> dict[str, Any]:
        """The Dataset factory's keyword arguments: ``data_options`` and ``data_paths``."""
        return {**dict(self.data_options), **dict(self.data_paths)}


TRAINING_KEYS = (
    "model",
    "models",
    "model_choices",
    "data",
    "loss",
    "collate",
    "python_path",
    "max_physical_batch",
    "num_workers",
    "pin_memory",
    "model_options",
    "data_options",
    "data_paths",
    "eval_path",
    "eval_data_options",
    "eval_data_paths",
)
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


def is_import_path(value: str) -> bool:
    """``package.module:attribute`` (the attribute may be dotted)."""
    return bool(_IMPORT_PATH.fullmatch(value))


def _import_path(r: Reader, key: str) -> str:
    value = r.get(key, str, "")
    if value and not is_import_path(value):
        raise r.error(key, f"{value!r} is not an import path 'package.module:attribute'")
    return str(value)


def _options(r: Reader, key: str) -> tuple[tuple[str, Any], ...]:
    table = r.get(key, dict, {})
    return tuple(sorted(table.items()))


def _paths(
    r: Reader, options: tuple[tuple[str, Any], ...], *, prefix: str = ""
) -> tuple[tuple[str, str], ...]:
    """``data_paths`` (``eval_data_paths`` with ``prefix`` "eval_"): keyword -> a path,
    relative ones resolved against party.toml's folder; a keyword may not also be in the
    matching ``data_options``."""
    table = r.get(f"{prefix}data_paths", dict, {})
    out = []
    for key, text in sorted(table.items()):
        where = f"{prefix}data_paths.{key}"
        if key in dict(options):
            raise r.error(
                where, f"is also in {prefix}data_options: give each keyword in one of them"
            )
        if not isinstance(text, str) or not text or "\0" in text:
            raise r.error(where, f"must be a path (a non-empty string), got {text!r}")
        path = Path(text)
        out.append((key, str(path if path.is_absolute() else r.path.parent / path)))
    return tuple(out)


def _models(r: Reader) -> tuple[str, ...]:
    if "models" not in r.data:
        return ()
    if "model" in r.data:
        raise r.error("models", "give either model (one factory) or models (a list), not both")
    values = r.get("models", list, [])
    if not values or len(values) > 64:
        raise r.error("models", "must list 1 to 64 model factories")
    for v in values:
        if not isinstance(v, str) or not is_import_path(v):
            raise r.error("models", f"{v!r} is not an import path 'package.module:attribute'")
    if len(set(values)) != len(values):
        raise r.error("models", "lists a factory twice")
    return tuple(values)


_OPTION = re.compile(r"[A-Za-z_]\w{0,63}", re.ASCII)


def _choices(r: Reader, fixed: tuple[tuple[str, Any], ...]) -> tuple[ModelChoice, ...]:
    """``model_choices``: NAME = { min = A, max = B } or { choices = [...] }."""
    table = r.get("model_choices", dict, {})
    out = []
    for name, spec in sorted(table.items()):
        where = f"model_choices.{name}"
        if not _OPTION.fullmatch(name):
            raise r.error(where, "is not a keyword argument name")
        if name in dict(fixed):
            raise r.error(where, "is also in model_options: an option is fixed or chosen")
        if not isinstance(spec, dict) or set(spec) not in ({"min", "max"}, {"choices"}):
            raise r.error(where, "must be { min = A, max = B } or { choices = [...] }")
        if "choices" in spec:
            values = spec["choices"]
            if (
                not isinstance(values, list)
                or not 1 <= len(values) <= 256
                or not all(isinstance(v, str | int | float | bool) for v in values)
            ):
                raise r.error(where, "choices must list 1 to 256 strings, numbers or booleans")
            out.append(ModelChoice(name=name, choices=tuple(values)))
            continue
        low, high = spec["min"], spec["max"]
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in (low, high)
        )
        if not numbers or not low <= high:
            raise r.error(where, f"min {low!r} and max {high!r} must be finite numbers, min <= max")
        integer = isinstance(low, int) and isinstance(high, int)
        out.append(ModelChoice(name=name, minimum=low, maximum=high, integer=integer))
    return tuple(out)


def read_training(r: Reader) -> TrainingDeclaration | None:
    """A dataset's training declarations, or None when it declares none."""
    if not any(k in r.data for k in TRAINING_KEYS):
        return None
    loss = r.get("loss", str, "cross_entropy")
    if loss not in BUILTIN_LOSSES and not is_import_path(loss):
        raise r.error(
            "loss",
            f"must be 'cross_entropy', 'mse' or an import path 'package.module:fn', got {loss!r}",
        )
    paths = r.get("python_path", (str, list), [])
    if isinstance(paths, str):
        paths = [paths]
    folders = []
    for text in paths:
        if not isinstance(text, str) or not text or "\0" in text:
            raise r.error("python_path", f"must be a folder or a list of folders, got {text!r}")
        folder = Path(text) if Path(text).is_absolute() else r.path.parent / text
        if not folder.is_dir():
            raise r.error("python_path", f"{str(folder)!r} is not a folder")
        folders.append(folder.resolve())
    physical = r.get("max_physical_batch", int, 1024)
    if not 1 <= physical <= 1 << 20:
        raise r.error("max_physical_batch", f"must be in [1, 2^20], got {physical}")
    workers = r.get("num_workers", int, 0)
    if not 0 <= workers <= 256:
        raise r.error("num_workers", f"must be in [0, 256], got {workers}")
    fixed = _options(r, "model_options")
    data = _import_path(r, "data")
    eval_options = _options(r, "eval_data_options")
    eval_paths = _paths(r, eval_options, prefix="eval_")
    eval_path = r.get("eval_path", str, "")
    if data and eval_path:
        raise r.error(
            "eval_path",
            f"{eval_path!r}: a declared Dataset's held-out split is given by eval_data_paths "
            "or eval_data_options (the arguments that differ for it)",
        )
    if not data and (eval_options or eval_paths):
        key = "eval_data_options" if eval_options else "eval_data_paths"
        raise r.error(key, "needs data = 'package.module:factory' (an .npz takes eval_path)")
    if eval_path:
        if "\0" in eval_path or not eval_path.endswith(".npz"):
            raise r.error(
                "eval_path", f"must be an .npz file like the training data, got {eval_path!r}"
            )
        given = Path(eval_path)
        eval_path = str(given if given.is_absolute() else r.path.parent / given)
    return TrainingDeclaration(
        model=_import_path(r, "model"),
        models=_models(r),
        model_choices=_choices(r, fixed),
        data=data,
        loss=loss,
        collate=_import_path(r, "collate"),
        python_path=tuple(folders),
        max_physical_batch=int(physical),
        num_workers=int(workers),
        pin_memory=r.get("pin_memory", bool, None),
        model_options=fixed,
        data_options=_options(r, "data_options"),
        data_paths=_paths(r, _options(r, "data_options")),
        eval_path=eval_path,
        eval_data_options=eval_options,
        eval_data_paths=eval_paths,
    )
