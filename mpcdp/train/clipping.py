"""Per-sample gradient clipping for DP-SGD by book-keeping: one forward, one backward.

DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy", CCS, Algorithm 1) needs
the sum over a batch of per-sample gradients, each clipped to norm at most ``C``. Computing
every per-sample gradient (Opacus) costs memory ``batch x params``; ghost clipping (Li,
Tramer, Liang, Hashimoto 2022, "Large language models can be strong differentially private
learners", ICLR) avoids that but needs a second backward pass. This module implements
book-keeping (BK) of Bu, Wang, Zha, Karypis 2023, "Differentially private optimization on
large model at small cost" (ICML; the fastDP library), which needs neither:

1. A forward pass with hooks on every trainable layer (a module that directly owns
   parameters with ``requires_grad=True``) records the layer input ``A`` (detached) and the
   autograd edge of its output ``Z``. A layer called several times in one forward (weight
   sharing) keeps every call; for Linear, Conv2d and Embedding the calls are concatenated
   along the "time" axis, since a per-sample gradient is the sum over calls.
2. One call ``torch.autograd.grad(sum of per-sample losses, [Z_1..Z_L])`` returns the output
   gradients ``G``. Autograd only runs the nodes needed to reach the outputs, so the weight
   gradients (the ``G^T A`` matmuls of an ordinary backward) are never computed.
3. Per layer, squared per-sample gradient norms. For Linear (and Conv2d after
   ``F.unfold``, Embedding with indicator inputs) with ``T`` positions per sample, the
   "ghost norm" ``<A A^T, G G^T>`` (Goodfellow 2015, "Efficient per-example gradient
   computations", arXiv:1510.01799, for ``T = 1``; Li et al. 2022 for sequences) costs
   ``B T^2 (p + d)`` while instantiating per-sample gradients ``G_j^T A_j`` costs
   ``B T p d``; the layerwise choice (ghost when ``2 T^2 <= p d``) is the mixed ghost norm of
   Bu, Mao, Xu 2022, "Scalable and efficient training of large convolutional neural networks
   with differential privacy" (NeurIPS). LayerNorm and GroupNorm per-sample
   gradients are small and are instantiated from the normalised input. Any other layer owning
   parameters falls back to ``torch.func`` (``vmap`` of a ``vjp`` of that module alone), which
   materialises ``batch x params`` for that module only and re-runs its forward once.
4. Clip factors from the total norm over all trainable parameters: flat clipping
   ``c_j = min(1, C / (||g_j|| + 1e-6))``, or automatic clipping (Bu, Wang, Zha, Karypis
   2023, "Automatic clipping: differentially private deep learning made easier and
   stronger", NeurIPS) ``c_j = C / (||g_j|| + stability)``, which normalises every
   per-sample gradient to norm below ``C``.
5. The clipped sum per layer directly from ``A``, ``G`` and ``c`` (``sum_j c_j G_j^T A_j``,
   one matmul shaped like the non-private weight gradient; for a Conv2d on the ghost branch,
   the native weight-gradient kernel applied to ``c``-scaled ``G``), or from the per-sample
   gradients where step 3 instantiated them; no second backward.

``bias_only=True`` is DP-BiTFiT (Bu, Wang, Zha, Karypis 2022, "Differentially private
bias-term only fine-tuning of foundation models"): only biases are trained,
and the bias gradients of Linear and Conv2d layers need the output gradients only, so layer
inputs are not even stored. See also Dupuy et al. 2022, "An efficient DP-SGD mechanism for
large scale NLU models" (ICASSP), for the cost of per-sample clipping in practice.

Requirements on the model, which the BK method shares with every per-sample method: the batch
is dimension 0 of every trainable layer's input and output, and examples do not interact in
the forward pass. BatchNorm, which mixes the examples of a batch, is refused, and so is
``nn.MultiheadAttention``, whose forward bypasses its sub-modules (use
:func:`mpcdp.train.layers.replace_multihead_attention`). A parameter that is used outside the
forward of the module that owns it (read as ``module.weight`` by another module) gets a wrong
gradient and cannot be detected; parameters shared between modules are refused. A layer input
modified in place after the layer read it is detected and refused. Fallback modules must be
deterministic and work under ``torch.func.vmap`` with a batch of one; torch's fused RNNs
(``nn.LSTM``, ``nn.GRU``) do not, so such a model is refused when first called, with the
advice to build the recurrence from ``nn.LSTMCell`` / ``nn.GRUCell`` (a cell called at
every step is handled: tensors inside tuple arguments, such as the cell's ``(h, c)``, are
split by example too).

Precision: whatever the model's dtype or autocast, norms and clipped sums are computed in
IEEE float32 (float64 for a float64 model): half-precision layer inputs, output gradients
and per-sample gradients are upcast first (:func:`_work`), so the terms summed are exactly
those whose norms set the clip factors.

Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.grad import conv2d_weight
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from mpcdp.errors import MpcdpError, ParameterError

__all__ = [
    "ClippedBatch",
    "ClippingMode",
    "PerSampleClipper",
    "per_sample_gradients_reference",
]

_log = logging.getLogger(__name__)

ClippingMode = Literal["flat", "automatic"]
_MODES: tuple[str, ...] = ("flat", "automatic")
_FLAT_EPS = 1e-6

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A layer's clipped-sum step: (clip factors (B,), {local parameter name: destination view of
# grad_sum, shaped like the parameter}) -> None; it writes every trainable parameter's sum.
_SumFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], None]


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


@dataclass
class _Call:
    """What the forward hook recorded for one call of a layer."""

    inputs: tuple[Any, ...]
    kwargs: dict[str, Any]
    edges: list[GradientEdge]
    # index into the flattened outputs of each edge (fallback layers), and the G's later
    leaf_index: list[int]
    grads: list[torch.Tensor | None] = field(default_factory=list)
    # version counters of the stored input tensors when recorded (in-place changes detection)
    versions: list[int] = field(default_factory=list)

    def stored_tensors(self) -> list[torch.Tensor]:
        values = [*self.inputs, *self.kwargs.values()]
        return [v for v in values if isinstance(v, torch.Tensor)]

    def record_versions(self) -> _Call:
        self.versions = [t._version for t in self.stored_tensors()]
        return self

    def inputs_modified(self) -> bool:
        return [t._version for t in self.stored_tensors()] != self.versions


@dataclass
class _Layer:
    """A module that owns trainable parameters, with how its gradients are computed."""

    path: str
    module: nn.Module
    kind: str  # "linear", "conv2d", "embedding", "layernorm", "groupnorm", "fallback"
    params: dict[str, nn.Parameter]  # local name -> trainable parameter
    calls: list[_Call] = field(default_factory=list)

    @property
    def needs_input(self) -> bool:
        # Linear/Conv2d bias gradients and norm-layer bias gradients need only G (DP-BiTFiT).
        if self.kind in ("linear", "conv2d", "layernorm", "groupnorm"):
            return "weight" in self.params
        return True


def _where(path: str) -> str:
    return f"module {path!r}" if path else "the root module"


def _check_finite_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(name, value, "must be a finite number > 0")
    if not math.isfinite(value) or value <= 0:
        raise ParameterError(name, value, "must be a finite number > 0")
    return float(value)


def _uses_batch_statistics(bn: _BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


def _same_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def _classify(path: str, module: nn.Module, own: dict[str, nn.Parameter]) -> str:
    names = set(own)
    if _same_forward(module, nn.Linear) and names <= {"weight", "bias"}:
        return "linear"
    if (
        _same_forward(module, nn.Conv2d)
        and names <= {"weight", "bias"}
        and isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
    ):
        return "conv2d"
    if _same_forward(module, nn.Embedding) and names == {"weight"}:
        assert isinstance(module, nn.Embedding)
        if module.max_norm is not None:
            raise ParameterError(
                "module",
                path,
                f"{_where(path)} is nn.Embedding with max_norm={module.max_norm}: it "
                "renormalises its weight in place during the forward, which per-sample "
                "clipping does not support; use max_norm=None",
            )
        if module.scale_grad_by_freq:
            raise ParameterError(
                "module",
                path,
                f"{_where(path)} is nn.Embedding with scale_grad_by_freq=True: it scales "
                "gradients by token counts over the whole batch, which mixes examples; "
                "use scale_grad_by_freq=False",
            )
        return "embedding"
    if _same_forward(module, nn.LayerNorm) and names <= {"weight", "bias"}:
        return "layernorm"
    if _same_forward(module, nn.GroupNorm) and names <= {"weight", "bias"}:
        return "groupnorm"
    return "fallback"


def _trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class PerSampleClipper:
    """Sum of clipped per-sample gradients of a module by book-keeping (BK).

    One forward and one backward per batch, no per-sample loop and no second backward;
    see the module docstring for the method and its requirements on the model.

    Args:
        module: the model. Its trainable parameters (``requires_grad=True``) are the ones
            clipped and summed; with ``bias_only=True`` the constructor first sets
            ``requires_grad=False`` on every parameter whose name does not end in ``"bias"``
            (this modifies ``module``).
        max_grad_norm: the clipping norm ``C`` (finite, > 0).
        clipping: ``"flat"`` (``min(1, C / (||g|| + 1e-6))``) or ``"automatic"``
            (``C / (||g|| + stability)``).
        stability: the stability constant of automatic clipping (finite, > 0).
        bias_only: DP-BiTFiT, train biases only.

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
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ParameterError("module", type(module).__name__, "must be a torch.nn.Module")
        self.max_grad_norm = _check_finite_positive("max_grad_norm", max_grad_norm)
        if clipping not in _MODES:
            raise ParameterError("clipping", clipping, f"must be one of {list(_MODES)}")
        self.clipping: ClippingMode = clipping
        self.stability = _check_finite_positive("stability", stability)
        self.bias_only = bool(bias_only)
        self.module = module
        self._closed = False

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
                    raise ParameterError(
                        "module",
                        path,
                        f"{_where(path)} is {type(m).__name__} and {why}: it mixes examples "
                        "in a batch, so per-sample gradients are undefined; use GroupNorm or "
                        "LayerNorm (or a frozen BatchNorm in eval mode)",
                    )
            if not for_call and isinstance(m, nn.MultiheadAttention):
                if any(p.requires_grad for p in m.parameters()):
                    raise ParameterError(
                        "module",
                        path,
                        f"{_where(path)} is nn.MultiheadAttention, whose forward uses its "
                        "weights directly so per-sample gradients cannot be tracked; convert "
                        "the model with mpcdp.train.layers.replace_multihead_attention(model) "
                        "first",
                    )

    def _build_layers(self) -> list[_Layer]:
        layers: list[_Layer] = []
        owner: dict[int, str] = {}
        for path, m in self.module.named_modules():
            own = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            for n, p in own.items():
                full = f"{path}.{n}" if path else n
                if id(p) in owner:
                    raise ParameterError(
                        "module",
                        path,
                        f"parameter {full!r} is the same tensor as {owner[id(p)]!r} (weight "
                        "tying); shared parameters are not supported by per-sample clipping",
                    )
                owner[id(p)] = full
            kind = _classify(path, m, own)
            if kind == "fallback":
                _log.info(
                    "%s (%s) is not a layer with a closed-form rule: its per-sample gradients "
                    "are materialised with torch.func (batch x %d values)",
                    _where(path),
                    type(m).__name__,
                    sum(p.numel() for p in own.values()),
                )
            layers.append(_Layer(path=path, module=m, kind=kind, params=own))
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
        if check and not _all_finite(flat):
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
        which on a CPU costs more than the pass that fills it (fresh pages).

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
            and not _all_finite(inputs)
        ):
            bad = int((~torch.isfinite(inputs)).sum())
            raise ParameterError(
                "inputs",
                f"{bad} non-finite of {inputs.numel()} values",
                "inputs must be finite (NaN or inf found)",
            )
        self._check_modules(for_call=True)
        frozen = [name for name, p in self._params if not p.requires_grad]
        if frozen:
            raise ParameterError(
                "module",
                frozen[0],
                "a parameter was frozen after the PerSampleClipper was built; the trainable "
                "set is fixed at construction: build a new PerSampleClipper",
            )
        inputs = inputs.to(self.device)
        targets = targets.to(self.device)

        try:
            loss_sum, grads_ok = self._forward_backward(inputs, targets, loss_fn, batch)
            with torch.no_grad(), _ieee_float32(self.device):
                return self._clip_and_sum(batch, loss_sum, grads_ok, float(scale), out)
        except _NonFiniteSamples as exc:
            skipped: _NonFiniteSamples = exc
        finally:
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

    # -- the BK steps ----------------------------------------------------------------------

    def _hook(self, layer: _Layer, batch: int) -> Callable[..., None]:
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
                    _Call(
                        inputs=detached_args,
                        kwargs=detached_kwargs,
                        edges=[get_gradient_edge(leaves[i]) for i in idx],
                        leaf_index=idx,
                    ).record_versions()
                )
                return tree_unflatten(leaves, out_spec)
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise ParameterError(
                    "module", layer.path, f"{_where(layer.path)} was called without a tensor input"
                )
            if x.dim() == 0 or x.shape[0] != batch or output.shape[0] != batch:
                raise self._batch_error(layer, "its input", tuple(x.shape), batch)
            if layer.kind == "conv2d" and x.dim() != 4:
                raise self._batch_error(layer, "its input", tuple(x.shape), batch)
            stored = (x.detach(),) if layer.needs_input else ()
            layer.calls.append(
                _Call(
                    inputs=stored, kwargs={}, edges=[get_gradient_edge(output)], leaf_index=[0]
                ).record_versions()
            )
            return None

        return hook

    @staticmethod
    def _batch_error(layer: _Layer, what: str, shape: tuple[int, ...], batch: int) -> Exception:
        return ParameterError(
            "module",
            layer.path,
            f"{_where(layer.path)} ({type(layer.module).__name__}) was called with {what} "
            f"of shape {shape}, whose dimension 0 is not the batch size {batch}: per-sample "
            "clipping needs batch-first layers",
        )

    def _forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, batch: int
    ) -> tuple[torch.Tensor, bool]:
        handles = [
            layer.module.register_forward_hook(self._hook(layer, batch), with_kwargs=True)
            for layer in self._layers
        ]
        try:
            with torch.enable_grad():
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
                edges: list[GradientEdge] = []
                slots: list[tuple[_Call, int]] = []
                for layer in self._layers:
                    for call in layer.calls:
                        call.grads = [None] * len(call.edges)
                        for k, edge in enumerate(call.edges):
                            edges.append(edge)
                            slots.append((call, k))
                if not edges or not loss_sum.requires_grad:
                    return loss_sum.detach(), False
                grads = torch.autograd.grad(loss_sum, edges, allow_unused=True)
                for (call, k), g in zip(slots, grads, strict=True):
                    call.grads[k] = g
                return loss_sum.detach(), True
        finally:
            for h in handles:
                h.remove()

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
        finishers: list[tuple[_Layer, _SumFn]] = []
        if grads_ok:
            for layer in self._layers:
                calls = [c for c in layer.calls if any(g is not None for g in c.grads)]
                if not calls:
                    continue
                if any(c.inputs_modified() for c in calls):
                    raise ParameterError(
                        "module",
                        layer.path,
                        f"the input of {_where(layer.path)} was modified in place after the "
                        "layer read it (e.g. `x += ...` or an inplace activation on its input); "
                        "per-sample gradients need the input as the layer saw it",
                    )
                layer_norm2, finish = _LAYER_RULES[layer.kind](layer, calls, batch)
                norm2 += layer_norm2.to(dt)
                finishers.append((layer, finish))
        bad = ~torch.isfinite(norm2)  # checked below, with the statistics (one host sync)
        norms = norm2.clamp_min(0.0).sqrt()
        if self.clipping == "flat":
            factors = (self.max_grad_norm / (norms + _FLAT_EPS)).clamp(max=1.0)
        else:
            factors = self.max_grad_norm / (norms + self.stability)
        scaled = factors * scale if scale != 1.0 else factors

        # the clipped sums are written straight into grad_sum (no concatenation copy)
        if out is None:
            grad_sum = torch.empty(self._num_params, dtype=torch.float32, device=self.device)
        else:
            grad_sum = out
        filled: set[int] = set()
        for layer, finish in finishers:
            dests = {name: self._slot(grad_sum, p) for name, p in layer.params.items()}
            finish(scaled, dests)
            filled.update(id(p) for p in layer.params.values())
        for _, p in self._params:
            if id(p) not in filled:  # a layer not called, or whose output missed the loss
                self._slot(grad_sum, p).zero_()
        n_bad, loss_value, mean_norm = torch.stack(
            [bad.sum().to(dt), loss_sum.to(dt), norms.mean()]
        ).tolist()
        if n_bad:  # their NaN clip factors spoiled this sum: the caller reruns without them
            raise _NonFiniteSamples(bad)
        return ClippedBatch(
            grad_sum=grad_sum, batch_size=batch, loss_sum=loss_value, mean_norm=mean_norm
        )


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: min and max in one reduction (NaN propagates to both), one
    host sync. ``torch.isfinite(t).all()`` allocates a mask of t's size and, on a CPU, takes
    ~20x longer on a 10^7-vector."""
    if t.numel() == 0:
        return True
    if t.is_complex():
        return _all_finite(torch.view_as_real(t))
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


class _NonFiniteSamples(Exception):
    """Raised inside a step when some samples' gradient norms are not finite."""

    def __init__(self, bad: torch.Tensor) -> None:
        super().__init__("non-finite per-sample gradients")
        self.bad = bad


