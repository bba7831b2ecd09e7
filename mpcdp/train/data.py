"""Where a site's sampled examples come from, one physical micro-batch at a time.

:func:`poisson_indices` draws a step's batch: every example independently with probability
q, from the engine's CSPRNG (the law the accountant assumes; the indices stay in the site's
process and its DataLoader workers, and are never logged). Then:

- :class:`TensorBatches` (an ``.npz`` task): the examples live on the device; a micro-batch
  is an index into them.
- :class:`LoaderBatches` (a declared Dataset): only the sampled items are read, through one
  ``torch.utils.data.DataLoader`` per session (a batch sampler over the step's indices,
  ``num_workers`` persistent workers, pinned memory, the declared collate), and each
  micro-batch of at most ``max_physical_batch`` items is moved to the device on its own.
  Nothing holds a copy of the whole Dataset. A sampled item that cannot be read (its
  ``__getitem__`` raises) or has non-finite features contributes 0, and the site's log gets
  a count only: a failed step would tell the coordinator that a sampled item was bad.

Nothing happens at import time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    Sampler,
    TensorDataset,
    default_collate,
)

from mpcdp.errors import DataError

__all__ = ["LoaderBatches", "TensorBatches", "poisson_indices"]

log = logging.getLogger(__name__)

#: examples per draw of uniforms: a site's sampling temporaries stay near 8 MiB
_SAMPLE_SLICE = 1 << 20

Batch = tuple[torch.Tensor, torch.Tensor]


def poisson_indices(*, count: int, rate: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """The sorted indices in [0, count) of one Poisson(rate) batch: each index independently
    with probability ``rate`` (uniforms from ``rng``, in slices to bound the memory)."""
    parts = []
    for start in range(0, count, _SAMPLE_SLICE):
        size = min(_SAMPLE_SLICE, count - start)
        parts.append(np.flatnonzero(rng.random(size) < rate) + start)
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _finite_only(x: torch.Tensor, y: torch.Tensor) -> Batch:
    """The items of a batch whose features are finite: an item with NaN or inf features
    contributes 0, like an item whose gradient is not finite (mpcdp.train.clipping). Only
    their count is logged, in the site's own log; the step goes on, so what a coordinator
    sees does not depend on them (``mpcdp party check`` names the items)."""
    if not x.is_floating_point() or x.shape[0] == 0:
        return x, y
    ok = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bool(ok.all()):
        return x, y
    log.warning(
        "%d sampled item(s) with non-finite features contribute 0 (mpcdp party check names them)",
        int((~ok).sum()),
    )
    return x[ok], y[ok]


class TensorBatches:
    """In-memory examples on the device (features float32, targets as given)."""

    def __init__(self, x: NDArray[Any], y: NDArray[Any], device: torch.device) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(y)).to(device)
        self._device = device

    @property
    def count(self) -> int:
        return int(self.x.shape[0])

    def batches(self, indices: NDArray[np.int64], physical: int) -> Iterator[Batch]:
        index = torch.from_numpy(indices).to(self._device)
        for start in range(0, indices.size, physical):
            part = index[start : start + physical]
            yield self.x[part], self.y[part]

    def add(self, x: NDArray[np.float32], y: NDArray[np.int64]) -> None:
        if x.shape[1:] != tuple(self.x.shape[1:]) or y.shape != (x.shape[0],):
            raise DataError(
                f"examples of shape {x.shape} must be (n, {tuple(self.x.shape[1:])}) with n labels"
            )
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self._device, self.x.dtype)
        yt = torch.from_numpy(np.ascontiguousarray(y)).to(self._device, self.y.dtype)
        self.x = torch.cat([self.x, xt])
        self.y = torch.cat([self.y, yt])

    def close(self) -> None:
        return None


class _StepBatches(Sampler[list[int]]):
    """The batch sampler of a session's DataLoader: the current step's index batches (set
    by :meth:`LoaderBatches.batches` before each pass; read in the site's process only)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Guarded(Dataset[Any]):
    """The site's Dataset, with an item whose ``__getitem__`` raises read as None: that item
    contributes 0, like one with non-finite features, instead of failing the step where the
    coordinator would see that a sampled item is unreadable."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception:  # the site's own code: any failure is this item's
            return None


def _collate_readable(items: list[Any], *, collate: Callable[[list[Any]], Any] | None) -> Any:
    """(the batch of the readable items or None, how many items could not be read)."""
    kept = [item for item in items if item is not None]
    if not kept:
        return None, len(items)
    return (collate or default_collate)(kept), len(items) - len(kept)


class LoaderBatches:
    """A declared Dataset read through one DataLoader per session (module docstring)."""

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        device: torch.device,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        collate: Callable[[list[Any]], Any] | None = None,
        float_dtype: torch.dtype = torch.float32,
    ) -> None:
        self._dataset = dataset
        self._count = len(dataset)  # type: ignore[arg-type]
        self._device = device
        self._float = float_dtype
        self._pin = device.type == "cuda" if pin_memory is None else pin_memory
        self._workers = num_workers
        self._collate = collate
        self._sampler = _StepBatches()
        self._loader: DataLoader[Any] | None = None

    @property
    def count(self) -> int:
        return self._count

    def _make_loader(self) -> DataLoader[Any]:
        if self._loader is None:
            self._loader = DataLoader(
                _Guarded(self._dataset),
                batch_sampler=self._sampler,
                num_workers=self._workers,
                pin_memory=self._pin and torch.cuda.is_available(),
                collate_fn=functools.partial(_collate_readable, collate=self._collate),
                persistent_workers=self._workers > 0,
            )
        return self._loader

    def batches(self, indices: NDArray[np.int64], physical: int) -> Iterator[Batch]:
        order = indices.tolist()
        self._sampler.batches = [order[s : s + physical] for s in range(0, len(order), physical)]
        try:
            loader = iter(self._make_loader())
            while True:
                try:
                    batch, unreadable = next(loader)
                except StopIteration:
                    return
                except Exception as exc:  # the site's own Dataset or collate failed
                    # the type only: a message could name a sampled item
                    log.error("reading a sampled batch failed: %s", type(exc).__name__)
                    raise DataError(
                        "a sampled batch of the Dataset could not be read (the site's log "
                        "says how; mpcdp party check reads every item)"
                    ) from None
                if unreadable:  # a count only: which items could name the sample
                    log.warning(
                        "%d sampled item(s) could not be read: they contribute 0", unreadable
                    )
                if batch is None:
                    continue
                yield _finite_only(*self._to_device(batch))
        finally:
            self._sampler.batches = []

    def _to_device(self, batch: Any) -> Batch:
        try:
            x, y = batch
        except (TypeError, ValueError):
            raise DataError(
                f"a batch of the Dataset is {type(batch).__name__}, not (inputs, targets)"
            ) from None
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError("a batch of the Dataset is not a pair of tensors")
        blocking = not self._pin
        if x.is_floating_point():
            x = x.to(self._device, self._float, non_blocking=not blocking)
        else:
            x = x.to(self._device, non_blocking=not blocking)
        if y.is_floating_point():
            y = y.to(self._device, torch.float32, non_blocking=not blocking)
        else:
            y = y.to(self._device, torch.int64, non_blocking=not blocking)
        return x, y

    def add(self, x: NDArray[np.float32], y: NDArray[np.int64]) -> None:
        """Append examples (an audit run's input canaries) as a TensorDataset."""
        extra = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        self._dataset = ConcatDataset([self._dataset, extra])
        self._count += int(x.shape[0])
        self.close()

    def close(self) -> None:
        """Stop the DataLoader's workers (idempotent)."""
        loader, self._loader = self._loader, None
        if loader is not None and self._workers > 0:
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
