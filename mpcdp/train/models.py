"""Model architectures by name, so a coordinator and its sites build the same module.

A training run names its architecture with a short string that every site checks and builds
for itself (no code crosses the wire):

- ``mlp:64,128,10``: flatten, then Linear(64, 128), ReLU, Linear(128, 10) (any number of
  hidden widths; the first number is the flattened input size, the last the classes).
- ``linear:64,10``: logistic regression (flatten, one Linear).
- ``mlpln:64,128,10``: like ``mlp`` with a LayerNorm after every hidden Linear.

The parameters' values always come from the coordinator (the first step of a session carries
all of them), so a site's random initialisation never matters.
"""

from __future__ import annotations

import itertools

from torch import nn

from mpcdp.errors import ParameterError, valid_names

__all__ = ["build_model", "check_model_spec"]

_KINDS = ("mlp", "linear", "mlpln")


def check_model_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``kind:w0,w1,...`` strictly; ParameterError names the spec otherwise."""
    kind, _, widths_text = spec.partition(":")
    if kind not in _KINDS:
        raise ParameterError(
            "model",
            spec,
            f"kind {kind!r} is not built in (a model of your own is an import path "
            f"pkg.module:factory); {valid_names(kind, _KINDS)}",
        )
    try:
        widths = tuple(int(w) for w in widths_text.split(","))
    except ValueError:
        raise ParameterError("model", spec, "widths must be integers, e.g. mlp:64,128,10") from None
    if len(widths) < 2 or any(not 1 <= w <= 1 << 20 for w in widths):
        raise ParameterError("model", spec, "needs >= 2 widths, each in [1, 2^20]")
    if kind == "linear" and len(widths) != 2:
        raise ParameterError("model", spec, "linear takes exactly inputs,classes")
    return kind, widths


def build_model(spec: str) -> nn.Module:
    """The module named by ``spec`` (see the module docstring)."""
    kind, widths = check_model_spec(spec)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if kind == "mlpln":
                layers.append(nn.LayerNorm(b))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
