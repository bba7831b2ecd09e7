"""Release mechanisms with distributed noise (docs/design.md, "Distributed noise").

Each mechanism describes the noise that the *honest* parties' shares must add up to, and sizes
one party's share for h = n - t honest parties: a party that colludes knows its own share and
can subtract it, so only the h honest shares count (noise is sized for h, never for n; extra
noise from more honest parties only helps privacy).

| mechanism           | one party adds                        | h honest shares sum to | guarantee |
| discrete-laplace    | Polya(1/h, a) - Polya(1/h, a)         | DLap(a), a = e^-eps/D1 | pure eps  |
| skellam             | Skellam(mu / h)                       | Skellam(mu)            | RDP       |
| discrete-gaussian   | N_Z(0, sigma^2 / h), sigma/sqrt(h)>=2 | ~N_Z(0, sigma^2)       | RDP/zCDP  |
| none                | 0 (warned: exact MPC, no DP)          | 0                      | none      |

All quantities are in integer (ring) units: the caller encodes its query with fixed point and
passes the sensitivities of the encoded query. :meth:`Mechanism.check_range` refuses a
mechanism whose one-party share would leave its sampler's exact range (mpcdp.dp.samplers),
so a party can refuse a query before any charge instead of releasing inexact noise.
``tail_bound`` bounds |sum of n shares| except with probability 2^-64 (Chernoff bounds on
the moment generating functions), which is what mpcdp.mpc.encoding.check_headroom needs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp import events as ev
from mpcdp.dp import samplers
from mpcdp.errors import ParameterError

__all__ = [
    "MECHANISMS",
    "DiscreteGaussian",
    "DiscreteLaplace",
    "Mechanism",
    "NoNoise",
    "Skellam",
    "honest_parties",
]

log = logging.getLogger(__name__)

#: log of the failure probability of tail bounds: 2^-64.
_LOG_TAIL_FAILURE = -64 * math.log(2)


def honest_parties(*, n_parties: int, colluders: int) -> int:
    """h = n - t, refusing settings where no honest party would be left."""
    if not isinstance(n_parties, int) or n_parties < 2:
        raise ParameterError("n_parties", n_parties, "must be an int >= 2")
    if not isinstance(colluders, int) or not 0 <= colluders < n_parties:
        raise ParameterError("colluders", colluders, f"must be an int in [0, {n_parties - 1}]")
    return n_parties - colluders


def _check_honest(honest: int) -> None:
    if isinstance(honest, bool) or not isinstance(honest, int) or honest < 1:
        raise ParameterError("honest", honest, "must be an int >= 1")


def _check_parties(n_parties: int, honest: int) -> None:
    _check_honest(honest)
    if not isinstance(n_parties, int) or n_parties < honest:
        raise ParameterError("n_parties", n_parties, f"must be an int >= honest={honest}")


def _log_failure(failure: float) -> float:
    if isinstance(failure, bool) or not isinstance(failure, int | float) or not 0 < failure < 1:
        raise ParameterError("failure", failure, "must be a probability in (0, 1)")
    return math.log(failure)


def _chernoff_tail(log_mgf: _LogMgf, t_max: float, log_failure: float = _LOG_TAIL_FAILURE) -> int:
    """Smallest k (up to grid resolution) with 2 * min_t exp(log_mgf(t) - t k) <= failure."""
    ts = t_max * np.logspace(-12, 0, 2000, endpoint=False)
    ks = (log_mgf(ts) - (log_failure - math.log(2))) / ts
    return math.ceil(float(np.min(ks)))


class _LogMgf(Protocol):
    def __call__(self, t: NDArray[np.float64]) -> NDArray[np.float64]: ...


@runtime_checkable
class Mechanism(Protocol):
    """What the protocol needs from a noise mechanism."""

    @property
    def name(self) -> str:
        """The mechanism's name as users spell it (see MECHANISMS)."""
        ...

    def share(
        self, *, size: int, honest: int, rng: np.random.Generator | None = None
    ) -> NDArray[np.int64]:
        """One party's noise share (integers)."""
        ...

    def total_variance(self, *, n_parties: int, honest: int) -> float:
        """Variance of the sum of all n parties' shares (when all follow the protocol)."""
        ...

    def tail_bound(self, *, n_parties: int, honest: int, failure: float = 2.0**-64) -> int:
        """|sum of n shares| <= this, except with probability ``failure`` (a Chernoff bound:
        the true probability is at most that)."""
        ...

    def check_range(self, *, honest: int) -> None:
        """Raise ParameterError if one share (sized for ``honest``) would leave the exact
        range of its sampler."""
        ...

    def event(self) -> ev.Event:
        """The privacy event one release with this mechanism costs."""
        ...


