"""The evaluation data of a training run, checked before any site is asked or charged: the
model runs on its first examples at the coordinator, the loss on that output, and for
cross-entropy every label is one of the model's classes (docs/training.md, "Checked before
the first charge"). A bad file then costs nothing, instead of crashing the run after the
sites paid for its first epoch. Nothing happens at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch.utils.data import Dataset

from mpcdp.errors import ParameterError
from mpcdp.train.run_model import evaluate_any

__all__ = ["EVAL_CHECK_ITEMS", "checked_eval_data", "evaluate"]

Arrays = tuple[NDArray[Any], NDArray[Any]]


def evaluate(
    model: torch.nn.Module, data: Arrays, *, batch_size: int = 2048
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``data`` = (x, y)."""
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(data[0], dtype=np.float32))
    y = torch.as_tensor(np.asarray(data[1], dtype=np.int64))
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(y), batch_size):
            out = model(x[s : s + batch_size].to(device))
            t = y[s : s + batch_size].to(device)
            loss += float(F.cross_entropy(out, t, reduction="sum"))
            correct += int((out.argmax(dim=1) == t).sum())
    model.train(was)
    n = max(len(y), 1)
    return correct / n, loss / n


#: examples of the evaluation data the coordinator runs its model on before any site is asked
EVAL_CHECK_ITEMS = 8


def _eval_refusal(why: str, name: str = "eval_data") -> ParameterError:
    what = "the evaluation data" if name == "eval_data" else "the public data"
    return ParameterError(name, what, f"{why}; nothing was charged")


def _runs_on(net: torch.nn.Module, x: NDArray[Any]) -> Exception | None:
    """None when ``net`` runs on the features ``x`` (no gradient, eval mode), else why not."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.as_tensor(x))
    except Exception as exc:  # the user's model on the user's data: any failure is the answer
        return exc
    finally:
        net.train(was)
    return None


def checked_eval_data(
    net: torch.nn.Module,
    data: Arrays | Dataset[Any],
    *,
    loss: str,
    python_path: str | Path | Sequence[str | Path] = (),
    feature_shape: tuple[int, ...] = (),
    name: str = "eval_data",
) -> Arrays | Dataset[Any]:
    """The evaluation data, checked the way every epoch will use it, before any site is asked:
    the model runs on its first :data:`EVAL_CHECK_ITEMS` examples at the coordinator and the
    loss on that output, and for cross-entropy every label is a class of the model's output.
    Arrays keep integer features (token ids) as int64 for a model that takes them, and turn
    them into float32 for one that does not (integer pixel values), as the sites do with an
    .npz. ParameterError naming ``eval_data`` (or ``name``: the warm start's public data are
    checked the same way) and the problem otherwise."""

    def _refusal(why: str) -> ParameterError:
        return _eval_refusal(why, name)

    sites = f" (the sites' examples have shape {feature_shape})" if feature_shape else ""
    if not isinstance(data, tuple):
        try:
            size = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise _refusal(
                f"{type(data).__name__} is not a map-style Dataset (no __len__)"
            ) from None
        if size == 0:
            raise _refusal("the Dataset is empty")
        head: Arrays | Dataset[Any] = torch.utils.data.Subset(
            data, range(min(EVAL_CHECK_ITEMS, size))
        )
    else:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if x.ndim < 1 or y.ndim < 1 or len(x) != len(y) or len(x) == 0:
            raise _refusal(
                f"x {x.shape} and y {y.shape} must hold the same number (> 0) of examples"
            )
        if x.dtype.kind not in "fiu":
            raise _refusal(f"x must be numbers, got dtype {x.dtype}")
        if loss == "cross_entropy" and y.dtype.kind not in "iu":
            raise _refusal(f"y must be integer labels for cross_entropy, got dtype {y.dtype}")
        k = min(EVAL_CHECK_ITEMS, len(x))
        if x.dtype.kind in "iu":
            x = x.astype(np.int64)
            if _runs_on(net, x[:k]) is not None and _runs_on(net, x[:k].astype(np.float32)) is None:
                x = x.astype(np.float32)  # integer pixels for a model of float features
        else:
            x = x.astype(np.float32)
        failed = _runs_on(net, x[:k])
        if failed is not None:
            raise _refusal(
                f"the model cannot run on its first {k} examples (x of shape "
                f"{tuple(x.shape[1:])}, {x.dtype}){sites}: {type(failed).__name__}: "
                f"{str(failed)[:300]}"
            )
        if loss == "cross_entropy":
            was = net.training
            net.eval()
            try:
                with torch.no_grad():
                    out = net(torch.as_tensor(x[:1]))
            finally:
                net.train(was)
            classes = int(out.shape[1]) if out.ndim == 2 else 0
            if classes < 2:
                raise _refusal(
                    f"cross_entropy needs the model's output to be (N, classes), got "
                    f"{tuple(out.shape)}"
                )
            bad = np.flatnonzero((y < 0) | (y >= classes))
            if bad.size:
                raise _refusal(
                    f"example {int(bad[0])} has label {int(y[bad[0]])}, outside the model's "
                    f"{classes} classes [0, {classes})"
                )
        data = (x, y)
        head = (x[:k], y[:k])
    try:
        evaluate_any(net, head, loss=loss, python_path=python_path)
    except ParameterError:
        raise
    except Exception as exc:  # the user's model, loss or Dataset: any failure is refused
        raise _refusal(
            f"evaluating the model on its first examples{sites} failed: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    return data
