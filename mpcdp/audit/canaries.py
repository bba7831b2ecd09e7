"""Canaries of the one-run audit inside federated DP-SGD (Steinke, Nasr, Jagielski 2023,
"Privacy auditing with one (1) training run", Section 6: white-box gradient canaries and
black-box input canaries; Section 3: independent inclusion with probability 1/2).

What is public and what is secret:

- The canaries' *content* is public, derived from the run id alone (SHA-256 of a label and
  the run id seeds a numpy generator: these values are meant to be known by everyone, so a
  non-cryptographic generator is right here, unlike for noise, masks or sampling). Site i
  of n owns canaries ``i * per_site .. (i + 1) * per_site - 1``.
- A canary's *inclusion* bit is drawn by its site from the site's CSPRNG when the session
  opens and kept secret until the run's last step; the site then reveals its bits (packed,
  :func:`pack_inclusion`) with that step's upload. The bits are coin flips about public
  canaries, independent of the site's data: revealing them tells nothing about the data.
- White-box: canary j of site i is the gradient ``C e_c`` (C = max_grad_norm) on a distinct
  coordinate c (:func:`gradient_coordinates`, Dirac canaries). When included it behaves like
  one more example of the site: Poisson-sampled at every step with the run's sample rate
  (secretly, at the site) and, when sampled, added to the site's clipped sum before rounding,
  noise and masking.
- Black-box: canary j of site i is an input drawn uniformly from [0, 1)^shape with a label
  uniform in 0..num_classes-1 (:func:`input_canaries`); an included one is appended to the
  site's examples for the session. Its score is minus the final model's loss on it.

The white-box score (:class:`WhiteBoxScorer`) is the log-likelihood ratio of "canary present"
against "absent" at the canary's coordinate of every released step sum, summed over steps.
Under the model the accountant assumes (the coordinate holds noise of std s, plus C 2^k when
the canary was sampled, with probability q) one step's ratio is
``log(1 - q + q exp((a x - a^2 / 2) / s^2))`` with a = C 2^k in integer units: the most
powerful per-step test of the two hypotheses (Neyman-Pearson), where a plain sum of the
projections weighs the many steps where the canary was not sampled as much as the few where
it was. The score only orders canaries: a wrong s (for instance noise that is broken) changes
the power, never the validity of the bound (mpcdp.audit.bound).

The real gradients also land on the canaries' coordinates, and unlike the noise they are
correlated from step to step (a weight's gradient drifts slowly); when the noise is smaller
than claimed they, not the noise, hide the canaries, and the ratio computed with the claimed
noise is nearly a plain sum that adds the drift up. So a second score counts the spikes: the
steps where the coordinate's value exceeds an exponential moving average of its earlier
values (decay :data:`DETREND_DECAY`, started at the first step's value) by more than
a / 2 + :data:`SPIKE_SCALE` times the coordinate's own fluctuation so far (the mean of
min(|residual|, a / 2) over its earlier steps). A canary adds a when sampled; a coordinate
whose real gradient jumps by about a on its own would otherwise collect spikes without any
canary, the errors that cap the bound when the noise is gone (the mean is truncated at a / 2
so that the canary's own spikes barely raise it). It is weaker when the noise is as claimed
and much stronger when it is not. The audit tries both and pays for the choice in its
Bonferroni correction (mpcdp.audit.bound.audit). Measured on the test federation with the
noise removed (3 x 300 canaries, 100 steps): the plain count got 2 to 5 of 810 guesses wrong,
the scaled count 0 to 1.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import ParameterError, ProtocolError

__all__ = [
    "AUDIT_KINDS",
    "MAX_CANARIES",
    "SCORE_SETS",
    "WhiteBoxScorer",
    "draw_inclusion",
    "gradient_coordinates",
    "input_canaries",
    "pack_inclusion",
    "unpack_inclusion",
]

#: "white-box": gradient canaries scored on the released step sums; "black-box": input
#: canaries scored on the final model
AUDIT_KINDS = ("white-box", "black-box")
#: the most canaries one site takes in one run
MAX_CANARIES = 1 << 20
#: score rows the audit tries per kind (:meth:`WhiteBoxScorer.score_sets`; black-box: the loss)
SCORE_SETS = {"white-box": 2, "black-box": 1}
_LABEL = b"mpcdp audit canaries v1\n"
#: weight of the past in the white-box score's moving average (about 20 steps)
DETREND_DECAY = 0.95
#: a spike must exceed a / 2 by this many times the coordinate's mean truncated residual
SPIKE_SCALE = 2.0
FloatArray = NDArray[np.float64]


def public_generator(*, run_id: str, what: str) -> np.random.Generator:
    """The generator of a run's public canary content (not a secret: see the module
    docstring)."""
    digest = hashlib.sha256(_LABEL + what.encode() + b"\n" + run_id.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _count(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ParameterError(name, value, f"must be an int in [{lo}, {hi}]")
    return int(value)


def gradient_coordinates(
    *, run_id: str, num_params: int, sites: int, per_site: int
) -> NDArray[np.int64]:
    """Distinct coordinates of every site's Dirac canaries, shape (sites, per_site): row i
    holds site i's (a public function of the run id)."""
    _count("sites", sites, 1, 1 << 16)
    _count("per_site", per_site, 1, MAX_CANARIES)
    _count("num_params", num_params, 1, 1 << 40)
    if sites * per_site > num_params:
        raise ParameterError(
            "audit_canaries",
            per_site,
            f"{sites} sites x {per_site} gradient canaries need distinct coordinates, the "
            f"model has {num_params} trainable parameters",
        )
    gen = public_generator(run_id=run_id, what="white-box")
    picked = gen.choice(num_params, size=sites * per_site, replace=False)
    return np.asarray(picked, dtype=np.int64).reshape(sites, per_site)


