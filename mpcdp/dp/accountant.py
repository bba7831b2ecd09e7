"""Privacy accounting: composition of events and noise calibration.

- Pure eps releases compose by exact rational addition (basic composition).
- RDP releases (Gaussian, Skellam, distributed discrete Gaussian, each possibly Poisson
  subsampled and repeated) compose by adding their RDP curves at integer orders
  (Mironov 2017, Prop. 1); the sum converts to (eps, delta) with dp-accounting.
- A mix is bounded by basic composition: (eps_pure, 0) followed by (eps_rdp, delta) is
  (eps_pure + eps_rdp, delta)-DP.
- Exact (noiseless) releases carry no guarantee; they are counted, not composed.

:func:`get_noise_multiplier` calibrates a noise multiplier for a target (eps, delta) over a
number of subsampled steps, for the Gaussian or the Skellam mechanism, by bisection on the
monotone map noise -> epsilon (the way Opacus' ``get_noise_multiplier`` works).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp import events as ev
from mpcdp.dp import rdp
from mpcdp.errors import ParameterError

__all__ = [
    "Accountant",
    "PrivacySpent",
    "calibrate",
    "compose",
    "get_noise_multiplier",
    "rdp_curve",
]


@dataclass(frozen=True)
class PrivacySpent:
    """Composition of a list of events at one delta."""

    epsilon: float
    delta: float
    pure_epsilon: Fraction
    rdp_epsilon: float
    optimal_order: float | None
    exact_releases: int


@functools.lru_cache(maxsize=4096)
def _curve(event: ev.Event, orders: tuple[int, ...]) -> NDArray[np.float64]:
    if isinstance(event, ev.SubsampledGaussian):
        one = rdp.subsampled_gaussian(
            sample_rate=event.sample_rate, noise_multiplier=event.noise_multiplier, orders=orders
        )
    elif isinstance(event, ev.Skellam):
        e = event

        def at(a: int) -> float:
            return float(
                rdp.skellam(
                    mu=e.mu,
                    l1_sensitivity=e.l1_sensitivity,
                    l2_sensitivity=e.l2_sensitivity,
                    orders=(a,),
                )[0]
            )

        one = rdp.poisson_subsampled(at, sample_rate=e.sample_rate, orders=orders)
    elif isinstance(event, ev.DistributedDiscreteGaussian):
        g = event

        def at(a: int) -> float:
            return float(
                rdp.distributed_discrete_gaussian(
                    share_sigma=g.share_sigma,
                    honest=g.honest,
                    l1_sensitivity=g.l1_sensitivity,
                    l2_sensitivity=g.l2_sensitivity,
                    dim=g.dim,
                    orders=(a,),
                )[0]
            )

        one = rdp.poisson_subsampled(at, sample_rate=g.sample_rate, orders=orders)
    else:
        raise ParameterError("event", event, "has no RDP curve (pure or exact release)")
    out: NDArray[np.float64] = one * event.steps
    out.setflags(write=False)
    return out


def rdp_curve(
    event: ev.Event, *, orders: Sequence[int] = rdp.DEFAULT_ORDERS
) -> NDArray[np.float64]:
    """RDP of an RDP-type event at ``orders`` (already multiplied by its steps)."""
    out: NDArray[np.float64] = _curve(event, tuple(int(a) for a in orders)).copy()
    return out


def compose(
    events: Iterable[ev.Event], *, delta: float, orders: Sequence[int] = rdp.DEFAULT_ORDERS
) -> PrivacySpent:
    """(epsilon, delta) of running all ``events`` (basic composition of pure and RDP parts)."""
    if not 0 < delta < 1:
        raise ParameterError("delta", delta, "must be in (0, 1)")
    ords = tuple(int(a) for a in orders)
    pure = Fraction(0)
    total = np.zeros(len(ords))
    any_rdp = False
    exact = 0
    for event in ev.flatten(events):
        if isinstance(event, ev.PureDp):
            pure += event.epsilon
        elif isinstance(event, ev.Exact):
            exact += 1
        else:
            total += _curve(event, ords)
            any_rdp = True
    rdp_eps, order = 0.0, None
    if any_rdp:
        rdp_eps, order = rdp.to_epsilon(orders=ords, rdp=total, delta=delta)
    return PrivacySpent(
        epsilon=float(pure) + rdp_eps,
        delta=delta,
        pure_epsilon=pure,
        rdp_epsilon=rdp_eps,
        optimal_order=order,
        exact_releases=exact,
    )


class Accountant:
    """Stateful wrapper: record events as they happen, ask for epsilon at any delta."""

    def __init__(self, *, orders: Sequence[int] = rdp.DEFAULT_ORDERS) -> None:
        self._orders = tuple(int(a) for a in orders)
        self._events: list[ev.Event] = []

    @property
    def events(self) -> tuple[ev.Event, ...]:
        return tuple(self._events)

    def record(self, event: ev.Event) -> None:
        self._events.append(event)

    def spent(self, *, delta: float) -> PrivacySpent:
        return compose(self._events, delta=delta, orders=self._orders)

    def get_epsilon(self, *, delta: float) -> float:
        return self.spent(delta=delta).epsilon


def _event_for(
    mechanism: str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    l2_sensitivity: float,
    l1_sensitivity: float,
) -> ev.Event:
    if mechanism == "gaussian":
        return ev.SubsampledGaussian(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
    return ev.Skellam(
        mu=(noise_multiplier * l2_sensitivity) ** 2,
        l1_sensitivity=l1_sensitivity,
        l2_sensitivity=l2_sensitivity,
        sample_rate=sample_rate,
        steps=steps,
    )


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    mechanism: Literal["gaussian", "skellam"] = "gaussian",
    l2_sensitivity: float = 1.0,
    l1_sensitivity: float | None = None,
    epsilon_tolerance: float = 0.005,
    orders: Sequence[int] = rdp.DEFAULT_ORDERS,
    alongside: Sequence[ev.Event] = (),
) -> float:
    """Smallest noise multiplier z (noise std = z * l2_sensitivity) with eps <= target.

    For ``skellam`` the variance is mu = (z * l2_sensitivity)^2 in integer units and
    ``l1_sensitivity`` defaults to l2_sensitivity^2 (the bound for integer vectors). The result
    is within ``epsilon_tolerance`` (relative) of the target, on the safe side.
    ``alongside``: releases of fixed noise made in the same run (e.g. evaluations), composed
    with the steps: the target covers them all. ParameterError naming ``target_epsilon``
    when they alone reach it.
    """
    if mechanism not in ("gaussian", "skellam"):
        raise ParameterError("mechanism", mechanism, "must be 'gaussian' or 'skellam'")
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ParameterError("target_epsilon", target_epsilon, "must be finite and > 0")
    if not 0 < target_delta < 1:
        raise ParameterError("target_delta", target_delta, "must be in (0, 1)")
    l1 = l2_sensitivity**2 if l1_sensitivity is None else l1_sensitivity

    if alongside:
        fixed = compose(alongside, delta=target_delta, orders=orders).epsilon
        if fixed >= target_epsilon:
            raise ParameterError(
                "target_epsilon",
                target_epsilon,
                f"the releases made alongside the steps alone spend epsilon {fixed:.4g}",
            )

    def eps(z: float) -> float:
        event = _event_for(mechanism, z, sample_rate, steps, l2_sensitivity, l1)
        return compose([event, *alongside], delta=target_delta, orders=orders).epsilon

    return calibrate(eps, target_epsilon=target_epsilon, epsilon_tolerance=epsilon_tolerance)


def calibrate(
    epsilon_of: Callable[[float], float],
    *,
    target_epsilon: float,
    epsilon_tolerance: float = 0.005,
    start: float = 1.0,
    limit: float = 1e12,
) -> float:
    """Smallest noise level x with epsilon_of(x) <= target (epsilon_of decreasing in x).

    Bisection on a bracket found by doubling from ``start``; the answer is on the safe side
    and within ``epsilon_tolerance`` (relative) of the target.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ParameterError("target_epsilon", target_epsilon, "must be finite and > 0")
    lo, hi = 0.0, start
    while epsilon_of(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > limit:
            raise ParameterError(
                "target_epsilon", target_epsilon, f"unreachable with noise level <= {limit:g}"
            )
    while True:
        mid = (lo + hi) / 2
        if epsilon_of(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if epsilon_of(hi) >= target_epsilon * (1 - epsilon_tolerance) or hi - lo <= 1e-9 * hi:
            return hi
