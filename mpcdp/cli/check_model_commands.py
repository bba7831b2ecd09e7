"""``mpcdp check-model``: what per-sample clipping will do with a model, before the first run.

A thin wrapper of :mod:`mpcdp.train.model_check`. Exit status 0 when the clipper accepts the
model as it is, 1 when it refuses it (the fix is printed), 2 for a usage error (a bad import
path, a factory that raises, an input shape the model cannot take). Needs the ``train``
extra (torch), imported only when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mpcdp.errors import ParameterError


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace(" ", "").split(","))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not sizes like 1,28,28", param_hint="--input-shape"
        ) from None
    if not shape or any(s < 1 for s in shape):
        raise typer.BadParameter(f"{text!r}: every size must be >= 1", param_hint="--input-shape")
    return shape


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _print_report(report: Any, title: str) -> None:
    typer.echo(
        f"{title}: {report.model}, {report.trainable_params:,} trainable of "
        f"{report.total_params:,} parameters"
    )
    rows = [("module", "type", "clipping", "T", "p", "d", "per example", "note")]
    for r in report.layers:
        rows.append(
            (
                r.path or "<root>",
                r.type,
                r.method,
                *("" if v is None else str(v) for v in (r.positions, r.p, r.d)),
                _mib(r.per_example_bytes) if r.per_example_bytes else "",
                r.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    for row in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
        typer.echo(f"  {cells}  {row[7]}".rstrip())
    m = report.memory
    if m is not None:
        typer.echo(
            f"memory of one DP step at batch {m.batch_size} (an estimate): {_mib(m.total)} = "
            f"activations {_mib(m.activations)} + output gradients {_mib(m.output_grads)} + "
            f"per-sample gradients {_mib(m.per_sample_grads)} + largest ghost/unfold temporary "
            f"{_mib(m.transient)} + parameters {_mib(m.parameters)} + gradient sum "
            f"{_mib(m.grad_sum)}"
        )
    if report.ok:
        typer.echo("verdict: the clipper accepts this model")
    else:
        typer.echo(f"verdict: REFUSED: {report.refusal}")


def _print_fixes(fixes: Any) -> None:
    if not fixes:
        return
    typer.echo("fixes (change your model code, or fix it in the factory):")
    for f in fixes:
        mark = "" if f.applied else " (cannot be fixed automatically)"
        typer.echo(f"  {f.path or '<root>'}: {f.before} -> {f.after}{mark}: {f.advice}")
    typer.echo(
        "  or, in the factory: `from mpcdp.train.model_check import fix_model; "
        "model, changes = fix_model(model)` (see --fix-out)"
    )


_WRAPPER = '''"""Written by `mpcdp check-model --fix-out`: {target} with mpcdp's fixes applied
(BatchNorm -> GroupNorm, nn.MultiheadAttention -> DPMultiheadAttention). Use as the model
import path `{stem}:{attr}`, with this file's folder and your code's on the python path."""

from mpcdp.train.model_check import fix_model, load_model


def {attr}(name: str):
    model, _ = fix_model(load_model({target!r}, name=name))
    return model
'''


def check_model(
    target: str = typer.Argument(
        ..., metavar="MODULE:ATTR", help="The model: package.module:factory (or a class)."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Model name passed to the factory (default: the import path)."
    ),
    python_path: list[Path] = typer.Option(
        [], "--python-path", metavar="DIR", help="Folder put first on sys.path (repeatable)."
    ),
    input_shape: str | None = typer.Option(
        None,
        "--input-shape",
        metavar="SIZES",
        help="Per-example input shape, e.g. 1,28,28 or 32 (tokens).",
    ),
    input_dtype: str = typer.Option("float", "--input-dtype", help="float or long (tokens)."),
    vocab: int | None = typer.Option(
        None, "--vocab", help="Token ids below this (long; default: the first Embedding's)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Batch of the memory estimate."),
    num_classes: int | None = typer.Option(
        None, "--num-classes", help="Classes of the synthetic targets (default: output size)."
    ),
    bias_only: bool = typer.Option(False, "--bias-only", help="DP-BiTFiT: biases only."),
    fix: bool = typer.Option(False, "--fix", help="Apply the fixes and check the result."),
    fix_out: Path | None = typer.Option(
        None,
        "--fix-out",
        metavar="OUT.py",
        help="Write a factory module that applies the fixes (implies --fix).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What the DP clipper will do with each layer of a model (ghost norm, instantiated
    per-sample gradients, closed-form, torch.func fallback, refused and why), the fixes for
    what can be fixed, the parameter count and an estimate of one DP step's memory."""
    if input_dtype not in ("float", "long"):
        raise typer.BadParameter(
            f"{input_dtype!r} is not float or long", param_hint="--input-dtype"
        )
    if batch_size < 1:
        raise typer.BadParameter(f"{batch_size!r} must be >= 1", param_hint="--batch-size")
    if num_classes is not None and num_classes < 1:
        raise typer.BadParameter(f"{num_classes!r} must be >= 1", param_hint="--num-classes")
    if vocab is not None and vocab < 1:
        raise typer.BadParameter(f"{vocab!r} must be >= 1", param_hint="--vocab")
    shape = _shape(input_shape)
    if fix_out is not None and not fix_out.name.endswith(".py"):
        raise typer.BadParameter(f"{str(fix_out)!r} must end in .py", param_hint="--fix-out")
    try:
        import torch

        from mpcdp.train import model_check as mc
    except ImportError as exc:
        typer.echo(f"error: check-model needs the train extra (pip install mpcdp[train]): {exc}")
        raise typer.Exit(1) from None

    def usage(exc: ParameterError) -> typer.Exit:
        typer.echo(f"error: {exc}", err=True)
        return typer.Exit(2)

    try:
        model = mc.load_model(target, name=name, python_path=python_path)
        dtype = torch.long if input_dtype == "long" else torch.float32
        if shape is None:
            guess = mc.infer_input(model)
            if guess is None:
                raise ParameterError(
                    "--input-shape", None, "give the per-example input shape, e.g. 1,28,28"
                )
            shape, dtype, guessed_vocab = guess
            vocab = vocab if vocab is not None else guessed_vocab
        if dtype == torch.long and vocab is None:
            vocab = next(
                (m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)),
                None,
            )
        if dtype == torch.long and vocab is None:
            raise ParameterError("--vocab", None, "is needed with --input-dtype long")
        inputs, _ = mc.synthetic_batch(input_shape=shape, input_dtype=dtype, vocab=vocab)
        classes = num_classes or mc.infer_num_classes(model, inputs=inputs)
        inputs, targets = mc.synthetic_batch(
            input_shape=shape, input_dtype=dtype, vocab=vocab, num_classes=classes
        )
        report = mc.check_model(
            model, inputs=inputs, targets=targets, batch_size=batch_size, bias_only=bias_only
        )
        fixed = None
        if (fix or fix_out is not None) and report.fixes:
            fixed_model, _ = mc.fix_model(model)
            fixed = mc.check_model(
                fixed_model,
                inputs=inputs,
                targets=targets,
                batch_size=batch_size,
                bias_only=bias_only,
            )
    except ParameterError as exc:
        raise usage(exc) from None
    if fix_out is not None:
        attr = target.partition(":")[2].split(".")[-1]
        fix_out.write_text(_WRAPPER.format(target=target, stem=fix_out.stem, attr=attr))
    if as_json:
        out = {
            "target": target,
            "input_shape": list(shape),
            "ok": report.ok,
            "report": report.to_json(),
            "fixed": None if fixed is None else fixed.to_json(),
            "fix_out": None if fix_out is None else str(fix_out),
        }
        typer.echo(json.dumps(out))
    else:
        _print_report(report, f"model {target}")
        _print_fixes(report.fixes)
        if fixed is not None:
            typer.echo("")
            _print_report(fixed, "after the fixes")
        if fix_out is not None:
            typer.echo(f"wrote {fix_out}: model import path {fix_out.stem}:{attr}")
    if not report.ok:
        raise typer.Exit(1)
