"""The TrainSpec of a training session (mpcdp.protocol.training): refused values, its
digest, sensitivities that include the rounding, the choice of the fixed-point scale."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("torch")


from mpcdp.errors import (
    HeadroomError,
    ParameterError,
)
from mpcdp.protocol.query import query_spec
from mpcdp.protocol.training import (
    choose_scale_bits,
    digest,
    sensitivities,
)
from tests.conftest import PARTIES
from tests.training_support import tspec


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("steps", 0),
        ("max_grad_norm", float("nan")),
        ("max_grad_norm", -1.0),
        ("mu", 0.0),
        ("clipping", "median"),
        ("ring_bits", 16),
        ("colluders", 3),
        ("colluders", True),
        ("parties", ("alice",)),
        ("run_id", ""),
        ("scale_bits", 41),
    ],
)
def test_train_spec_refuses_bad_values_naming_them(field: str, value: object) -> None:
    with pytest.raises(ParameterError, match=field):
        tspec(**{field: value})


def test_train_spec_digest_is_domain_separated_and_covers_every_field() -> None:
    s = tspec()
    d = digest(s)
    assert d == digest(tspec())
    for changed in (
        dataclasses.replace(s, mu=s.mu * 2),
        dataclasses.replace(s, steps=5),
        dataclasses.replace(s, bias_only=True),
        dataclasses.replace(s, start_step=1),
    ):
        assert digest(changed) != d
    q = query_spec.QuerySpec(
        query_id="run-1",
        dataset="ex",
        statistic=query_spec.Statistic.SUM,
        mechanism="none",
        epsilon="0",
        parties=PARTIES,
    )
    assert query_spec.digest(q) != d


def test_sensitivities_include_the_rounding() -> None:
    l2, l1 = sensitivities(max_grad_norm=0.5, scale_bits=10, num_params=100)
    assert l2 == pytest.approx(0.5 * 1024 + 10)
    assert l1 == pytest.approx(10 * 0.5 * 1024 + 100)


def test_scale_is_the_smallest_with_1_percent_rounding_that_fits_the_ring() -> None:
    kw = dict(num_params=10_000, n_parties=3, honest=2, noise_multiplier=1.0)
    # enough headroom: the smallest k with sqrt(d) / (C 2^k) <= 1%
    k = choose_scale_bits(max_grad_norm=0.5, max_total_batch=2000, **kw)  # type: ignore[arg-type]
    assert 100 / (0.5 * 2**k) <= 0.01 < 100 / (0.5 * 2 ** (k - 1))
    # a huge batch: the largest k that cannot wrap Z_2^32
    k = choose_scale_bits(max_grad_norm=1.0, max_total_batch=2**20, **kw)  # type: ignore[arg-type]
    assert 2**20 * 2.0**k < 2**31 <= 2**20 * 2.0 ** (k + 2)
    with pytest.raises(HeadroomError, match="max_total_batch"):
        choose_scale_bits(
            max_grad_norm=1.0,
            num_params=10,
            max_total_batch=2**31,
            n_parties=3,
            honest=2,
            noise_multiplier=1.0,
        )
