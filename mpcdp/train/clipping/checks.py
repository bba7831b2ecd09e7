"""First-use checks of what per-sample clipping assumes about the model.

Book-keeping clipping (package docstring) bounds one example's influence only if (a)
dimension 0 of every trainable layer's tensors is the batch, (b) examples do not interact, in
the forward pass, in the loss *or in the backward pass*, and (c) the gradient that autograd
would compute for the batch is exactly the sum of the per-layer terms the hooks see (every
path from a parameter to the loss goes through its own module's output). None of these can be
read off the code; a model that breaks (a) or (b) moves the released sum by several times
the clipping bound for one example, silently, and one that breaks (c) trains on a gradient
other than its own. The clipper checks all of them on its first batch of at least two
examples (a site checks at session open, on a synthetic batch of its largest physical size);
the orchestration is :meth:`.clipper.PerSampleClipper._first_use`, the comparisons are here.

The probe. The batch is the *reference*: the clipper's own forward and backward of the whole
batch, with hooks recording every module call and the outputs of the trainable layers and of
the model (grad enabled, every module's train/eval flag as in the step; active ``nn.Dropout``
modules are made the identity for the probe while their ``training`` flag stays True, so a
branch on that flag is probed too). The same graph is backpropagated a second time with the
examples' losses weighted by random powers of two ``w_j`` in {1, 2, 4, 8}. A random
permutation of the batch (from a CSPRNG-seeded generator the model cannot predict) is cut
into *parts* (three of one example, a random odd size and the rest, :func:`part_sizes`),
each forwarded again as a batch of its own; one of the parts of one example is also
backpropagated (the step's own forward and backward on that batch of one).
Then:

* :func:`compare_traces`: the modules called, and the outputs of the trainable layers and of
  the model, row by row, equal the reference's rows of the same examples (on a difference,
  :func:`localize` traces every module to name the first that differs); a tensor that a
  trainable layer received with dimension 0 equal to the batch size must have the part's
  size (a sequence-first ``(T, B, F)`` with ``T == B``, a positional ``arange(T)`` or a
  shared table of length ``B`` keep theirs). Random parts and positions leave no structural
  blind spot: a mix of neighbours ``2k, 2k + 1``, a weight by position in the batch, a top-k
  over the batch or a branch on an odd batch size all change some example's row between the
  whole batch and its part (three parts of one example: a top half by norm was missed by
  17% of probes with one).
* :func:`compare_losses`: each example's loss is the same in its part.
* :func:`compare_reweighted`: the second backward gives, at every trainable layer's output,
  exactly ``w_j`` times the first one's row j. Backward passes are linear in the gradient
  entering them and a power of two commutes with every rounding, so an honest backward
  passes exactly, however ill-conditioned, while any term that carries one example's loss
  into another example's row (``h + (m - m.detach())`` with ``m`` a batch mean, a custom
  ``autograd.Function`` or a tensor hook that sums over the batch, a module backward hook
  that mixes ``grad_input``, a nonlinear selection of rows) shows at any size.
* :func:`compare_output_grads`: the example backpropagated alone gets the reference's row
  (to 25%: across batch sizes kernels round differently, and an ill-conditioned backward
  amplifies that), so a backward that depends on the batch's size shows.
* :func:`.autograd_check.compare_sums`: for that example, the book-keeping sum ``w g``
  (the per-layer rules) equals autograd's gradient of ``w l`` with respect to the
  parameters (a linear layer's sum ``G^T X`` in factored form,
  :func:`.autograd_check.matmul_sum_stats`). A forward
  hook that changes a layer's output (``o * 3``), a parameter that reaches the loss through
  a tensor derived from it and used outside its module (``self.w = self.weight * 1`` read by
  the parent), or a hook on a parameter's gradient all make the two differ.
* :class:`StateSnapshot`: no parameter or buffer changes in a forward pass (writes through
  ``.data``, running statistics with any momentum): buffers are not aggregated, and such a
  model would carry earlier batches' data into later steps.
* :func:`check_parameter_uses`, on the reference's autograd graph: a parameter's gradient
  reaches it only from nodes created inside a forward call of its own module (weight tying
  through ``F.linear(h, emb.weight)`` is refused with that cause).

When a forward comparison fails, :func:`check_deterministic` runs the whole batch again: a
model whose outputs differ between two identical passes is refused as random (other than
through ``nn.Dropout``), since whether its examples interact cannot be checked.

Cost: about two steps (the parts' forwards cover the batch once; one more backward of the
whole batch; one example's backward), and over the parameters one copy, two comparisons with
it and the single example's gradient (:meth:`.clipper.PerSampleClipper._first_use`).

What the probe cannot see (the README lists it with magnitudes measured by
``benchmarks/probe_limits.py``): a model that changes its behaviour after the first checked
batch (a step counter, a branch on a data value the synthetic batch does not have, a branch
on a batch size that is neither probed nor the largest), forward interactions below relative
2^-10 (2^-4 in half precision) that do not reach the backward, and a backward scaled by less
than 25% depending on the batch size.

Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import Node
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_flatten

from mpcdp.errors import ParameterError, UnsupportedModuleError
from mpcdp.train.clipping.precision import sq_norms
from mpcdp.train.clipping.rules import Layer, module_at

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: relative tolerance of the comparisons, by the dtype of the compared tensor
_RTOL = {torch.float16: 2.0**-4, torch.bfloat16: 2.0**-4}
_RTOL_DEFAULT = 2.0**-10


def rtol_for(dtype: torch.dtype) -> float:
    """The relative tolerance of a comparison of tensors of ``dtype``."""
    return _RTOL.get(dtype, _RTOL_DEFAULT)


@dataclass
class Trace:
    """One forward of the model with a hook on every module, in order of completion."""

    # (module path, module type, flattened output leaves: detached tensors or None)
    calls: list[tuple[str, str, list[torch.Tensor | None]]] = field(default_factory=list)
    # trainable layer path -> per call, the shapes of its flattened argument tensors
    arg_shapes: dict[str, list[list[tuple[int, ...] | None]]] = field(default_factory=dict)


def _leaves(value: Any) -> list[Any]:
    leaves, _ = tree_flatten(value)
    return list(leaves)


@contextlib.contextmanager
def traced(
    module: nn.Module,
    layer_paths: set[str],
    trace: Trace,
    *,
    every_output: bool = False,
) -> Iterator[None]:
    """Record every module call, the outputs (detached) of the trainable layers and of the
    root module (of every module with ``every_output``), and the trainable layers' argument
    shapes into ``trace`` while the block runs. An interaction anywhere that matters shows
    in a trainable layer's output, the model's output or the backward; comparing only those
    keeps the probe's cost near a step's."""
    kept = set(layer_paths) | {""}

    def make_hook(path: str) -> Callable[..., None]:
        keep = every_output or path in kept

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            leaves = (
                [t.detach() if isinstance(t, torch.Tensor) else None for t in _leaves(out)]
                if keep
                else []
            )
            trace.calls.append((path, type(m).__name__, leaves))
            if path in layer_paths:
                shapes = [
                    tuple(t.shape) if isinstance(t, torch.Tensor) else None
                    for t in _leaves((args, kwargs))
                ]
                trace.arg_shapes.setdefault(path, []).append(shapes)

        return hook

    handles = [
        m.register_forward_hook(make_hook(path), with_kwargs=True)
        for path, m in module.named_modules()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


@contextlib.contextmanager
def neutral_dropout(module: nn.Module) -> Iterator[None]:
    """Active ``nn.Dropout`` modules are the identity while the block runs; their ``training``
    flag stays True (a model that branches on it is probed as it trains). Dropout is
    independent per element, so it cannot mix examples, and its masks cannot be compared
    between batch sizes. The module's ``forward`` is replaced on the instance (in-place
    dropout included) and restored after."""
    switched: list[tuple[nn.Module, Any]] = []
    for m in module.modules():
        if isinstance(m, _DropoutNd) and m.training:
            switched.append((m, m.__dict__.get("forward")))
            m.forward = _identity  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m, own in switched:
            if own is None:
                del m.forward
            else:
                m.forward = own  # type: ignore[method-assign]


#: the probe's parts of one example each (then a random odd size and the rest)
SINGLES = 3


def part_sizes(batch: int, generator: torch.Generator) -> list[int]:
    """Sizes of the probe's parts of a batch of ``batch >= 2``: :data:`SINGLES` parts of one
    example, a random odd size and the rest, each at least 1 (fewer parts for small
    batches). Three single examples rather than one: against a selection over the batch
    (keep the top half by norm) one part of one example, one odd part and the rest missed it
    in 17% of probes, three single examples in none of 300 (BENCHMARKS.md)."""
    singles = min(SINGLES, batch)
    rest = batch - singles
    if rest <= 1:
        return [1] * singles + ([rest] if rest else [])
    odd = list(range(1, rest, 2))  # odd sizes leaving at least one for the rest
    s = odd[int(torch.randint(len(odd), (1,), generator=generator))]
    return [1] * singles + [s, rest - s]


class Scratch:
    """One buffer that the comparisons of a probe reuse for their temporaries (a part's rows
    of the reference, a difference): on a CPU a fresh temporary of several MB per comparison
    costs more in page faults than the pass that fills it."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device, overwritten by the next
        :meth:`take`."""
        n = math.prod(shape)
        buf = self._buf
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


def _buffer(scratch: Scratch | None, like: torch.Tensor) -> torch.Tensor:
    if scratch is None:
        return torch.empty_like(like)
    return scratch.take(tuple(like.shape), like)


def _bad_rows(
    full: torch.Tensor,
    part: torch.Tensor,
    rtol: float,
    ratio: torch.Tensor | None = None,
    *,
    rows: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, bool]:
    """Mask of the rows where ``part`` differs from ``ratio * full[rows]`` (``ratio``: one
    power of two per row, or 1; ``rows``: all by default) beyond ``rtol`` of that row's norm
    (computed in float32 at least: enough for tolerances of 2^-16 and above). Non-finite
    values count as the largest finite ones (``nan_to_num``).

    One pass for the difference and one norm of each operand, temporaries in ``scratch``: a
    power of two scales a norm exactly, so ``ratio`` multiplies ``full``'s row norms instead
    of ``full`` itself (for a row so small that its squares underflow, the slow path below
    runs). Where every value is finite ``nan_to_num`` changes nothing, and a non-finite
    value makes some norm non-finite, so the slow path (``nan_to_num`` copies of both) runs
    exactly when it differs. Returns the mask and whether any row is set (the fast path
    reads the host once)."""
    work = torch.float64 if torch.float64 in (full.dtype, part.dtype) else torch.float32
    p = part.to(work).reshape(part.shape[0], -1)
    if rows is None:
        f = full.to(work).reshape(full.shape[0], -1)
    elif full.dtype == work:
        f = torch.index_select(full.reshape(full.shape[0], -1), 0, rows, out=_buffer(scratch, p))
    else:
        f = full[rows].to(work).reshape(p.shape)
    r = None if ratio is None else ratio.to(f.device, work).reshape(-1, 1)
    scale = torch.linalg.vector_norm(f, dim=1)
    if r is not None:
        scale = scale * r.reshape(-1)
        d = torch.addcmul(p, f, r, value=-1.0, out=_buffer(scratch, p))
    elif rows is not None:
        d = f.sub_(p)  # f is this function's own copy of the rows
    else:
        d = torch.sub(f, p, out=_buffer(scratch, p))
    diff = torch.linalg.vector_norm(d, dim=1)
    # below this a row's squares underflow, and scaling it may round otherwise
    tiny = torch.finfo(work).tiny / torch.finfo(work).eps
    # one read back to the host: whether the fast path holds, and whether a row is bad
    top = scale.max()
    bad: torch.Tensor = diff > rtol * (scale + (top * 1e-6 + 1e-30))
    flags = [top, diff.max(), bad.any().to(work)]
    if r is not None:
        flags.append(((scale > 0) & (scale < tiny)).any().to(work))
    values = torch.stack(flags).tolist()
    # rows whose norms over- or underflowed in the working precision (a float32 norm of
    # values above ~1.8e19 is inf, one of values below ~1e-19 is 0): compared exactly below
    underflow = values[0] < tiny or (r is not None and values[3] != 0.0)
    if math.isfinite(values[0]) and math.isfinite(values[1]) and not underflow:
        return bad, values[2] != 0.0
    # float64, non-finite values bounded by float32's range (whose squares float64 holds),
    # norms scaled by powers of two (precision.sq_norms): no scale hides a difference
    big = float(torch.finfo(torch.float32).max)
    f64 = (full if rows is None else full[rows]).to(torch.float64).reshape(p.shape)
    f64 = torch.nan_to_num(f64 if r is None else f64 * r.double(), posinf=big, neginf=-big)
    p64 = torch.nan_to_num(p.to(torch.float64), posinf=big, neginf=-big)
    scale64 = sq_norms(f64).sqrt()
    diff64 = sq_norms(f64 - p64).sqrt()
    floor = 1e-6 * float(scale64.max())
    bad = diff64 > rtol * (scale64 + floor)
    return bad.to(scale.device), bool(bad.any())


def _first_bad_row(
    full: torch.Tensor,
    part: torch.Tensor,
    rtol: float | None = None,
    ratio: torch.Tensor | None = None,
    *,
    rows: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> int | None:
    """The first row where ``part`` differs from ``ratio * full[rows]`` beyond ``rtol`` (by
    default the tolerance of ``full``'s dtype, :func:`rtol_for`), or None."""
    if part.shape[0] == 0 or math.prod(part.shape[1:]) == 0:
        return None
    tol = rtol_for(full.dtype) if rtol is None else rtol
    bad, any_bad = _bad_rows(full, part, tol, ratio, rows=rows, scratch=scratch)
    return int(bad.nonzero()[0, 0]) if any_bad else None


def refuse(path: str, why: str) -> UnsupportedModuleError:
    """A refusal of the model, naming the module at ``path``."""
    return UnsupportedModuleError(path, why)


def coincidence(layer: Layer, received: str) -> UnsupportedModuleError:
    """The refusal of a trainable layer whose dimension 0 equalled the batch size only by
    coincidence; ``received`` says what it received for which batch sizes."""
    return refuse(
        layer.path,
        f"{module_at(layer.path)} ({type(layer.module).__name__}) received {received}: its "
        "dimension 0 equals the batch size only by coincidence (sequence-first, or shared "
        "across the batch); per-sample clipping needs batch-first tensors: make dimension 0 "
        "the batch",
    )


def compare_traces(
    full: Trace,
    part: Trace,
    rows: torch.Tensor,
    batch: int,
    layers: dict[str, Layer],
    *,
    scratch: Scratch | None = None,
) -> None:
    """Refuse unless ``part`` (a forward of the examples ``rows`` of the whole batch, in
    that order) computed every module's outputs exactly as the whole batch did
    (temporaries in ``scratch``)."""
    size = int(rows.shape[0])
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
        raise refuse(
            where,
            f"the forward pass calls other modules for a batch of {size} than for the whole "
            f"batch of {batch} (first difference at {module_at(where)}): the batch decides the "
            "computation (a branch on a batch statistic or on the batch size?), so examples "
            "interact and per-sample clipping cannot bound one example's influence",
        )
    # (a) the batch dimension of trainable layers is the batch, not a size that coincides
    for path, calls in full.arg_shapes.items():
        layer = layers[path]
        for k, (shapes_f, shapes_p) in enumerate(zip(calls, part.arg_shapes[path], strict=True)):
            for sf, sp in zip(shapes_f, shapes_p, strict=True):
                if sf and sp is not None and sf[0] == batch and sp[0] != size:
                    raise coincidence(
                        layer,
                        f"a tensor of shape {sf} for a batch of {batch}, and of shape {sp} for "
                        f"a batch of {size} (call {k + 1})",
                    )
    # (b) every batched output of every module, row by row
    for (path, kind, leaves_f), (_, _, leaves_p) in zip(full.calls, part.calls, strict=True):
        for tf, tp in zip(leaves_f, leaves_p, strict=False):
            if tf is None or tp is None or tf.dim() == 0 or not tf.is_floating_point():
                continue
            if tf.shape[0] != batch or tuple(tp.shape) != (size, *tf.shape[1:]):
                continue
            row = _first_bad_row(tf, tp, rows=rows, scratch=scratch)
            if row is not None:
                raise refuse(
                    path,
                    f"the output of {module_at(path)} ({kind}) for example {int(rows[row])} "
                    f"differs when that example is in a batch of {size} instead of {batch} "
                    "(at another position): examples interact at or before this module "
                    "(batch statistics, centring by the batch mean, a branch on the batch or "
                    "its size, a mix of neighbours, a weight by position, BatchNorm-like "
                    "code); per-sample clipping needs each example's output to depend on that "
                    "example alone",
                )


def localize(
    *,
    module: nn.Module,
    layers: dict[str, Layer],
    whole: torch.Tensor,
    part: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """After :func:`compare_traces` found a difference in the outputs it keeps: trace every
    module's outputs for the whole batch and the part again, and refuse naming the first
    module whose rows differ (possibly one without parameters). Returns if the second
    look finds nothing (the caller then raises what it found first)."""
    full, again = Trace(), Trace()
    with traced(module, set(layers), full, every_output=True), torch.enable_grad():
        module(whole)
    with traced(module, set(layers), again, every_output=True), torch.enable_grad():
        module(part)
    compare_traces(full, again, rows, int(whole.shape[0]), layers)


def compare_losses(
    full: torch.Tensor, part: torch.Tensor, rows: torch.Tensor, loss_fn: LossFn
) -> None:
    """Refuse unless each example's loss in the part equals its loss in the whole batch."""
    size = int(rows.shape[0])
    row = _first_bad_row(full[rows].reshape(size, 1), part.reshape(size, 1))
    if row is not None:
        raise ParameterError(
            "loss_fn",
            getattr(loss_fn, "__name__", type(loss_fn).__name__),
            f"the loss of example {int(rows[row])} differs when that example is in a batch "
            f"of {size} (at another position): the loss mixes examples (normalised by a batch "
            "statistic, contrastive terms across the batch, a weight by position); loss_fn "
            "must return each example's loss from its own output and target",
        )


#: per trainable layer path: per call, the gradient at each recorded output edge (or None)
OutputGrads = dict[str, list[list[torch.Tensor | None]]]


def output_grads(layers: Sequence[Layer], *, again: bool = False) -> OutputGrads:
    """The output gradients the layers' calls hold now (``again``: those of the second
    backward, ``Call.grads_again``)."""
    return {
        layer.path: [list(c.grads_again if again else c.grads) for c in layer.calls]
        for layer in layers
    }


#: relative tolerance of :func:`compare_reweighted`, by the precision the gradients were
#: computed in: the two backward passes run the same kernels on the same shapes, and a
#: power-of-two weight commutes with every rounding, so an honest backward agrees exactly
#: (the slack covers only underflow near the smallest normal numbers)
EXACT_RTOL = {torch.float32: 2.0**-16, torch.bfloat16: 2.0**-8}


def compare_reweighted(
    first: OutputGrads,
    second: OutputGrads,
    weights: torch.Tensor,
    again: torch.Tensor,
    *,
    rows: torch.Tensor,
    rtol: float,
    scratch: Scratch | None = None,
) -> None:
    """Refuse unless the second backward of a part (losses weighted by ``again``) gave, at
    every trainable layer's output, ``again[j] / weights[j]`` times the first one's row j
    (temporaries in ``scratch``).

    Backward passes are linear in the gradient that enters them, so a term that carries
    example i's loss into example j's row scales with ``again[i]`` in row j and shows
    whatever its size. Both passes run at the same batch size, so this comparison can be
    (nearly) exact where one across batch sizes cannot: an ill-conditioned honest backward
    (a GroupNorm over two channels) differs between batch sizes by up to a few percent."""
    size = int(weights.shape[0])
    ratio = (again / weights).to(torch.float32).reshape(size)  # powers of two: exact
    for path, calls in first.items():
        for grads_1, grads_2 in zip(calls, second.get(path, []), strict=False):
            for g1, g2 in zip(grads_1, grads_2, strict=False):
                if g1 is None or g2 is None or g1.dim() == 0 or g1.shape[0] != size:
                    continue
                row = _first_bad_row(g1, g2, rtol, ratio, scratch=scratch)
                if row is not None:
                    raise _backward_mix(path, size, int(rows[row]))


#: relative tolerance of :func:`compare_output_grads` (across batch sizes). Much looser than
#: the forward's: an honest backward through an ill-conditioned layer amplifies the rounding
#: differences of batch-size-dependent kernels without bound (a GroupNorm over two
#: channels: up to 5.6% of a row in 1,000 probes of 64 examples). Mixing between examples is
#: caught exactly by :func:`compare_reweighted`; this comparison is for a backward that
#: scales rows by a factor depending on the batch's size, seen from 25% on.
CROSS_SIZE_GRAD_RTOL = 2.0**-2


def compare_output_grads(
    full: OutputGrads,
    part: OutputGrads,
    rows: torch.Tensor,
    weights: torch.Tensor,
    *,
    rtol: float = _RTOL_DEFAULT,
) -> None:
    """Refuse unless the gradient at every trainable layer's output in the part (its losses
    weighted by ``weights``) is ``weights[j]`` times the whole batch's row of example j, to
    relative ``rtol`` (at least that of the gradients' dtype)."""
    size = int(rows.shape[0])
    for path, calls_f in full.items():
        calls_p = part.get(path, [])
        if len(calls_f) != len(calls_p):
            raise refuse(
                path,
                f"{module_at(path)} is called {len(calls_f)} times for the whole batch and "
                f"{len(calls_p)} times for a batch of {size}: the batch decides the computation",
            )
        for grads_f, grads_p in zip(calls_f, calls_p, strict=True):
            for gf, gp in zip(grads_f, grads_p, strict=False):
                if gf is None and gp is None:
                    continue
                if gf is None or gp is None or gf.dim() == 0 or gf.shape[1:] != gp.shape[1:]:
                    raise _backward_mix(path, size, None)
                work = torch.float64 if gf.dtype == torch.float64 else torch.float32
                w = weights.to(work).reshape(size, *([1] * (gf.dim() - 1)))
                expected = gf[rows].to(work) * w  # exact: w is a power of two
                row = _first_bad_row(expected, gp, max(rtol, CROSS_SIZE_GRAD_RTOL))
                if row is not None:
                    raise _backward_mix(path, size, int(rows[row]))


def _backward_mix(path: str, size: int, example: int | None) -> ParameterError:
    which = f"for example {example} " if example is not None else ""
    return refuse(
        path,
        f"the gradient reaching the output of {module_at(path)} {which}differs when that "
        f"example is in a batch of {size} with its loss weighted: the backward pass mixes "
        "examples or depends on the batch (a custom autograd.Function, a tensor hook or a "
        "module backward hook that combines examples, a term like m - m.detach() with m a "
        "batch statistic); per-sample clipping needs each example's gradient to come from "
        "that example's loss alone",
    )


#: integer dtypes of the floating dtypes' sizes, to compare stored values bit for bit
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class StateSnapshot:
    """The values of a module's parameters and buffers, to refuse a forward that changes
    them (:meth:`check`). ``slots``: parameter name -> a tensor of that parameter's shape and
    dtype that holds its copy instead of a new one (memory the caller has already touched: on
    a CPU a fresh model-sized copy costs more in page faults than the copying itself); the
    caller leaves the slots alone until its last :meth:`check`."""

    def __init__(self, module: nn.Module, *, slots: dict[str, torch.Tensor] | None = None) -> None:
        slots = slots or {}
        with torch.no_grad():
            self._params = {
                n: _copy(p.detach(), slots.get(n)) for n, p in module.named_parameters()
            }
            self._buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

    @staticmethod
    def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
        """Floats bit for bit (a zero's sign and a NaN's payload included: a forward could
        carry data in them), in one pass over integer views; other dtypes by value."""
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() and a.element_size() in _BITS:
            wa, wb = _words(a), _words(b)
            if wa is None or wb is None:
                bits = _BITS[a.element_size()]
                return torch.equal(a.view(bits), b.view(bits))
            return torch.equal(wa, wb)
        if torch.equal(a, b):  # False for any NaN, which the slow path allows
            return True
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
        return False

    def check(self, module: nn.Module) -> None:
        """Refuse if any parameter or buffer differs from the snapshot."""
        for name, p in module.named_parameters():
            old = self._params.get(name)
            if old is None or not self._same(old, p.detach()):
                raise ParameterError(
                    "model",
                    f"parameter {name!r}",
                    "changed in a forward pass (a write through .data or an in-place update): "
                    "the gradient is computed at the parameters as sent, so a forward pass "
                    "must not modify them",
                )
        for name, b in module.named_buffers():
            old = self._buffers.get(name)
            if old is None or not self._same(old, b.detach()):
                raise ParameterError(
                    "model",
                    f"buffer {name!r}",
                    "changed in a forward pass (running statistics, a counter): buffers are "
                    "not aggregated, and a buffer updated from a batch carries that batch's "
                    "data into later steps, so training must not change them",
                )


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """A contiguous ``t``'s bytes as int64 (the fastest dtype for :func:`torch.equal`), or
    None where its size or offset is not a multiple of 8 bytes."""
    size = t.element_size()
    if not t.is_contiguous() or (t.numel() * size) % 8 or (t.storage_offset() * size) % 8:
        return None
    return t.reshape(-1).view(torch.int64)


def _copy(value: torch.Tensor, slot: torch.Tensor | None) -> torch.Tensor:
    """A copy of ``value``: into ``slot`` where it has ``value``'s shape and dtype."""
    if slot is None or slot.shape != value.shape or slot.dtype != value.dtype:
        return value.clone()
    return slot.copy_(value)


def check_deterministic(module: nn.Module, inputs: torch.Tensor, first: Trace) -> None:
    """Refuse a model whose module outputs differ between ``first`` (a traced forward of
    ``inputs``) and a second identical forward: random other than through nn.Dropout."""
    again = Trace()
    with traced(module, set(), again, every_output=True), torch.enable_grad():
        module(inputs)
    for (path, kind, a), (_, _, b) in zip(first.calls, again.calls, strict=False):
        for ta, tb in zip(a, b, strict=False):
            if ta is None or tb is None or ta.shape != tb.shape or not ta.is_floating_point():
                continue
            if ta.dim() > 0 and _first_bad_row(ta, tb) is not None:
                raise refuse(
                    path,
                    f"the output of {module_at(path)} ({kind}) changes between two identical "
                    "forward passes: the forward is random other than through nn.Dropout "
                    "modules (functional dropout, noise), so whether examples interact cannot "
                    "be checked; use nn.Dropout modules for dropout",
                )


def check_parameter_uses(*, loss: torch.Tensor, layers: list[Layer]) -> None:
    """Refuse a parameter whose gradient reaches it from outside its module's forward.

    A call's own nodes are those reached from its outputs' autograd edges without passing
    its arguments' nodes (``Call.frontier``, recorded by the forward hook)."""
    owner: dict[int, Layer] = {}
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
                    raise refuse(
                        layer.path,
                        f"parameter {full!r} is used outside the forward of {module_at(layer.path)}"
                        f" (by another module or by a parent's code, e.g. weight tying through "
                        f"F.linear(h, {full})): its gradient through that use would be missing "
                        "from the per-sample gradients; use it only by calling its module",
                    )
            else:
                stack.append(child)