#: One process-wide guard (module docstring of :func:`_ieee_float32`): how many clipping
#: steps are inside it, and the settings it found when the first one entered.
_GUARD_LOCK = threading.Lock()
_guard_users = 0
_guard_saved: dict[tuple[int, str], tuple[Any, str, Any]] = {}


def _precision_switches(device: torch.device) -> list[tuple[Any, str, Any]]:
    """(object, attribute, IEEE value) for every switch that lets float32 matmuls or
    convolutions run at reduced precision on ``device``'s backends.

    torch's ``fp32_precision`` API is used where it exists (mixing it with the legacy
    ``allow_tf32`` flags raises in recent torch); the legacy flags otherwise.
    ``torch.set_float32_matmul_precision("high")`` sets the former to "tf32" (oneDNN on the
    CPU, cuBLAS on CUDA)."""
    switches: list[tuple[Any, str, Any]] = []
    mkldnn = getattr(torch.backends, "mkldnn", None)
    for backend in (getattr(mkldnn, "matmul", None), getattr(mkldnn, "conv", None)):
        if backend is not None and hasattr(backend, "fp32_precision"):
            switches.append((backend, "fp32_precision", "ieee"))
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):
            switches.append((matmul, "fp32_precision", "ieee"))
        else:  # pragma: no cover - torch before the fp32_precision API
            switches.append((matmul, "allow_tf32", False))
        cudnn = torch.backends.cudnn
        for backend in (getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None)):
            if backend is not None and hasattr(backend, "fp32_precision"):
                switches.append((backend, "fp32_precision", "ieee"))
        if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # pragma: no cover
            switches.append((cudnn, "allow_tf32", False))
    return switches


