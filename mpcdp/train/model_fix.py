"""What :func:`fix_model` replaces so that per-sample clipping accepts a model, the fix half
of ``mpcdp check-model --fix`` (as Opacus pairs ``ModuleValidator.validate`` with ``fix``;
the check is :mod:`mpcdp.train.model_check`'s).

- A BatchNorm that the clipper refuses (trainable, or using batch statistics: one example's
  normalised output then depends on the others') becomes ``nn.GroupNorm(G, C)``, which
  normalises each example alone (Wu and He 2018, "Group Normalization"), with the same
  ``eps`` and affine weights.
- ``nn.MultiheadAttention`` (fused input projection, no per-layer rule) becomes
  :class:`~mpcdp.train.layers.DPMultiheadAttention`, which computes the same function from
  ``nn.Linear`` layers.

Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mpcdp.errors import ParameterError
from mpcdp.train.layers import replace_multihead_attention

__all__ = ["Fix", "fix_model", "possible_fixes", "refused_batchnorm"]


@dataclass(frozen=True)
class Fix:
    """One change :func:`fix_model` made (``applied``) or could not make, and why."""

    path: str
    before: str
    after: str
    applied: bool
    advice: str


def _groups(channels: int, *, at_least_two_per_group: bool) -> int:
    """The largest divisor of ``channels`` up to 32 (with >= 2 channels per group if asked)."""
    top = min(32, channels // 2 if at_least_two_per_group else channels)
    return next((g for g in range(max(top, 1), 0, -1) if channels % g == 0), 1)


def refused_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm the clipper refuses: trainable, or normalising by batch statistics."""
    if not isinstance(m, _BatchNorm):
        return False
    trainable = any(p.requires_grad for p in m.parameters(recurse=False))
    return trainable or m.training or m.running_mean is None


def _group_norm_for(bn: _BatchNorm) -> nn.GroupNorm:
    channels = bn.num_features
    groups = _groups(channels, at_least_two_per_group=isinstance(bn, nn.BatchNorm1d))
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = nn.GroupNorm(
        groups,
        channels,
        eps=bn.eps,
        affine=bn.affine,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    if bn.affine:
        with torch.no_grad():
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
        new.weight.requires_grad_(bn.weight.requires_grad)
        new.bias.requires_grad_(bn.bias.requires_grad)
    new.train(bn.training)
    return new


def fix_model(model: nn.Module) -> tuple[nn.Module, tuple[Fix, ...]]:
    """Replace, in place, what the clipper refuses and can be replaced; say what changed.

    Every BatchNorm that the clipper refuses (trainable, or using batch statistics) becomes
    ``nn.GroupNorm(G, C)`` with the same ``eps`` and affine weights (``G``: the largest
    divisor of ``C`` up to 32; for ``BatchNorm1d`` with at least two channels per group, as
    its input may be ``(B, C)``); every ``nn.MultiheadAttention`` becomes a
    :class:`~mpcdp.train.layers.DPMultiheadAttention` computing the same function (its
    attention dropout is an ``nn.Dropout`` module, which the clipper's checks accept). Running
    statistics are dropped, so a trained BatchNorm model computes another function (train
    it again). Returns the model (a new object only when the root itself was replaced) and
    the changes, including those that could not be made (``applied=False``, with why).
    """
    fixes: list[Fix] = []
    done: dict[int, nn.Module] = {}

    def replace(path: str, m: nn.Module) -> nn.Module | None:
        if id(m) in done:
            return done[id(m)]
        new: nn.Module | None = None
        if refused_batchnorm(m):
            assert isinstance(m, _BatchNorm)
            new = _group_norm_for(m)
            assert isinstance(new, nn.GroupNorm)
            fixes.append(
                Fix(
                    path=path,
                    before=f"{type(m).__name__}({m.num_features})",
                    after=f"GroupNorm({new.num_groups}, {new.num_channels})",
                    applied=True,
                    advice=f"use nn.GroupNorm({new.num_groups}, {new.num_channels}) in place of "
                    f"nn.{type(m).__name__}({m.num_features}) (or nn.LayerNorm)",
                )
            )
        elif isinstance(m, nn.MultiheadAttention):
            try:
                new = replace_multihead_attention(m)
            except ParameterError as exc:
                fixes.append(
                    Fix(path, "MultiheadAttention", "MultiheadAttention", False, exc.reason)
                )
                return None
            advice = (
                "call mpcdp.train.layers.replace_multihead_attention(model) before returning "
                "the model (or build it with DPMultiheadAttention)"
            )
            after = f"DPMultiheadAttention({m.embed_dim}, {m.num_heads})"
            if m.dropout > 0:
                after = f"DPMultiheadAttention({m.embed_dim}, {m.num_heads}, dropout={m.dropout})"
            fixes.append(
                Fix(
                    path=path,
                    before=f"MultiheadAttention({m.embed_dim}, {m.num_heads}, dropout={m.dropout})",
                    after=after,
                    applied=True,
                    advice=advice,
                )
            )
        if new is not None:
            done[id(m)] = new
        return new

    root = replace("", model)
    if root is not None:
        return root, tuple(fixes)
    for path, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):
            if child is None:
                continue
            new = replace(f"{path}.{attr}" if path else attr, child)
            if new is not None:
                setattr(parent, attr, new)
    return model, tuple(fixes)


def possible_fixes(model: nn.Module) -> tuple[Fix, ...]:
    """What :func:`fix_model` would change (run on a copy)."""
    _, fixes = fix_model(copy.deepcopy(model))
    return fixes
