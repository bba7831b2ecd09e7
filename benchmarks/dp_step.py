"""One DP-SGD step, side by side: non-private, mpcdp (book-keeping), Opacus; time and memory.

Run:  python -m benchmarks.dp_step [--models mlp cnn transformer] [--batch-size B]
                                   [--repeat 5] [--warmup 2] [--device cpu|cuda]
                                   [--autocast none|bf16]
                                   [--threads N] [--opacus-modes hooks ghost] [--json out.json]

For every model, on the same device, with the same batch (random data, fixed seed) and the
same initial weights (one copy of the model per variant), in the same run:

- non-private: forward, ``loss.mean().backward()``, ``optimizer.step()``, ``zero_grad``;
- mpcdp: :meth:`mpcdp.train.clipping.PerSampleClipper.clipped_grad_sum` (per-sample clipping
  by book-keeping, C = 1: one forward, one backward), plus Gaussian noise of std 1.0 * C on
  the sum, divided by the batch size, set as ``.grad``, ``optimizer.step()``. This is the
  local compute of a step; the secure aggregation of the sum across sites is not included;
- mpcdp-client: what a federated site does on a step's critical path: the same clipped sum,
  scaled by 2^16 and rounded with a dither, then the SGD update (a site's Skellam share and
  masks are built in the background, protocol/training.py, so no noise is drawn here);
- Opacus (if installed): ``PrivacyEngine.make_private`` on its own copy, noise multiplier
  1.0, C = 1, ``poisson_sampling=False`` (the same fixed batch): forward, backward,
  ``DPOptimizer.step()`` (clip, noise, step), ``zero_grad``. ``--opacus-modes``: ``hooks``
  (Opacus' default, per-sample gradients instantiated) and ``ghost`` (Opacus' ghost
  clipping, two backward passes).

Every optimizer is SGD with momentum 0.9. Time: best of ``--repeat`` steps after
``--warmup`` steps, the variants interleaved round by round (``torch.cuda.synchronize``
around each step on a GPU). Memory, measured on a separate step: on CUDA the peak of
``torch.cuda.max_memory_allocated`` during the step minus what was allocated before it (the
step's transient memory: activations, gradients, per-sample state, noise); on the CPU the
increase of the process' peak resident set (VmHWM, reset through /proc/self/clear_refs after
``malloc_trim``) over the resident set before the step: an approximation, "n/a" where the
kernel does not allow the reset. "held": what the variant keeps between steps beyond its
model (allocated memory, or resident set after ``malloc_trim``, after the warm-up steps minus
before the variant was built: optimizer momentum, Opacus' wrappers, mpcdp's reused
buffers); the memory ratio is (held + step) over the non-private step's. Ratios: each
variant over the non-private step ("ratio/np") and over the mpcdp step ("ratio/ours"; for
Opacus that is Opacus / mpcdp). Absolute times and megabytes are for this machine only.

Models (``--models``): ``mlp`` (flattened 3x32x32 input, Linear 3072-2048-1536-512-10 with
ReLUs by default (``--mlp-widths``): 10,232,842 parameters), ``cnn`` (3 x [Conv2d 3x3,
GroupNorm, ReLU, MaxPool], Linear, ReLU, Linear on 3x32x32: 357,258), ``transformer``
(Embedding of tokens and of positions, ``--layers`` pre-norm blocks of LayerNorm + attention
from four Linear projections + LayerNorm + MLP, mean pool, Linear: 3,696,138 at the
defaults), ``torch-transformer`` (the same shape from torch's own ``nn.TransformerEncoder``
with dropout 0.1, made clippable by ``replace_multihead_attention``: the user-model path).
All classify into 10 classes with cross-entropy. The defaults follow the device (``cuda``
when available, batch 256 there, 64 on the CPU); on a GPU machine
``python -m benchmarks.dp_step --json out.json`` runs everything there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import functools
import gc
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpcdp.train.clipping import PerSampleClipper
from mpcdp.train.federated import set_flat_gradients
from mpcdp.train.rounding import randomized_round_

CLASSES = 10
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 0.01
MODEL_NAMES = ("mlp", "cnn", "transformer", "torch-transformer")

Step = Callable[[], None]


# -- models ------------------------------------------------------------------------------


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(8, c_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        *block(64, 128),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, CLASSES),
    )


class Attention(nn.Module):
    """Multi-head self-attention from four nn.Linear projections (batch first)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        out: torch.Tensor = self.out(y.transpose(1, 2).reshape(b, t, d))
        return out


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return out


