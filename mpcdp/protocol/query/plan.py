"""What a query releases: tensors, fixed point, sensitivities and calibrated noise.

Party and coordinator compute the same :class:`ReleasePlan` from the same spec, so they agree
on every noise parameter without sending any. Adjacency is add/remove of one row at one party
(for vector datasets: of the party's whole vector). Sensitivities are in ring units:

| statistic | tensors (frac_bits)                 | L1 sensitivity per tensor                    |
| count     | count (0)                           | 1                                            |
| sum       | sum (f)                             | ceil(max(|lo|,|hi|) 2^f) + 1                 |
| mean      | centered sum (f), count (0)         | ceil((hi-lo)/2 2^f) + 1, 1; eps, delta split |
| histogram | one count per category (0)          | 1 (L2 1)                                     |
| vector    | clipped vector (f)                  | L2: B 2^f + sqrt(d)/2, L1: sqrt(d) L2        |

(+1 and sqrt(d)/2: each party rounds its local aggregate to the nearest ring element once.)
The mean is mid + S/C with S the sum of (x - mid), mid = (lo + hi)/2, which halves the
sum's sensitivity compared with a plain sum.

Noise per tensor: discrete Laplace with a = exp(-eps_t/D1); Skellam with mu calibrated so
that the RDP bound gives (eps_t, delta_t); distributed discrete Gaussian with sigma calibrated
by the KLS21 bound for h honest shares (share std at least 2).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction

from mpcdp.dp import accountant, events, rdp
from mpcdp.dp.mechanisms import DiscreteGaussian, DiscreteLaplace, Mechanism, NoNoise, Skellam
from mpcdp.errors import HeadroomError, ParameterError
from mpcdp.mpc import encoding
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic

__all__ = [
    "MAX_ROUNDING_INFLATION",
    "ReleasePlan",
    "TensorPlan",
    "check_sampler_range",
    "choose_frac_bits",
    "first_fitting",
    "fit",
    "frac_bits_for",
    "mechanism_for",
    "needed_frac_bits",
    "plan",
]


@dataclass(frozen=True)
class TensorPlan:
    """One released tensor."""

    name: str
    length: int
    frac_bits: int
    mechanism: Mechanism
    max_abs: float  # per party, real units (for the headroom check)

    def noise_std(self, *, n_parties: int, honest: int) -> float:
        """Std of the total noise per coordinate, in real units."""
        var = self.mechanism.total_variance(n_parties=n_parties, honest=honest)
        return math.sqrt(var) / float(1 << self.frac_bits)


@dataclass(frozen=True)
class ReleasePlan:
    spec: QuerySpec
    tensors: tuple[TensorPlan, ...]
    event: events.Event

    @property
    def length(self) -> int:
        return sum(t.length for t in self.tensors)

    def check_headroom(self) -> None:
        n, h = len(self.spec.parties), self.spec.honest
        for t in self.tensors:
            encoding.check_headroom(
                n_parties=n,
                max_abs=t.max_abs,
                frac_bits=t.frac_bits,
                noise_tail=t.mechanism.tail_bound(n_parties=n, honest=h),
                ring_bits=self.spec.ring_bits,
            )


def mechanism_for(
    spec: QuerySpec, *, epsilon: float, delta: float, l1: float, l2: float, dim: int
) -> Mechanism:
    """The noise of one tensor of ``spec`` calibrated to (epsilon, delta) at these
    sensitivities (module docstring)."""
    if spec.mechanism == "none":
        return NoNoise()
    if spec.mechanism == "discrete-laplace":
        return DiscreteLaplace(epsilon=epsilon, l1_sensitivity=math.ceil(l1))
    if spec.mechanism == "skellam":
        mu = _skellam_mu(epsilon, delta, l1, l2)
        return Skellam(mu=mu, l1_sensitivity=l1, l2_sensitivity=l2)
    sigma = _ddg_sigma(epsilon, delta, l1, l2, dim, spec.honest)
    return DiscreteGaussian(
        sigma=sigma, l1_sensitivity=l1, l2_sensitivity=l2, dim=dim, honest=spec.honest
    )


@functools.lru_cache(maxsize=256)
def _skellam_mu(epsilon: float, delta: float, l1: float, l2: float) -> float:
    z = accountant.get_noise_multiplier(
        target_epsilon=epsilon,
        target_delta=delta,
        sample_rate=1.0,
        steps=1,
        mechanism="skellam",
        l2_sensitivity=l2,
        l1_sensitivity=l1,
    )
    return (z * l2) ** 2


@functools.lru_cache(maxsize=256)
def _ddg_sigma(epsilon: float, delta: float, l1: float, l2: float, dim: int, honest: int) -> float:
    floor = 2.0 * math.sqrt(honest)  # share std >= 2

    def eps(sigma: float) -> float:
        curve = rdp.distributed_discrete_gaussian(
            share_sigma=sigma / math.sqrt(honest),
            honest=honest,
            l1_sensitivity=l1,
            l2_sensitivity=l2,
            dim=dim,
        )
        return rdp.to_epsilon(orders=rdp.DEFAULT_ORDERS, rdp=curve, delta=delta)[0]

    if eps(floor) <= epsilon:
        return floor
    return accountant.calibrate(eps, target_epsilon=epsilon, start=max(floor, l2))


def plan(spec: QuerySpec, *, vector_length: int | None = None) -> ReleasePlan:
    """The release plan of ``spec``; ``vector_length`` is needed for vector datasets."""
    eps_total = float(Fraction(spec.epsilon))
    f = spec.frac_bits
    bound = max(abs(spec.lower), abs(spec.upper))
    st = spec.statistic
    tensors: list[tuple[str, int, int, float, float, float]] = []  # name, len, fb, l1, l2, max
    if st is Statistic.COUNT:
        tensors.append(("count", 1, 0, 1.0, 1.0, float(spec.max_rows)))
    elif st is Statistic.SUM and not spec.column:
        if not vector_length or vector_length < 1:
            raise ParameterError("vector_length", vector_length, "vector sums need the length")
        if spec.l2_bound <= 0:
            raise ParameterError("l2_bound", spec.l2_bound, "vector sums need an L2 bound > 0")
        l2 = spec.l2_bound * (1 << f) + math.sqrt(vector_length) / 2
        l1 = math.sqrt(vector_length) * l2
        tensors.append(("vector", vector_length, f, l1, l2, spec.l2_bound))
    elif st is Statistic.SUM:
        d1 = math.ceil(bound * (1 << f)) + 1
        tensors.append(("sum", 1, f, d1, d1, bound * spec.max_rows))
    elif st is Statistic.MEAN:
        half = (spec.upper - spec.lower) / 2
        d1 = math.ceil(half * (1 << f)) + 1
        tensors.append(("centered_sum", 1, f, d1, d1, half * spec.max_rows))
        tensors.append(("count", 1, 0, 1.0, 1.0, float(spec.max_rows)))
    elif st is Statistic.HISTOGRAM:
        tensors.append(("histogram", len(spec.categories), 0, 1.0, 1.0, float(spec.max_rows)))
    else:  # pragma: no cover - Statistic is closed
        raise ParameterError("statistic", st, "unsupported")
    k = len(tensors)
    eps_t, delta_t = eps_total / k, spec.delta / k
    built = tuple(
        TensorPlan(
            name=name,
            length=length,
            frac_bits=fb,
            mechanism=mechanism_for(spec, epsilon=eps_t, delta=delta_t, l1=l1, l2=l2, dim=length),
            max_abs=max_abs,
        )
        for name, length, fb, l1, l2, max_abs in tensors
    )
    for t in built:
        check_sampler_range(spec, t)
    if spec.mechanism == "discrete-laplace":
        # the parts' exact epsilons add up to the spec's exactly
        event: events.Event = events.PureDp(epsilon=events.exact_epsilon(spec.epsilon))
    else:
        event = events.Composite(parts=tuple(t.mechanism.event() for t in built))
    return ReleasePlan(spec=spec, tensors=built, event=event)


def check_sampler_range(spec: QuerySpec, t: TensorPlan) -> None:
    """Refuse a tensor whose noise share would leave its sampler's exact range (the party's
    check before any charge; the planner's reason to choose fewer fractional bits)."""
    try:
        t.mechanism.check_range(honest=spec.honest)
    except ParameterError as exc:
        raise ParameterError(
            exc.name,
            exc.value,
            f"{exc.reason}. The {spec.mechanism} noise of {t.name!r} follows from "
            f"epsilon={spec.epsilon}, delta={spec.delta:g}, the bounds, colluders and "
            f"frac_bits={t.frac_bits}: use fewer fractional bits (or leave frac_bits to the "
            "planner) or a larger epsilon",
        ) from None


