"""The first-use probe of :class:`.clipper.PerSampleClipper`: the whole batch as the reference
and random parts of it run again, every comparison of :mod:`.checks` between them.

Implemented as a mixin of the clipper, whose book-keeping forward and backward
(:meth:`_forward_backward`) and per-layer rules the probe reuses, so that what is probed is
exactly what a step computes. Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpcdp.errors import ParameterError, UnsupportedModuleError
from mpcdp.train.clipping import autograd_check, checks
from mpcdp.train.clipping.checks import StateSnapshot, Trace
from mpcdp.train.clipping.precision import cat1, finite_rows, ieee_float32, upcast
from mpcdp.train.clipping.rules import LAYER_RULES, Call, Layer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FirstUseProbe:
    """The probe's half of :class:`.clipper.PerSampleClipper` (a mixin): the attributes and
    methods below are the clipper's."""

    module: nn.Module
    device: torch.device
    _layers: list[Layer]
    _params: list[tuple[str, nn.Parameter]]
    _num_params: int
    _dtype: torch.dtype
    _probe_gen: torch.Generator
    _probe_batch: int | None
    _record_frontier: bool
    _checked: bool

    if TYPE_CHECKING:

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
        ) -> tuple[torch.Tensor, bool, torch.Tensor, list[torch.Tensor | None]]: ...

        def _slot(self, flat: torch.Tensor, p: nn.Parameter) -> torch.Tensor: ...

        @staticmethod
        def _check_inputs_unmodified(layer: Layer, calls: list[Call]) -> None: ...

    def _first_use(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        batch: int,
        *,
        flat: torch.Tensor,
    ) -> tuple[torch.Tensor, bool]:
        """The step's forward and backward on the whole batch, which is also the probe's
        reference, then the probe (:mod:`.checks`). Returns what :meth:`_forward_backward`
        does for the whole batch (loss sum, whether output gradients were computed), with
        its layers' calls in place for the clipped sum. ``flat``: a contiguous float32 vector
        of :attr:`num_params` values that the probe overwrites (the step's ``grad_sum``
        afterwards): it holds the snapshot of the float32 parameters and then the single
        example's per-layer sums of the layers other than linear ones (a linear layer's sum
        is compared in factored form), so that the probe allocates nothing of the model's size
        but autograd's gradient of that example (on a CPU a fresh model-sized buffer costs
        more in page faults than the pass that fills it).

        Cost, in passes over the batch: the step's forward and backward, one more backward
        of the same graph (other weights), the parts' forwards (the batch once more, as five
        batches), and one backward of a part of one example: about two steps where a step's
        cost grows with the batch. Over the model's parameters: one copy (the snapshot), two
        comparisons with it, and for the single example its gradient (written by autograd),
        one or two reads of it for the comparison and, for layers other than linear ones,
        the per-layer sums."""
        gen = self._probe_gen
        perm = torch.randperm(batch, generator=gen)
        sizes = checks.part_sizes(batch, gen)
        # the parts' inputs are taken before any forward: a model that modifies its input in
        # place changes the caller's batch, not the parts
        parts = []
        for idx in torch.split(perm, sizes):
            rows = idx.to(self.device)
            parts.append((rows, inputs[rows], targets[rows]))
        # several examples first, so that an interaction is reported as such; the part of
        # one example that is also backpropagated (checks.part_sizes) last
        single = parts.pop(0)
        parts.sort(key=lambda part: -int(part[0].shape[0]))
        parts.append(single)
        pristine = inputs.clone()
        # powers of two (1 to 8, not all equal): scaling by one commutes with every rounding,
        # so an honest backward of the same graph gives exactly w_j times its row
        again = torch.exp2(torch.randint(0, 4, (batch,), generator=gen).to(torch.float64))
        again[int(perm[0])] = 2.0 * again[int(perm[1])] if again[int(perm[1])] < 8 else 1.0
        again = again.to(self.device)
        single_weight = torch.exp2(torch.randint(0, 4, (1,), generator=gen).double())
        single_weight = single_weight.to(self.device)
        # gradients computed under autocast are rounded to half precision on their way even
        # where the tensors they reach are float32
        autocast = torch.is_autocast_enabled(self.device.type)
        if _shares_memory(flat, self.module):  # an ``out`` in the model's own memory
            flat = torch.empty_like(flat)
        state = StateSnapshot(
            self.module,
            slots={n: self._slot(flat, p) for n, p in self._params if p.dtype == torch.float32},
        )
        reference = Trace()
        scratch = checks.Scratch()
        with checks.neutral_dropout(self.module):
            self._record_frontier = True
            try:
                loss_sum, grads_ok, losses, _ = self._forward_backward(
                    inputs, targets, loss_fn, batch, trace=reference, weights_again=again
                )
            finally:
                self._record_frontier = False
            state.check(self.module)
            for layer in self._layers:
                self._check_inputs_unmodified(layer, layer.calls)
            full_grads = checks.output_grads(self._layers)
            full_again = checks.output_grads(self._layers, again=True)
            for layer in self._layers:
                for call in layer.calls:
                    call.grads_again = []
            # an example whose loss or output gradients are not finite contributes 0 to the
            # step (the sum is rerun without it): the probe leaves it out
            finite = torch.isfinite(losses)
            for per_call in full_grads.values():
                for grads in per_call:
                    for g in grads:
                        if g is not None and g.dim() > 0 and g.shape[0] == batch:
                            finite &= finite_rows(g)
            half = (
                autocast
                or any(
                    g is not None and g.dtype in (torch.float16, torch.bfloat16)
                    for per_call in full_grads.values()
                    for grads in per_call
                    for g in grads
                )
                or any(p.dtype in (torch.float16, torch.bfloat16) for _, p in self._params)
            )
            rtol = checks.rtol_for(torch.bfloat16 if half else torch.float32)
            # the whole batch's calls wait while the parts run, then make the step's sum
            saved = [layer.calls for layer in self._layers]
            for layer in self._layers:
                layer.calls = []
            self._probe_batch = batch
            by_path = {layer.path: layer for layer in self._layers}
            autograd: list[torch.Tensor | None] | None = None
            try:
                # 1. the forward and the losses, every part against the whole batch; the
                # single example's part also backpropagated (its calls stay for 3.)
                for part in parts:
                    rows, x, y = part
                    keep = finite[rows]
                    if not bool(keep.all()):
                        rows, x, y = rows[keep], x[keep], y[keep]
                    if rows.numel() == 0:
                        continue
                    result = self._probe_forward(
                        rows=rows,
                        inputs=x.clone(),  # a model may change its input in place
                        targets=y,
                        loss_fn=loss_fn,
                        batch=batch,
                        reference=reference,
                        losses=losses,
                        state=state,
                        pristine=pristine,
                        layers=by_path,
                        scratch=scratch,
                        weights=single_weight if part is single else None,
                    )
                    if part is single:
                        autograd = result
                # 2. the backward: linear in the examples' losses, exactly
                ones = torch.ones(batch, dtype=torch.float64, device=self.device)
                rows_all = torch.arange(batch, device=self.device)[finite]
                try:
                    checks.compare_reweighted(
                        _select(full_grads, finite),
                        _select(full_again, finite),
                        ones[finite],
                        again[finite],
                        rows=rows_all,
                        rtol=checks.EXACT_RTOL[torch.bfloat16 if half else torch.float32],
                        scratch=scratch,
                    )
                except ParameterError:
                    state.check(self.module)
                    raise
                del full_again
                # 3. one example alone: the backward across batch sizes, and (after the last
                # look at the snapshot, whose memory they take) the per-layer sums against
                # autograd's gradient
                if autograd is not None:
                    try:
                        checks.compare_output_grads(
                            full_grads,
                            checks.output_grads(self._layers),
                            single[0],
                            single_weight,
                            rtol=rtol,
                        )
                    except ParameterError:
                        state.check(self.module)
                        raise
                state.check(self.module)
                del state
                if autograd is not None:
                    self._compare_with_autograd(autograd, flat)
                self._checked = True
            finally:
                self._probe_batch = None
                for layer, calls in zip(self._layers, saved, strict=True):
                    layer.calls = calls
        return loss_sum, grads_ok

    def _probe_forward(
        self,
        *,
        rows: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        batch: int,
        reference: Trace,
        losses: torch.Tensor,
        state: StateSnapshot,
        pristine: torch.Tensor,
        layers: dict[str, Layer],
        scratch: checks.Scratch,
        weights: torch.Tensor | None = None,
    ) -> list[torch.Tensor | None] | None:
        """One part's forward (grad enabled, as in the step) against the whole batch's.
        With ``weights`` (the part of one example that is also backpropagated alone): the
        step's own forward and backward of the part, its losses weighted, which leaves the
        output gradients in the layers' calls and returns autograd's gradient of the
        parameters; otherwise None."""
        size = int(rows.shape[0])
        trace = Trace()
        autograd: list[torch.Tensor | None] | None = None
        part_losses: Any
        try:
            if weights is None:
                with checks.traced(self.module, set(layers), trace), torch.enable_grad():
                    part_losses = loss_fn(self.module(inputs), targets)
            else:
                _, _, part_losses, autograd = self._forward_backward(
                    inputs, targets, loss_fn, size, trace=trace, weights=weights, param_grads=True
                )
        except ParameterError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise _fails_on(size, batch, exc) from exc
        try:
            try:
                checks.compare_traces(reference, trace, rows, batch, layers, scratch=scratch)
            except ParameterError as exc:
                if isinstance(exc, UnsupportedModuleError):
                    state.check(self.module)
                    checks.check_deterministic(self.module, pristine, reference)
                    checks.localize(
                        module=self.module,
                        layers=layers,
                        whole=pristine.clone(),
                        part=pristine[rows],
                        rows=rows,
                    )
                raise
            if isinstance(part_losses, torch.Tensor) and tuple(part_losses.shape) == (size,):
                checks.compare_losses(losses, part_losses.detach(), rows, loss_fn)
            else:
                shape = getattr(part_losses, "shape", type(part_losses).__name__)
                raise ParameterError(
                    "loss_fn",
                    f"output shape {tuple(shape) if isinstance(shape, torch.Size) else shape}",
                    f"must return per-sample losses of shape ({size},), e.g. "
                    "F.cross_entropy(out, y, reduction='none')",
                )
        except ParameterError:
            state.check(self.module)  # a forward that changed the model is the cause
            raise
        return autograd

    def _compare_with_autograd(
        self, autograd: list[torch.Tensor | None], flat: torch.Tensor
    ) -> None:
        """The per-layer rules' sum of the recorded calls (one example, its loss weighted)
        against autograd's gradient of the same loss. A linear layer's sum ``G^T X`` is
        compared in factored form (:func:`.autograd_check.matmul_sum_stats`: it reads autograd's
        gradient once and writes nothing of the weight's size); the other layers' rules
        write their sums into their slots of ``flat``, compared as they are."""
        index = {id(p): k for k, (_, p) in enumerate(self._params)}
        stats: dict[int, autograd_check.SumStats] = {}
        with torch.no_grad(), ieee_float32(self.device):
            ones = torch.ones(1, dtype=self._dtype, device=self.device)
            for layer in self._layers:
                calls = [c for c in layer.calls if any(g is not None for g in c.grads)]
                if not calls:
                    continue
                module = layer.module
                if layer.kind == "linear" and isinstance(module, nn.Linear):
                    p_out, d_in = module.out_features, module.in_features
                    g = cat1([upcast(_grad(c)).reshape(-1, p_out) for c in calls], dim=0)
                    for name, p in layer.params.items():
                        target = autograd[index[id(p)]]
                        if name == "weight":
                            x = cat1([c.inputs[0].reshape(-1, d_in) for c in calls], dim=0)
                            stats[id(p)] = autograd_check.matmul_sum_stats(g, x, target)
                        else:
                            stats[id(p)] = autograd_check.sum_stats(g.sum(dim=0), target)
                    continue
                slots = {name: self._slot(flat, p) for name, p in layer.params.items()}
                LAYER_RULES[layer.kind](layer, calls, 1)[1](ones, slots)
                for name, p in layer.params.items():
                    stats[id(p)] = autograd_check.sum_stats(slots[name], autograd[index[id(p)]])
        owner = {id(p): layer.path for layer in self._layers for p in layer.params.values()}
        autograd_check.compare_sum_stats(
            names=[(owner[id(p)], name) for name, p in self._params],
            # a layer not called, or whose output missed the loss: its sum is 0
            stats=[
                stats[id(p)] if id(p) in stats else autograd_check.sum_stats(None, autograd[k])
                for k, (_, p) in enumerate(self._params)
            ],
            rtol=autograd_check.SUMS_RTOL,
        )
        for layer in self._layers:
            layer.calls.clear()


