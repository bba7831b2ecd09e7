"""The federated digits demo: three sites train one MLP with federated DP-SGD.

scikit-learn's bundled digits (1,797 8x8 images, no download) are split 80/20 into train and
test with a fixed permutation; the training part is dealt to three sites (``site-a``,
``site-b``, ``site-c``), each a separate ``mpcdp party serve`` process with its own
certificate, ledger (budget epsilon per site) and ``digits.npz``; the coordinator keeps the
test split to report accuracy per epoch. With ``public_fraction`` > 0 that fraction of the
training part is public instead (held by the coordinator, used for a non-private warm start)
and the sites share the rest.

Used by ``mpcdp demo digits``, demos/federated_digits.py and the utility benchmark.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.local.localnet import launch

__all__ = ["DigitsSplit", "load_digits_split", "run", "write_sites"]

log = logging.getLogger(__name__)

SITES = ("site-a", "site-b", "site-c")
#: the fixed seed of the public train/test split (not a secret: it only fixes the split)
SPLIT_SEED = 20261125


@dataclass(frozen=True)
class DigitsSplit:
    sites: dict[str, tuple[NDArray[np.float32], NDArray[np.int64]]]
    test: tuple[NDArray[np.float32], NDArray[np.int64]]
    public: tuple[NDArray[np.float32], NDArray[np.int64]] | None
    train: tuple[NDArray[np.float32], NDArray[np.int64]]  # all private training examples


def load_digits_split(
    *, n_sites: int = 3, public_fraction: float = 0.0, test_fraction: float = 0.2
) -> DigitsSplit:
    """Digits scaled to [0, 1], split train/test, train dealt round-robin to the sites."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test = round(test_fraction * len(y))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    n_public = round(public_fraction * len(train_idx))
    public_idx, private_idx = train_idx[:n_public], train_idx[n_public:]
    names = SITES if n_sites == 3 else tuple(f"site-{i}" for i in range(n_sites))
    sites = {
        name: (x[private_idx[i::n_sites]], y[private_idx[i::n_sites]])
        for i, name in enumerate(names)
    }
    return DigitsSplit(
        sites=sites,
        test=(x[test_idx], y[test_idx]),
        public=(x[public_idx], y[public_idx]) if n_public else None,
        train=(x[private_idx], y[private_idx]),
    )


def write_sites(
    workdir: Path, split: DigitsSplit, *, budget: float, delta: float
) -> dict[str, str]:
    """Save each site's examples as WORKDIR/SITE/digits.npz, and its held-out split (the
    test examples dealt round-robin to the sites) as WORKDIR/SITE/digits-test.npz, for
    evaluation at the sites; return each site's ``[datasets.digits]`` TOML (budget
    ``budget`` at ``delta``) for localnet.launch."""
    toml = {}
    n = len(split.sites)
    tx, ty = split.test
    for i, (name, (x, y)) in enumerate(split.sites.items()):
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "digits.npz", x=x, y=y)
        np.savez(folder / "digits-test.npz", x=tx[i::n], y=ty[i::n])
        toml[name] = (
            "[datasets.digits]\n"
            'path = "digits.npz"\n'
            'eval_path = "digits-test.npz"\n'
            "num_classes = 10\n"
            f"epsilon = {budget!r}\n"
            f"delta = {delta!r}\n"
        )
    return toml


def run(
    *,
    workdir: Path,
    target_epsilon: float = 3.0,
    target_delta: float = 1e-5,
    epochs: float = 20.0,
    batch_size: int = 64,
    learning_rate: float = 0.03,
    max_grad_norm: float = 1.0,
    clipping: str = "flat",
    public_fraction: float = 0.0,
    public_epochs: int = 30,
    checkpoint: Path | None = None,
    seed: int | None = None,
    on_step: Callable[[Any], None] | None = None,
    on_epoch: Callable[[Any], None] | None = None,
    stop_after: int | None = None,
    site_budget: float | None = None,
    audit_canaries: int = 0,
    audit_kind: str = "white-box",
    audit_confidence: float = 0.95,
) -> Any:
    """Start the three sites, train, stop them; returns the TrainingResult. With
    ``audit_canaries`` > 0 the run is a one-run audit run (mpcdp.train.audit_run)."""
    from mpcdp.federation import Federation

    split = load_digits_split(public_fraction=public_fraction)
    budget = site_budget if site_budget is not None else max(2 * target_epsilon, 10.0)
    toml = write_sites(workdir, split, budget=budget, delta=target_delta)
    with launch(workdir=workdir, datasets_toml=toml, deadline_s=120.0) as net:
        with Federation.from_config(net.federation_config) as fed:
            return fed.train(
                dataset="digits",
                model="mlp:64,128,10",
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                max_grad_norm=max_grad_norm,
                clipping=clipping,
                eval_data=split.test,
                public_data=split.public,
                public_epochs=public_epochs if split.public is not None else 0,
                checkpoint=checkpoint,
                seed=seed,
                on_step=on_step,
                on_epoch=on_epoch,
                stop_after=stop_after,
                audit_canaries=audit_canaries,
                audit_kind=audit_kind,
                audit_confidence=audit_confidence,
            )
