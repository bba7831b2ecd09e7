"""Per-layer rules of book-keeping clipping: what a forward hook records for a layer and,
from it and the layer's output gradients, squared per-sample gradient norms and the
clipped-sum step (see the package docstring for the method and its references).

Each rule maps ``(layer, calls, batch)`` to ``(squared norms (B,), finish)``, where
``finish(c, dests)`` writes ``sum_j c_j g_j`` for every trainable parameter of the layer.
The squared norms are upper bounds of the norms of the values the finish sums, computed
without under- or overflow (:func:`.precision.norm_margin`): instantiated per-sample
gradients (Linear and Conv2d by default, Embedding rows, norm layers, the fallback) have
exact float64 norms; a ghost norm (Linear or Conv2d whose instantiated gradients would take
more memory, :func:`use_ghost`) comes from float64 Gram matrices plus Higham's bound on
their rounding and on that of its float64 clipped sum (:func:`_ghost`). A fallback layer's
vjp is re-run under the autocast its forward ran under (:func:`_autocast_state`).
Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, Node
from torch.nn.grad import conv2d_weight
from torch.utils._pytree import tree_flatten, tree_unflatten

from mpcdp.errors import UnsupportedModuleError
from mpcdp.train.clipping.precision import (
    cat1,
    mm_into,
    norm_out,
    pow2_scale,
    sq_norms,
    upcast,
)

# A layer's clipped-sum step: (clip factors (B,), {local parameter name: destination view of
# grad_sum, shaped like the parameter}) -> None; it writes every trainable parameter's sum.
SumFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], None]


#: Device types whose autocast state a recorded call keeps.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast settings in force now, as ``(device type, dtype)`` pairs: read when the
    forward hook records a call (the hook runs inside the layer's forward), so a fallback
    layer's vjp can be re-run under the autocast its forward ran under."""
    return tuple(
        (device, torch.get_autocast_dtype(device))
        for device in _AUTOCAST_DEVICES
        if torch.is_autocast_enabled(device)
    )


@dataclass
class Call:
    """What the forward hook recorded for one call of a layer."""

    inputs: tuple[Any, ...]
    kwargs: dict[str, Any]
    edges: list[GradientEdge]
    # index into the flattened outputs of each edge (fallback layers), and the G's later
    leaf_index: list[int]
    grads: list[torch.Tensor | None] = field(default_factory=list)
    # the first-use probe's second backward of the same graph, with other loss weights
    grads_again: list[torch.Tensor | None] = field(default_factory=list)
    # version counters of the stored input tensors when recorded (in-place changes detection)
    versions: list[int] = field(default_factory=list)
    # autograd nodes of the tensor arguments as the layer received them (first-use check)
    frontier: list[Node] = field(default_factory=list)
    # autocast in force when the call was recorded (the fallback re-runs under it)
    autocast: tuple[tuple[str, torch.dtype], ...] = field(default_factory=_autocast_state)

    def stored_tensors(self) -> list[torch.Tensor]:
        values = [*self.inputs, *self.kwargs.values()]
        return [v for v in values if isinstance(v, torch.Tensor)]

    def record_versions(self) -> Call:
        self.versions = [t._version for t in self.stored_tensors()]
        return self

    def inputs_modified(self) -> bool:
        return [t._version for t in self.stored_tensors()] != self.versions


@dataclass
class Layer:
    """A module that owns trainable parameters, with how its gradients are computed."""

    path: str
    module: nn.Module
    kind: str  # "linear", "conv2d", "embedding", "layernorm", "groupnorm", "fallback"
    params: dict[str, nn.Parameter]  # local name -> trainable parameter
    calls: list[Call] = field(default_factory=list)

    @property
    def needs_input(self) -> bool:
        # Linear/Conv2d bias gradients and norm-layer bias gradients need only G (DP-BiTFiT).
        if self.kind in ("linear", "conv2d", "layernorm", "groupnorm"):
            return "weight" in self.params
        return True


def module_at(path: str) -> str:
    return f"module {path!r}" if path else "the root module"


def _same_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def classify(path: str, module: nn.Module, own: dict[str, nn.Parameter]) -> str:
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
            raise UnsupportedModuleError(
                path,
                f"{module_at(path)} is nn.Embedding with max_norm={module.max_norm}: it "
                "renormalises its weight in place during the forward, which per-sample "
                "clipping does not support; use max_norm=None",
            )
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                path,
                f"{module_at(path)} is nn.Embedding with scale_grad_by_freq=True: it scales "
                "gradients by token counts over the whole batch, which mixes examples; "
                "use scale_grad_by_freq=False",
            )
        return "embedding"
    if _same_forward(module, nn.LayerNorm) and names <= {"weight", "bias"}:
        return "layernorm"
    if _same_forward(module, nn.GroupNorm) and names <= {"weight", "bias"}:
        return "groupnorm"
    return "fallback"


