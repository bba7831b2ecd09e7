"""The coordinator's side of the one-run audit (mpcdp.train.audit_run, mpcdp.audit.canaries):
the white-box score, the black-box losses, and their bad inputs."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from mpcdp.audit.canaries import WhiteBoxScorer
from mpcdp.errors import ParameterError
from mpcdp.train import audit_run
from tests.training_support import tspec


def test_white_box_score_is_the_per_step_likelihood_ratio() -> None:
    coords = np.array([2, 0, 5])
    scorer = WhiteBoxScorer(coordinates=coords, canary_units=4.0, noise_std=2.0, sample_rate=0.1)
    step = np.array([3, -7, 1, 0, 9, 4], dtype=np.int32)
    scorer.update(step)
    scorer.update(step)
    x = step[coords].astype(float)
    one = np.log(0.9 + 0.1 * np.exp((4 * x - 8) / 4))
    np.testing.assert_allclose(scorer.scores, 2 * one, rtol=1e-12)
    assert scorer.steps == 2
    # the same value twice: no spike above the moving average
    assert scorer.spikes.tolist() == [0, 0, 0]
    sets = scorer.score_sets()
    np.testing.assert_allclose(sets[1], 0.5 / (1 + np.exp(-2 * one)))
    assert scorer.score_sets().shape == (2, 3)


def test_spike_count_ignores_a_slow_drift() -> None:
    """Every coordinate carries a large constant gradient of its own and no noise: the
    likelihood ratio ranks by the drift, the spike count by the canary's spikes."""
    rng = np.random.default_rng(2)
    m, a = 200, 10.0
    included = rng.random(m) < 0.5
    drift = rng.normal(0, 3 * a, m)
    scorer = WhiteBoxScorer(
        coordinates=np.arange(m), canary_units=a, noise_std=5 * a, sample_rate=0.1
    )
    for _ in range(300):
        hit = included & (rng.random(m) < 0.1)
        scorer.update(np.round(drift + hit * a).astype(np.int64))

    def accuracy(scores: np.ndarray) -> float:
        top = np.argsort(-scores)[: m // 4]
        return float(included[top].mean())

    assert accuracy(scorer.score_sets()[1]) > 0.95 > 0.8 > accuracy(scorer.scores)


def test_white_box_score_separates_canaries_and_is_finite_without_noise() -> None:
    """Simulated: 200 steps, q = 0.05, noise std = the canary's size. Included canaries
    (sampled ~10 times) outscore excluded ones on average by many standard errors; with the
    observed values far outside the assumed noise (noise removed) the scores stay finite."""
    rng = np.random.default_rng(1)
    m, steps, a = 400, 200, 100.0
    included = rng.random(m) < 0.5
    scorer = WhiteBoxScorer(coordinates=np.arange(m), canary_units=a, noise_std=a, sample_rate=0.05)
    for _ in range(steps):
        hit = included & (rng.random(m) < 0.05)
        scorer.update(np.round(hit * a + rng.normal(0, a, m)).astype(np.int64))
    gap = scorer.scores[included].mean() - scorer.scores[~included].mean()
    assert gap > 10 * scorer.scores.std() / math.sqrt(m)
    huge = WhiteBoxScorer(
        coordinates=np.arange(2), canary_units=1e6, noise_std=1.0, sample_rate=0.5
    )
    huge.update(np.array([10**6, 0]))
    assert np.all(np.isfinite(huge.scores)) and huge.scores[0] > huge.scores[1]


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        (dict(coordinates=np.array([], dtype=np.int64)), "coordinates"),
        (dict(canary_units=0.0), "canary_units"),
        (dict(noise_std=math.inf), "noise_std"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
    ],
)
def test_white_box_scorer_refuses_bad_inputs(kw: dict[str, object], name: str) -> None:
    args: dict[str, object] = dict(
        coordinates=np.arange(3), canary_units=1.0, noise_std=1.0, sample_rate=0.1
    )
    args.update(kw)
    with pytest.raises(ParameterError, match=name):
        WhiteBoxScorer(**args)  # type: ignore[arg-type]


def test_scorers_refuse_a_spec_of_the_other_kind() -> None:
    with pytest.raises(ParameterError, match="white-box"):
        audit_run.white_box_scorer(spec=tspec())
    with pytest.raises(ParameterError, match="black-box"):
        audit_run.black_box_scores(
            model=_mlp(0),
            spec=tspec(audit_canaries=3, audit_kind="white-box"),
            feature_shape=(20,),
            num_classes=2,
        )
    spec = tspec(audit_canaries=3, audit_kind="white-box")
    with pytest.raises(ParameterError, match="scores"):
        audit_run.finish(
            scores=np.zeros(8),
            included={p: np.zeros(3, dtype=bool) for p in spec.parties},
            spec=spec,
            delta=1e-5,
            confidence=0.95,
            claimed_epsilon=1.0,
        )


def test_black_box_scores_are_minus_the_losses_of_the_public_canaries() -> None:
    from mpcdp.audit.canaries import input_canaries

    model = _mlp(3)
    spec = tspec(audit_canaries=4, audit_kind="black-box")
    scores = audit_run.black_box_scores(model=model, spec=spec, feature_shape=(20,), num_classes=2)
    assert scores.shape == (12,)
    x, y = input_canaries(
        run_id=spec.run_id, site_index=1, count=4, feature_shape=(20,), num_classes=2
    )
    ref = audit_run.example_losses(
        model=model, inputs=torch.from_numpy(x), targets=torch.from_numpy(y)
    )
    np.testing.assert_allclose(scores[4:8], -ref)


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 256), torch.nn.ReLU(), torch.nn.Dropout(0.0), torch.nn.Linear(256, 2)
    )


def _random_label_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def test_example_losses_match_cross_entropy_and_restore_modes() -> None:
    model = _mlp(1)
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    inputs, targets = _random_label_data(12, 37)
    losses = audit_run.example_losses(model=model, inputs=inputs, targets=targets, batch_size=8)
    assert losses.shape == (37,) and losses.dtype == np.float64
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(inputs), targets, reduction="none")
    np.testing.assert_allclose(losses, ref.double().numpy(), rtol=1e-6)
    assert model.training and model[0].training and not model[2].training


def test_example_losses_rejects_mismatched_targets() -> None:
    inputs, targets = _random_label_data(13, 5)
    with pytest.raises(ParameterError, match="targets"):
        audit_run.example_losses(model=_mlp(2), inputs=inputs, targets=targets[:4])
    with pytest.raises(ParameterError, match="targets"):
        audit_run.example_losses(model=_mlp(2), inputs=inputs, targets=targets.float())
    with pytest.raises(ParameterError, match="batch_size"):
        audit_run.example_losses(model=_mlp(2), inputs=inputs, targets=targets, batch_size=0)


def test_importing_mpcdp_does_not_import_torch() -> None:
    code = "import sys, mpcdp; assert not {'torch', 'mpcdp.train'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
