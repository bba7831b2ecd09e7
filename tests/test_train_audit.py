"""Membership-inference audit: Clopper-Pearson bounds, validity of the epsilon lower bound."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
scipy_stats = pytest.importorskip("scipy.stats")

import torch  # noqa: E402

from mpcdp.errors import ParameterError  # noqa: E402
from mpcdp.train import audit  # noqa: E402


@pytest.mark.parametrize(
    ("k", "n", "alpha"),
    [
        (0, 1, 0.05),
        (0, 10, 0.05),
        (10, 10, 0.05),
        (3, 10, 0.025),
        (0, 2500, 0.025),
        (1, 2500, 0.025),
        (1250, 2500, 0.025),
        (2499, 2500, 0.025),
        (17, 400, 0.001),
        (1, 100_000, 0.01),
        (30_000, 100_000, 0.3),
    ],
)
def test_clopper_pearson_matches_scipy_beta(k: int, n: int, alpha: float) -> None:
    ours = audit.clopper_pearson_upper(successes=k, trials=n, alpha=alpha)
    ref = 1.0 if k == n else float(scipy_stats.beta.ppf(1 - alpha, k + 1, n - k))
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-15)
    # The bound is returned from the safe side of the bisection bracket.
    if k < n:
        assert scipy_stats.binom.cdf(k, n, ours) <= alpha * (1 + 1e-7)


def test_clopper_pearson_rejects_bad_counts() -> None:
    with pytest.raises(ParameterError, match="successes"):
        audit.clopper_pearson_upper(successes=11, trials=10, alpha=0.05)
    with pytest.raises(ParameterError, match="trials"):
        audit.clopper_pearson_upper(successes=0, trials=0, alpha=0.05)
    with pytest.raises(ParameterError, match="alpha"):
        audit.clopper_pearson_upper(successes=0, trials=5, alpha=1.0)


def test_identical_distributions_give_no_evidence() -> None:
    rng = np.random.default_rng(1)
    result = audit.epsilon_lower_bound(
        member_scores=rng.standard_normal(5000),
        non_member_scores=rng.standard_normal(5000),
        delta=1e-5,
        rng=np.random.default_rng(2),
    )
    assert 0.0 <= result.epsilon_lower_bound < 0.15
    assert result.members == 2500 and result.non_members == 2500


@pytest.mark.parametrize("delta", [0.0, 1e-5, 0.1])
def test_separated_scores_give_a_large_finite_bound(delta: float) -> None:
    rng = np.random.default_rng(3)
    members = rng.uniform(0.0, 1.0, 5000)
    non_members = rng.uniform(2.0, 3.0, 5000)
    result = audit.epsilon_lower_bound(
        member_scores=members,
        non_member_scores=non_members,
        delta=delta,
        rng=np.random.default_rng(4),
    )
    assert 3.0 < result.epsilon_lower_bound < math.log(2500) + 1
    assert math.isfinite(result.epsilon_lower_bound)
    assert result.tpr == 1.0 and result.fpr == 0.0
    assert 1.0 <= result.threshold < 2.0
    # Zero errors out of 2,500 at one-sided level 0.025 each: 1 - 0.025 ** (1 / 2500).
    zero_ub = -math.expm1(math.log(0.025) / 2500)
    assert result.fpr_upper == pytest.approx(zero_ub)
    assert result.fnr_upper == pytest.approx(zero_ub)
    assert result.epsilon_lower_bound == pytest.approx(math.log((1 - delta - zero_ub) / zero_ub))


def test_lower_bound_is_valid_for_a_known_epsilon() -> None:
    """Randomized response with eps = 1: the bound may exceed 1 only with prob. <= 5%."""
    eps = 1.0
    p_member_low = math.exp(eps) / (1 + math.exp(eps))
    trials, exceed, bounds = 50, 0, []
    for seed in range(trials):
        rng = np.random.default_rng([7, seed])
        # Scores 0/1, lower = member: P(0) = e^eps / (1 + e^eps) for members and
        # 1 / (1 + e^eps) for non-members, so every threshold test obeys the (eps, 0) region
        # and the best one (member iff score 0) meets it with equality.
        members = (rng.random(2000) >= p_member_low).astype(np.float64)
        non_members = (rng.random(2000) >= 1 - p_member_low).astype(np.float64)
        result = audit.epsilon_lower_bound(
            member_scores=members, non_member_scores=non_members, delta=0.0, rng=rng
        )
        bounds.append(result.epsilon_lower_bound)
        exceed += result.epsilon_lower_bound > eps
    assert exceed <= 5, bounds
    # ... and it is a useful bound, not a trivial 0.
    assert np.median(bounds) > 0.6


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 256), torch.nn.ReLU(), torch.nn.Dropout(0.0), torch.nn.Linear(256, 2)
    )


def _random_label_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def test_overfit_model_leaks_and_untrained_model_does_not() -> None:
    train = _random_label_data(10, 200)
    held_out = _random_label_data(11, 200)

    untrained = _mlp(0)
    flat = audit.audit_model(
        model=untrained,
        members=train,
        non_members=held_out,
        delta=1e-5,
        rng=np.random.default_rng(5),
    )
    assert flat.epsilon_lower_bound < 0.2

    model = _mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(train[0]), train[1])
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    result = audit.audit_model(
        model=model,
        members=train,
        non_members=held_out,
        delta=1e-5,
        rng=np.random.default_rng(5),
    )
    assert result.epsilon_lower_bound > 0.5
    assert result.tpr > result.fpr
    assert model.training  # restored


def test_example_losses_match_cross_entropy_and_restore_modes() -> None:
    model = _mlp(1)
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    inputs, targets = _random_label_data(12, 37)
    losses = audit.example_losses(model=model, inputs=inputs, targets=targets, batch_size=8)
    assert losses.shape == (37,) and losses.dtype == np.float64
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(inputs), targets, reduction="none")
    np.testing.assert_allclose(losses, ref.double().numpy(), rtol=1e-6)
    assert model.training and model[0].training and not model[2].training


def test_example_losses_rejects_mismatched_targets() -> None:
    inputs, targets = _random_label_data(13, 5)
    with pytest.raises(ParameterError, match="targets"):
        audit.example_losses(model=_mlp(2), inputs=inputs, targets=targets[:4])
    with pytest.raises(ParameterError, match="targets"):
        audit.example_losses(model=_mlp(2), inputs=inputs, targets=targets.float())
    with pytest.raises(ParameterError, match="batch_size"):
        audit.example_losses(model=_mlp(2), inputs=inputs, targets=targets, batch_size=0)
    with pytest.raises(ParameterError, match="members"):
        audit.audit_model(
            model=_mlp(2),
            members=(inputs,),  # type: ignore[arg-type]
            non_members=(inputs, targets),
            delta=1e-5,
        )


GOOD = np.array([0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    ("kwargs", "name", "reason"),
    [
        ({"member_scores": np.array([0.1, np.nan])}, "member_scores", "finite"),
        ({"non_member_scores": np.array([np.inf, 1.0])}, "non_member_scores", "finite"),
        ({"member_scores": np.array([0.1])}, "member_scores", "at least 2"),
        ({"non_member_scores": np.array([])}, "non_member_scores", "at least 2"),
        ({"member_scores": np.ones((2, 2))}, "member_scores", "1-D"),
        ({"delta": 1.0}, "delta", r"\[0, 1\)"),
        ({"delta": -1e-9}, "delta", r"\[0, 1\)"),
        ({"delta": float("nan")}, "delta", r"\[0, 1\)"),
        ({"confidence": 1.0}, "confidence", r"\(0, 1\)"),
        ({"confidence": 0.0}, "confidence", r"\(0, 1\)"),
        ({"rng": 3}, "rng", "Generator"),
    ],
)
def test_bad_inputs_name_the_parameter(kwargs: dict[str, object], name: str, reason: str) -> None:
    args: dict[str, object] = {
        "member_scores": GOOD,
        "non_member_scores": GOOD,
        "delta": 1e-5,
        "rng": np.random.default_rng(0),
    }
    args.update(kwargs)
    with pytest.raises(ParameterError, match=reason) as info:
        audit.epsilon_lower_bound(**args)  # type: ignore[arg-type]
    assert info.value.name == name
    assert name in str(info.value)


def test_importing_mpcdp_does_not_import_torch() -> None:
    code = "import sys, mpcdp; assert not {'torch', 'mpcdp.train'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