def batch_error(layer: Layer, what: str, shape: tuple[int, ...], batch: int) -> Exception:
    return UnsupportedModuleError(
        layer.path,
        f"{module_at(layer.path)} ({type(layer.module).__name__}) was called with {what} "
        f"of shape {shape}, whose dimension 0 is not the batch size {batch}: per-sample "
        "clipping needs batch-first layers",
    )


def _grad(call: Call) -> torch.Tensor:
    g = call.grads[0]
    assert g is not None  # calls whose output missed the loss are filtered out
    return upcast(g)


def _matmul_rule(
    a: torch.Tensor | None,
    g: torch.Tensor,
    has_weight: bool,
    has_bias: bool,
    ghost_weight_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, SumFn]:
    """Linear-type layer with A (B, T, d) and G (B, T, p): weight grad sum_t g_t a_t^T.

    Three ways, by ``T`` and the shape (:func:`use_ghost`): ``T = 1``, the norm
    ``|a| |g|``; per-sample gradients instantiated (``bmm``), whose norms are those of the
    very values summed; or the ghost norm in float64 (:func:`_ghost`), with its clipped sum
    in float64 too. ``ghost_weight_sum(c, dtype)``, if given, computes the clipped weight
    sum of the ghost branch without ``A`` (Conv2d: the native weight-gradient kernel on
    c-scaled G), so ``A`` is freed after the norms.
    """
    batch, t, p = g.shape
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    norm2 = torch.zeros(batch, dtype=torch.float64, device=g.device)
    # weight_fn(c, dest): write the clipped weight sum into dest, viewed as (p, d)
    weight_fn: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    gb: torch.Tensor | None = None
    if has_weight:
        assert a is not None
        a = a.to(g.dtype)
        d = a.shape[2]
        if t == 1:
            # ||g a^T||_F^2 = ||a||^2 ||g||^2 (Goodfellow 2015), each factor in float64
            a1, g1 = a[:, 0], g[:, 0]
            norm2 += sq_norms(a1) * sq_norms(g1)

            def weight_fn(c: torch.Tensor, dest: torch.Tensor) -> None:
                # scale the narrower factor by c: one small multiply, then one matmul
                if p <= d:
                    mm_into((g1 * c[:, None]).t(), a1, dest)
                else:
                    mm_into(g1.t(), a1 * c[:, None], dest)

        elif use_ghost(t, p, d):
            # float64 copies made by _ghost (not the layer's own tensors) may be scaled in place
            own_a, own_g = a.dtype != torch.float64, g.dtype != torch.float64
            a64, g64, ghost2 = _ghost(a, g, same=None)
            norm2 += ghost2
            del a
            if ghost_weight_sum is not None:
                ghost_sum = ghost_weight_sum
                a64 = None

                def weight_fn(c: torch.Tensor, dest: torch.Tensor) -> None:
                    dest.copy_(ghost_sum(c).reshape(dest.shape))

            else:
                assert a64 is not None
                a_ghost: torch.Tensor = a64
                done: list[bool] = []

                def weight_fn(c: torch.Tensor, dest: torch.Tensor) -> None:
                    # c times the narrower factor, in place on this rule's own float64 copy
                    # (no temporary of A's or G's size); exact, since a float32 clip factor
                    # times a float32 value fits in float64's 53 bits. Once per rule: the
                    # copy is scaled after that.
                    if done:
                        raise RuntimeError("a ghost layer's clipped sum is taken once")
                    done.append(True)
                    c64 = c.to(torch.float64)[:, None, None]
                    ac, gc = a_ghost, g64
                    if d <= p:
                        ac = ac.mul_(c64) if own_a else ac * c64
                    else:
                        gc = gc.mul_(c64) if own_g else gc * c64
                    rows = batch * t
                    dest.copy_(torch.mm(gc.reshape(rows, p).t(), ac.reshape(rows, d)))

        else:
            per_sample = torch.bmm(g.transpose(1, 2), a)  # (B, p, d)
            norm2 += sq_norms(per_sample)

            def weight_fn(c: torch.Tensor, dest: torch.Tensor) -> None:
                mm_into(c[None], per_sample.reshape(batch, p * d), dest.view(1, p * d))

    if has_bias:
        gb = g[:, 0] if t == 1 else g.sum(dim=1)  # (B, p)
        norm2 += sq_norms(gb)

    def finish(c: torch.Tensor, dests: dict[str, torch.Tensor]) -> None:
        c = c.to(g.dtype)
        if weight_fn is not None:
            dest = dests["weight"]
            weight_fn(c, dest.view(dest.shape[0], -1))
        if gb is not None:
            mm_into(c[None], gb, dests["bias"].view(1, -1))

    return norm_out(norm2, acc), finish


