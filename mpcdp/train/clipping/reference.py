"""A slow, obviously correct reference for per-sample gradients: ``torch.func.vmap`` of
``torch.func.grad`` over the examples, each differentiated as a batch of one (the definition
of a per-sample gradient; the tests compare the clipper against it). Nothing happens at import
time beyond defining names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _iter_flat(tensors: dict[str, torch.Tensor], names: list[str]) -> Iterator[torch.Tensor]:
    for n in names:
        t = tensors[n]
        yield t.reshape(t.shape[0], -1)


def per_sample_gradients_reference(
    module: nn.Module, *, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn
) -> torch.Tensor:
    """Unclipped per-sample gradients ``(B, num_params)`` with ``torch.func.vmap(grad)``.

    The slow, obviously correct reference: each example goes through ``module`` as a batch of
    one and is differentiated separately (vectorised by ``vmap``). Columns follow the order
    of :meth:`PerSampleClipper.named_parameters` (the trainable parameters of ``module`` in
    ``named_parameters()`` order). ``loss_fn`` is called as for
    :meth:`PerSampleClipper.clipped_grad_sum` and its (single) loss is differentiated.
    Memory is ``B x num_params``.
    """
    trainable = _trainable_named_parameters(module)
    names = [n for n, _ in trainable]
    params = {n: p.detach() for n, p in trainable}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(module, p, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    if inputs.shape[0] == 0:
        total = sum(p.numel() for _, p in trainable)
        return torch.zeros(0, total, dtype=trainable[0][1].dtype, device=inputs.device)
    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(
        params, inputs, targets
    )
    return torch.cat(list(_iter_flat(grads, names)), dim=1)
