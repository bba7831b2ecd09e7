"""A party's own data: CSV tables and .npy vectors, validated against declared bounds.

The party owns its data and is the only one who reads it. Loading is strict: every problem
(missing column, a value that is not a number, NaN or inf, an unknown category) is an error
naming the file, the row and the column. A numeric value outside the declared public bounds is
clipped to them (the bounds are what the sensitivity assumes, so clipping is what DP needs;
the default policy, ``out_of_bounds = "clip"``), and the number clipped per column goes to the
owner's log at WARNING, never the values. The policy ``out_of_bounds = "error"`` refuses such a
file instead; a node then reports that dataset unavailable to every coordinator that asks,
which tells them, uncharged, that some value is out of bounds (README, "out_of_bounds").
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import DataError

__all__ = [
    "ColumnSpec",
    "Examples",
    "Table",
    "Vector",
    "load_examples",
    "load_table",
    "load_vector",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnSpec:
    """A column's public declaration: numeric bounds, or categories."""

    name: str
    lower: float = 0.0
    upper: float = 0.0
    categories: tuple[str, ...] = ()
    out_of_bounds: str = "clip"  # or "error" (reveals that a value is out of bounds)
    #: declared quantile bin edges of a numeric column (strictly increasing, within
    #: [lower, upper]); empty: a query's bins are uniform over [lower, upper]
    edges: tuple[float, ...] = ()

    @property
    def categorical(self) -> bool:
        return bool(self.categories)


@dataclass(frozen=True)
class Table:
    path: Path
    rows: int
    numeric: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    categorical: dict[str, NDArray[np.int64]] = field(default_factory=dict)  # category indices


@dataclass(frozen=True)
class Vector:
    path: Path
    values: NDArray[np.float64]


def load_table(path: Path, columns: Sequence[ColumnSpec]) -> Table:
    """Read a CSV with a header row and validate the declared ``columns``."""
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror}") from None
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c.name for c in columns if c.name not in header]
        if missing:
            raise DataError(f"{path}: missing declared column(s) {missing}; header is {header}")
        raw: dict[str, list[str]] = {c.name: [] for c in columns}
        for row in reader:
            if None in row:
                raise DataError(f"{path}: row {reader.line_num} has more fields than the header")
            for c in columns:
                value = row[c.name]
                if value is None:
                    raise DataError(f"{path}: row {reader.line_num} column {c.name!r} is missing")
                raw[c.name].append(value)
    rows = len(next(iter(raw.values()))) if raw else 0
    numeric: dict[str, NDArray[np.float64]] = {}
    categorical: dict[str, NDArray[np.int64]] = {}
    for c in columns:
        if c.categorical:
            categorical[c.name] = _categories(path, c, raw[c.name])
        else:
            numeric[c.name] = _numbers(path, c, raw[c.name])
    return Table(path=path, rows=rows, numeric=numeric, categorical=categorical)


def _numbers(path: Path, c: ColumnSpec, values: list[str]) -> NDArray[np.float64]:
    out = np.empty(len(values), dtype=np.float64)
    clipped = 0
    for i, text in enumerate(values):
        line = i + 2  # header is line 1
        try:
            x = float(text)
        except ValueError:
            raise DataError(
                f"{path}: row {line} column {c.name!r}: {text!r} is not a number"
            ) from None
        if not math.isfinite(x):
            raise DataError(f"{path}: row {line} column {c.name!r}: {text!r} is not finite")
        if not c.lower <= x <= c.upper:
            if c.out_of_bounds != "clip":
                raise DataError(
                    f"{path}: row {line} column {c.name!r}: {x:g} is outside the declared "
                    f"bounds [{c.lower:g}, {c.upper:g}]"
                )
            x = min(max(x, c.lower), c.upper)
            clipped += 1
        out[i] = x
    if clipped:  # the count only: the values and rows are the owner's to look up
        log.warning("%s: clipped %d value(s) of column %r to its bounds", path, clipped, c.name)
    return out


def _categories(path: Path, c: ColumnSpec, values: list[str]) -> NDArray[np.int64]:
    index = {cat: k for k, cat in enumerate(c.categories)}
    out = np.empty(len(values), dtype=np.int64)
    for i, text in enumerate(values):
        k = index.get(text.strip())
        if k is None:
            raise DataError(
                f"{path}: row {i + 2} column {c.name!r}: {text!r} is not one of the declared "
                f"categories {list(c.categories)}"
            )
        out[i] = k
    return out