def _ghost(
    a: torch.Tensor | None, g: torch.Tensor, *, same: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Float64 copies of A and G and an upper bound of every example's squared norm of
    ``sum_t g_t a_t^T`` (Frobenius) with its clipped sum's rounding (float64, (B,)).

    The ghost norm ``sum_{t,t'} <a_t, a_t'> <g_t, g_t'>`` (``same[t, t']``, 0 or 1, in place
    of ``<a_t, a_t'>`` for one-hot inputs) is computed from float64 Gram matrices of the
    working-precision values, which float64 holds exactly (float64 values are first scaled
    per example by a power of two, :func:`.precision.pow2_scale`). A dot product of length
    n in any summation order is within ``gamma_n = n u / (1 - n u)`` of its value relative
    to the sum of its absolute terms (Higham 2002, "Accuracy and stability of numerical
    algorithms", Sec. 3.1, eq. 3.5), so with ``u_j = sum_t |a_t| |g_t|`` (>= the norm,
    and sum_{t,t'} |a_t||a_t'||g_t||g_t'| = u_j^2) the true squared norm is at most the
    computed one plus :func:`_ghost_slack` times ``u_j^2``; ``u_j`` comes from the Grams'
    diagonals. Without this term cancellation in a sequence layer could make a large norm
    come out as ~0 (not clipped at all); in float64 it is ~1e-11 of ``u_j^2``, where float32
    Grams needed ~1e-4 (a norm 2.8e-3 too large for Linear(512 -> 256) over 256 positions).

    The clipped sum of this branch is one float64 matmul over all B T positions: its
    rounding, ``gamma_{BT} c_j u_j`` at most for example j, is not bounded by ``c_j`` times
    the norm when the example's positions cancel, so ``gamma_{BT} 2^13 u_j`` is added to the
    norm (not to its square): every example's clipped contribution, rounding included, then
    stays within ``C (1 - 2^-12)(1 + 2^-13)``. Both terms are below 1e-7 of the norm at
    realistic widths.
    """
    batch, t, p = g.shape
    g64, eg = _wide(g)
    gg = torch.bmm(g64, g64.transpose(1, 2))
    gdiag = gg.diagonal(dim1=1, dim2=2)
    if a is None:
        assert same is not None
        a64 = None
        aa = same.to(torch.float64)
        adiag = aa.diagonal(dim1=1, dim2=2)
        ea = torch.zeros_like(eg)
        dots: tuple[int, ...] = (p,)
    else:
        a64, ea = _wide(a)
        aa = torch.bmm(a64, a64.transpose(1, 2))
        adiag = aa.diagonal(dim1=1, dim2=2)
        dots = (a.shape[2], p)
    ghost = torch.bmm(aa.reshape(batch, 1, t * t), gg.reshape(batch, t * t, 1)).reshape(batch)
    u = (adiag * gdiag).sqrt().sum(dim=1)
    slack = _ghost_slack(dot_lengths=dots, terms=t * t, dtype=torch.float64)
    rounding = (batch * t + 2) * torch.finfo(torch.float64).eps * 2.0**13
    norm = (ghost.clamp_min(0) + slack * u.square()).sqrt() + rounding * u
    scale = torch.exp2(2 * (ea + eg))  # undo the power-of-two scaling (float64 inputs)
    if a64 is not None and a is not None and a.dtype == torch.float64:
        a64 = a  # the finish uses the unscaled values
    if g.dtype == torch.float64:
        g64 = g
    return a64, g64, norm.square() * scale


def _wide(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in float64 (exact for float32 values) and, per example, the binary exponent it
    was scaled down by (0 for float32 values, whose products cannot leave float64's range)."""
    if x.dtype == torch.float64:
        return pow2_scale(x)
    return x.to(torch.float64), torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)


def _ghost_slack(*, dot_lengths: tuple[int, ...], terms: int, dtype: torch.dtype) -> float:
    """Bound on the floating-point error of a ghost norm, relative to ``u_j^2``.

    The ghost norm sum_{t,t'} <a_t, a_t'> <g_t, g_t'> is computed from dot products of the
    given lengths and a sum of ``terms`` products, all in ``dtype`` (float64). A dot
    product of length n in any summation order is within gamma_n = n u / (1 - n u) of its
    value relative to the sum of its absolute terms (Higham 2002, Sec. 3.1), and
    sum_{t,t'} |a_t||a_t'||g_t||g_t'| = u_j^2 with u_j = sum_t |a_t| |g_t| >=
    ||sum_t g_t a_t^T||. So the true squared norm is at most the computed one plus this
    factor times u_j^2; each gamma_n is taken as (n + 2) eps, more than twice the bound,
    which also covers the products, the square roots in u_j and u_j's own rounding.
    """
    eps = torch.finfo(dtype).eps
    return float(sum(n + 2 for n in dot_lengths) * eps + (terms + 2) * eps)


#: A layer's per-sample gradients are instantiated unless they would take more memory than
#: the ghost branch (float64 Grams and copies of A and G); instantiating always costs fewer
#: operations (:func:`use_ghost`).
def use_ghost(t: int, p: int, d: int) -> bool:
    """Ghost norm rather than instantiation iff the instantiated (B, p, d) float32 gradients
    would take more memory than the float64 ghost branch: ``4 p d > 16 T^2 + 8 T (p + d)``.

    Instantiation costs ``B T p d`` multiply-adds in float32 and its norms are exact for
    the values summed; the ghost branch, exact only in float64 (:func:`_ghost`), costs
    ``B T^2 (p + d)`` for the Grams plus a float64 clipped sum of ``B T p d`` (the mixed
    ghost norm of Bu, Mao, Xu 2022 traded these for memory at equal precision; at float64
    the trade favours instantiation whenever its memory is no larger)."""
    return 4 * p * d > 16 * t * t + 8 * t * (p + d)


def _linear_rule(layer: Layer, calls: list[Call], batch: int) -> tuple[torch.Tensor, SumFn]:
    m = layer.module
    assert isinstance(m, nn.Linear)
    p, d = m.out_features, m.in_features
    has_w, has_b = "weight" in layer.params, "bias" in layer.params
    g = cat1([_grad(c).reshape(batch, -1, p) for c in calls], dim=1)
    a = cat1([c.inputs[0].reshape(batch, -1, d) for c in calls], dim=1) if has_w else None
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


def _conv2d_rule(layer: Layer, calls: list[Call], batch: int) -> tuple[torch.Tensor, SumFn]:
    m = layer.module
    assert isinstance(m, nn.Conv2d)
    p = m.out_channels
    has_w, has_b = "weight" in layer.params, "bias" in layer.params
    g = cat1([_grad(c).reshape(batch, p, -1).transpose(1, 2) for c in calls], dim=1)
    a = cat1([_unfold(m, c.inputs[0]) for c in calls], dim=1) if has_w else None
    weight_shape = tuple(m.weight.shape)

    def ghost_weight_sum(c: torch.Tensor) -> torch.Tensor:
        # in float64, as the ghost norm's bound on the clipped sum's rounding assumes
        c = c.to(torch.float64)
        total: torch.Tensor | None = None
        for call in calls:
            x, pad = _padded(m, call.inputs[0].to(torch.float64))
            gc = _grad(call).to(torch.float64) * c[:, None, None, None]
            w = conv2d_weight(  # type: ignore[no-untyped-call]
                x, weight_shape, gc, stride=m.stride, padding=pad, dilation=m.dilation
            )
            total = w if total is None else total + w
        assert total is not None
        return total

    return _matmul_rule(a, g, has_w, has_b, ghost_weight_sum)


def _embedding_rule(layer: Layer, calls: list[Call], batch: int) -> tuple[torch.Tensor, SumFn]:
    """Embedding: each example's gradient is nonzero only in the rows of its own tokens, the
    sum of its output gradients at the positions holding that token. Those rows are
    instantiated (at most ``B T`` rows of ``E``, however large the vocabulary), so the norms
    are exactly those of the values summed, at the cost of one sort of the ``B T`` keys."""
    m = layer.module
    assert isinstance(m, nn.Embedding)
    vocab, dim = m.num_embeddings, m.embedding_dim
    idx = cat1([c.inputs[0].reshape(batch, -1) for c in calls], dim=1)  # (B, T)
    g = cat1([_grad(c).reshape(batch, -1, dim) for c in calls], dim=1)  # (B, T, E)
    if m.padding_idx is not None:
        g = g.masked_fill((idx == m.padding_idx).unsqueeze(-1), 0.0)
    example = torch.arange(batch, device=idx.device).unsqueeze(1)
    keys, inverse = torch.unique((example * vocab + idx).reshape(-1), return_inverse=True)
    rows = torch.zeros(keys.shape[0], dim, dtype=g.dtype, device=g.device)
    rows.index_add_(0, inverse, g.reshape(-1, dim))  # one row per (example, token)
    owner, token = keys // vocab, keys % vocab
    norm2 = torch.zeros(batch, dtype=torch.float64, device=g.device)
    norm2.index_add_(0, owner, sq_norms(rows))
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32

    def finish(c: torch.Tensor, dests: dict[str, torch.Tensor]) -> None:
        scaled = rows * c.to(rows.dtype)[owner].unsqueeze(1)
        dest = dests["weight"]
        if dest.dtype == rows.dtype:
            dest.zero_().index_add_(0, token, scaled)
        else:
            out = torch.zeros(vocab, dim, dtype=rows.dtype, device=rows.device)
            dest.copy_(out.index_add_(0, token, scaled))

    return norm_out(norm2, acc), finish


def _instantiated(per_sample: dict[str, torch.Tensor]) -> tuple[torch.Tensor, SumFn]:
    """Norms and clipped sum from per-sample gradients {name: (B, *shape)}."""
    per_sample = {n: upcast(v) for n, v in per_sample.items()}
    norm2: torch.Tensor | None = None
    for v in per_sample.values():
        n2 = sq_norms(v)
        norm2 = n2 if norm2 is None else norm2 + n2
    assert norm2 is not None
    acc = torch.float64 if any(v.dtype == torch.float64 for v in per_sample.values()) else None
    norm2 = norm_out(norm2, acc or torch.float32)

    def finish(c: torch.Tensor, dests: dict[str, torch.Tensor]) -> None:
        for n, v in per_sample.items():
            mm_into(c.to(v.dtype)[None], v.reshape(v.shape[0], -1), dests[n].view(1, -1))

    return norm2, finish


def _add(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    acc[name] = value if name not in acc else acc[name] + value


def _norm_rule(layer: Layer, calls: list[Call], batch: int) -> tuple[torch.Tensor, SumFn]:
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
            x = upcast(call.inputs[0])
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


def _fallback_rule(layer: Layer, calls: list[Call], batch: int) -> tuple[torch.Tensor, SumFn]:
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
                raise batch_error(layer, "an output", tuple(g.shape), batch)
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
            with contextlib.ExitStack() as stack:
                # the layer's forward ran under this autocast (the clipping step itself runs
                # with autocast off): re-run it the same way, half-precision inputs included
                for device_type, dtype in call.autocast:
                    stack.enter_context(
                        torch.autocast(device_type, dtype=dtype, cache_enabled=False)
                    )
                per = torch.func.vmap(per_sample)(batched_values, cotangents)
        except RuntimeError as exc:
            if isinstance(module, nn.RNNBase):
                cell = {"LSTM": "nn.LSTMCell", "GRU": "nn.GRUCell"}.get(
                    type(module).__name__, "nn.RNNCell"
                )
                raise UnsupportedModuleError(
                    layer.path,
                    f"{module_at(layer.path)} ({type(module).__name__}) runs torch's fused "
                    "recurrent kernel, which per-sample clipping cannot split by example; "
                    f"build the recurrence from {cell} called at every step (a cell called "
                    "in a loop is handled)",
                ) from exc
            raise UnsupportedModuleError(
                layer.path,
                f"{module_at(layer.path)} ({type(module).__name__}) has no closed-form per-sample "
                "rule and its torch.func fallback (vmap over the batch of a vjp of the "
                f"module alone) failed; it must be batch-first and deterministic: {exc}",
            ) from exc
        for n, v in per.items():
            _add(acc, n, v)
    return _instantiated(acc)


LAYER_RULES: dict[str, Callable[[Layer, list[Call], int], tuple[torch.Tensor, SumFn]]] = {
    "linear": _linear_rule,
    "conv2d": _conv2d_rule,
    "embedding": _embedding_rule,
    "layernorm": _norm_rule,
    "groupnorm": _norm_rule,
    "fallback": _fallback_rule,
}
