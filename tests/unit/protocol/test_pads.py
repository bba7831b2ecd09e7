"""One-pass pads (mpcdp.protocol.pads): the masks are MaskStream's words whatever the
slicing and the workers, the noise is one share of the mechanism's law, the pads of all
parties sum to the sum of their noise, and bad arguments are refused before any draw.

Chance failure: alpha = 1e-8 per check, fewer than 20 checks (< 1e-6 in all)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mpcdp.dp.mechanisms import DiscreteLaplace, Skellam
from mpcdp.dp.samplers import SKELLAM_MAX_MU
from mpcdp.errors import ParameterError
from mpcdp.local.simulation import pair_keys_for
from mpcdp.mpc import encoding, sharing
from mpcdp.mpc.rng import csprng
from mpcdp.protocol import pads
from tests.unit.dp.test_poisson import mean_var_pvalues

CHECK_ALPHA = 1e-8
KEYS = {1: bytes(range(32)), 2: bytes(range(3, 35))}


def rng(tag: int) -> np.random.Generator:
    return csprng(key=(2000 + tag).to_bytes(16, "little"))


@pytest.mark.parametrize(("bits", "size", "slice_size"), [(32, 70_001, 4096), (64, 9_999, 1 << 16)])
def test_masks_are_the_stream_from_word_zero(bits: int, size: int, slice_size: int) -> None:
    with ThreadPoolExecutor(2) as pool:
        pad = pads.build_pad(
            size=size, ring_bits=bits, noise=None, honest=2, party=0, pair_keys=KEYS,
            round_id=4, tensor_id=1, rng=rng(0), workers=pool, slice_size=slice_size,
        )  # fmt: skip
    mask = sharing.pairwise_mask(
        party=0, pair_keys=KEYS, round_id=4, tensor_id=1, size=size, ring_bits=bits
    )
    assert np.array_equal(pad, mask)


def test_a_pad_depends_on_the_generator_alone() -> None:
    noise = Skellam(mu=2.0e9, l1_sensitivity=1.0, l2_sensitivity=1.0)
    kwargs = dict(size=200_000, ring_bits=32, noise=noise, honest=2, party=0, pair_keys=KEYS,
                  round_id=1, slice_size=1 << 14)  # fmt: skip
    serial = pads.build_pad(rng=rng(1), **kwargs)  # type: ignore[arg-type]
    with ThreadPoolExecutor(2) as pool:
        parallel = pads.build_pad(rng=rng(1), workers=pool, **kwargs)  # type: ignore[arg-type]
    assert np.array_equal(serial, parallel)
    other = pads.build_pad(rng=rng(2), **kwargs)  # type: ignore[arg-type]
    assert not np.array_equal(serial, other)


@pytest.mark.parametrize("bits", [32, 64])
def test_the_noise_is_one_skellam_share(bits: int) -> None:
    mu, honest, size = 3.0e8, 2, 300_000
    noise = Skellam(mu=mu, l1_sensitivity=1.0, l2_sensitivity=1.0)
    pad = pads.build_pad(
        size=size, ring_bits=bits, noise=noise, honest=honest, party=0, pair_keys=KEYS,
        round_id=9, rng=rng(3),
    )  # fmt: skip
    mask = sharing.pairwise_mask(
        party=0, pair_keys=KEYS, round_id=9, tensor_id=0, size=size, ring_bits=bits
    )
    share = encoding.decode_int(pad - mask)
    var = mu / honest
    p_mean, p_var = mean_var_pvalues(share, 0.0, var, 1.0 / var)
    assert min(p_mean, p_var) > CHECK_ALPHA


def test_the_pads_of_all_parties_sum_to_their_noise() -> None:
    n, size, mu = 3, 100_000, 1.0e6
    pairs = pair_keys_for(n, session_id=b"pads")
    keys = [{j: pairs[min(i, j), max(i, j)] for j in range(n) if j != i} for i in range(n)]
    noise = Skellam(mu=mu, l1_sensitivity=1.0, l2_sensitivity=1.0)
    total = np.zeros(size, dtype=np.uint32)
    for i in range(n):
        total += pads.build_pad(
            size=size, ring_bits=32, noise=noise, honest=2, party=i, pair_keys=keys[i],
            round_id=2, rng=rng(10 + i), slice_size=1 << 12,
        )  # fmt: skip
    x = encoding.decode_int(total)
    var = n * mu / 2
    assert min(mean_var_pvalues(x, 0.0, var, 1.0 / var)) > CHECK_ALPHA


def test_other_mechanisms_and_none_fill_noise() -> None:
    out = np.ones(50_000, dtype=np.uint64)
    pads.fill_noise(out, noise=None, honest=2, rng=rng(4))
    assert not out.any()
    dlap = DiscreteLaplace(epsilon=1.0, l1_sensitivity=10)
    with ThreadPoolExecutor(2) as pool:
        pads.fill_noise(out, noise=dlap, honest=2, rng=rng(5), workers=pool, slice_size=4096)
    x = encoding.decode_int(out)
    var = dlap.total_variance(n_parties=2, honest=2) / 2  # one share
    p_mean, _ = mean_var_pvalues(x, 0.0, var, 0.0)
    assert p_mean > CHECK_ALPHA and 0.9 < float(x.var()) / var < 1.1


def test_refusals_come_before_any_draw() -> None:
    ok = dict(size=16, ring_bits=32, noise=None, honest=2, party=0, pair_keys=KEYS,
              round_id=0, rng=rng(6))  # fmt: skip
    with pytest.raises(ParameterError, match="slice_size"):
        pads.build_pad(**{**ok, "slice_size": 6})  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="size"):
        pads.build_pad(**{**ok, "size": -1})  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="pair_keys"):
        pads.build_pad(**{**ok, "pair_keys": {0: bytes(32)}})  # type: ignore[arg-type]
    huge = Skellam(mu=SKELLAM_MAX_MU * 4, l1_sensitivity=1.0, l2_sensitivity=1.0)
    with pytest.raises(ParameterError, match="mu/h"):
        pads.build_pad(**{**ok, "noise": huge})  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="slice_size"):
        pads.fill_noise(np.zeros(8, np.uint64), noise=None, honest=2, rng=rng(6), slice_size=0)
