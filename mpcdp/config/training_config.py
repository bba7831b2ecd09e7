"""A training dataset's declarations in party.toml (see mpcdp.config.party_config's
docstring): the model, data, loss and collate function as import paths, the folders to
import them from, and the site's resource limits. Only read here: mpcdp.train.declared imports
them when the node starts. Nothing happens at import time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpcdp.config.reader import Reader

__all__ = [
    "BUILTIN_LOSSES",
    "TRAINING_KEYS",
    "TrainingDeclaration",
    "is_import_path",
    "read_training",
]

#: the per-example losses known by name (any other loss is an import path)
BUILTIN_LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class TrainingDeclaration:
    """How a site trains on one dataset, as its party.toml declares it (import paths are
    ``package.module:attribute``; nothing is imported when the config is read)."""

    #: the model factory; "" for the built-in names (mlp:..., linear:..., mlpln:...)
    model: str = ""
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

    def data_arguments(self) -> dict[str, Any]:
        """The Dataset factory's keyword arguments: ``data_options`` and ``data_paths``."""
        return {**dict(self.data_options), **dict(self.data_paths)}


TRAINING_KEYS = (
    "model",
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


def _paths(r: Reader, options: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, str], ...]:
    """``data_paths``: keyword -> a path, relative ones resolved against party.toml's
    folder; a keyword may not also be in ``data_options``."""
    table = r.get("data_paths", dict, {})
    out = []
    for key, text in sorted(table.items()):
        where = f"data_paths.{key}"
        if key in dict(options):
            raise r.error(where, "is also in data_options: give each keyword in one of them")
        if not isinstance(text, str) or not text or "\0" in text:
            raise r.error(where, f"must be a path (a non-empty string), got {text!r}")
        path = Path(text)
        out.append((key, str(path if path.is_absolute() else r.path.parent / path)))
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
    return TrainingDeclaration(
        model=_import_path(r, "model"),
        data=_import_path(r, "data"),
        loss=loss,
        collate=_import_path(r, "collate"),
        python_path=tuple(folders),
        max_physical_batch=int(physical),
        num_workers=int(workers),
        pin_memory=r.get("pin_memory", bool, None),
        model_options=_options(r, "model_options"),
        data_options=_options(r, "data_options"),
        data_paths=_paths(r, _options(r, "data_options")),
    )