#: Elements checked per pass when validating a vector (bounds the temporaries to ~1 MiB).
_CHECK_SLICE = 1 << 20


def load_vector(path: Path) -> Vector:
    """Read a 1-D float vector from a .npy file (no pickles), refusing NaN and inf."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read a .npy vector: {exc}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected a 1-D numeric vector, got shape {arr.shape} {arr.dtype}")
    values = np.asarray(arr, dtype=np.float64)  # no second copy when the file is float64
    for start in range(0, values.size, _CHECK_SLICE):  # small temporaries, whatever the size
        bad = ~np.isfinite(values[start : start + _CHECK_SLICE])
        if bad.any():
            i = start + int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: element {i} is {float(values[i])!r}, not finite")
    return Vector(path=path, values=values)


@dataclass(frozen=True)
class Examples:
    """Labelled examples for training: features ``x`` (one row per example: float32, or int64
    when the file's ``x`` is integer-typed, e.g. token ids for an Embedding) and integer
    labels ``y`` in [0, num_classes), or, for regression (``num_classes`` 0), float32 targets
    ``y`` of shape (N,) or (N, ...)."""

    path: Path
    x: NDArray[np.float32] | NDArray[np.int64]
    y: NDArray[np.int64] | NDArray[np.float32]
    num_classes: int

    @property
    def count(self) -> int:
        """The examples (rows), whatever the targets' shape: a regression target of shape
        (N, k) is N examples, not N * k."""
        return int(self.x.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])


def load_examples(path: Path, *, num_classes: int, regression: bool = False) -> Examples:
    """Read an .npz with exactly the arrays ``x`` (numeric, shape (N, ...)) and ``y``
    (integers, shape (N,)); refuse NaN/inf features and labels outside [0, num_classes).
    With ``regression``, ``y`` holds finite numeric targets of shape (N, ...) instead.
    Integer-typed ``x`` stays integer (int64: token ids must not become floats); float ``x``
    becomes float32."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = sorted(npz.files)
            if names != ["x", "y"]:
                raise DataError(f"{path}: expected exactly the arrays ['x', 'y'], found {names}")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read an .npz of examples: {exc}") from None
    if x.ndim < 2 or x.dtype.kind not in "fiu":
        raise DataError(f"{path}: x must be numeric with shape (N, ...), got {x.shape} {x.dtype}")
    if regression:
        return _regression(path, x, y)
    if y.ndim != 1 or y.dtype.kind not in "iu" or y.size != x.shape[0]:
        raise DataError(
            f"{path}: y must be {x.shape[0]} integer labels, got shape {y.shape} {y.dtype}"
        )
    feats = _features(path, x)
    labels = y.astype(np.int64)
    out = (labels < 0) | (labels >= num_classes)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise DataError(
            f"{path}: example {i} has label {int(labels[i])}, outside [0, num_classes="
            f"{num_classes})"
        )
    return Examples(path=path, x=feats, y=labels, num_classes=num_classes)


def _features(path: Path, x: NDArray[Any]) -> NDArray[np.float32] | NDArray[np.int64]:
    if x.dtype.kind in "iu":
        if x.dtype == np.uint64 and x.size and int(x.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{path}: x holds integers above 2^63 - 1 (not an int64)")
        return x.astype(np.int64)
    feats = x.astype(np.float32)
    bad = ~np.isfinite(feats)
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(len(feats), -1).any(axis=1))[0])
        raise DataError(f"{path}: example {i} has a non-finite feature")
    return feats


def _regression(path: Path, x: NDArray[Any], y: NDArray[Any]) -> Examples:
    if y.ndim < 1 or y.dtype.kind not in "fiu" or y.shape[0] != x.shape[0]:
        raise DataError(
            f"{path}: y must be {x.shape[0]} numeric targets, got shape {y.shape} {y.dtype}"
        )
    targets = y.astype(np.float32)
    bad = ~np.isfinite(targets.reshape(len(targets), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: example {int(np.flatnonzero(bad)[0])} has a non-finite target")
    return Examples(path=path, x=_features(path, x), y=targets, num_classes=0)
