"""A site's training datasets, loaded and checked when its node starts: each becomes a
:class:`~mpcdp.protocol.training.TrainingTask` (its examples, held-out split, declared model
factories and loss, and the gradient source that computes its clipped sums), or stays
unavailable with the reason in the owner's log and ``mpcdp party check``. torch and the
site's own code are imported only when a dataset needs them; nothing runs at import time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from mpcdp.config.datasets import load_examples
from mpcdp.config.party_config import DatasetConfig, PartyConfig
from mpcdp.config.training_config import TrainingDeclaration, is_import_path
from mpcdp.errors import ConfigError, DataError, PolicyError
from mpcdp.protocol.training import GradientSource, TrainingTask, TrainSpec

__all__ = ["ModelFactory", "load_tasks"]

log = logging.getLogger("mpcdp.party.node")


#: Builds a site's torch module from the architecture name a training run names (``Any``:
#: torch is an optional dependency, imported only when a site trains).
ModelFactory = Callable[[str], Any]


def load_tasks(
    cfg: PartyConfig,
    device: str,
    model_factory: ModelFactory | None,
    *,
    probe: int | None = 16,
    ranks: Any = None,
) -> dict[str, TrainingTask]:
    """Every training dataset of ``cfg``, loaded and checked; one that fails is unavailable
    (its error goes to the owner's log and ``mpcdp party check``). ``probe``: items of a
    declared Dataset read now (None: all)."""
    tasks = {}
    for name, ds in cfg.datasets.items():
        if ds.kind != "examples":
            continue
        try:
            tasks[name] = _task(cfg, ds, device, model_factory, probe, ranks)
        except (DataError, ConfigError, PolicyError) as exc:
            log.error("dataset %r is unavailable: %s", name, exc)
            tasks[name] = TrainingTask(config=ds, examples=0, error=str(exc))
    return tasks


def _task(
    cfg: PartyConfig,
    ds: DatasetConfig,
    device: str,
    model_factory: ModelFactory | None,
    probe: int | None,
    ranks: Any = None,
) -> TrainingTask:
    decl = ds.training or TrainingDeclaration()
    where = f"site {cfg.id!r}: datasets.{ds.name}"
    declared = None
    if decl.data or decl.factories() or decl.loss != "cross_entropy":
        declared = _train_modules()[2]  # the site's own code needs torch now
    data: Any = None
    held_out: Any = None
    if decl.data:
        assert declared is not None
        data = declared.load_data(decl, where=where, num_classes=ds.num_classes, probe=probe)
        count, shape, classes = data.count, data.feature_shape, ds.num_classes
        if decl.evaluation:
            held_out = declared.load_data(
                decl.eval_declaration(),
                where=f"{where} (held-out split)",
                num_classes=ds.num_classes,
                probe=probe,
            )
    else:
        data = load_examples(ds.path, num_classes=ds.num_classes, regression=decl.loss == "mse")
        count, shape, classes = data.count, data.feature_shape, data.num_classes
        if decl.eval_path:
            held_out = load_examples(
                Path(decl.eval_path), num_classes=ds.num_classes, regression=decl.loss == "mse"
            )
    if held_out is not None:
        _check_held_out(held_out, data, where=where)
    factories: dict[str, ModelFactory] = {}
    for path in decl.factories():
        assert declared is not None
        factories[path] = declared.model_factory(
            path,
            options=decl.model_options,
            python_path=decl.python_path,
            where=f"{where}.{'models' if decl.models else 'model'}",
        )
        # the lowest choice of each option the coordinator may set (a factory must build
        # with every allowed value; the lowest is the one tried at start)
        lowest = {c.name: c.choices[0] if c.choices else c.minimum for c in decl.model_choices}
        _probe_model(functools.partial(factories[path], **lowest), path)
    loss_fn = None
    if declared is not None:
        loss_fn = declared.resolve_loss(
            decl.loss, python_path=decl.python_path, where=f"{where}.loss"
        )
    build = functools.partial(
        _site_model,
        factory=model_factory,
        factories=factories,
        decl=decl,
        dataset=ds.name,
        site=cfg.id,
    )
    return TrainingTask(
        config=ds,
        examples=count,
        feature_shape=shape,
        num_classes=classes,
        make_source=functools.partial(
            _torch_source,
            data=data,
            held_out=held_out,
            device=device,
            build=build,
            decl=decl,
            loss_fn=loss_fn,
            ranks=ranks,
        ),
        count_params=functools.partial(_count_params, build=build),
        architecture=functools.partial(_architecture, build=build),
        loss=decl.loss,
        held_out=0 if held_out is None else held_out.count,
    )


def _check_held_out(held_out: Any, data: Any, *, where: str) -> None:
    """The held-out split has the training data's form: the same feature shape (and, for
    an .npz, the same feature kind), and at most MAX_EVAL_EXAMPLES examples."""
    from mpcdp.protocol.training.evaluation import MAX_EVAL_EXAMPLES

    if held_out.feature_shape != data.feature_shape:
        raise DataError(
            f"{where}: the held-out split's examples have shape {held_out.feature_shape}, the "
            f"training data's {data.feature_shape}"
        )
    if held_out.count > MAX_EVAL_EXAMPLES:
        raise DataError(f"{where}: the held-out split holds more than 2^40 examples")
    x_kind = getattr(getattr(data, "x", None), "dtype", None)
    e_kind = getattr(getattr(held_out, "x", None), "dtype", None)
    if x_kind is not None and e_kind is not None and (x_kind.kind in "iu") != (e_kind.kind in "iu"):
        raise DataError(
            f"{where}: the held-out split's features are {e_kind}, the training data's {x_kind} "
            "(both integer token ids, or both numbers)"
        )
    # a declared Dataset: what its probed items show (an .npz has no such fields)
    for name in ("integer_features", "target_shape", "integer_targets"):
        mine, theirs = getattr(held_out, name, None), getattr(data, name, None)
        if mine != theirs:
            raise DataError(
                f"{where}: the held-out split's items have {name}={mine!r}, the training "
                f"data's {name}={theirs!r}"
            )


def _train_modules() -> tuple[ModuleType, ModuleType, ModuleType]:
    """mpcdp.train.models, mpcdp.train.gradient_source and mpcdp.train.declared: torch is the
    `train` extra, imported only when a site trains (or declares its own model or data)."""
    try:
        from mpcdp.train import declared, gradient_source, models
    except ImportError as exc:
        raise PolicyError(
            f"this party cannot train: {exc} (install mpcdp[train] on the party)"
        ) from None
    return models, gradient_source, declared


def _probe_model(factory: ModelFactory, name: str) -> None:
    """Build the declared model once at start (on torch's meta device: no memory), so a
    factory that raises makes the task unavailable now rather than at a coordinator's
    request."""
    import torch

    try:
        with torch.device("meta"):
            factory(name)
    except ConfigError:
        factory(name)  # some factories need real tensors; this raises if it fails too


def _site_model(
    name: str,
    options: Mapping[str, Any],
    *,
    factory: ModelFactory | None,
    factories: Mapping[str, ModelFactory],
    decl: TrainingDeclaration,
    dataset: str,
    site: str,
) -> Any:
    """The module a run names, with the options its coordinator set, as this site builds it:
    a dataset that declares ``model`` or ``models`` trains those only, with its fixed
    ``model_options`` and the ``model_choices`` a coordinator may set within their ranges;
    the others use the node's factory or the built-in names, with no options. PolicyError
    naming the model or the option otherwise (before anything is reserved)."""
    models = _train_modules()[0]
    where = f"site {site!r}: dataset {dataset!r}"
    if factories and name not in factories:
        raise PolicyError(
            f"{where} trains model {next(iter(factories))!r} here; the run names {name!r}"
            if len(factories) == 1
            else f"{where} trains models {sorted(factories)} here; the run names {name!r}"
        )
    if not factories and is_import_path(name):
        raise PolicyError(
            f"site {site!r}: model {name!r} is an import path, but dataset {dataset!r} "
            f"declares no model = {name!r} in this site's party.toml"
        )
    fixed = dict(decl.model_options)
    choices = {c.name: c for c in decl.model_choices}
    chosen = {}
    for key, value in options.items():
        if key in fixed:
            if fixed[key] != value or type(fixed[key]) is not type(value):
                raise PolicyError(
                    f"{where}: model option {key}={value!r} differs from this site's fixed "
                    f"model_options.{key} = {fixed[key]!r}"
                )
        elif key in choices:
            why = choices[key].refusal(value)
            if why:
                raise PolicyError(f"{where}: model option {key}={value!r} {why} here")
            chosen[key] = value
        else:
            settable = sorted(choices) or "none"
            raise PolicyError(
                f"{where}: a coordinator may not set model option {key!r} here (it may set: "
                f"{settable})"
            )
    if not factories:
        if chosen:
            raise PolicyError(f"{where}: the built-in model {name!r} takes no options")
        return (factory or models.build_model)(name)
    return factories[name](name, **chosen)


def _count_params(spec: TrainSpec, *, build: Callable[..., Any]) -> tuple[int, int]:
    gradient_source = _train_modules()[1]
    counts: tuple[int, int] = gradient_source.count_parameters(
        _for_spec(build, spec), spec.model, bias_only=spec.bias_only
    )
    return counts


def _architecture(spec: TrainSpec, *, build: Callable[..., Any]) -> tuple[str, ...]:
    from mpcdp.train.architecture import describe_factory

    return describe_factory(_for_spec(build, spec), spec.model)


def _for_spec(build: Callable[..., Any], spec: TrainSpec) -> ModelFactory:
    """``name -> module`` with the options ``spec``'s coordinator set."""
    options = spec.options()
    return lambda name: build(name, options)


def _torch_source(
    spec: TrainSpec,
    *,
    data: Any,
    held_out: Any = None,
    device: str,
    build: Callable[..., Any],
    decl: TrainingDeclaration,
    loss_fn: Any,
    ranks: Any = None,
) -> GradientSource:
    gradient_source = _train_modules()[1]
    source: GradientSource = gradient_source.TorchGradientSource(
        model=_for_spec(build, spec)(spec.model),
        spec=spec,
        examples=None if decl.data else data,
        data=data if decl.data else None,
        device=device,
        max_physical_batch=decl.max_physical_batch,
        num_workers=decl.num_workers,
        pin_memory=decl.pin_memory,
        ranks=ranks,
        eval_examples=held_out if held_out is not None and not decl.data else None,
        eval_data=held_out if held_out is not None and decl.data else None,
        **({} if loss_fn is None else {"loss_fn": loss_fn}),
    )
    return source