class TinyTransformer(nn.Module):
    """Token and position embeddings, pre-norm blocks, mean pooling, a linear classifier."""

    def __init__(self, *, vocab: int, seq_len: int, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        # positions as a (B, T) input: every trainable layer sees the batch on dimension 0
        # (contiguous: Opacus' ghost norm for Embedding calls .view on the indices)
        positions = torch.arange(t, device=tokens.device).expand(b, t).contiguous()
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.ln(x).mean(dim=1))
        return out


class TorchTransformer(nn.Module):
    """What a user writes: torch's own nn.TransformerEncoder (pre-norm, dropout 0.1, GELU),
    made trainable with per-sample clipping by
    :func:`mpcdp.train.layers.replace_multihead_attention` (the user-model path)."""

    def __init__(self, *, vocab: int, seq_len: int, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        from mpcdp.train.layers import replace_multihead_attention

        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)
        replace_multihead_attention(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t).contiguous()
        x = self.encoder(self.tok(tokens) + self.pos(positions))
        out: torch.Tensor = self.head(self.ln(x).mean(dim=1))
        return out


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """The model and a function batch_size -> random inputs (on the CPU)."""
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        widths = [3 * 32 * 32, *args.mlp_widths, CLASSES]
        return mlp(widths), lambda b: torch.randn(b, 3, 32, 32, generator=gen)
    if name == "cnn":
        return cnn(), lambda b: torch.randn(b, 3, 32, 32, generator=gen)
    if name == "transformer":
        model = TinyTransformer(
            vocab=args.vocab, seq_len=args.seq_len, dim=args.dim, heads=4, layers=args.layers
        )
        return model, lambda b: torch.randint(0, args.vocab, (b, args.seq_len), generator=gen)
    if name == "torch-transformer":
        user_model: nn.Module = TorchTransformer(
            vocab=args.vocab, seq_len=args.seq_len, dim=args.dim, heads=4, layers=args.layers
        )
        return user_model, lambda b: torch.randint(0, args.vocab, (b, args.seq_len), generator=gen)
    raise SystemExit(f"unknown model {name!r}")


# -- the steps ---------------------------------------------------------------------------


def _per_example_ce(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, targets, reduction="none")


def nonprivate_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def mpcdp_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    clipper = PerSampleClipper(model, max_grad_norm=MAX_GRAD_NORM)
    params = [p for _, p in clipper.named_parameters()]
    opt = torch.optim.SGD(params, lr=LEARNING_RATE, momentum=0.9)
    batch = x.shape[0]
    n, dev = clipper.num_params, clipper.device
    total, noise = torch.empty(n, device=dev), torch.empty(n, device=dev)  # reused

    def step() -> None:
        g = clipper.clipped_grad_sum(
            inputs=x, targets=y, loss_fn=_per_example_ce, out=total
        ).grad_sum  # fmt: skip
        torch.randn(n, out=noise)
        g.add_(noise, alpha=NOISE_MULTIPLIER * MAX_GRAD_NORM).div_(batch)
        set_flat_gradients(params, g)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def client_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """What a federated site does on a step's critical path (mpcdp/train/gradient_source.py): the
    clipped sum, scaled by 2^k and rounded with a dither into buffers allocated once (its
    noise share and masks are built in the background), and the update the coordinator sends
    back applied with SGD."""
    clipper = PerSampleClipper(model, max_grad_norm=MAX_GRAD_NORM)
    params = [p for _, p in clipper.named_parameters()]
    opt = torch.optim.SGD(params, lr=LEARNING_RATE, momentum=0.9)
    batch = x.shape[0]
    scale = 2.0**16
    n, dev = clipper.num_params, clipper.device
    total, low, dither = (torch.empty(n, device=dev) for _ in range(3))
    words = torch.empty(n, dtype=torch.int32, device=dev)
    host = words if dev.type == "cpu" else torch.empty(n, dtype=torch.int32, pin_memory=True)

    def step() -> None:
        # 2^k folded into the clip factors, one finiteness reduction, exact float32 rounding
        # to int32 words (the site draws its dither in the background; here it is timed)
        clipper.clipped_grad_sum(
            inputs=x, targets=y, loss_fn=_per_example_ce, check_inputs=False, scale=scale,
            out=total,
        )  # fmt: skip
        assert bool(torch.isfinite(total.sum()))
        torch.rand(n, out=dither)
        randomized_round_(total, dither=dither, low=low, out=words)
        host.copy_(words)  # Z_2^32 words, handed to the protocol
        g = low.copy_(words).div_(scale * batch)
        set_flat_gradients(params, g)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def opacus_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Step:
    from opacus import PrivacyEngine  # type: ignore[import-untyped]
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    # make_private wants a data loader: one batch of the same examples, sampled as it is
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    engine = PrivacyEngine()
    common: dict[str, Any] = {
        "module": model,
        "optimizer": opt,
        "data_loader": loader,
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM,
        "poisson_sampling": False,
    }
    if mode == "ghost":
        gsm, dp_opt, criterion, _ = engine.make_private(
            **common, criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost"
        )

        def ghost_step() -> None:
            criterion(gsm(x), y).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

        return ghost_step
    gsm, dp_opt, _ = engine.make_private(**common, grad_sample_mode=mode)

    def step() -> None:
        F.cross_entropy(gsm(x), y).backward()  # type: ignore[no-untyped-call]
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    return step