@contextlib.contextmanager
def _ieee_float32(device: torch.device) -> Iterator[None]:
    """Clip factors and clipped sums in IEEE float32: autocast off, and TF32 / bf16 off for
    float32 matmuls and convolutions (oneDNN, cuBLAS, cuDNN) while a step is inside.

    The ghost-norm error bound (:func:`_ghost_slack`) assumes float32 arithmetic, and a
    Conv2d's clipped sum (cuDNN's weight-gradient kernel, TF32 by default on Ampere and
    later) must be computed at the precision of the norm that scaled it: with 10-bit
    mantissas a crafted sample contributes far more than C.

    The precision switches are process-wide, and a party runs several sessions at once, so
    the guard is process-wide and reference-counted: the first step in saves every switch
    and sets it to IEEE, the last one out restores exactly what it found (the user's own
    ``set_float32_matmul_precision`` included). While any step is inside, float32 matmuls
    elsewhere in the process run at IEEE precision too: slower, never less accurate.
    """
    global _guard_users
    with _GUARD_LOCK:
        for obj, attr, ieee in _precision_switches(device):
            # saved the first time any step in touches it (a CUDA step may join CPU ones)
            _guard_saved.setdefault((id(obj), attr), (obj, attr, getattr(obj, attr)))
            setattr(obj, attr, ieee)
        _guard_users += 1
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        with _GUARD_LOCK:
            _guard_users -= 1
            if _guard_users == 0:
                for obj, attr, value in _guard_saved.values():
                    setattr(obj, attr, value)
                _guard_saved.clear()