@dataclass(frozen=True)
class DiscreteLaplace:
    """Pure eps-DP via distributed discrete Laplace noise."""

    epsilon: float
    l1_sensitivity: int
    name: str = "discrete-laplace"

    def __post_init__(self) -> None:
        ev.exact_epsilon(self.epsilon)
        if isinstance(self.l1_sensitivity, bool) or not isinstance(self.l1_sensitivity, int):
            raise ParameterError("l1_sensitivity", self.l1_sensitivity, "must be an int")
        if self.l1_sensitivity < 1:
            raise ParameterError("l1_sensitivity", self.l1_sensitivity, "must be >= 1")

    @property
    def decay(self) -> float:
        """a = exp(-eps / D1): pmf of the honest sum is proportional to a^|k|."""
        return math.exp(-float(self.epsilon) / self.l1_sensitivity)

    @property
    def scale(self) -> float:
        """b = D1 / eps: the pmf of the honest sum is proportional to exp(-|k| / b)."""
        return self.l1_sensitivity / float(self.epsilon)

    def share(
        self, *, size: int, honest: int, rng: np.random.Generator | None = None
    ) -> NDArray[np.int64]:
        return samplers.discrete_laplace_share(scale=self.scale, honest=honest, size=size, rng=rng)

    def check_range(self, *, honest: int) -> None:
        _check_honest(honest)
        samplers.check_dlap_share_scale(self.scale)

    def total_variance(self, *, n_parties: int, honest: int) -> float:
        _check_parties(n_parties, honest)
        s = float(self.epsilon) / self.l1_sensitivity
        # Var[Polya(r, a)] = r a / (1-a)^2; n shares, each the difference of two, r = 1/h.
        return 2 * (n_parties / honest) * math.exp(-s) / math.expm1(-s) ** 2

    def tail_bound(self, *, n_parties: int, honest: int, failure: float = 2.0**-64) -> int:
        _check_parties(n_parties, honest)
        log_failure = _log_failure(failure)
        s, r = float(self.epsilon) / self.l1_sensitivity, n_parties / honest
        t_max = s  # the MGF of Polya(r, a) is finite for t < -log a = s
        log_1ma = math.log(-math.expm1(-s))  # log(1 - a), without cancellation

        def log_mgf(t: NDArray[np.float64]) -> NDArray[np.float64]:
            one = r * (log_1ma - np.log(-np.expm1(t - s)))
            two = r * (log_1ma - np.log1p(-np.exp(-t - s)))
            out: NDArray[np.float64] = one + two
            return out

        return _chernoff_tail(log_mgf, t_max, log_failure)

    def event(self) -> ev.Event:
        return ev.PureDp(epsilon=ev.exact_epsilon(self.epsilon))


@dataclass(frozen=True)
class Skellam:
    """Distributed Skellam noise: variance ``mu`` in the honest sum (AKL21)."""

    mu: float
    l1_sensitivity: float
    l2_sensitivity: float
    name: str = "skellam"

    def __post_init__(self) -> None:
        ev.Skellam(
            mu=self.mu, l1_sensitivity=self.l1_sensitivity, l2_sensitivity=self.l2_sensitivity
        )

    def share(
        self, *, size: int, honest: int, rng: np.random.Generator | None = None
    ) -> NDArray[np.int64]:
        _check_honest(honest)
        return samplers.skellam(mu=self.mu / honest, size=size, rng=rng)

    def share_into(
        self, out: NDArray[Any], *, honest: int, rng: np.random.Generator | None = None
    ) -> None:
        """One party's share written into ``out`` in one pass: int64, or ring words (uint32,
        uint64: each draw mod 2^bits, as mpcdp.mpc.encoding.to_ring would encode it)."""
        _check_honest(honest)
        samplers.skellam_into(out, mu=self.mu / honest, rng=rng)

    def check_range(self, *, honest: int) -> None:
        _check_honest(honest)
        samplers.check_skellam_mu(self.mu / honest, name="mu/h")

    def total_variance(self, *, n_parties: int, honest: int) -> float:
        _check_parties(n_parties, honest)
        return self.mu * n_parties / honest

    def tail_bound(self, *, n_parties: int, honest: int, failure: float = 2.0**-64) -> int:
        log_failure = _log_failure(failure)
        m = self.total_variance(n_parties=n_parties, honest=honest)

        def log_mgf(t: NDArray[np.float64]) -> NDArray[np.float64]:
            out: NDArray[np.float64] = m * (np.cosh(t) - 1.0)
            return out

        return _chernoff_tail(log_mgf, 50.0, log_failure)

    def event(self) -> ev.Event:
        return ev.Skellam(
            mu=self.mu, l1_sensitivity=self.l1_sensitivity, l2_sensitivity=self.l2_sensitivity
        )


