"""The whole protocol in one process (mpcdp.local.simulation): exact and noisy sums, clipping,
the headroom refusal, budgets charged before contributing, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpcdp.dp.ledger import BudgetLedger
from mpcdp.dp.mechanisms import DiscreteLaplace, NoNoise, Skellam
from mpcdp.errors import BudgetExceededError, HeadroomError, ParameterError
from mpcdp.local.simulation import simulate_sum


def test_exact_secure_sum_of_real_vectors() -> None:
    rng = np.random.default_rng(0)  # test data only; never used for masks or noise
    xs = [rng.uniform(-5, 5, size=1000) for _ in range(4)]
    out = simulate_sum(xs, bound=5.0, frac_bits=20, mechanism=NoNoise())
    assert np.allclose(out.value, np.sum(xs, axis=0), atol=4 * 2**-21)


def test_inputs_are_clipped_to_the_bound_by_each_party() -> None:
    out = simulate_sum([[100.0], [-3.0], [2.0]], bound=10.0, frac_bits=8, mechanism=NoNoise())
    assert out.value[0] == pytest.approx(9.0)


def test_noisy_sum_has_the_announced_variance() -> None:
    mech = Skellam(mu=2.0**20, l1_sensitivity=2.0**20, l2_sensitivity=2.0**10)
    out = simulate_sum([np.zeros(50_000)] * 3, bound=1.0, frac_bits=10, mechanism=mech)
    # mu / 2^(2 frac_bits) = 1 per honest sum; 3 parties sized for h = 2 -> variance 1.5
    assert out.noise_variance == pytest.approx(1.5)
    assert out.value.var() == pytest.approx(1.5, rel=0.05)


def test_headroom_refusal_before_anything_is_sent() -> None:
    with pytest.raises(HeadroomError, match="n_parties=3"):
        simulate_sum([[1.0]] * 3, bound=2.0**40, frac_bits=30, mechanism=NoNoise())


def test_budget_is_charged_before_contributing(tmp_path: Path) -> None:
    ledgers = [BudgetLedger.create(tmp_path / f"p{i}.sqlite") for i in range(3)]
    for led in ledgers:
        led.set_budget("d", epsilon=1, delta=1e-6)
    mech = DiscreteLaplace(epsilon=0.6, l1_sensitivity=256)
    simulate_sum([[1.0]] * 3, bound=1.0, frac_bits=8, mechanism=mech, ledgers=ledgers, dataset="d")
    with pytest.raises(BudgetExceededError, match="dataset='d'"):
        simulate_sum(
            [[1.0]] * 3, bound=1.0, frac_bits=8, mechanism=mech, ledgers=ledgers, dataset="d"
        )
    for led in ledgers:
        assert led.status("d").queries == 1
        led.close()


def test_simulation_input_errors() -> None:
    with pytest.raises(ParameterError, match="inputs"):
        simulate_sum([[1.0]], bound=1.0, frac_bits=8, mechanism=NoNoise())
    with pytest.raises(ParameterError, match="inputs"):
        simulate_sum([[1.0], [1.0, 2.0]], bound=1.0, frac_bits=8, mechanism=NoNoise())
    with pytest.raises(ParameterError, match=r"x\[0\]"):
        simulate_sum([[float("nan")], [1.0]], bound=1.0, frac_bits=8, mechanism=NoNoise())
    with pytest.raises(ParameterError, match="colluders"):
        simulate_sum([[1.0], [1.0]], bound=1.0, frac_bits=8, mechanism=NoNoise(), colluders=2)
