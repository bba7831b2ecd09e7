"""The one-run audit's bound (mpcdp.audit.bound): known answers, monotonicity, validity and
power on simulated eps-randomized-response canaries, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpcdp.audit import bound, canaries
from mpcdp.audit.canaries import pack_inclusion, unpack_inclusion
from mpcdp.errors import ParameterError, ProtocolError

scipy_stats = pytest.importorskip("scipy.stats")


def reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value with scipy's binomial (an independent implementation)."""
    p = 1 / (1 + math.exp(-eps))
    tail = float(scipy_stats.binom.sf(v - 1, r, p))
    worst = 0.0
    for i in range(1, v + 1):
        mass = float(scipy_stats.binom.cdf(v - 1, r, p) - scipy_stats.binom.cdf(v - i - 1, r, p))
        worst = max(worst, mass / i)
    return min(1.0, tail + 2 * m * delta * worst)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (1000, 100, 90, 1.0, 0.0),
        (1000, 100, 90, 1.0, 1e-5),
        (1000, 200, 180, 2.5, 1e-4),
        (50, 10, 10, 0.3, 1e-3),
        (5000, 1000, 600, 0.2, 1e-6),
    ],
)
def test_p_value_matches_scipy(m: int, r: int, v: int, eps: float, delta: float) -> None:
    ours = bound.p_value(m=m, guesses=r, correct=v, epsilon=eps, delta=delta)
    assert ours == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-300)


def test_delta_zero_is_the_binomial_bound() -> None:
    """delta = 0: the bound is the eps where P[Binom(r, p) >= v] = 1 - confidence."""
    r, v, beta = 500, 400, 0.05
    eps = bound.epsilon_lower_bound(m=1000, guesses=r, correct=v, delta=0.0, confidence=1 - beta)
    p = 1 / (1 + math.exp(-eps))
    assert float(scipy_stats.binom.sf(v - 1, r, p)) == pytest.approx(beta, rel=1e-6)


@pytest.mark.parametrize(("r", "beta"), [(10, 0.05), (100, 0.05), (1000, 1e-7)])
def test_all_correct_guesses_give_the_closed_form(r: int, beta: float) -> None:
    """r of r correct with delta = 0: p^r <= beta, so eps = log(p / (1 - p)), p = beta^(1/r)."""
    p = beta ** (1 / r)
    expected = math.log(p / (1 - p))
    got = bound.epsilon_lower_bound(m=2 * r, guesses=r, correct=r, delta=0.0, confidence=1 - beta)
    assert got == pytest.approx(expected, rel=1e-9)


def test_bound_is_monotone() -> None:
    base = dict(m=2000, guesses=400, delta=1e-5, confidence=0.95)
    by_correct = [bound.epsilon_lower_bound(correct=v, **base) for v in range(200, 401, 20)]  # type: ignore[arg-type]
    assert by_correct == sorted(by_correct) and by_correct[0] == 0.0 and by_correct[-1] > 0
    by_conf = [
        bound.epsilon_lower_bound(m=2000, guesses=400, correct=350, delta=1e-5, confidence=c)
        for c in (0.5, 0.9, 0.99, 0.9999)
    ]
    assert by_conf == sorted(by_conf, reverse=True)
    by_delta = [
        bound.epsilon_lower_bound(m=2000, guesses=400, correct=350, delta=d, confidence=0.95)
        for d in (0.0, 1e-6, 1e-4, 1e-3)
    ]
    assert by_delta == sorted(by_delta, reverse=True)
    eps = [0.0, 0.5, 1.0, 2.0, 4.0]
    pv = [bound.p_value(m=2000, guesses=400, correct=350, epsilon=e, delta=1e-5) for e in eps]
    assert pv == sorted(pv)


def test_no_evidence_gives_zero() -> None:
    assert bound.epsilon_lower_bound(m=10, guesses=0, correct=0, delta=0, confidence=0.95) == 0
    assert bound.epsilon_lower_bound(m=100, guesses=50, correct=25, delta=0, confidence=0.95) == 0


