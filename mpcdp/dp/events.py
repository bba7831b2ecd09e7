"""Privacy events: what one release (or a run of identical releases) cost.

Frozen dataclasses, serialised to a canonical JSON object for the budget ledger. Decoding is
strict: unknown kinds, missing or extra fields and wrong types are refused.

- :class:`PureDp`: an eps-DP release (discrete Laplace, randomized response); epsilon is an
  exact rational, so pure budgets compose without float drift.
- :class:`SubsampledGaussian`, :class:`Skellam`, :class:`DistributedDiscreteGaussian`: RDP
  releases; they keep their full description so epsilon can be recomputed for any delta.
- :class:`Exact`: a release with no noise (mechanism ``none``); it has no DP guarantee and
  is recorded for audit only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, ClassVar, TypeAlias

from mpcdp.errors import DecodeError, ParameterError

__all__ = [
    "Composite",
    "DistributedDiscreteGaussian",
    "Event",
    "Exact",
    "PureDp",
    "Skellam",
    "SubsampledGaussian",
    "decode_event",
    "encode_event",
    "exact_epsilon",
    "flatten",
]


def exact_epsilon(value: object, *, name: str = "epsilon") -> Fraction:
    """An epsilon as an exact rational: 0.1 -> 1/10 (via its shortest decimal repr)."""
    if isinstance(value, bool):
        raise ParameterError(name, value, "must be a number")
    try:
        if isinstance(value, Fraction):
            eps = value
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ParameterError(name, value, "must be finite")
            eps = Fraction(Decimal(repr(value)))
        elif isinstance(value, int | str | Decimal):
            eps = Fraction(value)
        else:
            raise ParameterError(name, value, "must be a number")
    except (ValueError, ZeroDivisionError, InvalidOperation):
        raise ParameterError(name, value, "is not a number") from None
    if eps <= 0:
        raise ParameterError(name, value, "must be > 0")
    return eps


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParameterError(name, value, "must be a number")
    if not value > 0 or not math.isfinite(value):
        raise ParameterError(name, value, "must be finite and > 0")


def _rate_and_steps(sample_rate: float, steps: int) -> None:
    if not isinstance(sample_rate, int | float) or not 0 < sample_rate <= 1:
        raise ParameterError("sample_rate", sample_rate, "must be in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ParameterError("steps", steps, "must be an int >= 1")


@dataclass(frozen=True)
class PureDp:
    """An epsilon-DP release."""

    kind: ClassVar[str] = "pure"
    epsilon: Fraction

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", exact_epsilon(self.epsilon))


@dataclass(frozen=True)
class SubsampledGaussian:
    """``steps`` Poisson-subsampled Gaussian releases (sensitivity 1, std noise_multiplier)."""

    kind: ClassVar[str] = "subsampled_gaussian"
    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        _positive("noise_multiplier", self.noise_multiplier)
        _rate_and_steps(self.sample_rate, self.steps)


@dataclass(frozen=True)
class Skellam:
    """``steps`` (subsampled) Skellam(mu) releases; sensitivities in integer (ring) units."""

    kind: ClassVar[str] = "skellam"
    mu: float
    l1_sensitivity: float
    l2_sensitivity: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        _positive("mu", self.mu)
        _positive("l1_sensitivity", self.l1_sensitivity)
        _positive("l2_sensitivity", self.l2_sensitivity)
        _rate_and_steps(self.sample_rate, self.steps)


@dataclass(frozen=True)
class DistributedDiscreteGaussian:
    """``steps`` releases of a sum of ``honest`` shares N_Z(0, share_sigma^2), ``dim`` coords."""

    kind: ClassVar[str] = "distributed_discrete_gaussian"
    share_sigma: float
    honest: int
    l1_sensitivity: float
    l2_sensitivity: float
    dim: int
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        _positive("share_sigma", self.share_sigma)
        _positive("l1_sensitivity", self.l1_sensitivity)
        _positive("l2_sensitivity", self.l2_sensitivity)
        for name in ("honest", "dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ParameterError(name, v, "must be an int >= 1")
        _rate_and_steps(self.sample_rate, self.steps)


@dataclass(frozen=True)
class Exact:
    """A noiseless release (mechanism ``none``): no DP guarantee, recorded for audit."""

    kind: ClassVar[str] = "exact"


@dataclass(frozen=True)
class Composite:
    """Several releases made together by one query (e.g. a mean's sum and count)."""

    kind: ClassVar[str] = "composite"
    parts: tuple[Event, ...]

    def __post_init__(self) -> None:
        parts = tuple(self._flat())
        if not parts:
            raise ParameterError("parts", [], "a composite event needs at least one part")
        object.__setattr__(self, "parts", parts)

    def _flat(self) -> list[Event]:
        out: list[Event] = []
        for p in self.parts:
            out.extend(p._flat() if isinstance(p, Composite) else [p])
        return out


Event: TypeAlias = (
    PureDp | SubsampledGaussian | Skellam | DistributedDiscreteGaussian | Exact | Composite
)


def flatten(events: Iterable[Event]) -> list[Event]:
    """The non-composite events, in order."""
    out: list[Event] = []
    for e in events:
        out.extend(e.parts if isinstance(e, Composite) else [e])
    return out


_KINDS: dict[str, type[Any]] = {
    cls.kind: cls
    for cls in (PureDp, SubsampledGaussian, Skellam, DistributedDiscreteGaussian, Exact, Composite)
}


def _to_obj(event: Event) -> dict[str, Any]:
    obj: dict[str, Any] = {"kind": event.kind}
    for f in fields(event):
        value = getattr(event, f.name)
        if isinstance(value, Fraction):
            value = str(value)
        elif isinstance(value, tuple):
            value = [_to_obj(v) for v in value]
        obj[f.name] = value
    return obj


def encode_event(event: Event) -> str:
    """Canonical JSON: {"kind": ..., fields...}, keys sorted; epsilon as "num/den";
    a composite's parts as a list of such objects."""
    return json.dumps(_to_obj(event), sort_keys=True, separators=(",", ":"))


def decode_event(text: str) -> Event:
    """Strict inverse of :func:`encode_event`."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"privacy event is not JSON: {exc}") from None
    return _from_obj(obj, text)


def _from_obj(obj: Any, text: str) -> Event:
    if not isinstance(obj, dict) or "kind" not in obj:
        raise DecodeError("privacy event must be a JSON object with a 'kind'")
    cls = _KINDS.get(obj.pop("kind"))
    if cls is None:
        raise DecodeError(f"unknown privacy event kind in {text!r}")
    names = {f.name for f in fields(cls)}
    if set(obj) != names:
        raise DecodeError(f"privacy event fields {sorted(obj)} != {sorted(names)} for {cls.kind}")
    if cls is Composite:
        if not isinstance(obj["parts"], list):
            raise DecodeError("composite parts must be a list")
        obj["parts"] = tuple(_from_obj(p, text) for p in obj["parts"])
    if cls is PureDp:
        if not isinstance(obj["epsilon"], str):
            raise DecodeError("pure epsilon must be a 'num/den' string")
        obj["epsilon"] = Fraction(obj["epsilon"])
    try:
        event: Event = cls(**obj)
    except ParameterError as exc:
        raise DecodeError(f"invalid privacy event: {exc}") from None
    return event
