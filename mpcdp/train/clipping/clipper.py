"""The clipper: :class:`PerSampleClipper` runs one forward and one backward with hooks on the
trainable layers, applies the per-layer rules (:mod:`.rules`) and clips; see the package
docstring. Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from mpcdp.errors import MpcdpError, ParameterError, UnsupportedModuleError
from mpcdp.protocol.training.train_spec import CLIPPING_MODES
from mpcdp.train.clipping import checks
from mpcdp.train.clipping.checks import Trace, check_parameter_uses
from mpcdp.train.clipping.precision import all_finite, ieee_float32, norm_margin
from mpcdp.train.clipping.probe import FirstUseProbe
from mpcdp.train.clipping.rules import (
    LAYER_RULES,
    Call,
    Layer,
    SumFn,
    batch_error,
    classify,
    module_at,
)

__all__ = [
    "ClippedBatch",
    "ClippingMode",
    "PerSampleClipper",
]

_log = logging.getLogger(__name__)

#: the type of CLIPPING_MODES (mpcdp.protocol.training.train_spec), for type checkers
ClippingMode = Literal["flat", "automatic"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClippedBatch:
    """The result of one batch: the sum of clipped per-sample gradients.

    ``grad_sum`` is 1-D float32 on the module's device, flattened in
    :meth:`PerSampleClipper.named_parameters` order. ``loss_sum`` is the sum of the
    per-sample losses and ``mean_norm`` the mean unclipped per-sample gradient norm (0.0 for
    an empty batch); both are computed from private data and are not privatised.
    """

    grad_sum: torch.Tensor
    batch_size: int
    loss_sum: float
    mean_norm: float = 0.0


def _check_finite_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(name, value, "must be a finite number > 0")
    if not math.isfinite(value) or value <= 0:
        raise ParameterError(name, value, "must be a finite number > 0")
    return float(value)


def _uses_batch_statistics(bn: _BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


def _trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class PerSampleClipper(FirstUseProbe):
    """Sum of clipped per-sample gradients of a module by book-keeping (BK).

    One forward and one backward per batch, no per-sample loop and no second backward;
    see the module docstring for the method and its requirements on the model.

    Args:
        module: the model. Its trainable parameters (``requires_grad=True``) are the ones
            clipped and summed; with ``bias_only=True`` the constructor first sets
            ``requires_grad=False`` on every parameter whose name does not end in ``"bias"``
            (this modifies ``module``).
        max_grad_norm: the clipping norm ``C`` (finite, > 0).
        clipping: ``"flat"`` (``min(1, C' / ||g||)``) or ``"automatic"``
            (``C' / (||g|| + stability)``), where ``C' = C (1 - 2^-12)`` keeps every
            example strictly inside ``C`` despite float32 rounding of its norm
            (:func:`~mpcdp.train.clipping.precision.norm_margin`).
        stability: the stability constant of automatic clipping (finite, > 0).
        bias_only: DP-BiTFiT, train biases only.
        probe_generator: the randomness of the first-use checks (which examples form each
            part, the loss weights; :mod:`.checks`); default a generator seeded from the
            operating system's CSPRNG, so the model cannot predict the probe. Tests only.

    Raises:
        ParameterError: for an invalid argument, a model with no trainable parameter, a
            BatchNorm layer that uses batch statistics or has trainable parameters, an
            ``nn.MultiheadAttention`` with trainable parameters, an ``nn.Embedding`` with
            ``max_norm`` or ``scale_grad_by_freq``, or a parameter shared by two modules;
            the message names the module path.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        max_grad_norm: float,
        clipping: ClippingMode = "flat",
        stability: float = 0.01,
        bias_only: bool = False,
        probe_generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ParameterError("module", type(module).__name__, "must be a torch.nn.Module")
        self.max_grad_norm = _check_finite_positive("max_grad_norm", max_grad_norm)
        if clipping not in CLIPPING_MODES:
            raise ParameterError("clipping", clipping, f"must be one of {list(CLIPPING_MODES)}")
        self.clipping: ClippingMode = clipping
        self.stability = _check_finite_positive("stability", stability)
        self.bias_only = bool(bias_only)
        self.module = module
        self._closed = False
        # the first-use checks (mpcdp.train.clipping.checks) have passed on a batch of >= 2
        self._checked = False
        self._record_frontier = False
        if probe_generator is None:
            probe_generator = torch.Generator().manual_seed(secrets.randbits(63))
        elif not isinstance(probe_generator, torch.Generator):
            raise ParameterError(
                "probe_generator", type(probe_generator).__name__, "must be a torch.Generator"
            )
        self._probe_gen = probe_generator
        # while the first-use probe runs a part: the whole batch's size
        self._probe_batch: int | None = None

        flags = [(p, p.requires_grad) for p in module.parameters()]
        if self.bias_only:
            for name, p in module.named_parameters():
                if not name.endswith("bias"):
                    p.requires_grad_(False)
        try:
            self._setup()
        except Exception:
            for p, flag in flags:  # a refused model is left as it was
                p.requires_grad_(flag)
            raise

    # -- construction ----------------------------------------------------------------------

    def _setup(self) -> None:
        module = self.module
        self._check_modules(for_call=False)
        self._params = _trainable_named_parameters(module)
        if not self._params:
            raise ParameterError(
                "module",
                type(module).__name__,
                "has no trainable parameter (requires_grad=True)"
                + (" ending in 'bias'" if self.bias_only else ""),
            )
        devices = {p.device for _, p in self._params}
        if len(devices) != 1:
            raise ParameterError(
                "module", sorted(str(d) for d in devices), "parameters on several devices"
            )
        self.device = devices.pop()
        for name, p in self._params:
            if not p.is_floating_point():
                raise ParameterError(name, str(p.dtype), "trainable parameters must be float")
        self._dtype = (
            torch.float64
            if any(p.dtype == torch.float64 for _, p in self._params)
            else torch.float32
        )
        # clip factors aim strictly inside C, by the error of the least precise layer's norms
        least = (
            torch.float64
            if all(p.dtype == torch.float64 for _, p in self._params)
            else torch.float32
        )
        self._target = self.max_grad_norm * (1.0 - norm_margin(least))
        # flat layout: id(parameter) -> (offset, numel)
        self._layout: dict[int, tuple[int, int]] = {}
        offset = 0
        for _, p in self._params:
            self._layout[id(p)] = (offset, p.numel())
            offset += p.numel()
        self._num_params = offset
        self._layers = self._build_layers()
        _log.debug(
            "PerSampleClipper: %d trainable parameters in %d layers (%s)",
            self._num_params,
            len(self._layers),
            ", ".join(f"{layer.path or '<root>'}:{layer.kind}" for layer in self._layers),
        )

    def _check_modules(self, *, for_call: bool) -> None:
        for path, m in self.module.named_modules():
            if isinstance(m, _BatchNorm):
                trainable = any(p.requires_grad for p in m.parameters(recurse=False))
                if trainable or _uses_batch_statistics(m):
                    why = (
                        "has trainable parameters"
                        if trainable
                        else "uses batch statistics (training mode or track_running_stats=False)"
                    )
                    raise UnsupportedModuleError(
                        path,
                        f"{module_at(path)} is {type(m).__name__} and {why}: it mixes examples "
                        "in a batch, so per-sample gradients are undefined; use GroupNorm or "
                        "LayerNorm (or a frozen BatchNorm in eval mode)",
                    )
            if not for_call and isinstance(m, nn.MultiheadAttention):
                if any(p.requires_grad for p in m.parameters()):
                    raise UnsupportedModuleError(
                        path,
                        f"{module_at(path)} is nn.MultiheadAttention, whose forward uses its "
                        "weights directly so per-sample gradients cannot be tracked; convert "
                        "the model with mpcdp.train.layers.replace_multihead_attention(model) "
                        "first",
                    )

    def _build_layers(self) -> list[Layer]:
        layers: list[Layer] = []
        owner: dict[int, str] = {}
        for path, m in self.module.named_modules():
            own = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            for n, p in own.items():
                full = f"{path}.{n}" if path else n
                if id(p) in owner:
                    raise UnsupportedModuleError(
                        path,
                        f"parameter {full!r} is the same tensor as {owner[id(p)]!r} (weight "
                        "tying); shared parameters are not supported by per-sample clipping",
                    )
                owner[id(p)] = full
            kind = classify(path, m, own)
            if kind == "fallback":
                _log.info(
                    "%s (%s) is not a layer with a closed-form rule: its per-sample gradients "
                    "are materialised with torch.func (batch x %d values)",
                    module_at(path),
                    type(m).__name__,
                    sum(p.numel() for p in own.values()),
                )
            layers.append(Layer(path=path, module=m, kind=kind, params=own))
        return layers

    # -- public API ------------------------------------------------------------------------

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters, in the order of the flat vectors."""
        return list(self._params)

    @property
    def num_params(self) -> int:
        """The number of trainable scalars (length of ``grad_sum``)."""
        return self._num_params

    def flat_parameters(self) -> torch.Tensor:
        """A 1-D float32 copy of the trainable parameters, in :meth:`named_parameters` order."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).to(torch.float32) for _, p in self._params])

    def load_flat_parameters(self, flat: torch.Tensor, *, check: bool = True) -> None:
        """Copy a 1-D vector (as from :meth:`flat_parameters`) into the trainable parameters.
        ``check=False`` skips the finiteness check (one pass) for values already checked."""
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
            shape = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
            raise ParameterError("flat", shape, "must be a 1-D tensor")
        if flat.numel() != self._num_params:
            raise ParameterError(
                "flat",
                f"length {flat.numel()}",
                f"must have length num_params={self._num_params}",
            )
        if check and not all_finite(flat):
            raise ParameterError("flat", "non-finite values", "parameters must be finite")
        with torch.no_grad():
            for _, p in self._params:
                offset, n = self._layout[id(p)]
                p.copy_(flat[offset : offset + n].view(p.shape))

    def close(self) -> None:
        """Forget recorded state; the clipper cannot be used afterwards. Idempotent."""
        for layer in getattr(self, "_layers", []):
            layer.calls.clear()
        self._closed = True

    def __enter__(self) -> PerSampleClipper:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def clipped_grad_sum(
        self,
        *,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        check_inputs: bool = True,
        scale: float = 1.0,
        out: torch.Tensor | None = None,
    ) -> ClippedBatch:
        """Forward ``inputs``, and sum the clipped per-sample gradients of the losses.

        ``loss_fn(output, targets)`` must return per-sample losses of shape ``(B,)``, e.g.
        ``lambda out, y: F.cross_entropy(out, y, reduction="none")``. ``inputs`` and
        ``targets`` are moved to the parameters' device. The module's train/eval mode is left
        as it is. Forward hooks are registered for this call only. The parameters' ``.grad``
        is not touched. A sample whose gradient is not finite contributes 0.
        ``check_inputs=False`` skips the finiteness check of ``inputs`` (one GPU-to-host
        synchronisation) for data already validated. ``scale`` multiplies the clip factors,
        so ``grad_sum`` is ``scale`` times the clipped sum without a pass over it; for a
        power of two the result is exactly that product (a site's 2^k before rounding).
        ``out``: a contiguous 1-D float32 tensor of ``num_params`` values on the module's
        device that receives the sum (returned as ``grad_sum``) instead of a new tensor; a
        caller that reuses one buffer per step saves an allocation of the model's size,
        which on a CPU costs more than the pass that fills it (fresh pages). The first-use
        checks use it as their scratch, so after a refusal its values are unspecified.

        Raises:
            ParameterError: non-finite ``inputs``, ``targets`` of another batch size, a
                ``loss_fn`` that does not return shape ``(B,)``, a layer called with a
                leading dimension other than the batch size, or a BatchNorm layer that
                uses batch statistics.
        """
        if self._closed:
            raise MpcdpError("PerSampleClipper is closed")
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ParameterError("scale", scale, "must be a finite number > 0")
        batch = _batch_size(inputs, targets)
        if out is not None:
            self._check_out(out)
        if batch == 0:
            if out is None:
                zeros = torch.zeros(self._num_params, dtype=torch.float32, device=self.device)
            else:
                zeros = out.zero_()
            return ClippedBatch(grad_sum=zeros, batch_size=0, loss_sum=0.0, mean_norm=0.0)
        if (
            check_inputs
            and (inputs.is_floating_point() or inputs.is_complex())
            and not all_finite(inputs)
        ):
            bad = int((~torch.isfinite(inputs)).sum())
            raise ParameterError(
                "inputs",
                f"{bad} non-finite of {inputs.numel()} values",
                "inputs must be finite (NaN or inf found)",
            )
        self._check_unchanged()
        inputs = inputs.to(self.device)
        targets = targets.to(self.device)

        try:
            if not self._checked and batch >= 2:
                if out is None:  # the probe's buffer, then the sum's (its pages touched once)
                    out = torch.empty(self._num_params, dtype=torch.float32, device=self.device)
                loss_sum, grads_ok = self._first_use(inputs, targets, loss_fn, batch, flat=out)
            else:
                loss_sum, grads_ok, _, _ = self._forward_backward(inputs, targets, loss_fn, batch)
            with torch.no_grad(), ieee_float32(self.device):
                return self._clip_and_sum(batch, loss_sum, grads_ok, float(scale), out)
        except _NonFiniteSamples as exc:
            skipped: _NonFiniteSamples = exc
        finally:
            self._record_frontier = False
            for layer in self._layers:
                layer.calls.clear()
        # A sample whose gradient overflowed (e.g. huge weights) has no finite clip factor;
        # it contributes 0 (norm 0 <= C) instead of turning the whole sum into NaN. Examples
        # do not interact, so the others' gradients are the same without it.
        _log.warning(
            "%d of %d samples had a non-finite gradient: they contribute 0",
            int(skipped.bad.sum()),
            batch,
        )
        keep = ~skipped.bad
        rest = self.clipped_grad_sum(
            inputs=inputs[keep],
            targets=targets[keep],
            loss_fn=loss_fn,
            check_inputs=False,
            scale=scale,
            out=out,
        )
        return ClippedBatch(
            grad_sum=rest.grad_sum,
            batch_size=batch,
            loss_sum=rest.loss_sum,
            mean_norm=rest.mean_norm,
        )

    def check_model(self, *, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> None:
        """Run the first-use checks (:mod:`mpcdp.train.clipping.checks`) on this batch now,
        without computing a gradient, so that later batches are not checked again.

        A site calls this when a training session opens, on a synthetic batch of the
        dataset's shape: the checks then see no private data, and whether they pass says
        nothing about it. ``inputs`` needs at least two examples.

        Raises:
            ParameterError: as :meth:`clipped_grad_sum` (its input checks), a batch of fewer
                than two examples, or a model or loss that the checks refuse.
        """
        if self._closed:
            raise MpcdpError("PerSampleClipper is closed")
        batch = _batch_size(inputs, targets)
        if batch < 2:
            raise ParameterError("inputs", f"batch size {batch}", "must have at least 2 examples")
        self._check_unchanged()
        inputs = inputs.to(self.device)
        targets = targets.to(self.device)
        try:
            flat = torch.empty(self._num_params, dtype=torch.float32, device=self.device)
            self._first_use(inputs, targets, loss_fn, batch, flat=flat)
        finally:
            self._record_frontier = False
            for layer in self._layers:
                layer.calls.clear()

    def _check_unchanged(self) -> None:
        """What may change between calls: BatchNorm modes, parameters frozen later."""
        self._check_modules(for_call=True)
        frozen = [name for name, p in self._params if not p.requires_grad]
        if frozen:
            raise ParameterError(
                "module",
                frozen[0],
                "a parameter was frozen after the PerSampleClipper was built; the trainable "
                "set is fixed at construction: build a new PerSampleClipper",
            )

    # -- the BK steps ----------------------------------------------------------------------

    def _hook(self, layer: Layer, batch: int) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            if layer.kind == "fallback":
                leaves, out_spec = tree_flatten(output)
                idx = [
                    i
                    for i, t in enumerate(leaves)
                    if isinstance(t, torch.Tensor) and t.requires_grad
                ]
                if not idx:
                    return None
                # Each output is handed on as a view of itself, and its gradient is read at
                # the view: what flows in from outside the module only. At the output
                # itself autograd would add the module's own internal paths (an LSTMCell's
                # c feeds its h), and the vjp below would count them twice.
                leaves = list(leaves)
                for i in idx:
                    leaves[i] = leaves[i].view_as(leaves[i])
                detached_args = tuple(
                    a.detach() if isinstance(a, torch.Tensor) else a for a in args
                )
                detached_kwargs = {
                    k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
                }
                layer.calls.append(
                    Call(
                        inputs=detached_args,
                        kwargs=detached_kwargs,
                        edges=[get_gradient_edge(leaves[i]) for i in idx],
                        leaf_index=idx,
                        frontier=self._frontier((args, kwargs)),
                    ).record_versions()
                )
                return tree_unflatten(leaves, out_spec)
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise UnsupportedModuleError(
                    layer.path, f"{module_at(layer.path)} was called without a tensor input"
                )
            if x.dim() == 0 or x.shape[0] != batch or output.shape[0] != batch:
                whole = self._probe_batch
                if whole is not None and x.dim() > 0 and x.shape[0] == whole:
                    raise checks.coincidence(
                        layer,
                        f"a tensor of shape {tuple(x.shape)} for a batch of {batch} as for the "
                        f"whole batch of {whole}",
                    )
                raise batch_error(layer, "its input", tuple(x.shape), batch)
            if layer.kind == "conv2d" and x.dim() != 4:
                raise batch_error(layer, "its input", tuple(x.shape), batch)
            stored = (x.detach(),) if layer.needs_input else ()
            layer.calls.append(
                Call(
                    inputs=stored,
                    kwargs={},
                    edges=[get_gradient_edge(output)],
                    leaf_index=[0],
                    frontier=self._frontier(x),
                ).record_versions()
            )
            return None

        return hook

    def _frontier(self, args: Any) -> list[Node]:
        """The autograd nodes of the tensors in ``args`` (first use only: the graph check)."""
        if not self._record_frontier:
            return []
        leaves, _ = tree_flatten(args)
        return [
            get_gradient_edge(t).node
            for t in leaves
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]

    def _forward_backward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        batch: int,
        *,
        trace: Trace | None = None,
        weights: torch.Tensor | None = None,
        param_grads: bool = False,
        weights_again: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool, torch.Tensor, list[torch.Tensor | None]]:
        """Forward and the output gradients ``G`` of the BK layers. ``trace``: record every
        module's outputs too (first use). ``weights``: differentiate ``sum_j w_j l_j``
        instead of the sum (the first-use probe). ``param_grads``: return autograd's
        gradient with respect to the trainable parameters as well; otherwise that list is
        empty. ``weights_again``: backpropagate the same graph a second time with these
        weights, into each call's ``grads_again``.
        Returns (loss sum, whether G was computed, per-example losses, parameter grads)."""
        tracing = (
            checks.traced(self.module, {layer.path for layer in self._layers}, trace)
            if trace is not None
            else contextlib.nullcontext()
        )
        handles = [
            layer.module.register_forward_hook(self._hook(layer, batch), with_kwargs=True)
            for layer in self._layers
        ]
        try:
            with torch.enable_grad(), tracing:
                output = self.module(inputs)
                losses = loss_fn(output, targets)
                if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch,):
                    shape = (
                        tuple(losses.shape)
                        if isinstance(losses, torch.Tensor)
                        else type(losses).__name__
                    )
                    raise ParameterError(
                        "loss_fn",
                        f"output shape {shape}",
                        f"must return per-sample losses of shape ({batch},), e.g. "
                        "F.cross_entropy(out, y, reduction='none')",
                    )
                loss_sum = losses.sum()
                if self._record_frontier:
                    check_parameter_uses(loss=loss_sum, layers=self._layers)
                target = loss_sum if weights is None else (losses * weights.to(losses.dtype)).sum()
                edges: list[GradientEdge] = []
                slots: list[tuple[Call, int]] = []
                for layer in self._layers:
                    for call in layer.calls:
                        call.grads = [None] * len(call.edges)
                        for k, edge in enumerate(call.edges):
                            edges.append(edge)
                            slots.append((call, k))
                params = [p for _, p in self._params] if param_grads else []
                if not edges or not target.requires_grad:
                    return loss_sum.detach(), False, losses.detach(), [None] * len(params)
                wanted: Any = [*edges, *params]  # torch accepts edges and tensors together
                grads = torch.autograd.grad(
                    target, wanted, allow_unused=True, retain_graph=weights_again is not None
                )
                for (call, k), g in zip(slots, grads[: len(edges)], strict=True):
                    call.grads[k] = g
                if weights_again is not None:
                    again = torch.autograd.grad(
                        (losses * weights_again.to(losses.dtype)).sum(), edges, allow_unused=True
                    )
                    for layer in self._layers:
                        for call in layer.calls:
                            call.grads_again = [None] * len(call.edges)
                    for (call, k), g in zip(slots, again, strict=True):
                        call.grads_again[k] = g
                return loss_sum.detach(), True, losses.detach(), list(grads[len(edges) :])
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _check_inputs_unmodified(layer: Layer, calls: list[Call]) -> None:
        if any(c.inputs_modified() for c in calls):
            raise UnsupportedModuleError(
                layer.path,
                f"the input of {module_at(layer.path)} was modified in place after the "
                "layer read it (e.g. `x += ...` or an inplace activation on its input); "
                "per-sample gradients need the input as the layer saw it",
            )

    def _slot(self, flat: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        offset, n = self._layout[id(p)]
        return flat[offset : offset + n].view(p.shape)

    def _check_out(self, out: object) -> None:
        if not isinstance(out, torch.Tensor):
            raise ParameterError("out", type(out).__name__, "must be a torch.Tensor")
        want = (self._num_params,)
        if out.dtype != torch.float32 or tuple(out.shape) != want or not out.is_contiguous():
            raise ParameterError(
                "out",
                f"{out.dtype} of shape {tuple(out.shape)}",
                f"must be a contiguous float32 tensor of shape {want}",
            )
        if out.device != self.device:
            raise ParameterError("out", str(out.device), f"must be on {self.device}")

    def _write_sums(
        self, flat: torch.Tensor, finishers: list[tuple[Layer, SumFn]], factors: torch.Tensor
    ) -> None:
        """Every layer's sum weighted by ``factors`` into its slots of ``flat``; zeros for
        the parameters of the layers not in ``finishers``."""
        filled: set[int] = set()
        for layer, finish in finishers:
            finish(factors, {name: self._slot(flat, p) for name, p in layer.params.items()})
            filled.update(id(p) for p in layer.params.values())
        for _, p in self._params:
            if id(p) not in filled:  # a layer not called, or whose output missed the loss
                self._slot(flat, p).zero_()

    def _clip_and_sum(
        self,
        batch: int,
        loss_sum: torch.Tensor,
        grads_ok: bool,
        scale: float,
        out: torch.Tensor | None,
    ) -> ClippedBatch:
        dt = self._dtype
        norm2 = torch.zeros(batch, dtype=dt, device=self.device)
        finishers: list[tuple[Layer, SumFn]] = []
        if grads_ok:
            for layer in self._layers:
                calls = [c for c in layer.calls if any(g is not None for g in c.grads)]
                if not calls:
                    continue
                self._check_inputs_unmodified(layer, calls)
                layer_norm2, finish = LAYER_RULES[layer.kind](layer, calls, batch)
                norm2 += layer_norm2.to(dt)
                finishers.append((layer, finish))
        bad = ~torch.isfinite(norm2)  # checked below, with the statistics (one host sync)
        norms = norm2.clamp_min(0.0).sqrt()
        if self.clipping == "flat":
            factors = (self._target / norms).clamp(max=1.0)  # norm 0: inf -> 1
        else:
            factors = self._target / (norms + self.stability)
        scaled = factors * scale if scale != 1.0 else factors

        # the clipped sums are written straight into grad_sum (no concatenation copy)
        if out is None:
            grad_sum = torch.empty(self._num_params, dtype=torch.float32, device=self.device)
        else:
            grad_sum = out
        self._write_sums(grad_sum, finishers, scaled)
        n_bad, loss_value, mean_norm = torch.stack(
            [bad.sum().to(dt), loss_sum.to(dt), norms.mean()]
        ).tolist()
        if n_bad:  # their NaN clip factors spoiled this sum: the caller reruns without them
            raise _NonFiniteSamples(bad)
        return ClippedBatch(
            grad_sum=grad_sum, batch_size=batch, loss_sum=loss_value, mean_norm=mean_norm
        )


def _batch_size(inputs: object, targets: object) -> int:
    """The batch size shared by ``inputs`` and ``targets`` (their dimension 0)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        raise ParameterError(
            "inputs", type(inputs).__name__, "must be a tensor with a batch dimension 0"
        )
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        raise ParameterError(
            "targets", type(targets).__name__, "must be a tensor with a batch dimension 0"
        )
    batch = int(inputs.shape[0])
    if int(targets.shape[0]) != batch:
        raise ParameterError(
            "targets",
            f"batch size {targets.shape[0]}",
            f"must have the batch size of inputs ({batch})",
        )
    return batch


class _NonFiniteSamples(Exception):
    """Raised inside a step when some samples' gradient norms are not finite."""

    def __init__(self, bad: torch.Tensor) -> None:
        super().__init__("non-finite per-sample gradients")
        self.bad = bad
