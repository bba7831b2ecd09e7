"""The first-use probe of :class:`.clipper.PerSampleClipper`: the whole batch as the reference
and random parts of it run again, every comparison of :mod:`.checks` between them.

Implemented as a mixin of the clipper, whose book-keeping forward and backward
(:meth:`_forward_backward`) and per-layer rules the probe reuses, so that what is probed is
exactly what a step computes. Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from mpcdp.errors import ParameterError
from mpcdp.train.clipping import checks
from mpcdp.train.clipping.checks import StateSnapshot, Trace
from mpcdp.train.clipping.precision import _ieee_float32
from mpcdp.train.clipping.rules import _LAYER_RULES, _Call, _Layer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FirstUseProbe:
    """The probe's half of :class:`.clipper.PerSampleClipper` (a mixin): the attributes and
    methods below are the clipper's."""

    module: nn.Module
    device: torch.device
    _layers: list[_Layer]
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
        def _check_inputs_unmodified(layer: _Layer, calls: list[_Call]) -> None: ...

    def _first_use(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, batch: int
    ) -> tuple[torch.Tensor, bool]:
        """The step's forward and backward on the whole batch, which is also the probe's
        reference, then each part of a random permutation of the batch as a batch of its
        own (:mod:`.checks`). Returns what :meth:`_forward_backward` does for the whole
        batch (loss sum, whether output gradients were computed), with its layers' calls in
        place for the clipped sum."""
        gen = self._probe_gen
        perm = torch.randperm(batch, generator=gen)
        sizes = checks.part_sizes(batch, gen)
        # the parts' inputs are taken before any forward: a model that modifies its input in
        # place changes the caller's batch, not the parts
        parts = []
        for idx in torch.split(perm, sizes):
            rows = idx.to(self.device)
            # powers of two: scaling by one commutes with every rounding, so an honest
            # backward gives exactly w_j times its row, however it cancels
            w = torch.exp2(torch.randint(0, 4, (len(idx),), generator=gen).to(torch.float64))
            parts.append((rows, inputs[rows], targets[rows], w.to(self.device)))
        # the part of one example (sizes[0]) is also compared with autograd; it runs last so
        # that an interaction is reported as such by a part of several examples first
        parts = [*sorted(parts[1:], key=lambda part: -int(part[0].shape[0])), parts[0]]
        pristine = inputs.clone()
        # gradients computed under autocast are rounded to half precision on their way even
        # where the tensors they reach are float32
        autocast = torch.is_autocast_enabled(self.device.type)
        state = StateSnapshot(self.module)
        reference = Trace()
        with checks.neutral_dropout(self.module):
            self._record_frontier = True
            try:
                loss_sum, grads_ok, losses, _ = self._forward_backward(
                    inputs, targets, loss_fn, batch, trace=reference
                )
            finally:
                self._record_frontier = False
            state.check(self.module)
            for layer in self._layers:
                self._check_inputs_unmodified(layer, layer.calls)
            full_grads = checks.output_grads(self._layers)
            # an example whose loss or output gradients are not finite contributes 0 to the
            # step (the sum is rerun without it): the probe leaves it out
            finite = torch.isfinite(losses)
            for per_call in full_grads.values():
                for grads in per_call:
                    for g in grads:
                        if g is not None and g.dim() > 0 and g.shape[0] == batch:
                            finite &= torch.isfinite(g.reshape(batch, -1)).all(1)
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
            try:
                for rows, x, y, w in parts:
                    keep = finite[rows]
                    if not bool(keep.all()):
                        rows, x, y, w = rows[keep], x[keep], y[keep], w[keep]
                    if rows.numel() == 0:
                        continue
                    self._probe_part(
                        rows=rows,
                        inputs=x,
                        targets=y,
                        weights=w,
                        loss_fn=loss_fn,
                        batch=batch,
                        reference=reference,
                        losses=losses,
                        full_grads=full_grads,
                        state=state,
                        pristine=pristine,
                        rtol=rtol,
                        half=half,
                        against_autograd=rows.numel() == 1,
                    )
                self._checked = True
            finally:
                self._probe_batch = None
                for layer, calls in zip(self._layers, saved, strict=True):
                    layer.calls = calls
        return loss_sum, grads_ok

    def _probe_part(
        self,
        *,
        rows: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        loss_fn: LossFn,
        batch: int,
        reference: Trace,
        losses: torch.Tensor,
        full_grads: checks.OutputGrads,
        state: StateSnapshot,
        pristine: torch.Tensor,
        rtol: float,
        half: bool,
        against_autograd: bool,
    ) -> None:
        """One part of the probe (:mod:`.checks`). ``against_autograd``: compare the
        per-layer sums with autograd's gradient too (the part of one example: a sum of
        many half-precision terms in autograd would be a poor reference)."""
        size = int(rows.shape[0])
        trace = Trace()
        # other power-of-two weights for a second backward of the same graph: the first two
        # examples' ratios differ, so no part of two or more has proportional weights
        shift = torch.randint(0, 4, (size,), generator=self._probe_gen)
        if size >= 2:
            shift[0] = (shift[1] + 1 + torch.randint(0, 3, (1,), generator=self._probe_gen)) % 4
        again = weights * torch.exp2(shift.to(torch.float64)).to(weights.device)
        try:
            _, _, part_losses, autograd = self._forward_backward(
                inputs,
                targets,
                loss_fn,
                size,
                trace=trace,
                weights=weights,
                param_grads=against_autograd,
                weights_again=again if size >= 2 else None,
            )
        except ParameterError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise checks.refuse(
                "",
                f"the model fails on a batch of {size} after succeeding on a batch of "
                f"{batch} (a batch size built into the model?): {exc}",
            ) from exc
        try:
            state.check(self.module)
            by_path = {layer.path: layer for layer in self._layers}
            checks.compare_traces(reference, trace, rows, batch, by_path)
            checks.compare_losses(losses, part_losses, rows, loss_fn)
            part_grads = checks.output_grads(self._layers)
            if size >= 2:
                checks.compare_reweighted(
                    part_grads,
                    checks.output_grads(self._layers, again=True),
                    weights,
                    again,
                    rows=rows,
                    rtol=checks.EXACT_RTOL[torch.bfloat16 if half else torch.float32],
                )
            checks.compare_output_grads(full_grads, part_grads, rows, weights, rtol=rtol)
        except ParameterError as exc:
            if exc.name == "module":
                checks.check_deterministic(self.module, pristine, reference)
            raise
        if not against_autograd:
            for layer in self._layers:
                layer.calls.clear()
            return
        # the per-layer rules against autograd, on the same weighted loss
        with torch.no_grad(), _ieee_float32(self.device):
            flat = torch.zeros(self._num_params, dtype=torch.float32, device=self.device)
            ones = torch.ones(size, dtype=self._dtype, device=self.device)
            for layer in self._layers:
                calls = [c for c in layer.calls if any(g is not None for g in c.grads)]
                if calls:
                    _, finish = _LAYER_RULES[layer.kind](layer, calls, size)
                    finish(ones, {n: self._slot(flat, p) for n, p in layer.params.items()})
        owner = {id(p): layer.path for layer in self._layers for p in layer.params.values()}
        checks.compare_sums(
            names=[(owner[id(p)], name) for name, p in self._params],
            bookkeeping=[self._slot(flat, p) for _, p in self._params],
            autograd=autograd,
            rtol=checks.SUMS_RTOL,
        )
        for layer in self._layers:
            layer.calls.clear()