# -- per-layer rules: (layer, calls, batch) -> (squared norms (B,), clipped-sum step) ---------


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision norms and sums are computed in: at least IEEE float32.

    A bf16/fp16 model, or autocast in or around its forward, leaves layer inputs and output
    gradients in half precision; norms and clipped sums computed there would round the
    batch sum by ~2^-9 of its size (several C for a batch of aligned gradients), far more
    than one example's bound. Upcast, every per-sample term is exactly the product of the
    values the norm was taken of, and the sum rounds at float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _grad(call: _Call) -> torch.Tensor:
    g = call.grads[0]
    assert g is not None  # calls whose output missed the loss are filtered out
    return _work(g)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared norm of each x[j] (one reduction pass, no squared copy of x), >= float32."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    norms: torch.Tensor = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=acc)
    return norms.square()


def _mm_into(x: torch.Tensor, y: torch.Tensor, dest: torch.Tensor) -> None:
    """dest = x @ y, computed in place when dest has x's dtype (dest is a contiguous view)."""
    if dest.dtype == x.dtype:
        torch.mm(x, y, out=dest)
    else:
        dest.copy_(torch.mm(x, y))


def _cat1(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat that does not copy a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _matmul_rule(
    a: torch.Tensor | None,
    g: torch.Tensor,
    has_weight: bool,
    has_bias: bool,
    ghost_weight_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, _SumFn]:
    """Linear-type layer with A (B, T, d) and G (B, T, p): weight grad sum_t g_t a_t^T.

    ``ghost_weight_sum(c)``, if given, computes the clipped weight sum in the ghost branch
    without ``A`` (Conv2d: the native weight-gradient kernel on c-scaled G), so ``A`` is
    freed after the norms.
    """
    batch, t, p = g.shape
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    norm2 = torch.zeros(batch, dtype=acc, device=g.device)
    # weight_fn(c, dest): write the clipped weight sum into dest, viewed as (p, d)
    weight_fn: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    gb: torch.Tensor | None = None
    if has_weight:
        assert a is not None
        a = a.to(g.dtype)
        d = a.shape[2]
        if t == 1:
            # ||g a^T||_F^2 = ||a||^2 ||g||^2 (Goodfellow 2015)
            a1, g1 = a[:, 0], g[:, 0]
            norm2 += _sq_norms(a1) * _sq_norms(g1)

            def weight_fn(c: torch.Tensor, dest: torch.Tensor) -> None:
                # scale the narrower factor by c: one small multiply, then one matmul
                if p <= d:
                    _mm_into((g1 * c[:, None]).t(), a1, dest)
                else:
                    _mm_into(g1.t(), a1 * c[:, None], dest)

        elif _use_ghost(t, p, d):
            # ghost norm <A A^T, G G^T>, never forming the (B, p, d) per-sample gradients;
            # plus its rounding-error bound, so that cancellation cannot hide a large norm
            aa = torch.bmm(a, a.transpose(1, 2))
            gg = torch.bmm(g, g.transpose(1, 2))
            ghost = (aa * gg).reshape(batch, -1).sum(dim=1, dtype=torch.float64)
            u = (torch.linalg.vector_norm(a, dim=2) * torch.linalg.vector_norm(g, dim=2)).sum(1)
            slack = _ghost_slack(dot_lengths=(d, p), terms=t * t, dtype=g.dtype)
            norm2 += (ghost.clamp_min(0) + slack * u.to(torch.float64).square()).to(acc)
            if ghost_weight_sum is not None:
                ghost_sum = ghost_weight_sum

                def weight_fn(c: torch.Tensor, dest: torch.Tensor) -> None:
                    dest.copy_(ghost_sum(c).reshape(dest.shape))

            else:
                a_flat = a.reshape(batch * t, d)

                def weight_fn(c: torch.Tensor, dest: torch.Tensor) -> None:
                    _mm_into((g * c[:, None, None]).reshape(batch * t, p).t(), a_flat, dest)

        else:
            per_sample = torch.bmm(g.transpose(1, 2), a)  # (B, p, d)
            norm2 += _sq_norms(per_sample)

            def weight_fn(c: torch.Tensor, dest: torch.Tensor) -> None:
                _mm_into(c[None], per_sample.reshape(batch, p * d), dest.view(1, p * d))

    if has_bias:
        gb = g[:, 0] if t == 1 else g.sum(dim=1)  # (B, p)
        norm2 += _sq_norms(gb)

    def finish(c: torch.Tensor, dests: dict[str, torch.Tensor]) -> None:
        c = c.to(g.dtype)
        if weight_fn is not None:
            dest = dests["weight"]
            weight_fn(c, dest.view(dest.shape[0], -1))
        if gb is not None:
            _mm_into(c[None], gb, dests["bias"].view(1, -1))

    return norm2, finish


def _ghost_slack(*, dot_lengths: tuple[int, ...], terms: int, dtype: torch.dtype) -> float:
    """Bound on the floating-point error of a ghost norm, relative to ``u_j^2``.

    The ghost norm sum_{t,t'} <a_t, a_t'> <g_t, g_t'> is computed from dot products of the
    given lengths in ``dtype`` and a sum of ``terms`` products in float64. A dot product of
    length n in any summation order is within gamma_n = n u / (1 - n u) of its value
    relative to the sum of its absolute terms (Higham 2002, "Accuracy and stability of
    numerical algorithms", Sec. 3.1), and sum_{t,t'} |a_t||a_t'||g_t||g_t'| = u_j^2 with
    u_j = sum_t |a_t| |g_t| >= ||sum_t g_t a_t^T||. So the true squared norm is at most the
    computed one plus this factor times u_j^2 (each gamma_n is taken as n * eps, twice the
    bound, to cover the products and the float64 terms). Without it, cancellation in a
    sequence layer can make a per-sample norm of several hundred come out as ~0, i.e. not
    clipped at all. For T = 1 the branch above has no cancellation (a product of sums of
    squares).
    """
    eps = torch.finfo(dtype).eps
    return float(
        sum(n + 2 for n in dot_lengths) * eps + (terms + 2) * torch.finfo(torch.float64).eps
    )


def _use_ghost(t: int, p: int, d: int) -> bool:
    """Ghost norm (cost B T^2 (p + d)) rather than instantiation (B T p d) iff 2 T^2 <= p d."""
    return 2 * t * t <= p * d


def _linear_rule(layer: _Layer, calls: list[_Call], batch: int) -> tuple[torch.Tensor, _SumFn]:
    m = layer.module
    assert isinstance(m, nn.Linear)
    p, d = m.out_features, m.in_features
    has_w, has_b = "weight" in layer.params, "bias" in layer.params
    g = _cat1([_grad(c).reshape(batch, -1, p) for c in calls], dim=1)
    a = _cat1([c.inputs[0].reshape(batch, -1, d) for c in calls], dim=1) if has_w else None
    return _matmul_rule(a, g, has_w, has_b)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int, int, int] | tuple[int, int]:
    """Explicit padding of a Conv2d: (left, right, top, bottom) for 'same', else (ph, pw)."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads: list[int] = []
        for k, dil in zip(reversed(m.kernel_size), reversed(m.dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = m.padding
    return (int(ph), int(pw))


def _padded(m: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input with any asymmetric ('same') padding applied, and the remaining padding."""
    pad = _conv_padding(m)
    if len(pad) == 4:
        return F.pad(x, pad), (0, 0)
    return x, (pad[0], pad[1])


