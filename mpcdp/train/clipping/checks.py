"""First-use checks of what per-sample clipping assumes about the model (issue 13, s2-s4).

Book-keeping clipping (package docstring) is exact only if (a) dimension 0 of every
trainable layer's tensors is the batch, (b) examples do not interact, in the forward pass or
in the loss, and (c) every trainable parameter is used only inside the forward of the module
that owns it. None of these can be read off the code; a model that breaks (a) or (b) moves
the released sum by several times the clipping bound for one example, silently, and one that
breaks (c) gets wrong gradients. Two checks run on the first batch of at least two examples a
clipper sees (a site builds a clipper per training session, so every session is checked):

* :func:`check_examples_independent`, for (a) and (b): the batch is split into two halves;
  every module's outputs and the per-example losses for each half, computed alone, must equal
  the corresponding rows computed with the whole batch (no-grad, the module's own train/eval
  mode, ``nn.Dropout`` layers switched off for the check, IEEE float32). A tensor that a
  trainable layer received with dimension 0 equal to the batch size must have the half's
  size when the layer sees a half: a sequence-first tensor ``(T, B, F)`` with ``T == B``, a
  positional ``arange(T)`` or a shared table whose length happens to equal ``B`` keep their
  size and are refused. Splitting in halves, rather than probing a small sub-batch, also
  catches a batch-level branch triggered by one example (it fires for one half only).
* :func:`check_parameter_uses`, for (c): the autograd graph of the loss is walked once. A
  parameter's gradient must reach it only from nodes created inside a forward call of its
  own module (the nodes between the call's output and its inputs); a parameter read by
  another module or by a parent's code (weight tying through ``F.linear(h, emb.weight)``)
  has a gradient path the hooks never see, and is refused.

What these checks cannot see, documented in the README: interactions that the checked batch
does not trigger (a branch on a data value absent from it), interactions below the
tolerance (relative 2^-10 in float32, 2^-4 for half-precision outputs), randomness other
than ``nn.Dropout`` (refused as a non-deterministic forward), and a model that changes its
behaviour after the first batch (e.g. on a step counter). The tolerances are far above
float rounding between batch sizes and far below what batch statistics produce.

Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import Node
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_flatten

from mpcdp.errors import ParameterError
from mpcdp.train.clipping.rules import _Layer, _where

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: relative tolerance of the comparison, by the dtype of the compared tensor
_RTOL = {torch.float16: 2.0**-4, torch.bfloat16: 2.0**-4}
_RTOL_DEFAULT = 2.0**-10


@dataclass
class _Trace:
    """One forward of the model with a hook on every module, in order of completion."""

    # (module path, module type, flattened output leaves: detached tensors or None)
    calls: list[tuple[str, str, list[torch.Tensor | None]]] = field(default_factory=list)
    # trainable layer path -> per call, the shapes of its flattened argument tensors
    arg_shapes: dict[str, list[list[tuple[int, ...] | None]]] = field(default_factory=dict)


def _leaves(value: Any) -> list[Any]:
    leaves, _ = tree_flatten(value)
    return list(leaves)


def _trace(
    module: nn.Module, layer_paths: set[str], inputs: torch.Tensor
) -> tuple[_Trace, torch.Tensor]:
    trace = _Trace()
    handles = []

    def make_hook(path: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            leaves = [t.detach() if isinstance(t, torch.Tensor) else None for t in _leaves(out)]
            trace.calls.append((path, type(m).__name__, leaves))
            if path in layer_paths:
                shapes = [
                    tuple(t.shape) if isinstance(t, torch.Tensor) else None
                    for t in _leaves((args, kwargs))
                ]
                trace.arg_shapes.setdefault(path, []).append(shapes)

        return hook

    for path, m in module.named_modules():
        handles.append(m.register_forward_hook(make_hook(path), with_kwargs=True))
    try:
        output = module(inputs)
    finally:
        for h in handles:
            h.remove()
    return trace, output


@contextlib.contextmanager
def _dropout_off(module: nn.Module) -> Iterator[None]:
    """nn.Dropout layers in eval mode for the check: they are independent per element (they
    do not mix examples), and their masks cannot be compared between batch sizes."""
    switched = [m for m in module.modules() if isinstance(m, _DropoutNd) and m.training]
    for m in switched:
        m.train(False)
    try:
        yield
    finally:
        for m in switched:
            m.train(True)


def _first_bad_row(full: torch.Tensor, part: torch.Tensor) -> int | None:
    """The first row where ``part`` differs from ``full`` beyond the tolerance, or None."""
    rtol = _RTOL.get(full.dtype, _RTOL_DEFAULT)
    f = torch.nan_to_num(full.to(torch.float64).reshape(full.shape[0], -1))
    p = torch.nan_to_num(part.to(torch.float64).reshape(part.shape[0], -1))
    if f.shape[1] == 0:
        return None
    scale = torch.linalg.vector_norm(f, dim=1)
    floor = 1e-6 * float(scale.max()) + 1e-30
    bad = torch.linalg.vector_norm(f - p, dim=1) > rtol * (scale + floor)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def _refuse(path: str, why: str) -> ParameterError:
    return ParameterError("module", path, why)


def _compare_traces(
    full: _Trace, part: _Trace, rows: slice, batch: int, size: int, layers: dict[str, _Layer]
) -> None:
    if [c[0] for c in full.calls] != [c[0] for c in part.calls]:
        at = next(
            (
                i
                for i, (a, b) in enumerate(zip(full.calls, part.calls, strict=False))
                if a[0] != b[0]
            ),
            min(len(full.calls), len(part.calls)),
        )
        where = full.calls[at][0] if at < len(full.calls) else part.calls[at][0]
        raise _refuse(
            where,
            f"the forward pass calls other modules for part of the batch than for the whole "
            f"batch (first difference at {_where(where)}): the batch decides the computation "
            "(a branch on a batch statistic?), so examples interact and per-sample clipping "
            "cannot bound one example's influence",
        )
    # (a) the batch dimension of trainable layers is the batch, not a size that coincides
    for path, calls in full.arg_shapes.items():
        layer = layers[path]
        for k, (shapes_f, shapes_p) in enumerate(zip(calls, part.arg_shapes[path], strict=True)):
            for sf, sp in zip(shapes_f, shapes_p, strict=True):
                if sf and sp is not None and sf[0] == batch and sp[0] != size:
                    raise _refuse(
                        path,
                        f"{_where(path)} ({type(layer.module).__name__}) received a tensor "
                        f"of shape {sf} for a batch of {batch}, and of shape {sp} for a batch "
                        f"of {size} (call {k + 1}): its dimension 0 equals the batch size only "
                        "by coincidence (sequence-first, or shared across the batch); per-"
                        "sample clipping needs batch-first tensors: make dimension 0 the batch",
                    )
    # (b) every batched output of every module, row by row
    for (path, kind, leaves_f), (_, _, leaves_p) in zip(full.calls, part.calls, strict=True):
        for tf, tp in zip(leaves_f, leaves_p, strict=False):
            if tf is None or tp is None or tf.dim() == 0 or not tf.is_floating_point():
                continue
            if tf.shape[0] != batch or tuple(tp.shape) != (size, *tf.shape[1:]):
                continue
            row = _first_bad_row(tf[rows], tp)
            if row is not None:
                raise _refuse(
                    path,
                    f"the output of {_where(path)} ({kind}) for example {rows.start + row} "
                    "differs when that example is in a smaller batch: examples interact at or "
                    "before this module (batch statistics, centring by the batch mean, a "
                    "branch on the batch, BatchNorm-like code); per-sample clipping needs "
                    "each example's output to depend on that example alone",
                )


def check_examples_independent(
    *,
    module: nn.Module,
    layers: list[_Layer],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
) -> None:
    """Refuse a model or loss in which examples interact or whose batch dimension is only a
    coincidence of sizes (module docstring). ``inputs`` has at least two examples."""
    batch = int(inputs.shape[0])
    half = batch // 2
    by_path = {layer.path: layer for layer in layers}
    paths = set(by_path)
    with torch.no_grad(), _dropout_off(module):
        full, out_full = _trace(module, paths, inputs)
        losses_full = loss_fn(out_full, targets)
        if not isinstance(losses_full, torch.Tensor) or tuple(losses_full.shape) != (batch,):
            return  # the caller's own shape check reports this
        for rows in (slice(0, half), slice(half, batch)):
            size = rows.stop - rows.start
            try:
                part, out_part = _trace(module, paths, inputs[rows])
            except (RuntimeError, ValueError, IndexError) as exc:
                raise _refuse(
                    "",
                    f"the model fails on a batch of {size} after succeeding on a batch of "
                    f"{batch} (a batch size built into the model?): {exc}",
                ) from exc
            try:
                _compare_traces(full, part, rows, batch, size, by_path)
            except ParameterError:
                _check_deterministic(module, paths, inputs, full)
                raise
            losses_part = loss_fn(out_part, targets[rows])
            if not isinstance(losses_part, torch.Tensor) or tuple(losses_part.shape) != (size,):
                continue  # the caller's own shape check reports this
            row = _first_bad_row(losses_full[rows].reshape(size, 1), losses_part.reshape(size, 1))
            if row is not None:
                raise ParameterError(
                    "loss_fn",
                    getattr(loss_fn, "__name__", type(loss_fn).__name__),
                    f"the loss of example {rows.start + row} differs when that example is in a "
                    "smaller batch: the loss mixes examples (normalised by a batch statistic, "
                    "contrastive terms across the batch); loss_fn must return each example's "
                    "loss from its own output and target",
                )


def _check_deterministic(
    module: nn.Module, paths: set[str], inputs: torch.Tensor, first: _Trace
) -> None:
    again, _ = _trace(module, paths, inputs)
    for (path, kind, a), (_, _, b) in zip(first.calls, again.calls, strict=False):
        for ta, tb in zip(a, b, strict=False):
            if ta is None or tb is None or ta.shape != tb.shape or not ta.is_floating_point():
                continue
            if ta.dim() > 0 and _first_bad_row(ta, tb) is not None:
                raise _refuse(
                    path,
                    f"the output of {_where(path)} ({kind}) changes between two identical "
                    "forward passes: the forward is random other than through nn.Dropout "
                    "layers (functional dropout, noise), so whether examples interact cannot "
                    "be checked; use nn.Dropout modules for dropout",
                )


def check_parameter_uses(*, loss: torch.Tensor, layers: list[_Layer]) -> None:
    """Refuse a parameter whose gradient reaches it from outside its module's forward.

    A call's own nodes are those reached from its outputs' autograd edges without passing
    its arguments' nodes (``_Call.frontier``, recorded by the forward hook)."""
    owner: dict[int, _Layer] = {}
    for layer in layers:
        for p in layer.params.values():
            owner[id(p)] = layer
    inside: dict[str, set[Node]] = {}
    for layer in layers:
        nodes: set[Node] = set()
        for call in layer.calls:
            stop = set(call.frontier)
            stack = [e.node for e in call.edges]
            while stack:
                node = stack.pop()
                if node in nodes or node in stop:
                    continue
                nodes.add(node)
                stack.extend(n for n, _ in node.next_functions if n is not None)
        inside[layer.path] = nodes
    if loss.grad_fn is None:
        return
    seen: set[Node] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if isinstance(variable, torch.Tensor) and id(variable) in owner:
                layer = owner[id(variable)]
                if node not in inside[layer.path]:
                    name = next(n for n, p in layer.params.items() if p is variable)
                    full = f"{layer.path}.{name}" if layer.path else name
                    raise _refuse(
                        layer.path,
                        f"parameter {full!r} is used outside the forward of {_where(layer.path)}"
                        f" (by another module or by a parent's code, e.g. weight tying through "
                        f"F.linear(h, {full})): its gradient through that use would be missing "
                        "from the per-sample gradients; use it only by calling its module",
                    )
            else:
                stack.append(child)