#: The planner's fixed point: the fewest fractional bits with which rounding adds at most 1%
#: to the sensitivity (the +1 of a scalar, the sqrt(d)/2 of a vector, relative to the clipped
#: part B 2^f). More bits add nothing the noise could resolve; they only grow the noise's
#: integer parameters towards the samplers' limits and cost headroom.
MAX_ROUNDING_INFLATION = 0.01


def _clipped_bound(spec: QuerySpec, vector_length: int | None) -> tuple[float, float]:
    """(B, rounding part): the per-party bound of the fixed-point tensor in real units and
    the sensitivity that rounding adds to it, in ring units."""
    if spec.statistic is Statistic.SUM and not spec.column:
        return spec.l2_bound, math.sqrt(vector_length or 1) / 2
    if spec.statistic is Statistic.MEAN:
        return (spec.upper - spec.lower) / 2, 1.0
    return max(abs(spec.lower), abs(spec.upper)), 1.0


def needed_frac_bits(spec: QuerySpec, *, vector_length: int | None = None) -> int:
    """The fewest fractional bits f >= 0 with rounding part <= 1% of B 2^f (see
    MAX_ROUNDING_INFLATION); 0 for counts, histograms and bounds of 0."""
    if spec.statistic in (Statistic.COUNT, Statistic.HISTOGRAM):
        return 0
    bound, rounding = _clipped_bound(spec, vector_length)
    return frac_bits_for(bound=bound, rounding=rounding)