def input_canaries(
    *,
    run_id: str,
    site_index: int,
    count: int,
    feature_shape: tuple[int, ...],
    num_classes: int,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Site ``site_index``'s ``count`` input canaries: inputs uniform on [0, 1)^shape,
    labels uniform in 0..num_classes-1 (public: a function of the run id)."""
    _count("site_index", site_index, 0, 1 << 16)
    _count("count", count, 1, MAX_CANARIES)
    _count("num_classes", num_classes, 2, 1 << 20)
    if not all(isinstance(d, int) and d >= 1 for d in feature_shape):
        raise ParameterError("feature_shape", feature_shape, "must be positive ints")
    gen = public_generator(run_id=run_id, what=f"black-box site {site_index}")
    x = gen.random((count, *feature_shape), dtype=np.float32)
    y = gen.integers(0, num_classes, size=count, dtype=np.int64)
    return x, y


def draw_inclusion(*, count: int, rng: np.random.Generator) -> NDArray[np.bool_]:
    """``count`` independent fair coins from the site's (secret) generator."""
    _count("count", count, 1, MAX_CANARIES)
    if not isinstance(rng, np.random.Generator):
        raise ParameterError("rng", type(rng).__name__, "must be a numpy.random.Generator")
    return np.asarray(rng.integers(0, 2, size=count, dtype=np.uint8) == 1)


def pack_inclusion(bits: NDArray[np.bool_]) -> bytes:
    """Bits, 8 per byte, first bit in the most significant position (np.packbits)."""
    return np.packbits(np.asarray(bits, dtype=np.bool_)).tobytes()


def unpack_inclusion(data: bytes, *, count: int, party: str) -> NDArray[np.bool_]:
    """Strict inverse of :func:`pack_inclusion`: exactly ceil(count / 8) bytes, padding
    bits zero; a ProtocolError naming ``party`` otherwise."""
    need = (count + 7) // 8
    if len(data) != need:
        raise ProtocolError(
            f"party {party!r} revealed {len(data)} bytes of canary bits, expected {need}"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[count:].any():
        raise ProtocolError(f"party {party!r} revealed canary bits with non-zero padding")
    return np.asarray(bits[:count] == 1)


class WhiteBoxScorer:
    """Sums, over steps, the log-likelihood ratio of each Dirac canary (module docstring).

    Args:
        coordinates: every canary's coordinate (1-D, distinct), in canary order.
        canary_units: a = C 2^k, a canary's value in integer units.
        noise_std: s, the std of the noise on one coordinate of a step sum, integer units.
        sample_rate: q.
    """

    def __init__(
        self,
        *,
        coordinates: NDArray[np.int64],
        canary_units: float,
        noise_std: float,
        sample_rate: float,
    ) -> None:
        coords = np.asarray(coordinates, dtype=np.int64)
        if coords.ndim != 1 or coords.size < 1:
            raise ParameterError("coordinates", f"shape {coords.shape}", "must be 1-D, non-empty")
        for name, v in (("canary_units", canary_units), ("noise_std", noise_std)):
            if not isinstance(v, int | float) or not math.isfinite(v) or not v > 0:
                raise ParameterError(name, v, "must be finite and > 0")
        if not isinstance(sample_rate, int | float) or not 0 < sample_rate <= 1:
            raise ParameterError("sample_rate", sample_rate, "must be in (0, 1]")
        self.coordinates = coords
        self._a = float(canary_units)
        self._inv_var = 1.0 / float(noise_std) ** 2
        self._log_q = math.log(sample_rate)
        self._log_not_q = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf
        self.scores = np.zeros(coords.size, dtype=np.float64)
        self.spikes = np.zeros(coords.size, dtype=np.int64)
        self._trend = np.zeros(coords.size, dtype=np.float64)
        self._wobble = np.zeros(coords.size, dtype=np.float64)  # sum of min(|residual|, a/2)
        self.steps = 0

    def _llr(self, x: FloatArray) -> FloatArray:
        present = self._log_q + (self._a * x - 0.5 * self._a * self._a) * self._inv_var
        return np.asarray(np.logaddexp(self._log_not_q, present), dtype=np.float64)

    def update(self, step_sum: NDArray[np.integer]) -> None:
        """Add one released step sum (signed integer units, the whole vector)."""
        x = step_sum[self.coordinates].astype(np.float64)
        self.scores += self._llr(x)
        if self.steps == 0:  # the average starts at the first value (its residual is 0)
            self._trend[:] = x
        residual = x - self._trend
        scale = self._wobble / max(1, self.steps)
        self.spikes += residual > 0.5 * self._a + SPIKE_SCALE * scale
        self._wobble += np.minimum(np.abs(residual), 0.5 * self._a)
        self._trend *= DETREND_DECAY
        self._trend += (1.0 - DETREND_DECAY) * x
        self.steps += 1

    def score_sets(self) -> FloatArray:
        """Both scores, shape (2, m): the likelihood ratio, and the spike count with ties
        ordered by the likelihood ratio (a term in (0, 0.5) that never overrides a count)."""
        tie = 0.5 / (1.0 + np.exp(-np.clip(self.scores, -700, 700)))
        return np.stack([self.scores, self.spikes + tie])