def _grad(call: Call) -> torch.Tensor:
    """A linear layer's recorded output gradient (its one edge)."""
    g = call.grads[0]
    if g is None:
        raise AssertionError("a call without an output gradient")
    return g


def _shares_memory(flat: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``flat`` lies in the storage of one of ``module``'s parameters or buffers
    (the probe would then overwrite the values it snapshots)."""
    ptr = flat.untyped_storage().data_ptr()
    tensors = [*module.parameters(), *module.buffers()]
    return any(t.untyped_storage().data_ptr() == ptr for t in tensors)


def _fails_on(size: int, batch: int, exc: Exception) -> ParameterError:
    """The refusal of a model that fails on a part of ``size`` of a batch it ran on."""
    return checks.refuse(
        "",
        f"the model fails on a batch of {size} after succeeding on a batch of {batch} (a "
        f"batch size built into the model?): {exc}",
    )


def _select(grads: checks.OutputGrads, rows: torch.Tensor) -> checks.OutputGrads:
    """The rows ``rows`` (a mask of the batch) of every batched output gradient."""
    if bool(rows.all()):
        return grads
    batch = int(rows.shape[0])
    return {
        path: [
            [
                g[rows] if g is not None and g.dim() > 0 and g.shape[0] == batch else g
                for g in per_edge
            ]
            for per_edge in calls
        ]
        for path, calls in grads.items()
    }
