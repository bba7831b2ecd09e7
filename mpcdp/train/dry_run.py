"""A dry run of a federated DP-SGD run, on the coordinator's own data, before any site is asked:
the same plan (sampling rate, steps, clipping, scale, Skellam noise calibrated for the target
epsilon from the sites' public example counts), the same coordinator loop and update rule
(:func:`mpcdp.train.federated.train`), and at each simulated site the same per-example
clipping, randomized rounding and noise share as a real site, on a part of the data the
coordinator gives: public examples, or synthetic ones of the sites' declared shape. Nothing
leaves this process and nothing is charged.

Why: DP-SGD is sensitive to its learning rate and clipping scale, and a configuration that
diverges costs the sites real budget (docs/training.md, "Tuning without spending budget").
A dry run shows the curve the real run will follow as far as the data allow: with public data
like the sites', the accuracy too; with synthetic data, whether the run diverges or learns at
all under this noise. What it cannot show is how the sites' own data behave.

The simulated sites skip what does not change the numbers: the pairwise masks (they cancel in
the sum) and the key agreement, and their data are the coordinator's. Each holds exactly as
many examples as the real site declares (drawn with replacement from the given data), so the
plan, and therefore the noise, is the real run's. For evaluation at the sites, each also holds
a held-out split of a fifth as many examples, drawn apart.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.config.datasets import Examples
from mpcdp.errors import ParameterError
from mpcdp.mpc import encoding
from mpcdp.mpc.rng import csprng
from mpcdp.protocol import identity
from mpcdp.protocol.query.round_coordinator import ContributionStream
from mpcdp.protocol.session import Proposal
from mpcdp.protocol.training import TrainSpec, mechanism
from mpcdp.protocol.training.evaluation import eval_mechanism, eval_words, reports_accuracy
from mpcdp.train.gradient_source import TorchGradientSource
from mpcdp.train.results import TrainingResult
from mpcdp.train.run_model import model_factory_for, python_folders

__all__ = ["dry_run", "synthetic_data"]

log = logging.getLogger(__name__)

Arrays = tuple[NDArray[Any], NDArray[Any]]


class _SimulatedSite:
    """A TrainingClient that computes a real site's upload without masks: its clipped,
    randomly rounded gradient sum plus its Skellam noise share, on given examples."""

    def __init__(
        self,
        party_id: str,
        examples: Examples,
        *,
        held_out: Examples,
        build: Any,
        rng: np.random.Generator,
        loss_fn: Any = None,
    ) -> None:
        self._party_id = party_id
        self._examples = examples
        self._held_out = held_out
        self._build = build
        self._rng = rng
        self._loss_fn = loss_fn
        self._sources: dict[bytes, tuple[TrainSpec, TorchGradientSource]] = {}

    @property
    def party_id(self) -> str:
        return self._party_id

    def train_open(self, *, session_id: bytes, spec: TrainSpec) -> Proposal:
        source = TorchGradientSource(
            model=self._build(spec.model),
            spec=spec,
            examples=self._examples,
            eval_examples=self._held_out,
            device="cpu",
            **({} if self._loss_fn is None else {"loss_fn": self._loss_fn}),
        )
        self._sources[session_id] = (spec, source)
        key = identity.SignedKey(
            party_id=self._party_id, public_key=b"", signature=b"", certificate=b""
        )
        return Proposal(key=key, length=spec.num_params)

    def train_step(
        self,
        *,
        session_id: bytes,
        step: int,
        keys: Sequence[identity.SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
        ring_bits: int,
        deadline_s: float | None = None,
        evaluate: bool = False,
    ) -> ContributionStream:
        spec, source = self._sources[session_id]
        source.load_parameters(np.array(parameters, dtype=np.float32), full=full)
        if evaluate:  # a real site's terms and noise share, on the simulated split
            terms = source.evaluation(
                loss_bound=spec.eval_loss_bound,
                accuracy=reports_accuracy(spec.loss),
                rng=self._rng,
            )
            words = eval_words(spec.loss)
            share = eval_mechanism(spec.eval_mu, words=words).share(
                size=words, honest=spec.honest, rng=self._rng
            )
            words = encoding.to_ring(terms, ring_bits=ring_bits) + encoding.to_ring(
                share, ring_bits=ring_bits
            )
            return ContributionStream(self._party_id, words.size, "0", 0.0, iter([words]))
        grad = source.quantized_gradient(rng=self._rng)
        noise = mechanism(spec).share(size=spec.num_params, honest=spec.honest, rng=self._rng)
        upload = encoding.to_ring(grad, ring_bits=ring_bits) + encoding.to_ring(
            noise, ring_bits=ring_bits
        )

        def chunks() -> Iterator[np.ndarray]:
            yield upload

        return ContributionStream(self._party_id, upload.size, "0", 0.0, chunks())

    def abort(self, *, session_id: bytes, reason: str) -> None:
        self._close(session_id)

    def _close(self, session_id: bytes) -> None:
        entry = self._sources.pop(session_id, None)
        if entry is not None:
            entry[1].close()

    def close(self) -> None:
        for sid in list(self._sources):
            self._close(sid)


def synthetic_data(
    *,
    feature_shape: Sequence[int],
    num_classes: int,
    count: int,
    rng: np.random.Generator,
    integer_features: int = 0,
) -> Arrays:
    """Examples of the sites' declared shape, when the coordinator has no public data: each
    class a Gaussian cloud around its own random centre (so a model can learn something
    and a diverging run shows), or token ids in [0, integer_features) for a model that
    takes integers."""
    if num_classes < 2:
        raise ParameterError("num_classes", num_classes, "synthetic data needs >= 2 classes")
    if count < 1:
        raise ParameterError("count", count, "must be >= 1")
    shape = tuple(int(s) for s in feature_shape)
    y = rng.integers(0, num_classes, size=count)
    if integer_features:
        tokens = rng.integers(0, integer_features, size=(count, *shape))
        return tokens.astype(np.int64), y.astype(np.int64)
    centres = rng.normal(size=(num_classes, *shape)).astype(np.float32)
    x = centres[y] + rng.normal(size=(count, *shape)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def dry_run(
    *,
    data: Arrays,
    examples: Mapping[str, int],
    model: str,
    dataset: str = "dry-run",
    model_options: Mapping[str, Any] | None = None,
    python_path: str | Path | Sequence[str | Path] = (),
    loss: str = "cross_entropy",
    seed: int | None = None,
    **options: Any,
) -> TrainingResult:
    """Train ``model`` as :func:`mpcdp.train.federated.train` would across the sites of
    ``examples`` (site -> its declared number of examples), with each simulated site holding
    that many examples drawn from ``data`` = (x, y): the coordinator's public data, or
    :func:`synthetic_data`. ``options`` are ``train``'s (target_epsilon, target_delta,
    epochs, batch_size, learning_rate, max_grad_norm, clipping, eval_data, ...). Returns
    the result the real run would report, epoch by epoch; nothing is charged anywhere."""
    from mpcdp.train.federated import train
    from mpcdp.train.models import build_model

    x, y = np.asarray(data[0]), np.asarray(data[1])
    if x.ndim < 1 or len(x) != len(y) or len(x) == 0:
        raise ParameterError("data", f"x {x.shape}, y {y.shape}", "need the same number > 0")
    if not examples or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in examples.values()
    ):
        raise ParameterError("examples", dict(examples), "need every site's count >= 1")
    for name in ("clients", "audit_canaries", "checkpoint"):
        if options.get(name):
            raise ParameterError(name, options[name], "is not taken by a dry run")

    # the samplers take only a CSPRNG (mpcdp.mpc.rng); a seed makes the dry run repeatable:
    # one generator for the split, and one per site (the sites run in parallel threads)
    def generator(label: str) -> np.random.Generator:
        if seed is None:
            return csprng()
        return csprng(key=hashlib.sha256(f"dry run {seed} {label}".encode()).digest()[:16])

    rng = generator("split")
    build = model_factory_for(
        model, default=build_model, python_path=python_path, model_options=model_options
    )
    x = x.astype(np.int64) if x.dtype.kind in "iu" else x.astype(np.float32)
    regression = loss != "cross_entropy"
    num_classes = 0 if regression else int(y.max()) + 1
    y = y.astype(np.float32) if regression else y.astype(np.int64)
    loss_fn = None
    if loss != "cross_entropy":
        from mpcdp.train.declared import resolve_loss

        loss_fn = resolve_loss(loss, python_path=python_folders(python_path), where="loss")
    sites = []
    for party, count in examples.items():
        pick = rng.integers(0, len(x), size=count)
        held = Examples(path=Path("<dry run>"), x=x[pick], y=y[pick], num_classes=num_classes)
        # a held-out split for evaluation at the sites: a fifth as many, drawn apart
        pick = rng.integers(0, len(x), size=max(1, count // 5))
        split = Examples(path=Path("<dry run>"), x=x[pick], y=y[pick], num_classes=num_classes)
        sites.append(
            _SimulatedSite(
                party, held, held_out=split, build=build, rng=generator(party), loss_fn=loss_fn
            )
        )
    log.info("dry run: %d simulated sites, %d examples in all", len(sites), sum(examples.values()))
    try:
        return train(
            clients=sites,
            dataset=dataset,
            examples=dict(examples),
            model=model,
            model_options=model_options,
            python_path=python_path,
            loss=loss,
            seed=seed,
            min_parties=len(sites),
            held_out={p: max(1, n // 5) for p, n in examples.items()},
            **options,
        )
    finally:
        for s in sites:
            s.close()