def _unfold(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches (B, T, C kh kw) of a Conv2d, in the order of weight.reshape(p, -1)."""
    x, pad = _padded(m, x)
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
    return cols.transpose(1, 2)


def _conv2d_rule(layer: _Layer, calls: list[_Call], batch: int) -> tuple[torch.Tensor, _SumFn]:
    m = layer.module
    assert isinstance(m, nn.Conv2d)
    p = m.out_channels
    has_w, has_b = "weight" in layer.params, "bias" in layer.params
    g = _cat1([_grad(c).reshape(batch, p, -1).transpose(1, 2) for c in calls], dim=1)
    a = _cat1([_unfold(m, c.inputs[0]) for c in calls], dim=1) if has_w else None
    weight_shape = tuple(m.weight.shape)

    def ghost_weight_sum(c: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for call in calls:
            x, pad = _padded(m, _work(call.inputs[0]).to(c.dtype))
            gc = _grad(call).to(c.dtype) * c[:, None, None, None]
            w = conv2d_weight(  # type: ignore[no-untyped-call]
                x, weight_shape, gc, stride=m.stride, padding=pad, dilation=m.dilation
            )
            total = w if total is None else total + w
        assert total is not None
        return total

    return _matmul_rule(a, g, has_w, has_b, ghost_weight_sum)


def _embedding_rule(layer: _Layer, calls: list[_Call], batch: int) -> tuple[torch.Tensor, _SumFn]:
    m = layer.module
    assert isinstance(m, nn.Embedding)
    vocab, dim = m.num_embeddings, m.embedding_dim
    idx = _cat1([c.inputs[0].reshape(batch, -1) for c in calls], dim=1)  # (B, T)
    g = _cat1([_grad(c).reshape(batch, -1, dim) for c in calls], dim=1)  # (B, T, E)
    if m.padding_idx is not None:
        g = g.masked_fill((idx == m.padding_idx).unsqueeze(-1), 0.0)
    t = idx.shape[1]
    if _use_ghost(t, dim, vocab):
        # ghost norm: sum_{t,t'} [idx_t == idx_t'] <g_t, g_t'>
        gg = torch.bmm(g, g.transpose(1, 2))
        same = idx.unsqueeze(2) == idx.unsqueeze(1)
        ghost = (gg * same).sum(dim=(1, 2), dtype=torch.float64)
        u = torch.linalg.vector_norm(g, dim=2).sum(1).to(torch.float64)  # one-hot inputs
        slack = _ghost_slack(dot_lengths=(dim,), terms=t * t, dtype=g.dtype)
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        norm2 = (ghost.clamp_min(0) + slack * u.square()).to(acc)
        flat_idx = idx.reshape(-1)

        def finish(c: torch.Tensor, dests: dict[str, torch.Tensor]) -> None:
            rows = (g * c.to(g.dtype)[:, None, None]).reshape(-1, dim)
            dest = dests["weight"]
            if dest.dtype == rows.dtype:
                dest.zero_().index_add_(0, flat_idx, rows)
            else:
                out = torch.zeros(vocab, dim, dtype=g.dtype, device=g.device)
                dest.copy_(out.index_add_(0, flat_idx, rows))

        return norm2, finish
    per_sample = torch.zeros(batch, vocab, dim, dtype=g.dtype, device=g.device)
    per_sample.scatter_add_(1, idx.unsqueeze(-1).expand(batch, t, dim), g)
    return _instantiated({"weight": per_sample})


def _instantiated(per_sample: dict[str, torch.Tensor]) -> tuple[torch.Tensor, _SumFn]:
    """Norms and clipped sum from per-sample gradients {name: (B, *shape)}."""
    per_sample = {n: _work(v) for n, v in per_sample.items()}
    norm2: torch.Tensor | None = None
    for v in per_sample.values():
        n2 = _sq_norms(v)
        norm2 = n2 if norm2 is None else norm2 + n2
    assert norm2 is not None

    def finish(c: torch.Tensor, dests: dict[str, torch.Tensor]) -> None:
        for n, v in per_sample.items():
            _mm_into(c.to(v.dtype)[None], v.reshape(v.shape[0], -1), dests[n].view(1, -1))

    return norm2, finish


def _add(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    acc[name] = value if name not in acc else acc[name] + value


def _norm_rule(layer: _Layer, calls: list[_Call], batch: int) -> tuple[torch.Tensor, _SumFn]:
    """LayerNorm / GroupNorm: per-sample (B, C) gradients from G and the normalised input."""
    m = layer.module
    acc: dict[str, torch.Tensor] = {}
    for call in calls:
        g = _grad(call)
        if isinstance(m, nn.LayerNorm):
            n_norm = len(m.normalized_shape)
            dims = tuple(range(1, g.dim() - n_norm))
        else:
            assert isinstance(m, nn.GroupNorm)
            dims = tuple(range(2, g.dim()))
        if "weight" in layer.params:
            x = _work(call.inputs[0])
            if isinstance(m, nn.LayerNorm):
                xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            else:
                assert isinstance(m, nn.GroupNorm)
                xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
            gx = g * xhat.to(g.dtype)
            _add(acc, "weight", gx.sum(dim=dims) if dims else gx)
        if "bias" in layer.params:
            _add(acc, "bias", g.sum(dim=dims) if dims else g)
    return _instantiated(acc)


def _fallback_rule(layer: _Layer, calls: list[_Call], batch: int) -> tuple[torch.Tensor, _SumFn]:
    """Per-sample gradients of the module's own parameters with torch.func (vmap of vjp)."""
    module = layer.module
    params = {n: p.detach() for n, p in layer.params.items()}
    acc: dict[str, torch.Tensor] = {}
    for call in calls:
        # outputs that reach the loss (an unused output, e.g. an LSTM's h_n, is dropped)
        used = [k for k, g in enumerate(call.grads) if g is not None]
        leaf_index = [call.leaf_index[k] for k in used]
        cotangents = tuple(g for g in call.grads if g is not None)
        for g in cotangents:
            if g.dim() == 0 or g.shape[0] != batch:
                raise PerSampleClipper._batch_error(layer, "an output", tuple(g.shape), batch)
        # batched tensors: the tensors, anywhere in the positional and keyword arguments
        # (an LSTMCell's (h, c) tuple included), whose dimension 0 is the batch
        values, arg_spec = tree_flatten((call.inputs, call.kwargs))
        batched = [
            i
            for i, v in enumerate(values)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch
        ]

        def per_sample(
            batched_values: tuple[torch.Tensor, ...],
            cots: tuple[torch.Tensor, ...],
            values: list[Any] = values,
            batched: list[int] = batched,
            arg_spec: Any = arg_spec,
            leaf_index: list[int] = leaf_index,
        ) -> dict[str, torch.Tensor]:
            full = list(values)
            for i, v in zip(batched, batched_values, strict=True):
                full[i] = v.unsqueeze(0)  # the module sees a batch of one
            args, kwargs = tree_unflatten(full, arg_spec)

            def f(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
                out = torch.func.functional_call(module, p, args, kwargs)
                leaves, _ = tree_flatten(out)
                return tuple(leaves[i] for i in leaf_index)

            vjp_fn = torch.func.vjp(f, params)[1]
            (grads,) = vjp_fn(tuple(c.unsqueeze(0) for c in cots))
            result: dict[str, torch.Tensor] = grads
            return result

        batched_values = tuple(values[i] for i in batched)
        try:
            per = torch.func.vmap(per_sample)(batched_values, cotangents)
        except RuntimeError as exc:
            if isinstance(module, nn.RNNBase):
                cell = {"LSTM": "nn.LSTMCell", "GRU": "nn.GRUCell"}.get(
                    type(module).__name__, "nn.RNNCell"
                )
                raise ParameterError(
                    "module",
                    layer.path,
                    f"{_where(layer.path)} ({type(module).__name__}) runs torch's fused "
                    "recurrent kernel, which per-sample clipping cannot split by example; "
                    f"build the recurrence from {cell} called at every step (a cell called "
                    "in a loop is handled)",
                ) from exc
            raise ParameterError(
                "module",
                layer.path,
                f"{_where(layer.path)} ({type(module).__name__}) has no closed-form per-sample "
                "rule and its torch.func fallback (vmap over the batch of a vjp of the "
                f"module alone) failed; it must be batch-first and deterministic: {exc}",
            ) from exc
        for n, v in per.items():
            _add(acc, n, v)
    return _instantiated(acc)


_LAYER_RULES: dict[str, Callable[[_Layer, list[_Call], int], tuple[torch.Tensor, _SumFn]]] = {
    "linear": _linear_rule,
    "conv2d": _conv2d_rule,
    "embedding": _embedding_rule,
    "layernorm": _norm_rule,
    "groupnorm": _norm_rule,
    "fallback": _fallback_rule,
}


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
