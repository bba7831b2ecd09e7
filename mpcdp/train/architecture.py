"""A model's architecture as the fingerprint entries of mpcdp.protocol.training.fingerprint:
one entry per parameter and per buffer, in ``named_parameters`` / ``named_buffers`` order.

Buffers are not sent with the parameters, so every site must get the same ones from its
factory; buffers that training changes (BatchNorm's running statistics in training mode) are
refused here, and a site also refuses a model whose buffers change in a forward pass on its
synthetic check batch (mpcdp.train.gradient_source). Nothing happens at import time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mpcdp.errors import ParameterError

__all__ = ["describe_architecture", "describe_factory"]


def _shape(t: torch.Tensor) -> str:
    return "(" + ",".join(str(int(s)) for s in t.shape) + ")"


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def describe_architecture(model: nn.Module) -> tuple[str, ...]:
    """The model's entries (works on torch's meta device). Raises ParameterError for a
    module whose buffers training would change."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.batchnorm._NormBase)
            and module.track_running_stats
            and module.training
        ):
            raise ParameterError(
                "model",
                f"{name or 'the model'} ({type(module).__name__})",
                "updates its running statistics (buffers) in training; buffers are not "
                "aggregated, so use GroupNorm or LayerNorm",
            )
    out = [
        f"parameter {n} shape={_shape(p)} dtype={_dtype(p)} requires_grad={p.requires_grad}"
        for n, p in model.named_parameters()
    ]
    out += [f"buffer {n} shape={_shape(b)} dtype={_dtype(b)}" for n, b in model.named_buffers()]
    return tuple(out)


def describe_factory(factory: Callable[[str], nn.Module], name: str) -> tuple[str, ...]:
    """The entries of ``factory(name)``, built on torch's meta device (no memory, no
    initialisation; before anything freezes a parameter), or on the CPU for a factory that
    cannot build there."""
    try:
        with torch.device("meta"):
            model = factory(name)
    except ParameterError:
        raise
    except Exception:  # e.g. a factory that reads a tensor's value while building
        model = factory(name)
    return describe_architecture(model)