@dataclass(frozen=True)
class DiscreteGaussian:
    """Distributed discrete Gaussian: h shares N_Z(0, sigma^2/h) (KLS21)."""

    sigma: float
    l1_sensitivity: float
    l2_sensitivity: float
    dim: int
    honest: int
    name: str = "discrete-gaussian"

    def __post_init__(self) -> None:
        _check_honest(self.honest)
        if not self.sigma > 0 or not math.isfinite(self.sigma):
            raise ParameterError("sigma", self.sigma, "must be finite and > 0")
        if self.honest > 1 and self.share_sigma < 2:
            raise ParameterError(
                "sigma",
                self.sigma,
                f"share std sigma/sqrt(h) = {self.share_sigma:.3g} < 2; the sum of {self.honest} "
                "discrete Gaussians is then too far from a discrete Gaussian",
            )
        self.event()  # validates sensitivities and dim

    @property
    def share_sigma(self) -> float:
        return self.sigma / math.sqrt(self.honest)

    def share(
        self, *, size: int, honest: int, rng: np.random.Generator | None = None
    ) -> NDArray[np.int64]:
        if honest != self.honest:
            raise ParameterError(
                "honest", honest, f"this mechanism was sized for honest={self.honest}"
            )
        return samplers.discrete_gaussian(sigma=self.share_sigma, size=size, rng=rng)

    def check_range(self, *, honest: int) -> None:
        if honest != self.honest:
            raise ParameterError(
                "honest", honest, f"this mechanism was sized for honest={self.honest}"
            )
        if not self.share_sigma < samplers.DGAUSS_MAX_SIGMA:
            raise ParameterError(
                "sigma/sqrt(h)",
                self.share_sigma,
                f"is outside the discrete Gaussian sampler's range (0, "
                f"{samplers.DGAUSS_MAX_SIGMA:.6g})",
            )

    def total_variance(self, *, n_parties: int, honest: int) -> float:
        _check_parties(n_parties, honest)
        # The variance of N_Z(0, s^2) is at most s^2 (CKS20, Cor. 9).
        return n_parties * self.share_sigma**2

    def tail_bound(self, *, n_parties: int, honest: int, failure: float = 2.0**-64) -> int:
        # N_Z(0, s^2) is s-subgaussian (CKS20, Cor. 9), so the sum of n is sqrt(n) s-subgaussian.
        log_failure = _log_failure(failure)
        v = self.total_variance(n_parties=n_parties, honest=honest)
        return math.ceil(math.sqrt(2 * v * (-log_failure + math.log(2))))

    def event(self) -> ev.Event:
        return ev.DistributedDiscreteGaussian(
            share_sigma=self.share_sigma,
            honest=self.honest,
            l1_sensitivity=self.l1_sensitivity,
            l2_sensitivity=self.l2_sensitivity,
            dim=self.dim,
        )


@dataclass(frozen=True)
class NoNoise:
    """Exact MPC: no noise, no DP. Only on explicit request; whoever releases with it (the
    party engine, the simulation) logs a warning."""

    name: str = "none"

    def share(
        self, *, size: int, honest: int, rng: np.random.Generator | None = None
    ) -> NDArray[np.int64]:
        return np.zeros(size, dtype=np.int64)

    def check_range(self, *, honest: int) -> None:
        return None

    def total_variance(self, *, n_parties: int, honest: int) -> float:
        return 0.0

    def tail_bound(self, *, n_parties: int, honest: int, failure: float = 2.0**-64) -> int:
        _log_failure(failure)
        return 0

    def event(self) -> ev.Event:
        return ev.Exact()


#: Mechanism names as users spell them (CLI, config files, wire).
MECHANISMS = ("discrete-laplace", "skellam", "discrete-gaussian", "none")
