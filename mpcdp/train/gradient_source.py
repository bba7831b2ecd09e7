"""A site's gradient source: its model and examples in torch (protocol.training.GradientSource).

Per step: Poisson-sample the site's examples with rate q from the engine's CSPRNG (the batch
must stay secret for subsampling to amplify privacy), compute the sum of per-example clipped
gradients by book-keeping (mpcdp.train.clipping, one forward and one backward, physical
micro-batches of at most ``max_physical_batch``), scale by 2^scale_bits and round to
floor(x) + [u < frac(x)] on the model's device (in float32: always floor or floor + 1, and
P(+1) = frac(x) exactly but for x in (-1, 0), where it is within 2^-25:
mpcdp.train.rounding). The dither u may come from torch's generator: the site's privacy
bound holds for every dither (protocol.training). The sum, the rounding and the words live
in buffers allocated once per session, and the next step's dither is drawn in the
background into the second of two buffers: on a CPU a fresh tensor of the model's size
costs more (page faults) than the pass that fills it.

A draw larger than ``max_batch_size`` (probability < 1e-15) is cut to a uniformly random
subset of that size, so the ring's headroom check holds for every step.

The examples are an ``.npz`` held on the device, or a declared Dataset read through a
DataLoader, only the sampled items, one physical micro-batch at a time (mpcdp.train.data).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from mpcdp.config.datasets import Examples
from mpcdp.errors import DataError, ParameterError, RankFailure
from mpcdp.protocol.noise_pool import background_executor
from mpcdp.protocol.training import TrainSpec, max_batch_size
from mpcdp.protocol.training.evaluation import EVAL_SCALE
from mpcdp.train.clipping import PerSampleClipper
from mpcdp.train.data import LoaderBatches, TensorBatches, poisson_indices
from mpcdp.train.declared import DeclaredData
from mpcdp.train.ranks import RankGroup
from mpcdp.train.rounding import randomized_round_

__all__ = [
    "TorchGradientSource",
    "count_parameters",
    "cross_entropy_per_example",
    "pick_device",
]

log = logging.getLogger(__name__)

#: the largest synthetic batch the model is checked on at session open (the check runs at
#: max_physical_batch, the largest micro-batch a step uses, up to this size)
MAX_CHECK_BATCH = 1024


def cross_entropy_per_example(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, reduction="none")


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU. A named device must
    exist here (checked now, not at the first training step)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ParameterError("device", device, "is not a torch device") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ParameterError("device", device, f"this machine has {count} CUDA device(s)")
    elif dev.type != "cpu":
        raise ParameterError("device", device, "must be 'auto', 'cpu' or 'cuda[:index]'")
    return dev


def count_parameters(
    model_factory: Callable[[str], nn.Module], name: str, *, bias_only: bool
) -> tuple[int, int]:
    """(trainable, total) parameters of ``model_factory(name)``, built on torch's meta device
    (no memory, no initialisation): a site knows a model's size before it allocates it.
    Trainable follows PerSampleClipper: floating-point parameters that require a gradient,
    only the ones ending in 'bias' with ``bias_only``."""
    with torch.device("meta"):
        model = model_factory(name)
    total = trainable = 0
    for pname, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad and p.is_floating_point() and (not bias_only or pname.endswith("bias")):
            trainable += p.numel()
    return trainable, total


class TorchGradientSource:
    """Implements protocol.training.GradientSource for one session."""

    def __init__(
        self,
        *,
        model: nn.Module,
        spec: TrainSpec,
        examples: Examples | None = None,
        data: DeclaredData | None = None,
        device: torch.device | str = "auto",
        max_physical_batch: int = 1024,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_per_example,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        ranks: RankGroup | None = None,
        eval_examples: Examples | None = None,
        eval_data: DeclaredData | None = None,
    ) -> None:
        """Exactly one of ``examples`` (in memory, copied to the device once) and ``data``
        (a declared Dataset: read per micro-batch through a DataLoader with
        ``num_workers`` and ``pin_memory``, default pinned on a GPU). ``ranks``: this
        site's worker ranks (mpcdp.train.ranks; rank 0 is this process): each step's
        Poisson sample is dealt across them and their clipped sums are added here.
        ``eval_examples`` or ``eval_data``: the site's held-out split, in the same form as
        its training data, scored by :meth:`evaluation` (in this process)."""
        if (examples is None) == (data is None):
            raise ParameterError("examples", "and data", "give exactly one of them")
        if eval_examples is not None and examples is None:
            raise ParameterError("eval_examples", "given", "needs examples (an .npz site)")
        if eval_data is not None and data is None:
            raise ParameterError("eval_data", "given", "needs data (a declared Dataset)")
        self._eval: TensorBatches | LoaderBatches | None = None
        if isinstance(max_physical_batch, bool) or not 1 <= max_physical_batch <= 1 << 20:
            raise ParameterError("max_physical_batch", max_physical_batch, "must be in [1, 2^20]")
        self._device = pick_device(device) if isinstance(device, str) else device
        self.model = model.to(self._device)
        self.model.train()
        self.clipper = PerSampleClipper(
            self.model,
            max_grad_norm=spec.max_grad_norm,
            clipping=spec.clipping,  # type: ignore[arg-type]  # checked by TrainSpec
            bias_only=spec.bias_only,
        )
        self._all = list(self.model.parameters())
        self._loss_fn = loss_fn
        self._physical = max_physical_batch
        self._data: TensorBatches | LoaderBatches
        if examples is not None:
            x = examples.x
            integer = x.dtype.kind in "iu" and self._takes_integers(examples.feature_shape)
            if x.dtype.kind in "iu" and not integer:  # integer pixels for a float model
                x = x.astype(np.float32)
            self._check_model(
                examples.feature_shape,
                num_classes=examples.num_classes,
                target_shape=tuple(examples.y.shape[1:]),
                integer_targets=examples.y.dtype.kind in "iu",
                integer_features=integer,
            )
            self._data = TensorBatches(x, examples.y, self._device)
            if eval_examples is not None:
                ex = eval_examples.x
                if ex.dtype.kind in "iu" and not integer:
                    ex = ex.astype(np.float32)
                self._eval = TensorBatches(ex, eval_examples.y, self._device)
        else:
            assert data is not None
            self._check_model(
                data.feature_shape,
                num_classes=data.num_classes,
                target_shape=data.target_shape,
                integer_targets=data.integer_targets,
                integer_features=data.integer_features,
            )
            loader = functools.partial(
                LoaderBatches, device=self._device, num_workers=num_workers, pin_memory=pin_memory
            )
            self._data = loader(data.dataset, collate=data.collate)
            if eval_data is not None:
                self._eval = loader(eval_data.dataset, collate=eval_data.collate)
        self._checks_inputs = data is not None  # an .npz was validated when it was loaded
        self._n = self._data.count
        self._q = spec.sample_rate
        self._scale = float(2.0**spec.scale_bits)
        self._int = torch.int32 if spec.ring_bits == 32 else torch.int64
        self._max_batch = max_batch_size(examples=self._n, sample_rate=self._q)
        self._gen: torch.Generator | None = None
        # the next step's rounding dither, drawn in the background (prepare_next): it does
        # not depend on the data, and on a CPU site it is the largest single pass of the step
        self._dither: Future[torch.Tensor] | None = None
        self._dither_thread: ThreadPoolExecutor | None = None
        self._closed = False
        # prepare_next (after step s's upload) may run while step s + 1 starts (the
        # coordinator can send it before the server thread resumes): one dither at a time
        self._dither_lock = threading.Lock()
        # per-session buffers (allocated at the first step): two dithers (one in use, one
        # being drawn), the sum, a micro-batch's part, floor(x), the words on the device
        # and, for a GPU, their host copy
        self._dithers: list[torch.Tensor] = []
        self._in_use: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._part: torch.Tensor | None = None
        self._low: torch.Tensor | None = None
        self._words: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self._ranks = ranks
        self._key = secrets.token_hex(8)
        if ranks is not None:
            # every worker builds this session's source from its own copy of the site's
            # config and data (what it receives is the spec: nothing private)
            ranks.open(key=self._key, description={"dataset": spec.dataset, "spec": spec})

    def _takes_integers(self, feature_shape: tuple[int, ...]) -> bool:
        """Whether the model runs on integer features (token ids for an Embedding) rather
        than only on floats: an .npz's integer-typed x is given to it as int64 then, and as
        float32 otherwise (integer pixel values). Tried on a public batch of two zeros."""
        x = torch.zeros((2, *feature_shape), dtype=torch.int64, device=self._device)
        try:
            with torch.no_grad():
                self.model(x)
        except Exception:  # the user's model on int64 input: any failure means floats
            return False
        return True

    def _check_model(
        self,
        feature_shape: tuple[int, ...],
        *,
        num_classes: int,
        target_shape: tuple[int, ...] = (),
        integer_targets: bool = True,
        integer_features: bool = False,
    ) -> None:
        """The clipper's first-use checks (mpcdp.train.clipping.checks: examples independent
        in both passes, batch dimension real, gradients as autograd's, parameters and
        buffers unchanged) on a synthetic batch, when the session opens: a refusal then
        depends on no private data and comes before any step. The batch is public (uniform
        [0, 1) features, labels 0, 1, ...): it must carry nothing about this site. Its size
        is the largest micro-batch a step uses, ``max_physical_batch`` (the operator's
        setting, not the data's size), up to :data:`MAX_CHECK_BATCH`; the probe's parts
        cover sizes from 1 up. A model that cannot run on it is checked on its first real
        batch instead, where a refusal would depend on that batch."""
        gen = torch.Generator().manual_seed(0)
        size = max(2, min(self._physical, MAX_CHECK_BATCH))
        if integer_features:  # e.g. token ids
            x = torch.zeros((size, *feature_shape), dtype=torch.int64, device=self._device)
        else:
            x = torch.rand((size, *feature_shape), generator=gen).to(self._device)
        if integer_targets:
            y = (torch.arange(size) % max(num_classes, 1)).reshape(size, *([1] * len(target_shape)))
            y = y.expand(size, *target_shape).to(self._device)
        else:
            y = torch.rand((size, *target_shape), generator=gen).to(self._device)
        try:
            self.clipper.check_model(inputs=x, targets=y, loss_fn=self._loss_fn)
        except ParameterError:
            raise
        except Exception as exc:  # any failure of the user's model on synthetic inputs
            log.warning(
                "the model cannot run on a synthetic batch (%s: %s); its first real batch "
                "is checked instead",
                type(exc).__name__,
                str(exc)[:200],
            )

    @property
    def num_params(self) -> int:
        return self.clipper.num_params

    @property
    def total_params(self) -> int:
        return int(sum(p.numel() for p in self._all))

    def load_parameters(self, values: NDArray[np.float32], *, full: bool) -> None:
        flat = torch.from_numpy(values).to(self._device)
        self.load_flat(flat, full=full)
        if self._ranks is not None:
            self._ranks.load(key=self._key, flat=flat, full=full)

    def load_flat(self, flat: torch.Tensor, *, full: bool) -> None:
        """This process's copy of the parameters (mpcdp.train.ranks.WorkerSource)."""
        if full:
            torch.nn.utils.vector_to_parameters(flat, self._all)
        else:
            self.clipper.load_flat_parameters(flat, check=False)  # the engine checked them

    def clipped_sum(self, indices: NDArray[np.int64], *, scale: float, out: torch.Tensor) -> None:
        """The sum of these examples' clipped gradients times ``scale`` into ``out``
        (mpcdp.train.ranks.WorkerSource: this rank's part of a step)."""
        for k, (inputs, targets) in enumerate(self._data.batches(indices, self._physical)):
            first = k == 0
            if not first and self._part is None:
                self._part = torch.empty_like(out)
            batch = self.clipper.clipped_grad_sum(
                inputs=inputs,
                targets=targets,
                loss_fn=self._loss_fn,
                # an .npz was validated when it was loaded; a Dataset's items are checked
                # here (a sample with a non-finite input contributes 0)
                check_inputs=self._checks_inputs,
                scale=scale,  # 2^k folded into the clip factors: exact, no extra pass
                out=out if first else self._part,
            )
            if not first:
                out.add_(batch.grad_sum)
        if indices.size == 0:  # an empty Poisson batch still sends its noise share
            out.zero_()

    def quantized_gradient(
        self, *, rng: np.random.Generator
    ) -> NDArray[np.int32] | NDArray[np.int64]:
        idx = poisson_indices(count=self._n, rate=self._q, rng=rng)
        if idx.size > self._max_batch:
            log.warning("Poisson batch of %d cut to %d", idx.size, self._max_batch)
            idx = np.sort(rng.choice(idx, size=self._max_batch, replace=False))
        if self._sum is None:
            self._allocate(rng)
        assert self._sum is not None and self._low is not None and self._words is not None
        if self._ranks is not None:
            self._ranks.clipped_sum(
                key=self._key, indices=idx, scale=self._scale, own=self, out=self._sum
            )
        else:
            self.clipped_sum(idx, scale=self._scale, out=self._sum)
        # one reduction: a NaN or inf anywhere makes the sum non-finite (the clipper drops
        # such samples, so this is defence in depth)
        if not bool(torch.isfinite(self._sum.sum())):
            raise ParameterError("gradient", "non-finite", "refusing to release this step")
        # The sum is at most max_batch C 2^k per coordinate, which the plan keeps inside the
        # ring, so int32 holds the rounded words exactly in Z_2^32.
        with self._dither_lock:
            if self._dither is None:  # not drawn ahead (first step, or prepare_next late)
                up = self._draw_dither(self._spare())
            else:
                up = self._dither.result()
                self._dither = None
            self._in_use = up
        words = randomized_round_(self._sum, dither=up, low=self._low, out=self._words)
        if self._host is not None:
            words = self._host.copy_(words)
        out: NDArray[np.int32] | NDArray[np.int64] = words.numpy()
        return out

    def evaluation(
        self, *, loss_bound: float, accuracy: bool, rng: np.random.Generator
    ) -> NDArray[np.int64]:
        """The evaluation words of the held-out split (mpcdp.protocol.training.evaluation):
        the model in eval mode without gradients; per example, with ``accuracy``, its
        accuracy in [0, 1] (argmax over dimension 1 against the target, averaged over any
        further positions; 0 for float targets), and its loss clipped to [0, loss_bound] over
        loss_bound (NaN and inf count as the bound), each times S and randomized-rounded with
        ``rng``; summed in int64. Every example's terms are in [0, S], whatever the model
        does."""
        if self._eval is None:
            raise ParameterError("evaluation", "asked", "this site holds no held-out split")
        if not math.isfinite(loss_bound) or not loss_bound > 0:
            raise ParameterError("loss_bound", loss_bound, "must be finite and > 0")
        parts: list[NDArray[np.float64]] = []
        everything = np.arange(self._eval.count, dtype=np.int64)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for inputs, targets in self._eval.batches(everything, self._physical):
                    out = self.model(inputs)
                    losses = self._loss_fn(out, targets).reshape(-1).double()
                    if losses.shape[0] != targets.shape[0]:
                        raise ParameterError(
                            "loss", f"{losses.shape[0]} values", "must give one loss per example"
                        )
                    losses = torch.nan_to_num(losses, nan=loss_bound, posinf=loss_bound)
                    terms = [losses.clamp(0.0, loss_bound) / loss_bound]
                    if accuracy:
                        right = torch.zeros_like(terms[0])
                        if out.dim() >= 2 and not targets.is_floating_point():
                            hits = (out.argmax(dim=1) == targets).double()
                            right = hits.reshape(hits.shape[0], -1).mean(dim=1).clamp(0, 1)
                        terms.insert(0, right)
                    parts.append(torch.stack(terms, dim=1).cpu().numpy())
        finally:
            self.model.train(was)
        if not parts:
            return np.zeros(2 if accuracy else 1, dtype=np.int64)
        scaled = np.concatenate(parts) * EVAL_SCALE
        low = np.floor(scaled)
        rounded = low + (rng.random(scaled.shape) < scaled - low)
        total: NDArray[np.int64] = rounded.astype(np.int64).sum(axis=0)
        return total

    def add_examples(self, x: NDArray[np.float32], y: NDArray[np.int64]) -> None:
        """Append examples (an audit run's included input canaries) before the first step;
        they are Poisson-sampled with the rest."""
        if self._sum is not None:
            raise ParameterError("x", f"{len(x)} examples", "must be added before the first step")
        if self._ranks is not None:
            raise ParameterError(
                "audit_kind",
                "black-box",
                "input canaries need a single-rank site (the worker ranks hold only the "
                "site's own examples); use a white-box audit",
            )
        try:
            self._data.add(x, y)
        except DataError as exc:
            raise ParameterError("x", f"shape {x.shape}", str(exc)) from None
        self._n = self._data.count
        self._max_batch = max_batch_size(examples=self._n, sample_rate=self._q)

    def prepare_next(self) -> None:
        """Start drawing the next step's dither in the background (the engine calls this
        once a step's upload is sent, with the noise share and masks)."""
        with self._dither_lock:
            if self._closed or self._sum is None or self._dither is not None:
                return
            if self._dither_thread is None:
                self._dither_thread = background_executor(1, name="dither")
            self._dither = self._dither_thread.submit(self._draw_dither, self._spare())

    def close(self) -> None:
        """Stop the background thread (the engine calls this when the session ends); does
        not wait for a draw in progress. Idempotent."""
        self._data.close()
        if self._eval is not None:
            self._eval.close()
        if self._ranks is not None and not self._closed:
            try:
                self._ranks.close(key=self._key)
            except RankFailure:
                log.warning("the worker ranks could not drop session %s", self._key)
        with self._dither_lock:
            self._closed = True
            if self._dither_thread is not None:
                self._dither_thread.shutdown(wait=False, cancel_futures=True)
                self._dither_thread = None
            self._dither = None

    def _spare(self) -> torch.Tensor:
        """The dither buffer the last step did not use."""
        return self._dithers[1] if self._in_use is self._dithers[0] else self._dithers[0]

    def _allocate(self, rng: np.random.Generator) -> None:
        """The session's buffers and dither generator, at its first step."""
        n, dev = self.num_params, self._device
        self._gen = torch.Generator(device=dev)
        self._gen.manual_seed(int(rng.integers(0, 2**63 - 1)))
        self._dithers = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(2)]
        self._sum = torch.empty(n, dtype=torch.float32, device=dev)
        self._low = torch.empty(n, dtype=torch.float32, device=dev)
        self._words = torch.empty(n, dtype=self._int, device=dev)
        if dev.type != "cpu":
            self._host = torch.empty(n, dtype=self._int, pin_memory=True)

    def _draw_dither(self, buffer: torch.Tensor) -> torch.Tensor:
        """Uniforms on [0, 1) for one step's rounding (any dither keeps the privacy bound)."""
        return torch.rand(buffer.shape, generator=self._gen, out=buffer)
