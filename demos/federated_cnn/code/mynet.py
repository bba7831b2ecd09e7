"""The model of this demo project: a small CNN for 8x8 grey images, with GroupNorm.

mpcdp imports it by its path, ``mynet:build``, at every site (``model`` in party.toml) and
at the coordinator (``mpcdp train --model mynet:build --python-path code``). GroupNorm, not
BatchNorm: BatchNorm mixes the examples of a batch, which per-example DP clipping refuses.
"""

from __future__ import annotations

from torch import nn


def build(name: str) -> nn.Module:
    """The network for the run's model ``name`` (here always this one)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
