"""What per-sample clipping will do with a model, before the first run (``mpcdp check-model``).

In the spirit of Opacus' ``ModuleValidator``: :func:`check_model` reports, for every module
that owns trainable parameters, what :class:`~mpcdp.train.clipping.PerSampleClipper` will do
with it (ghost norm, instantiated per-sample gradients, the closed-form norm-layer rule, the
``torch.func`` fallback, or a refusal and why), the parameter counts and an estimate of one
DP step's memory at a given batch size; :func:`fix_model` (:mod:`mpcdp.train.model_fix`)
replaces what can be replaced (BatchNorm by GroupNorm, ``nn.MultiheadAttention`` by
:class:`~mpcdp.train.layers.DPMultiheadAttention`); :func:`load_model` imports a model
factory given as ``package.module:attr``.

The verdict is the clipper's own: the check builds a clipper on a copy of the model, runs its
first-use checks (:meth:`PerSampleClipper.check_model`) and one clipped step on a synthetic
batch, and reports the first :class:`~mpcdp.errors.ParameterError` it raises. The
ghost/instantiated choice of Linear and Conv2d layers depends on ``T``, the positions per
example, which a forward pass on the synthetic batch measures; the clipper's own rule
(:func:`~mpcdp.train.clipping.rules.use_ghost`: the ghost norm only where instantiating,
``4 p d`` bytes per example, would take more memory than the float64 ghost branch,
``16 T^2 + 8 T (p + d)``) is then applied to the layer's ``T``, ``p`` and ``d``. Embedding
layers are always instantiated, sparsely (the rows of each example's own tokens: at most
``T E`` values). A model whose layers see other shapes on real data may be treated
differently there. The memory figure is an estimate (see :class:`MemoryEstimate`).

Nothing happens at import time beyond defining names.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpcdp.config.training_config import is_import_path
from mpcdp.errors import ParameterError, UnsupportedModuleError, UserImportError
from mpcdp.train import declared
from mpcdp.train.clipping import PerSampleClipper
from mpcdp.train.clipping.rules import classify, use_ghost
from mpcdp.train.model_fix import Fix, fix_model, possible_fixes, refused_batchnorm

__all__ = [
    "Fix",
    "LayerReport",
    "MemoryEstimate",
    "ModelReport",
    "check_model",
    "default_loss",
    "fix_model",
    "infer_input",
    "infer_num_classes",
    "load_model",
    "synthetic_batch",
]

_log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: examples in the synthetic batch that the check runs (the clipper's checks need >= 2)
PROBE_BATCH = 4


@dataclass(frozen=True)
class LayerReport:
    """What the clipper does with one module that owns trainable parameters.

    ``method``: ``"ghost"`` (ghost norm, no per-sample gradient formed), ``"instantiated"``
    (per-sample gradients ``(B, p, d)``; for an Embedding, the rows of each example's own
    tokens, at most ``T E`` values), ``"bias"`` (bias-only: from output gradients
    alone), ``"closed-form"`` (LayerNorm/GroupNorm), ``"fallback"`` (``torch.func``),
    ``"unused"`` (not called in the forward: its gradient is zero) or ``"refused"``.
    ``positions`` (T), ``p`` and ``d`` are set for Linear, Conv2d and Embedding layers that
    were called; ``per_example_bytes`` is the layer's per-sample-gradient memory per example
    (instantiated, closed-form and fallback layers) or its float64 ghost branch's, Grams and
    copies of A and G, ``16 T^2 + 8 T (p + d)`` (ghost, T > 1).
    """

    path: str
    type: str
    kind: str
    method: str
    params: int
    positions: int | None = None
    p: int | None = None
    d: int | None = None
    per_example_bytes: int = 0
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    """An estimate, in bytes, of one DP step's memory at ``batch_size`` examples.

    ``activations``: the tensors autograd saved in the synthetic forward, scaled to the batch;
    ``output_grads``: the gradients at the trainable layers' outputs that the clipper holds;
    ``per_sample_grads``: instantiated, closed-form and fallback layers' per-sample gradients
    (held until the clipped sum); ``transient``: the largest one-layer temporary (the float64
    ghost branch, ``B (16 T^2 + 8 T (p + d))`` bytes, a Conv2d's unfolded input);
    ``parameters`` and ``grad_sum``: the model and the clipped-sum buffer. Allocator overhead,
    the optimizer state and the framework's workspace are not counted: treat the total as a
    lower estimate.
    """

    batch_size: int
    parameters: int
    grad_sum: int
    activations: int
    output_grads: int
    per_sample_grads: int
    transient: int

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.grad_sum
            + self.activations
            + self.output_grads
            + self.per_sample_grads
            + self.transient
        )


@dataclass(frozen=True)
class ModelReport:
    """The result of :func:`check_model`. ``refusal`` is the clipper's message, or None."""

    model: str
    trainable_params: int
    total_params: int
    layers: tuple[LayerReport, ...]
    refusal: str | None
    refused_module: str | None
    memory: MemoryEstimate | None
    fixes: tuple[Fix, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when the clipper accepts the model as it is."""
        return self.refusal is None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        if self.memory is not None:
            out["memory"]["total"] = self.memory.total
            out["memory"]["estimate"] = True
        return out


# -- loading -------------------------------------------------------------------------------


def load_model(
    target: str, *, name: str | None = None, python_path: Sequence[str | Path] = ()
) -> nn.Module:
    """Import ``package.module:attr`` and build the model.

    ``attr`` (dotted attributes allowed) is a factory called as ``factory(name)`` (``name``
    defaults to ``target``), an ``nn.Module`` subclass (called without arguments) or an
    ``nn.Module`` instance. The directories of ``python_path`` are put first on
    ``sys.path`` (and stay there, as for a site's own code). Raises
    :class:`~mpcdp.errors.ParameterError` naming the path, the module, the attribute or the
    factory's exception.
    """
    attr = target.partition(":")[2]
    if not is_import_path(target):
        raise ParameterError(
            "model", target, "must be an import path 'package.module:attr', e.g. mynet:build"
        )
    folders = []
    for entry in python_path:
        folder = Path(entry)
        if not folder.is_dir():
            raise ParameterError("python_path", str(entry), "is not a directory")
        folders.append(folder.resolve())
    try:  # the importer a site uses for its declared model (one lock on sys.path)
        obj = declared.import_object(target, python_path=folders, where="model")
    except UserImportError as exc:
        raise ParameterError("model", target, _import_reason(exc)) from exc.cause
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ParameterError(
            "model",
            target,
            f"{attr!r} is a {type(obj).__name__}, not a factory, an nn.Module class or instance",
        )
    is_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    arg = target if name is None else name
    try:
        model = obj() if is_class else obj(arg)
    except Exception as exc:
        call = f"{attr}()" if is_class else f"{attr}({arg!r})"
        raise ParameterError("model", target, f"{call} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ParameterError(
            "model",
            target,
            f"{attr}({arg!r}) returned a {type(model).__name__}, not a torch.nn.Module",
        )
    return model


def _import_reason(exc: UserImportError) -> str:
    """Why ``exc.path`` did not import, in check-model's words (what to change)."""
    module_name, attr, cause = exc.module_name, exc.attr, exc.cause
    if cause is None:
        origin = exc.origin or module_name
        return f"module {module_name!r} ({origin}) has no attribute {attr!r}"
    if isinstance(cause, ModuleNotFoundError):
        missing = cause.name or module_name
        found = (
            f"module {module_name!r} was not found"
            if module_name == missing or module_name.startswith(missing + ".")
            else f"importing {module_name!r} failed: it imports {missing!r}, which was not found"
        )
        return (
            f"{found} (searched {len(sys.path)} sys.path entries; "
            "add the folder of your code with --python-path / python_path)"
        )
    return f"importing {module_name!r} raised {type(cause).__name__}: {cause}"


# -- synthetic batch -----------------------------------------------------------------------


def synthetic_batch(
    *,
    input_shape: Sequence[int],
    input_dtype: torch.dtype = torch.float32,
    vocab: int | None = None,
    num_classes: int = 2,
    batch: int = PROBE_BATCH,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random examples of per-example shape ``input_shape`` (standard normal, or
    integers below ``vocab`` for an integer dtype) and class targets below ``num_classes``;
    the same for the same arguments (a seeded generator of its own)."""
    shape = tuple(input_shape)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ParameterError("input_shape", shape, "every size must be an integer >= 1")
    if batch < 2:
        raise ParameterError("batch", batch, "must be >= 2")
    if num_classes < 1:
        raise ParameterError("num_classes", num_classes, "must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    if input_dtype.is_floating_point:
        inputs = torch.randn((batch, *shape), generator=gen).to(input_dtype)
    else:
        if vocab is None or vocab < 1:
            raise ParameterError("vocab", vocab, f"must be >= 1 for integer inputs ({input_dtype})")
        inputs = torch.randint(0, vocab, (batch, *shape), generator=gen, dtype=input_dtype)
    targets = torch.randint(0, num_classes, (batch,), generator=gen)
    return inputs, targets


def infer_input(model: nn.Module) -> tuple[tuple[int, ...], torch.dtype, int | None] | None:
    """(per-example shape, dtype, vocab) guessed from the first module that owns parameters:
    ``(in_features,)`` for a Linear, 16 tokens below ``num_embeddings`` for an Embedding;
    None for anything else (give the shape)."""
    for m in model.modules():
        if next(m.parameters(recurse=False), None) is None:
            continue
        if isinstance(m, nn.Linear):
            return (m.in_features,), torch.float32, None
        if isinstance(m, nn.Embedding):
            return (16,), torch.long, m.num_embeddings
        return None
    return None


def _forward_failed(inputs: torch.Tensor, exc: Exception) -> ParameterError:
    return ParameterError(
        "inputs",
        f"{inputs.dtype} of shape {tuple(inputs.shape)}",
        f"the model's forward failed on the synthetic batch ({type(exc).__name__}: {exc}); "
        "give the per-example input shape and dtype the model expects",
    )


def infer_num_classes(model: nn.Module, *, inputs: torch.Tensor) -> int:
    """The size of the last dimension of the model's output on ``inputs`` (a no-grad forward
    of a copy), or 2 when the output is not a tensor of rank >= 2. Raises ParameterError
    naming the input shape when the forward fails."""
    try:
        with torch.no_grad():
            out = copy.deepcopy(model)(inputs)
    except Exception as exc:
        raise _forward_failed(inputs, exc) from exc
    if isinstance(out, torch.Tensor) and out.dim() >= 2:
        return int(out.shape[-1])
    return 2


def default_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy of ``(B, K)`` logits; outputs ``(B, ..., K)`` are averaged
    over the middle positions first (a synthetic loss: what the clipper does with a layer
    does not depend on it)."""
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ParameterError(
            "model output", what, "the check's loss needs a tensor of logits (B, K) or (B, ..., K)"
        )
    logits = output if output.dim() == 2 else output.reshape(output.shape[0], -1, output.shape[-1])
    if logits.dim() == 3:
        logits = logits.mean(dim=1)
    return F.cross_entropy(logits.float(), targets, reduction="none")


# -- the check -----------------------------------------------------------------------------


@dataclass
class _Seen:
    """What the probe forward saw of one layer: per call, input and output shapes."""

    inputs: list[tuple[int, ...]] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)  # numel of each call's output


def _probe(
    model: nn.Module, layers: dict[str, nn.Module], inputs: torch.Tensor
) -> tuple[dict[str, _Seen], int, Any]:
    """One forward with grad: each layer's shapes, and the bytes autograd saved."""
    seen = {path: _Seen() for path in layers}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            saved[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    def make_hook(path: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor):
                seen[path].inputs.append(tuple(x.shape))
            if isinstance(out, torch.Tensor):
                seen[path].outputs.append(out.numel())

        return hook

    handles = [m.register_forward_hook(make_hook(p), with_kwargs=True) for p, m in layers.items()]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model(inputs)
    finally:
        for h in handles:
            h.remove()
    # parameters saved for backward are not activations
    params = {
        (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()
    }
    return seen, sum(n for k, n in saved.items() if k not in params), output


_MATMUL_KINDS = ("linear", "conv2d", "embedding")

#: bytes per value of an instantiated per-sample gradient, as :func:`use_ghost` counts them
_INSTANTIATED_BYTES = 4


def _ghost_bytes(t: int, p: int, d: int) -> int:
    """Per-example bytes of the ghost branch as :func:`use_ghost` counts them: float64 Gram
    matrices of A and G (``2 T^2`` values) and float64 copies of A and G (``T (p + d)``)."""
    return 16 * t * t + 8 * t * (p + d)


def _tpd(kind: str, m: nn.Module, s: _Seen, batch: int) -> tuple[int, int, int] | None:
    """(T, p, d) of a Linear, Conv2d or Embedding layer from its calls (T summed over calls)."""
    if not s.inputs:
        return None
    if isinstance(m, nn.Linear) and kind == "linear":
        t = sum(math.prod(shape) // (batch * m.in_features) for shape in s.inputs)
        return t, m.out_features, m.in_features
    if isinstance(m, nn.Conv2d) and kind == "conv2d":
        t = sum(n // (batch * m.out_channels) for n in s.outputs)
        kh, kw = m.kernel_size
        return t, m.out_channels, m.in_channels * kh * kw
    if isinstance(m, nn.Embedding) and kind == "embedding":
        t = sum(math.prod(shape) // batch for shape in s.inputs)
        return t, m.embedding_dim, m.num_embeddings
    return None


def _static_refusal(path: str, m: nn.Module, owner: dict[int, str]) -> str | None:
    if refused_batchnorm(m):
        return f"{type(m).__name__} mixes the examples of a batch; fix: GroupNorm"
    if isinstance(m, nn.MultiheadAttention):
        return "nn.MultiheadAttention bypasses its sub-modules; fix: replace_multihead_attention"
    for n, p in m.named_parameters(recurse=False):
        full = f"{path}.{n}" if path else n
        if p.requires_grad and owner.get(id(p), full) != full:
            return f"parameter {full!r} is the same tensor as {owner[id(p)]!r} (weight tying)"
    return None


def _layer_report(
    path: str, m: nn.Module, s: _Seen, *, probe: int, size: int, reason: str | None, model_ok: bool
) -> tuple[LayerReport, int, int]:
    """One layer's report, its per-example held bytes (per-sample gradients, kept until the
    clipped sum) and its per-example one-layer temporary (ghost matrices, unfolded input)."""
    own = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
    n_params = sum(p.numel() for p in own.values())
    kind = "fallback"
    try:
        kind = classify(path, m, own)
    except ParameterError as exc:
        reason = reason or exc.reason
    t, p, d = _tpd(kind, m, s, probe) or (0, 0, 0)
    per_example = held = peak = 0
    note = ""
    if reason is not None:
        method, note = "refused", reason
    elif (not s.inputs and not s.outputs) or (kind in _MATMUL_KINDS and not t):
        method, note = "unused", "not called in the synthetic forward: gradient zero"
    elif kind in ("layernorm", "groupnorm"):
        method, per_example = "closed-form", n_params * size
    elif kind == "fallback":
        method, per_example = "fallback", n_params * size
        tried = "works on the synthetic batch" if model_ok else "not tried, the model is refused"
        note = f"torch.func vmap of the module alone: {tried}"
    elif "weight" not in own:
        method, per_example = "bias", p * size
        note = "bias only: from the output gradients alone"
    elif kind == "embedding":
        # the rows of each example's own tokens, sparsely: at most T rows of E (= p) values
        method, per_example = "instantiated", t * p * size
        note = f"rows of the example's tokens: at most T*E={t * p} values"
    elif t == 1:
        method, note = "ghost", "T=1: norm |a| |g| per example"
    else:
        ghost, inst = _ghost_bytes(t, p, d), _INSTANTIATED_BYTES * p * d
        if use_ghost(t, p, d):
            method, per_example = "ghost", ghost
            note = f"ghost: 16T^2+8T(p+d)={ghost} B < 4pd={inst} B per example"
        else:
            method, per_example = "instantiated", p * d * size
            note = f"instantiated: 4pd={inst} B <= 16T^2+8T(p+d)={ghost} B per example"
    if method == "ghost":
        peak = per_example
    else:
        held = per_example
    if kind == "conv2d" and method in ("ghost", "instantiated"):
        peak += t * d * size  # the unfolded input
    if kind in ("linear", "conv2d") and "bias" in own and method in ("ghost", "instantiated"):
        held += p * size  # the per-sample bias gradients (B, p)
    none = method in ("refused", "unused") or kind not in _MATMUL_KINDS
    report = LayerReport(
        path,
        type(m).__name__,
        kind,
        method,
        n_params,
        None if none else t,
        None if none else p,
        None if none else d,
        per_example,
        note,
    )
    return report, held, peak


def check_model(
    model: nn.Module,
    *,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn = default_loss,
    batch_size: int = 64,
    bias_only: bool = False,
) -> ModelReport:
    """Report what the clipper does with ``model`` on a batch like ``inputs``.

    ``inputs``/``targets``: a synthetic batch of at least two examples (e.g. from
    :func:`synthetic_batch`); ``batch_size``: the batch the memory is estimated for. The
    model is not modified (the check runs on a deep copy). Raises ParameterError for bad
    arguments or a model whose forward fails on ``inputs`` (naming the shapes).
    """
    if batch_size < 1:
        raise ParameterError("batch_size", batch_size, "must be >= 1")
    probe = int(inputs.shape[0]) if inputs.dim() > 0 else 0
    if probe < 2:
        raise ParameterError("inputs", tuple(inputs.shape), "needs a batch of at least 2 examples")
    work = copy.deepcopy(model)
    device = next(work.parameters(), torch.empty(0)).device
    inputs, targets = inputs.to(device), targets.to(device)
    if bias_only:
        for n, p in work.named_parameters():
            if not n.endswith("bias"):
                p.requires_grad_(False)
    unique = {id(p): p for p in work.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    total = sum(p.numel() for p in unique)

    owner: dict[int, str] = {}
    owned: dict[str, nn.Module] = {}
    for path, m in work.named_modules():
        for n, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                owned[path] = m
                owner.setdefault(id(p), f"{path}.{n}" if path else n)
    try:
        seen, activation_bytes, output = _probe(work, owned, inputs)
    except Exception as exc:
        raise _forward_failed(inputs, exc) from exc

    with torch.no_grad():
        loss_fn(output, targets)  # a loss that cannot take the output is the caller's error
    del output
    refusal, refused_module = _clipper_verdict(work, inputs, targets, loss_fn, bias_only)
    size = 8 if any(p.dtype == torch.float64 for p in unique) else 4
    scale = batch_size / probe
    layers: list[LayerReport] = []
    per_sample = transient = output_grads = 0
    attention = [path for path, m in owned.items() if isinstance(m, nn.MultiheadAttention)]
    for path, m in owned.items():
        outer = next((r for r in attention if path.startswith(r + ".")), None)
        reason = (
            _static_refusal(path, m, owner)
            or (refusal if path == refused_module else None)
            or (None if outer is None else f"inside the refused {outer!r}")
        )
        layer, held, peak = _layer_report(
            path, m, seen[path], probe=probe, size=size, reason=reason, model_ok=refusal is None
        )
        layers.append(layer)
        per_sample += held
        transient = max(transient, peak)
        output_grads += int(sum(seen[path].outputs) * scale) * size
    memory = MemoryEstimate(
        batch_size=batch_size,
        parameters=sum(p.numel() * p.element_size() for p in unique),
        grad_sum=trainable * 4,
        activations=int(activation_bytes * scale),
        output_grads=output_grads,
        per_sample_grads=per_sample * batch_size,
        transient=transient * batch_size,
    )
    _log.info("check-model: %d layers, refusal: %s", len(layers), refusal)
    return ModelReport(
        model=type(model).__name__,
        trainable_params=trainable,
        total_params=total,
        layers=tuple(layers),
        refusal=refusal,
        refused_module=refused_module,
        memory=memory,
        fixes=possible_fixes(model),
    )


def _clipper_verdict(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    bias_only: bool,
) -> tuple[str | None, str | None]:
    """The clipper's refusal on this model (construction, first-use checks, one step):
    (message, module path if the error names one), or (None, None)."""
    work = copy.deepcopy(model)
    try:
        clipper = PerSampleClipper(work, max_grad_norm=1.0, bias_only=bias_only)
        with clipper:
            clipper.check_model(inputs=inputs, targets=targets, loss_fn=loss_fn)
            clipper.clipped_grad_sum(inputs=inputs, targets=targets, loss_fn=loss_fn)
    except ParameterError as exc:
        paths = {path for path, _ in model.named_modules()}
        if isinstance(exc, UnsupportedModuleError) and exc.module_path in paths:
            return str(exc), exc.module_path
        return str(exc), None
    return None, None