# -- measuring ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Step, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def _malloc_trim() -> None:
    """Give glibc's freed heap memory back to the OS, so that its reuse shows as growth."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_peak_bytes(step: Step) -> int | None:
    """Peak RSS during one step minus the RSS before it; None where it cannot be measured."""
    gc.collect()
    try:
        _malloc_trim()
        before = _proc_status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        if _proc_status_kb("VmHWM") > before + 1024:
            return None  # the reset did not take
    except (OSError, KeyError):
        return None
    step()
    return max(0, _proc_status_kb("VmHWM") - before) * 1024


def _cuda_peak_bytes(step: Step, device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def held_bytes(device: torch.device) -> int | None:
    """What the process holds now: CUDA memory allocated, or the resident set after a GC
    and ``malloc_trim`` on the CPU (None where /proc is missing)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    _malloc_trim()
    try:
        return _proc_status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        return None


def peak_bytes(step: Step, device: torch.device) -> int | None:
    return _cuda_peak_bytes(step, device) if device.type == "cuda" else _cpu_peak_bytes(step)


@dataclass
class Row:
    model: str
    params: int
    batch: int
    variant: str
    step_s: float | None = None
    peak_bytes: int | None = None
    held_bytes: int | None = None
    ratio_nonprivate: float | None = None
    ratio_ours: float | None = None
    mem_ratio_nonprivate: float | None = None
    error: str | None = None


@contextlib.contextmanager
def _reported(row: Row, device: torch.device) -> Iterator[None]:
    """Warnings off; an Opacus variant that fails is reported "n/a" with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus: secure_mode off, and the like
            yield
    except Exception as exc:
        if row.variant in ("non-private", "mpcdp", "mpcdp-client"):
            raise
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        row.step_s = row.peak_bytes = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_model(
    name: str, args: argparse.Namespace, device: torch.device, opacus_modes: list[str]
) -> list[Row]:
    torch.manual_seed(0)
    base, make_inputs = build(name, args)
    params = sum(p.numel() for p in base.parameters())
    x = make_inputs(args.batch_size).to(device)
    y = torch.randint(0, CLASSES, (args.batch_size,), generator=torch.Generator().manual_seed(2))
    y = y.to(device)

    makers: dict[str, Callable[[nn.Module], Step]] = {
        "non-private": lambda m: nonprivate_step(m, x, y),
        "mpcdp": lambda m: mpcdp_step(m, x, y),
        "mpcdp-client": lambda m: client_step(m, x, y),
    }
    for mode in opacus_modes:
        makers[f"opacus-{mode}"] = functools.partial(opacus_step, x=x, y=y, mode=mode)

    rows = {v: Row(model=name, params=params, batch=args.batch_size, variant=v) for v in makers}
    steps: dict[str, Step] = {}
    for variant, make in makers.items():
        with _reported(rows[variant], device):
            model = copy.deepcopy(base).to(device)
            before = held_bytes(device)
            step = _under_autocast(make(model), device, args.autocast)
            for _ in range(args.warmup):
                step()
            steps[variant] = step
            after = held_bytes(device)
            if before is not None and after is not None:
                # state kept between steps: optimizer buffers, hooks' state, reused buffers
                rows[variant].held_bytes = max(0, after - before)
    best = {v: math.inf for v in steps}
    for _ in range(args.repeat):  # interleaved: drift hits every variant alike
        for variant, step in steps.items():
            if rows[variant].error is None:
                with _reported(rows[variant], device):
                    best[variant] = min(best[variant], _timed(step, device))
    for variant, step in steps.items():
        if rows[variant].error is None:
            with _reported(rows[variant], device):
                rows[variant].peak_bytes = peak_bytes(step, device)
                rows[variant].step_s = best[variant]
    steps.clear()
    base_t, ours_t = rows["non-private"].step_s, rows["mpcdp"].step_s
    assert base_t is not None and ours_t is not None
    base_m = _total_bytes(rows["non-private"])
    for row in rows.values():
        if row.step_s is None:
            continue
        row.ratio_nonprivate = row.step_s / base_t
        row.ratio_ours = row.step_s / ours_t
        total = _total_bytes(row)
        if total is not None and base_m:
            row.mem_ratio_nonprivate = total / base_m
    return list(rows.values())


def _under_autocast(step: Step, device: torch.device, autocast: str) -> Step:
    """``step`` run under torch.autocast in bfloat16 when ``autocast`` is "bf16" (how GPU
    users train): every variant alike, the non-private baseline included."""
    if autocast == "none":
        return step

    def wrapped() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step()

    return wrapped


def _total_bytes(row: Row) -> int | None:
    """Held between steps + the step's own peak: what the variant needs beyond the model."""
    if row.peak_bytes is None or row.held_bytes is None:
        return None
    return row.peak_bytes + row.held_bytes