def frac_bits_for(*, bound: float, rounding: float) -> int:
    """The fewest fractional bits f >= 0 with ``rounding`` (ring units) <= 1% of
    ``bound`` 2^f (MAX_ROUNDING_INFLATION); 0 for a bound of 0."""
    if not bound > 0:
        return 0
    return max(0, math.ceil(math.log2(rounding / (MAX_ROUNDING_INFLATION * bound))))


def first_fitting(start: int, build: Callable[[int], ReleasePlan], *, what: str) -> int:
    """The largest f in [0, start] whose plan ``build(f)`` fits: headroom in its ring and every
    noise share inside its sampler's exact range. Raises the last candidate's HeadroomError
    or ParameterError when none does (``what`` names the query in the fallback message)."""
    last: Exception | None = None
    for f in range(start, -1, -1):
        try:
            build(f).check_headroom()
        except (HeadroomError, ParameterError) as exc:
            last = exc
            continue
        return f
    raise last or HeadroomError(f"no frac_bits in [0, {start}] fits the ring for {what}")


def choose_frac_bits(
    spec: QuerySpec, *, vector_length: int | None = None, max_frac_bits: int | None = None
) -> int:
    """The planner's frac_bits: :func:`needed_frac_bits` (``max_frac_bits`` for exact
    releases), at most ``max_frac_bits`` (default: spec.frac_bits), lowered while the round
    does not fit.

    "Fits" means the headroom check passes in spec.ring_bits and every noise share is inside
    its sampler's exact range. Raises HeadroomError or ParameterError (with the reason of
    the last candidate) when not even frac_bits = 0 fits.
    """

    top = spec.frac_bits if max_frac_bits is None else max_frac_bits
    # exact releases (mechanism none) have no noise to size against: as precise as they fit
    need = top if spec.mechanism == "none" else needed_frac_bits(spec, vector_length=vector_length)
    return first_fitting(
        min(top, need),
        lambda f: plan(replace(spec, frac_bits=f), vector_length=vector_length),
        what=spec.query_id,
    )


#: Vector sums use Z_2^32 (half the bytes) when the planner's frac_bits fit it unchanged.


def fit(
    spec: QuerySpec, *, vector_length: int | None, frac_bits: int | None, ring_bits: int | None
) -> QuerySpec:
    """Choose the ring and the fixed point: explicit values win (and are checked here, so an
    analyst learns before any party is asked); otherwise vector sums use Z_2^32 when it holds
    the planner's frac_bits (:func:`choose_frac_bits` in Z_2^64) and Z_2^64 else; everything
    else uses Z_2^64."""
    candidates = [ring_bits] if ring_bits is not None else ([32, 64] if vector_length else [64])
    wanted: int | None = None
    last: Exception | None = None
    for bits in candidates:
        trial = replace(spec, ring_bits=bits)
        try:
            if frac_bits is not None:
                f = frac_bits
                plan(replace(trial, frac_bits=f), vector_length=vector_length).check_headroom()
            else:
                f = choose_frac_bits(trial, vector_length=vector_length)
                if bits == 32 and ring_bits is None:
                    wanted = choose_frac_bits(
                        replace(spec, ring_bits=64), vector_length=vector_length
                    )
                    if f < wanted:  # Z_2^32 would cost precision: use Z_2^64
                        continue
        except (HeadroomError, ParameterError) as exc:
            last = exc
            continue
        return replace(trial, frac_bits=f)
    raise last or HeadroomError(f"query {spec.query_id} does not fit the ring")
