"""What a site trains on, as its TrainingEngine sees it: :class:`TrainingTask` (a dataset's
declaration, its public size and shape, and factories) and :class:`GradientSource` (the model
and data of one session; torch lives behind it, in mpcdp.train.gradient_source). Nothing happens at
import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from mpcdp.config.party_config import DatasetConfig
from mpcdp.protocol.training.train_spec import TrainSpec

__all__ = ["GradientSource", "TrainingTask"]


class GradientSource(Protocol):
    """A site's model and data, as the engine drives them (torch lives behind this; see
    mpcdp.train.gradient_source). Built per session from the spec."""

    @property
    def num_params(self) -> int:
        """Trainable parameters: the words of one upload."""
        ...

    @property
    def total_params(self) -> int:
        """All parameters of the model (a session's first step carries all of them)."""
        ...

    def load_parameters(self, values: NDArray[np.float32], *, full: bool) -> None: ...

    def quantized_gradient(
        self, *, rng: np.random.Generator
    ) -> NDArray[np.int32] | NDArray[np.int64]:
        """Poisson-sample a batch, clip, sum, scale by 2^scale_bits, round (unbiased); int32
        when the session's ring is Z_2^32 (the plan keeps every value inside it). The array
        may be a buffer the source reuses: it is valid until the next call."""
        ...

    def prepare_next(self) -> None:
        """Prepare the next step's data-independent work (e.g. its rounding dither) in the
        background; called after a step's upload is sent."""
        ...

    def evaluation(
        self, *, loss_bound: float, accuracy: bool, rng: np.random.Generator
    ) -> NDArray[np.int64]:
        """The site's evaluation words on its held-out split with the loaded parameters
        (mpcdp.protocol.training.evaluation): sums of per-example terms in [0, S],
        randomized-rounded with ``rng``: the argmax accuracy (with ``accuracy``), then the
        clipped loss."""
        ...

    def add_examples(self, x: NDArray[np.float32], y: NDArray[np.int64]) -> None:
        """Append examples to the session's data before its first step (the included input
        canaries of a black-box audit run); they are sampled like every other example."""
        ...

    def close(self) -> None:
        """Release what the session holds (threads); called once when it ends."""
        ...


@dataclass(frozen=True)
class TrainingTask:
    """An example dataset a site trains on: its declaration and a source factory.

    ``make_source`` is None when the data failed validation; ``error`` says why.
    ``count_params`` gives (trainable, total) parameters of the spec's model without building
    it (e.g. on torch's meta device), so a site refuses an oversized model before it
    allocates anything.
    """

    config: DatasetConfig
    examples: int
    feature_shape: tuple[int, ...] = ()
    num_classes: int = 0
    make_source: Callable[[TrainSpec], GradientSource] | None = None
    error: str | None = None
    count_params: Callable[[TrainSpec], tuple[int, int]] | None = None
    #: the spec's model as this site builds it, entry by entry (protocol.training.fingerprint)
    architecture: Callable[[TrainSpec], tuple[str, ...]] | None = None
    #: the per-example loss the site declared (a run must name the same)
    loss: str = "cross_entropy"
    #: the examples of the site's held-out split (party.toml; 0: none), on which it evaluates
    #: when a run asks (public, like ``examples``)
    held_out: int = 0