def _fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}{spec}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default 256 on cuda, 64 on cpu"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--opacus-modes", nargs="*", default=["hooks", "ghost"], choices=["hooks", "ghost"]
    )
    parser.add_argument(
        "--mlp-widths",
        type=int,
        nargs="+",
        default=[2048, 1536, 512],
        help="hidden widths of the MLP (input 3072, 10 classes)",
    )
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--autocast",
        choices=["none", "bf16"],
        default="none",
        help="run every variant's step under bf16 autocast (mpcdp still clips in float32)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 64
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    opacus_version: str | None = None
    modes: list[str] = list(args.opacus_modes)
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        print("Opacus is not installed: the Opacus rows are skipped (pip install opacus)")
        modes = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, opacus {opacus_version or 'n/a'}, "
        f"{torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"best of {args.repeat} after {args.warmup} warm-up steps"
    )
    mem_what = "CUDA peak alloc" if device.type == "cuda" else "peak RSS growth"
    print(
        f"memory: held MB = state kept between steps beyond the model (optimizer, hooks, "
        f"buffers); step MB = the step's {mem_what} over what was held before it; "
        f"mem/np = (held + step) over the non-private step's"
    )
    header = (
        f"{'model':<12} {'params':>11} {'batch':>5}  {'variant':<14} {'step ms':>9} "
        f"{'ratio/np':>8} {'ratio/ours':>10} {'held MB':>8} {'step MB':>9} {'mem/np':>7}"
    )
    print(header)
    print("-" * len(header))
    all_rows: list[Row] = []
    for model_name in args.models:
        rows = bench_model(model_name, args, device, modes)
        all_rows += rows
        for r in rows:
            lead = f"{r.model:<12} {r.params:>11,d} {r.batch:>5d}  {r.variant:<14}"
            if r.error is not None:
                print(f"{lead} {'n/a':>9}  ({r.error})")
                continue
            ms = None if r.step_s is None else r.step_s * 1e3
            mb = None if r.peak_bytes is None else r.peak_bytes / 2**20
            held = None if r.held_bytes is None else r.held_bytes / 2**20
            print(
                f"{lead} {_fmt(ms, '.2f', 9)} {_fmt(r.ratio_nonprivate, '.2f', 8)} "
                f"{_fmt(r.ratio_ours, '.2f', 10)} {_fmt(held, '.1f', 8)} {_fmt(mb, '.1f', 9)} "
                f"{_fmt(r.mem_ratio_nonprivate, '.2f', 7)}",
                flush=True,
            )
    if args.json:
        payload = {
            "device": name,
            "torch": torch.__version__,
            "opacus": opacus_version,
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "repeat": args.repeat,
            "memory": mem_what,
            "rows": [asdict(r) for r in all_rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