def randomized_response(
    rng: np.random.Generator, m: int, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """S_i uniform; the score is S_i flipped with probability 1 / (1 + e^eps): an eps-DP
    release of each canary's bit (and nothing more private is possible at that accuracy)."""
    s = rng.integers(0, 2, size=m) == 1
    flip = rng.random(m) < 1 / (1 + math.exp(eps))
    return np.where(s ^ flip, 1.0, -1.0), s


@pytest.mark.parametrize("eps", [1.0, 3.0])
def test_bound_is_valid_and_powerful_on_randomized_response(eps: float) -> None:
    """N = 40 runs at confidence 1 - 1e-8 with fixed guesses (k+ = k- = m/4): each run's
    bound exceeds eps with probability <= 1e-8 (the bound's statement), so a chance failure
    of this test is <= 40 * 1e-8 = 4e-7 per eps. Power: with r = 50,000 guesses the bound
    reaches 0.85 eps (expected ~0.94 at eps 1, ~0.96 at eps 3: 5.6 binomial std below the
    mean accuracy; 0.85 is over 20 std from the mean of the bound)."""
    rng = np.random.default_rng(20261130 + int(eps))
    m, runs = 100_000, 40
    for _ in range(runs):
        scores, included = randomized_response(rng, m, eps)
        res = bound.audit(
            scores=scores,
            included=included,
            delta=0.0,
            confidence=1 - 1e-8,
            k_plus=m // 4,
            k_minus=m // 4,
            claimed_epsilon=eps,
        )
        assert res.epsilon_lower_bound <= eps
        assert res.epsilon_lower_bound >= 0.85 * eps
        assert res.guesses == m // 2 and res.m == m and res.candidates == 1
        assert res.fraction_reached == pytest.approx(res.epsilon_lower_bound / eps)


def test_grid_search_is_bonferroni_corrected_and_valid() -> None:
    """Choosing (k+, k-) after seeing the bits: each of G candidates at (1 - c) / G. 20 runs
    at confidence 1 - 1e-8 (chance failure <= 2e-7); the bound is below the fixed-guess one
    at the same accuracy only by the correction."""
    rng = np.random.default_rng(7)
    eps, m = 2.0, 20_000
    for _ in range(20):
        scores, included = randomized_response(rng, m, eps)
        scores = scores + rng.random(m) * 1e-3  # break ties: a continuous score
        res = bound.audit(scores=scores, included=included, delta=1e-12, confidence=1 - 1e-8)
        assert res.candidates > 1
        assert 0.5 * eps < res.epsilon_lower_bound <= eps


def test_the_delta_term_floors_the_p_value() -> None:
    """max over i includes i = v: the p-value is at least 2 m delta P[Binom < v] / v, so a
    small 1 - confidence needs a small audited delta (the audit's ``delta`` option)."""
    m, r, v, delta = 20_000, 10_000, 9_000, 1e-5
    below = float(scipy_stats.binom.cdf(v - 1, r, 1 / (1 + math.exp(-1.0))))
    floor = 2 * m * delta / v * below
    assert floor > 4e-5
    assert bound.p_value(m=m, guesses=r, correct=v, epsilon=1.0, delta=delta) >= floor
    assert bound.epsilon_lower_bound(
        m=m, guesses=r, correct=v, delta=delta, confidence=1 - floor / 2
    ) == pytest.approx(0.0)
    assert bound.epsilon_lower_bound(m=m, guesses=r, correct=v, delta=1e-15, confidence=0.99) > 2


def test_a_leaky_release_is_caught() -> None:
    """A release that is eps = 6 randomized response, audited against a claim of 1."""
    rng = np.random.default_rng(3)
    scores, included = randomized_response(rng, 2000, 6.0)
    res = bound.audit(
        scores=scores, included=included, delta=1e-12, confidence=1 - 1e-7, claimed_epsilon=1.0
    )
    assert res.epsilon_lower_bound > 2.0 and res.fraction_reached is not None
    assert res.fraction_reached > 2.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(m=0, guesses=0, correct=0), "m"),
        (dict(m=10, guesses=11, correct=0), "guesses"),
        (dict(m=10, guesses=5, correct=6), "correct"),
        (dict(m=10, guesses=5, correct=True), "correct"),
        (dict(m=10, guesses=5, correct=3, delta=1.0), "delta"),
        (dict(m=10, guesses=5, correct=3, delta=-0.1), "delta"),
        (dict(m=10, guesses=5, correct=3, confidence=1.0), "confidence"),
        (dict(m=10, guesses=5, correct=3, confidence=0), "confidence"),
    ],
)
def test_bound_refuses_bad_counts(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = dict(delta=0.0, confidence=0.95)
    args.update(kwargs)
    with pytest.raises(ParameterError, match=name):
        bound.epsilon_lower_bound(**args)  # type: ignore[arg-type]


def test_p_value_refuses_bad_epsilon() -> None:
    with pytest.raises(ParameterError, match="epsilon"):
        bound.p_value(m=10, guesses=5, correct=3, epsilon=-1.0, delta=0.0)
    with pytest.raises(ParameterError, match="epsilon"):
        bound.p_value(m=10, guesses=5, correct=3, epsilon=math.inf, delta=0.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(scores=[]), "scores"),
        (dict(scores=[1.0, math.nan]), "scores"),
        (dict(scores=[[[1.0]]], included=[True]), "scores"),
        (dict(included=[1, 0]), "included"),
        (dict(included=[True]), "included"),
        (dict(k_plus=1), "k_minus"),
        (dict(k_plus=-1, k_minus=0), "k_plus"),
        (dict(k_plus=2, k_minus=1), "k_plus"),
        (dict(k_plus=0, k_minus=1.5), "k_minus"),
        (dict(grid=[]), "grid"),
        (dict(grid=[0]), "grid"),
        (dict(claimed_epsilon=-1.0), "claimed_epsilon"),
        (dict(delta=2.0), "delta"),
        (dict(confidence=1.5), "confidence"),
    ],
)
def test_audit_refuses_bad_inputs(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = dict(scores=[1.0, 0.0], included=[True, False], delta=0.0)
    args.update(kwargs)
    with pytest.raises(ParameterError, match=name):
        bound.audit(**args)  # type: ignore[arg-type]


def test_inclusion_bits_round_trip_strictly() -> None:
    bits = np.array([True, False, True, True, False, False, False, True, True])
    data = pack_inclusion(bits)
    assert len(data) == 2
    assert np.array_equal(unpack_inclusion(data, count=9, party="a"), bits)
    with pytest.raises(ProtocolError, match="expected 2"):
        unpack_inclusion(data + b"\0", count=9, party="a")
    with pytest.raises(ProtocolError, match="padding"):
        unpack_inclusion(bytes([data[0], 0xFF]), count=9, party="a")


def test_several_score_sets_are_tried_and_paid_for() -> None:
    """Two score sets, one useless: the bound uses the informative one and twice as many
    Bonferroni candidates as one set alone."""
    rng = np.random.default_rng(11)
    scores, included = randomized_response(rng, 4000, 3.0)
    scores = scores + rng.random(4000) * 1e-3
    noise = rng.random(4000)
    one = bound.audit(scores=scores, included=included, delta=1e-9, confidence=0.99)
    both = bound.audit(
        scores=np.stack([noise, scores]), included=included, delta=1e-9, confidence=0.99
    )
    assert both.score_set == 1 and both.candidates == 2 * one.candidates
    assert 0 < both.epsilon_lower_bound <= one.epsilon_lower_bound
    with pytest.raises(ParameterError, match="included"):
        bound.audit(scores=np.zeros((2, 3)), included=[True, False], delta=0.0)


GRAD = dict(run_id="r", num_params=100, sites=1, per_site=1)
INPUT = dict(run_id="r", site_index=0, count=1, feature_shape=(2,), num_classes=2)


@pytest.mark.parametrize(
    ("function", "base", "bad", "name"),
    [
        ("gradient_coordinates", GRAD, dict(sites=0), "sites"),
        ("gradient_coordinates", GRAD, dict(per_site=0), "per_site"),
        ("gradient_coordinates", GRAD, dict(num_params=0), "num_params"),
        ("input_canaries", INPUT, dict(site_index=-1), "site_index"),
        ("input_canaries", INPUT, dict(count=0), "count"),
        ("input_canaries", INPUT, dict(feature_shape=(0,)), "feature_shape"),
        ("input_canaries", INPUT, dict(num_classes=1), "num_classes"),
        ("draw_inclusion", dict(count=1, rng=np.random.default_rng(0)), dict(count=0), "count"),
        ("draw_inclusion", dict(count=1, rng=np.random.default_rng(0)), dict(rng=3), "rng"),
    ],
)
def test_canary_helpers_refuse_bad_inputs(
    function: str, base: dict[str, object], bad: dict[str, object], name: str
) -> None:
    with pytest.raises(ParameterError, match=name):
        getattr(canaries, function)(**{**base, **bad})


def test_audit_report_prints_every_number() -> None:
    pytest.importorskip("typer")
    from types import SimpleNamespace

    from mpcdp.cli.run_options import audit_report

    a = bound.OneRunAudit(
        epsilon_lower_bound=0.5, m=300, guesses=40, correct=33, k_plus=20, k_minus=20,
        confidence=0.95, delta=1e-5, candidates=26, claimed_epsilon=2.0,
    )  # fmt: skip
    text = audit_report(SimpleNamespace(audit=a, plan=SimpleNamespace(audit_kind="white-box")))
    for part in ("2.0000", "0.5000", "25.0%", "0.95", "300", "40 (20/20), 33", "white-box"):
        assert part in text


@pytest.mark.parametrize(("k", "beta"), [(10, 0.05), (200, 1e-7)])
def test_ceiling_is_the_all_correct_bound_with_known_answers(k: int, beta: float) -> None:
    """A grid [k] on m = 2k canaries has the candidates (k, k) and (k, 0), each at beta / 2;
    with delta = 0 the best, all 2k guesses right, solves p^(2k) = beta / 2 (Theorem 3.1 of
    Steinke, Nasr, Jagielski 2023): eps = log(p / (1 - p))."""
    p = (beta / 2) ** (1 / (2 * k))
    got = bound.ceiling(m=2 * k, delta=0.0, confidence=1 - beta, grid=[k])
    assert got == pytest.approx(math.log(p / (1 - p)), rel=1e-9)
    # what an audit whose every guess is right reports, and records
    scores = np.arange(2 * k, dtype=float)
    res = bound.audit(scores=scores, included=scores >= k, delta=0.0, confidence=1 - beta, grid=[k])
    assert res.epsilon_lower_bound == pytest.approx(got, rel=1e-12) and res.ceiling == got


def test_the_ceiling_of_1000_canaries_per_site_is_lifted() -> None:
    """3 sites x 1,000 white-box canaries (two score sets), delta 1e-5, 95%: the equal-weight
    grid of 17 pairs could never pass 4.18, whatever the run; the schedule, which puts half
    the weight on guessing all but 4 sqrt(m) canaries, reaches 6.27. Still below a claim
    of 8: the delta term caps it near log(alpha w r / (2 m delta)) whatever m is."""
    old = bound.ceiling(m=3000, delta=1e-5, confidence=0.95, score_sets=2, grid=bound.DEFAULT_GRID)
    new = bound.ceiling(m=3000, delta=1e-5, confidence=0.95, score_sets=2)
    assert 4.17 < old < 4.19 and 6.2 < new < 6.35
    huge = bound.ceiling(m=90_000, delta=1e-5, confidence=0.95, score_sets=2)
    assert huge < 7.0 < bound.ceiling(m=90_000, delta=1e-12, confidence=0.95, score_sets=2)


def test_schedule_weights_sum_to_one_and_fit_m() -> None:
    for m in (1, 2, 7, 100, 900, 3000, 123_457):
        guesses = bound.schedule(m)
        assert sum(g.weight for g in guesses) == pytest.approx(1.0, abs=1e-12)
        assert all(1 <= g.guesses <= m and g.weight > 0 for g in guesses)
        assert len({(g.k_plus, g.k_minus) for g in guesses}) == len(guesses)
    widest = bound.schedule(3000)[0]
    assert (widest.k_plus, widest.k_minus) == (1390, 1390)
    assert widest.weight == pytest.approx(0.5)


def test_advice_names_the_canaries_and_the_delta_that_make_a_claim_testable() -> None:
    """Claim 8 with 3,000 canaries at delta 1e-5: untestable, and no canary count helps at
    that delta; a smaller audited delta (where the claim, given as a function of delta, is
    larger) and the canaries named there do make it testable."""

    def claim(d: float) -> float:
        return 8.0 + 0.05 * math.log10(1e-5 / d)

    advice = bound.advise(
        claimed_epsilon=claim, m=3000, delta=1e-5, confidence=0.95, score_sets=2, sites=3
    )
    assert not advice.testable and advice.canaries is None
    assert advice.delta is not None and advice.delta < 1e-5
    assert advice.delta_canaries is not None and advice.delta_canaries % 3 == 0
    assert advice.claimed_at_delta == pytest.approx(claim(advice.delta))
    there = bound.ceiling(
        m=advice.delta_canaries, delta=advice.delta, confidence=0.95, score_sets=2
    )
    assert advice.claimed_at_delta is not None and there > advice.claimed_at_delta
    text = advice.text(sites=3)
    assert "ceiling" in text and f"{advice.delta:g}" in text and "per site" in text
    easy = bound.advise(claimed_epsilon=1.0, m=3000, delta=1e-5, confidence=0.95)
    assert easy.testable and easy.text() == ""
    fewer = bound.advise(claimed_epsilon=5.0, m=300, delta=1e-12, confidence=0.95, sites=3)
    assert not fewer.testable and fewer.canaries is not None and fewer.canaries > 300
    assert bound.ceiling(m=fewer.canaries, delta=1e-12, confidence=0.95) > 5.0


def test_an_untestable_claim_is_flagged_in_the_result(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    scores, included = randomized_response(rng, 300, 50.0)
    with caplog.at_level("WARNING", logger="mpcdp.audit.bound"):
        res = bound.audit(scores=scores, included=included, delta=1e-5, claimed_epsilon=9.0)
    assert res.testable is False and res.epsilon_lower_bound <= res.ceiling < 9.0
    assert any("ceiling" in r.getMessage() for r in caplog.records)
    assert bound.audit(scores=scores, included=included, delta=1e-5).testable is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(m=0), "m"),
        (dict(score_sets=0), "score_sets"),
        (dict(delta=1.0), "delta"),
        (dict(confidence=1.0), "confidence"),
        (dict(grid=[0]), "grid"),
    ],
)
def test_ceiling_refuses_bad_inputs(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = dict(m=100, delta=1e-5, confidence=0.95)
    args.update(kwargs)
    with pytest.raises(ParameterError, match=name):
        bound.ceiling(**args)  # type: ignore[arg-type]
