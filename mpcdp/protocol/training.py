"""Federated DP-SGD over one secure-aggregation session (DESIGN.md: "Training reuses one
session's keys for many rounds"; "Arithmetic": clip -> scale -> randomized rounding -> noise
share -> mask).

A training session is one key agreement and many steps. Step s of a session:

1. the coordinator sends every site the model's parameters (all of them on the session's first
   step, the trainable ones after that);
2. each site Poisson-samples its own examples with rate q (secret CSPRNG), computes the sum
   of per-example clipped gradients (L2 norm <= C each), encodes it as
   ``round(g * 2^scale_bits)`` with unbiased randomized rounding, adds its Skellam noise share
   (sized for h = n - t honest sites) and its pairwise mask for round id s, and uploads it;
3. the coordinator adds the uploads: masks cancel, what is left is
   ``sum_sites round(g_i * 2^k) + Skellam(>= mu)``, which it decodes, divides by 2^k and by the
   expected batch size, and hands to its optimizer. The next step's parameters go back out.

Privacy, per site and per example (the site's own guarantee; it trusts nothing the coordinator
computed): adding or removing one example changes the site's clipped sum by a vector v with
``||v||_2 <= C``. Randomized rounding of a vector x is ``floor(x + u)`` for a uniform dither
u; for any fixed u each coordinate of the difference is ``floor`` or ``ceil`` of
``|v_k| 2^k``, so, for *every* u,

    Delta_2 <= C 2^k + sqrt(d),      Delta_1 <= sqrt(d) C 2^k + d

(worst case over the dither, hence valid for the mixture; it plays the role of the
Kairouz-Liu-Steinke 2021 inflated bound, with no failure probability). With the total noise
Skellam(mu), one step is an RDP release with those sensitivities (Agarwal-Kairouz-Liu 2021,
Cor. 3.6); Poisson subsampling amplifies it (mpcdp.dp.rdp.poisson_subsampled), and steps
compose. The site charges its ledger with :class:`~mpcdp.dp.events.Skellam` events of
``steps_per_charge`` steps before the first step of each block leaves it (charge before
release), under the query id ``run_id/session/block``: a resumed run in a new session pays
again for the steps it redoes, because they are new releases.

The site checks, before it signs its key: the dataset, the peers, t >= its min_colluders, the
clipping mode, the number of parameters of the architecture, the headroom of the ring, and
that the whole session fits its budget (and its max_epsilon_per_query).

Every step uploads ``num_params`` ring words; the noise share and the mask of step s + 1 are
built in a background thread while the coordinator sums step s (they do not depend on data),
so the critical path of a site is its gradient plus one vector addition.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from mpcdp import encoding, ring, sharing
from mpcdp.audit.canaries import (
    AUDIT_KINDS,
    MAX_CANARIES,
    draw_inclusion,
    gradient_coordinates,
    input_canaries,
    pack_inclusion,
    unpack_inclusion,
)
from mpcdp.config import DatasetConfig
from mpcdp.dp import accountant
from mpcdp.dp import events as ev
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.dp.mechanisms import Skellam
from mpcdp.errors import (
    DataError,
    HeadroomError,
    LedgerError,
    ParameterError,
    PolicyError,
    ProtocolError,
    RoundAborted,
    SessionError,
)
from mpcdp.protocol import identity
from mpcdp.protocol.coordinator import (
    ContributionStream,
    abort_all,
    accumulate,
    order_clients,
    signed_keys,
)
from mpcdp.protocol.noise_pool import Builder, NoisePool, fill_in_slices
from mpcdp.protocol.party import (
    SESSION_ID_BYTES,
    ClosedSessions,
    Contribution,
    Proposal,
    SessionHost,
    SessionSlots,
    check_parties,
    new_signed_key,
    session_pair_keys,
    unavailable,
)
from mpcdp.protocol.spec import validate_parties

__all__ = [
    "CLIPPING_MODES",
    "GradientSource",
    "TrainSpec",
    "TrainingClient",
    "TrainingEngine",
    "TrainingSession",
    "TrainingTask",
    "choose_scale_bits",
    "digest",
    "max_batch_size",
    "mechanism",
    "run_event",
    "sensitivities",
    "step_event",
]

log = logging.getLogger(__name__)

CLIPPING_MODES = ("flat", "automatic")
_SPEC_LABEL = b"mpcdp train spec v1\n"
#: noise is drawn in slices of this many coordinates, in parallel (64K: the Poisson
#: sampler's temporaries stay in cache; 1M slices took 1.7x as long)
_NOISE_SLICE = 1 << 16
#: the largest scale C * 2^k ever used
_MAX_SCALE = float(1 << 24)
#: the scale is chosen so that rounding adds at most this to Delta_2: sqrt(d) / (C 2^k)
_MAX_INFLATION = 0.01


@dataclass(frozen=True)
class TrainSpec:
    """One training session, as every site receives and checks it (see the proto)."""

    run_id: str
    dataset: str
    model: str
    parties: tuple[str, ...]
    sample_rate: float
    steps: int
    max_grad_norm: float
    scale_bits: int
    mu: float
    num_params: int
    colluders: int = 1
    start_step: int = 0
    steps_per_charge: int = 1
    clipping: str = "flat"
    bias_only: bool = False
    ring_bits: int = 32
    #: one-run audit (mpcdp.audit.canaries): canaries per site, 0 when not an audit run
    audit_canaries: int = 0
    #: "white-box" or "black-box" with canaries, "" without
    audit_kind: str = ""

    def __post_init__(self) -> None:
        for name in ("run_id", "dataset", "model"):
            v = getattr(self, name)
            if not isinstance(v, str) or not 1 <= len(v) <= 128 or not v.isprintable():
                raise ParameterError(name, v, "must be 1..128 printable characters")
        object.__setattr__(self, "parties", validate_parties(self.parties, self.colluders))
        if not isinstance(self.sample_rate, int | float) or not 0 < self.sample_rate <= 1:
            raise ParameterError("sample_rate", self.sample_rate, "must be in (0, 1]")
        _int(self.steps, "steps", 1, 2**40)
        _int(self.start_step, "start_step", 0, 2**40)
        _int(self.steps_per_charge, "steps_per_charge", 1, 2**40)
        _int(self.num_params, "num_params", 1, 2**40)
        _int(self.scale_bits, "scale_bits", 0, 40)
        for name in ("max_grad_norm", "mu"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ParameterError(name, v, "must be a number")
            if not math.isfinite(v) or not v > 0:
                raise ParameterError(name, v, "must be finite and > 0")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        if self.clipping not in CLIPPING_MODES:
            raise ParameterError("clipping", self.clipping, f"must be one of {CLIPPING_MODES}")
        if not isinstance(self.bias_only, bool):
            raise ParameterError("bias_only", self.bias_only, "must be a bool")
        if self.ring_bits not in (32, 64):
            raise ParameterError("ring_bits", self.ring_bits, "must be 32 or 64")
        _int(self.audit_canaries, "audit_canaries", 0, MAX_CANARIES)
        if self.audit_canaries == 0:
            if self.audit_kind != "":
                raise ParameterError("audit_kind", self.audit_kind, "must be '' without canaries")
        elif self.audit_kind not in AUDIT_KINDS:
            raise ParameterError("audit_kind", self.audit_kind, f"must be one of {AUDIT_KINDS}")
        elif self.start_step != 0:
            # the inclusion bits belong to one session: an audit run is never resumed
            raise ParameterError("start_step", self.start_step, "must be 0 in an audit run")
        elif (
            self.audit_kind == "white-box"
            and len(self.parties) * self.audit_canaries > self.num_params
        ):
            raise ParameterError(
                "audit_canaries",
                self.audit_canaries,
                f"{len(self.parties)} sites x {self.audit_canaries} gradient canaries need "
                f"distinct coordinates; the model has {self.num_params} trainable parameters",
            )

    @property
    def honest(self) -> int:
        return len(self.parties) - self.colluders

    @property
    def end_step(self) -> int:
        """One past the session's last step."""
        return self.start_step + self.steps

    def index_of(self, party: str) -> int:
        try:
            return self.parties.index(party)
        except ValueError:
            raise ParameterError(
                "parties", list(self.parties), f"does not include {party!r}"
            ) from None


def _int(v: object, name: str, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ParameterError(name, v, f"must be an int in [{lo}, {hi}]")


def digest(spec: TrainSpec) -> bytes:
    """SHA-256 of ``b"mpcdp train spec v1\\n"`` + the canonical JSON of the spec (sorted
    keys, floats as ``repr`` strings); the label keeps it apart from query-spec digests."""
    obj: dict[str, Any] = asdict(spec)
    for k, v in obj.items():
        if isinstance(v, float):
            obj[k] = repr(v)
        elif isinstance(v, tuple):
            obj[k] = list(v)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(_SPEC_LABEL + text.encode()).digest()


# -- the maths of one step (pure) ------------------------------------------------------------


def sensitivities(*, max_grad_norm: float, scale_bits: int, num_params: int) -> tuple[float, float]:
    """(Delta_2, Delta_1) in integer units of one example's change to a site's rounded sum:
    ``C 2^k + sqrt(d)`` and ``sqrt(d) C 2^k + d`` (module docstring)."""
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        raise ParameterError("max_grad_norm", max_grad_norm, "must be finite and > 0")
    if num_params < 1:
        raise ParameterError("num_params", num_params, "must be >= 1")
    scaled = max_grad_norm * 2.0**scale_bits
    root = math.sqrt(num_params)
    return scaled + root, root * scaled + num_params


def step_event(spec: TrainSpec, *, steps: int) -> ev.Skellam:
    """The privacy event of ``steps`` steps of ``spec`` (for one site's examples)."""
    l2, l1 = sensitivities(
        max_grad_norm=spec.max_grad_norm, scale_bits=spec.scale_bits, num_params=spec.num_params
    )
    return ev.Skellam(
        mu=spec.mu, l1_sensitivity=l1, l2_sensitivity=l2, sample_rate=spec.sample_rate, steps=steps
    )


def mechanism(spec: TrainSpec) -> Skellam:
    """The noise of every step: Skellam(mu) in the honest sum, shares sized for h."""
    l2, l1 = sensitivities(
        max_grad_norm=spec.max_grad_norm, scale_bits=spec.scale_bits, num_params=spec.num_params
    )
    return Skellam(mu=spec.mu, l1_sensitivity=l1, l2_sensitivity=l2)


def run_event(spec: TrainSpec) -> ev.Skellam:
    """The privacy event of the whole session."""
    return step_event(spec, steps=spec.steps)


def max_batch_size(*, examples: int, sample_rate: float) -> int:
    """A bound on a Poisson(q) batch of ``examples`` that fails with probability < 1e-15
    (Chernoff); a larger draw is cut to it (see the site's source)."""
    mean = examples * sample_rate
    return min(examples, math.ceil(mean + 8.5 * math.sqrt(mean) + 40))


def choose_scale_bits(
    *,
    max_grad_norm: float,
    num_params: int,
    max_total_batch: int,
    n_parties: int,
    honest: int,
    noise_multiplier: float,
    ring_bits: int = 32,
) -> int:
    """The gradient scale 2^k: the smallest k with ``sqrt(d) / (C 2^k) <= 1%`` (rounding
    adds at most 1% to Delta_2), or, when the ring's headroom does not allow that, the largest
    k whose round cannot wrap it:
    ``max_total_batch * C 2^k + n + tail(Skellam(mu(k))) < 2^(ring_bits - 1)`` with
    mu(k) = (noise_multiplier * Delta_2(k))^2. Raises HeadroomError when even k = 0 overflows.

    Not larger than needed: mu grows as 4^k, and a scale whose shares would leave the
    Skellam sampler's exact range (mu / h <= 2^47, mpcdp.dp.samplers) is skipped.
    """
    target = max(0, math.ceil(math.log2(math.sqrt(num_params) / (_MAX_INFLATION * max_grad_norm))))
    for k in range(min(40, target), -1, -1):
        if max_grad_norm * 2.0**k > _MAX_SCALE:
            continue
        l2, l1 = sensitivities(max_grad_norm=max_grad_norm, scale_bits=k, num_params=num_params)
        mu = (noise_multiplier * l2) ** 2
        noise = Skellam(mu=mu, l1_sensitivity=l1, l2_sensitivity=l2)
        try:
            noise.check_range(honest=honest)
        except ParameterError:
            continue  # a smaller scale: more rounding noise, but shares the sites can draw
        tail = noise.tail_bound(n_parties=n_parties, honest=honest)
        bound = max_total_batch * math.ceil(max_grad_norm * 2.0**k) + n_parties + tail
        if bound < 1 << (ring_bits - 1):
            return k
    raise HeadroomError(
        f"no gradient scale fits the ring and the Skellam sampler's range: "
        f"max_total_batch={max_total_batch}, max_grad_norm={max_grad_norm:g}, "
        f"noise_multiplier={noise_multiplier:g}, num_params={num_params}, "
        f"ring_bits={ring_bits}; use ring_bits=64, a smaller batch or a larger epsilon"
    )


# -- the site ---------------------------------------------------------------------------------


class GradientSource(Protocol):
    """A site's model and data, as the engine drives them (torch lives behind this; see
    mpcdp.train.site). Built per session from the spec."""

    @property
    def num_params(self) -> int:
        """Trainable parameters: the words of one upload."""
        ...

    @property
    def total_params(self) -> int:
        """All parameters of the model (a session's first step carries all of them)."""
        ...

    def load_parameters(self, values: NDArray[np.float32], *, full: bool) -> None: ...

    def quantized_gradient(
        self, *, rng: np.random.Generator
    ) -> NDArray[np.int32] | NDArray[np.int64]:
        """Poisson-sample a batch, clip, sum, scale by 2^scale_bits, round (unbiased); int32
        when the session's ring is Z_2^32 (the plan keeps every value inside it). The array
        may be a buffer the source reuses: it is valid until the next call."""
        ...

    def prepare_next(self) -> None:
        """Prepare the next step's data-independent work (e.g. its rounding dither) in the
        background; called after a step's upload is sent."""
        ...

    def add_examples(self, x: NDArray[np.float32], y: NDArray[np.int64]) -> None:
        """Append examples to the session's data before its first step (the included input
        canaries of a black-box audit run); they are sampled like every other example."""
        ...

    def close(self) -> None:
        """Release what the session holds (threads); called once when it ends."""
        ...


@dataclass(frozen=True)
class TrainingTask:
    """An example dataset a site trains on: its declaration and a source factory.

    ``make_source`` is None when the data failed validation; ``error`` says why.
    ``count_params`` gives (trainable, total) parameters of the spec's model without building
    it (e.g. on torch's meta device), so a site refuses an oversized model before it
    allocates anything.
    """

    config: DatasetConfig
    examples: int
    feature_shape: tuple[int, ...] = ()
    num_classes: int = 0
    make_source: Callable[[TrainSpec], GradientSource] | None = None
    error: str | None = None
    count_params: Callable[[TrainSpec], tuple[int, int]] | None = None


@dataclass
class _SiteSession:
    coordinator: str
    spec: TrainSpec
    source: GradientSource
    private_key: X25519PrivateKey
    public: identity.SignedKey
    expires: float
    next_step: int
    pair_keys: dict[int, bytes] | None = None
    charged_block: int = -1
    busy: bool = False
    last_status: float = 0.0
    last_epsilon: str = "0"  # the dataset's epsilon spent after the session's last charge
    #: audit runs: this site's canary inclusion bits (secret until the last step's upload)
    canaries_in: NDArray[np.bool_] | None = None
    #: white-box audit runs: the coordinates of this site's included gradient canaries
    canary_coordinates: NDArray[np.int64] | None = None


class TrainingEngine(SessionHost):
    """One site's training sessions (the training twin of PartyEngine, sharing its ledger)."""

    def __init__(
        self,
        *,
        party_id: str,
        tasks: Mapping[str, TrainingTask],
        ledger: BudgetLedger,
        ca: x509.Certificate,
        certificate: x509.Certificate,
        signing_key: ec.EllipticCurvePrivateKey,
        peers: Sequence[str],
        min_colluders: int = 1,
        idle_ttl_s: float = 600.0,
        max_sessions: int = 4,
        max_sessions_total: int = 8,
        max_params: int = 100_000_000,
        noise_threads: int = 0,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.monotonic,
        test_only_noise_divisor: float = 1.0,
    ) -> None:
        """``test_only_noise_divisor``: FOR TESTS AND BENCHMARKS ONLY. Divides the std of
        this site's noise shares (inf: no noise at all), to show that the one-run audit
        (mpcdp.audit) catches a release less private than claimed. It is a constructor
        argument only: nothing in party.toml or on the wire reaches it."""
        from mpcdp.rng import ensure_rng

        if (
            isinstance(test_only_noise_divisor, bool)
            or not isinstance(test_only_noise_divisor, int | float)
            or not test_only_noise_divisor >= 1
        ):
            raise ParameterError(
                "test_only_noise_divisor", test_only_noise_divisor, "must be a number >= 1"
            )
        self._noise_divisor = float(test_only_noise_divisor)
        if self._noise_divisor != 1.0:
            log.warning(
                "TEST ONLY: party %s divides its training noise std by %g; its releases are "
                "NOT differentially private as claimed",
                party_id,
                self._noise_divisor,
            )

        self.party_id = party_id
        self.tasks = dict(tasks)
        self.ledger = ledger
        self._ca = ca
        self._certificates = identity.CertificateCache(ca=ca)
        self._cert = certificate
        self._signing_key = signing_key
        self._peers = frozenset(peers) | {party_id}
        self._min_colluders = min_colluders
        self._ttl = idle_ttl_s
        self._slots = SessionSlots(per_coordinator=max_sessions, total=max_sessions_total)
        self._max_params = max_params
        self._clock = clock
        self._rng = ensure_rng(rng)  # batch sampling: must stay secret
        self._pads = NoisePool(rng=rng, max_entries=2, threads=noise_threads, name="pad")
        self._sessions: dict[bytes, _SiteSession] = {}
        self._closed = ClosedSessions(limit=4096)
        self._lock = threading.Lock()

    def max_parameters(self, session_id: bytes) -> int:
        """How many parameter values a step of this open session may carry."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                why = self._closed.get(session_id) or "unknown or expired"
                raise SessionError(f"training session {session_id.hex()}: {why}")
            return session.source.total_params

    # -- open -------------------------------------------------------------------------------

    def open(self, *, session_id: bytes, spec: TrainSpec, coordinator: str) -> Proposal:
        with self._claiming(session_id, coordinator):
            return self._open(session_id, spec, coordinator)

    def _open(self, session_id: bytes, spec: TrainSpec, coordinator: str) -> Proposal:
        check_parties(
            party_id=self.party_id,
            parties=spec.parties,
            peers=self._peers,
            colluders=spec.colluders,
            min_colluders=self._min_colluders,
        )
        # every parameter that decides this site's noise is in its samplers' exact range
        mechanism(spec).check_range(honest=spec.honest)
        task = self.tasks.get(spec.dataset)
        if task is None:
            raise PolicyError(
                f"unknown example dataset {spec.dataset!r} (this party trains on "
                f"{sorted(self.tasks)})"
            )
        if task.make_source is None:
            raise DataError(unavailable(spec.dataset, self.party_id))
        cfg = task.config
        if spec.num_params > self._max_params:
            raise PolicyError(
                f"num_params={spec.num_params} exceeds this site's max_model_params="
                f"{self._max_params}"
            )
        if task.count_params is not None:  # the model's size before it is built
            trainable, total = task.count_params(spec)
            if total > self._max_params:
                raise PolicyError(
                    f"model {spec.model!r} has {total} parameters, more than this site's "
                    f"max_model_params={self._max_params}"
                )
            _check_num_params(spec, trainable)
        # an audit run's included canaries are examples of this site for the session
        self._check_headroom(spec, task.examples + spec.audit_canaries)
        event = run_event(spec)
        if cfg.max_epsilon_per_query is not None:
            eps = accountant.compose([event], delta=cfg.delta).epsilon
            if eps > cfg.max_epsilon_per_query:
                raise PolicyError(
                    f"the session's epsilon {eps:.4g} (delta={cfg.delta:g}) exceeds "
                    f"max_epsilon_per_query={cfg.max_epsilon_per_query:g} of {cfg.name!r}"
                )
        # the whole session is reserved now; each block's charge draws on the reservation,
        # and what is left is released when the session ends early
        key = _reservation(spec, session_id)
        self.ledger.reserve(
            dataset=cfg.name, key=key, event=event, query_id=_charge_id(spec, session_id, 0)
        )
        try:
            source = task.make_source(spec)
        except BaseException:
            self.ledger.release(key)
            raise
        try:
            _check_num_params(spec, source.num_params)
            canaries = self._canaries(spec, task, source)
            return self._accept(session_id, spec, coordinator, source, canaries)
        except BaseException:
            source.close()
            self.ledger.release(key)
            raise

    def _canaries(
        self, spec: TrainSpec, task: TrainingTask, source: GradientSource
    ) -> tuple[NDArray[np.bool_] | None, NDArray[np.int64] | None]:
        """An audit run's inclusion bits (from this site's CSPRNG) and, for white-box
        canaries, the included ones' coordinates; black-box canaries that are included join
        the source's examples. (None, None) for an ordinary run."""
        if spec.audit_canaries == 0:
            return None, None
        me = spec.index_of(self.party_id)
        bits = draw_inclusion(count=spec.audit_canaries, rng=self._rng)
        if spec.audit_kind == "white-box":
            coords = gradient_coordinates(
                run_id=spec.run_id,
                num_params=spec.num_params,
                sites=len(spec.parties),
                per_site=spec.audit_canaries,
            )[me]
            return bits, coords[bits]
        if not task.feature_shape or task.num_classes < 2:
            raise PolicyError(
                f"dataset {spec.dataset!r} declares no feature shape and classes for input "
                "canaries; use audit_kind='white-box'"
            )
        x, y = input_canaries(
            run_id=spec.run_id,
            site_index=me,
            count=spec.audit_canaries,
            feature_shape=task.feature_shape,
            num_classes=task.num_classes,
        )
        if bits.any():
            source.add_examples(x[bits], y[bits])
        return bits, None

    def _accept(
        self,
        session_id: bytes,
        spec: TrainSpec,
        coordinator: str,
        source: GradientSource,
        canaries: tuple[NDArray[np.bool_] | None, NDArray[np.int64] | None],
    ) -> Proposal:
        private_key, signed = new_signed_key(
            signing_key=self._signing_key,
            certificate=self._cert,
            session_id=session_id,
            spec_digest=digest(spec),
            party_id=self.party_id,
        )
        session = _SiteSession(
            coordinator=coordinator,
            spec=spec,
            source=source,
            private_key=private_key,
            public=signed,
            expires=self._clock() + self._ttl,
            next_step=spec.start_step,
            canaries_in=canaries[0],
            canary_coordinates=canaries[1],
        )
        with self._lock:
            if session_id in self._sessions or session_id in self._closed:
                raise SessionError(f"session {session_id.hex()} was already used")
            self._sessions[session_id] = session
        log.info(
            "training session %s: run %s, %d steps from %d, %d parameters",
            session_id.hex(),
            spec.run_id,
            spec.steps,
            spec.start_step,
            spec.num_params,
        )
        return Proposal(key=signed, length=spec.num_params)

    def _check_headroom(self, spec: TrainSpec, examples: int) -> None:
        batch = max_batch_size(examples=examples, sample_rate=spec.sample_rate)
        per_site = batch * math.ceil(spec.max_grad_norm * 2.0**spec.scale_bits) + 1
        n = len(spec.parties)
        tail = mechanism(spec).tail_bound(n_parties=n, honest=spec.honest)
        encoding_bound = n * per_site + tail
        if encoding_bound >= 1 << (spec.ring_bits - 1):
            raise HeadroomError(
                f"training step could overflow the ring: {n} sites * (batch {batch} * "
                f"max_grad_norm={spec.max_grad_norm:g} * 2^scale_bits={spec.scale_bits}) + "
                f"noise tail {tail} >= 2^{spec.ring_bits - 1}; lower scale_bits"
            )

    # -- step -------------------------------------------------------------------------------

    def _acquire(self, session_id: bytes, coordinator: str) -> _SiteSession:
        with self._lock:
            self._expire()
            session = self._sessions.get(session_id)
            if session is None:
                why = self._closed.get(session_id)
                if why is not None:
                    raise SessionError(f"training session {session_id.hex()} is closed ({why})")
                raise SessionError(f"unknown or expired training session {session_id.hex()}")
            if session.coordinator != coordinator:
                raise SessionError(
                    f"session {session_id.hex()} belongs to coordinator "
                    f"{session.coordinator!r}, not {coordinator!r}"
                )
            if session.busy:
                raise SessionError(f"session {session_id.hex()} is already running a step")
            session.busy = True
            return session

    def step(
        self,
        *,
        session_id: bytes,
        step: int,
        keys: Sequence[identity.SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
        coordinator: str,
    ) -> Contribution:
        """Run step ``step`` of the session: the masked noisy quantized gradient sum."""
        session = self._acquire(session_id, coordinator)
        try:
            return self._step(session_id, session, step, keys, parameters, full)
        except Exception as exc:
            # any failure ends the session: a step is never answered twice
            self._end(session_id, f"failed at step {step}: {type(exc).__name__}")
            raise
        finally:
            session.busy = False

    def _step(
        self,
        session_id: bytes,
        session: _SiteSession,
        step: int,
        keys: Sequence[identity.SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
    ) -> Contribution:
        spec = session.spec
        if step != session.next_step:
            raise ProtocolError(
                f"step={step} but session {session_id.hex()} expects step {session.next_step}"
            )
        if session.pair_keys is None:
            if not keys:
                raise ProtocolError("the first step of a session must relay every signed key")
            if not full:
                raise ProtocolError("the first step of a session must carry all parameters")
            session.pair_keys = session_pair_keys(
                party_id=self.party_id,
                parties=spec.parties,
                keys=keys,
                own=session.public,
                private_key=session.private_key,
                session_id=session_id,
                spec_digest=digest(spec),
                ca=self._ca,
                certificates=self._certificates,
            )
        elif keys:
            raise ProtocolError("signed keys are relayed on a session's first step only")
        expected = session.source.total_params if full else session.source.num_params
        if parameters.shape != (expected,):
            raise ProtocolError(
                f"parameters carry {parameters.size} values, expected {expected} "
                f"({'all' if full else 'trainable'} parameters of {spec.model!r})"
            )
        if not np.all(np.isfinite(parameters)):
            raise ParameterError("parameters", "non-finite", "must be finite float32 values")
        block = (step - spec.start_step) // spec.steps_per_charge
        if block > session.charged_block:
            first = spec.start_step + block * spec.steps_per_charge
            n_steps = min(spec.steps_per_charge, spec.end_step - first)
            left = spec.end_step - first - n_steps
            charge = self.ledger.charge(
                dataset=spec.dataset,
                query_id=_charge_id(spec, session_id, block),
                event=step_event(spec, steps=n_steps),
                reservation=_reservation(spec, session_id),
                # the reservation now covers the remaining steps only
                keep=step_event(spec, steps=left) if left > 0 else None,
                note=f"training {spec.run_id} ({spec.model}) steps {first}-{first + n_steps - 1}"
                + (" (audit run)" if spec.audit_canaries else ""),
            )
            if not charge.new:
                raise LedgerError(f"block {block} of session {session_id.hex()} was charged")
            session.charged_block = block
            assert charge.status is not None
            session.last_status = charge.status.remaining_epsilon
            session.last_epsilon = f"{charge.status.spent_epsilon:.6g}"
        session.source.load_parameters(parameters, full=full)
        grad = session.source.quantized_gradient(rng=self._rng)
        if grad.shape != (spec.num_params,):
            raise ProtocolError(f"gradient has shape {grad.shape}, expected ({spec.num_params},)")
        if session.canary_coordinates is not None:
            self._add_gradient_canaries(spec, session.canary_coordinates, grad)
        upload = self._pads.take((session_id, step), self._pad_builder(session, step))
        np.add(upload, encoding.to_ring(grad, ring_bits=spec.ring_bits), out=upload)
        session.next_step = step + 1
        session.expires = self._clock() + self._ttl
        reveal = b""
        if session.next_step >= spec.end_step:
            if session.canaries_in is not None:
                # the run's releases are all made: the audit may see which canaries were in
                reveal = pack_inclusion(session.canaries_in)
            self._end(session_id, "finished")
        return Contribution(
            party_id=self.party_id,
            epsilon_spent=session.last_epsilon,
            budget_remaining=session.last_status,
            length=upload.size,
            _noisy=upload,
            _mask=None,
            audit_inclusion=reveal,
        )

    def _add_gradient_canaries(
        self, spec: TrainSpec, coordinates: NDArray[np.int64], grad: np.ndarray
    ) -> None:
        """A white-box audit step: each included Dirac canary is Poisson-sampled like an
        example (rate q, this site's secret CSPRNG) and, when sampled, adds its clipped
        gradient C e_c, scaled by 2^k, to the site's rounded sum, before noise and mask. Its
        value C 2^k is itself randomly rounded (exact when it is an integer, as for C = 1):
        at most ceil(C 2^k) on one coordinate, within the sensitivity C 2^k + sqrt(d) that
        the site charges for every example."""
        sampled = coordinates[self._rng.random(coordinates.size) < spec.sample_rate]
        if sampled.size == 0:
            return
        units = spec.max_grad_norm * 2.0**spec.scale_bits
        low = math.floor(units)
        values = low + (self._rng.random(sampled.size) < units - low)
        grad[sampled] += values.astype(grad.dtype)

    def step_finished(self, *, session_id: bytes) -> None:
        """After a step's upload is sent: build the next step's noise share + mask (they do
        not depend on data) in the background."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.next_step >= session.spec.end_step:
            return
        session.source.prepare_next()
        nbytes = session.spec.num_params * session.spec.ring_bits // 8
        self._pads.prepare(
            (session_id, session.next_step),
            self._pad_builder(session, session.next_step),
            nbytes=nbytes,
        )

    def _pad_builder(self, session: _SiteSession, step: int) -> Builder:
        spec = session.spec
        pair_keys = session.pair_keys
        assert pair_keys is not None
        me = spec.index_of(self.party_id)
        noise: Skellam | None = mechanism(spec)
        if self._noise_divisor != 1.0:  # TEST ONLY (constructor docstring)
            assert noise is not None
            noise = (
                None
                if math.isinf(self._noise_divisor)
                else Skellam(
                    mu=spec.mu / self._noise_divisor**2,
                    l1_sensitivity=noise.l1_sensitivity,
                    l2_sensitivity=noise.l2_sensitivity,
                )
            )
        dtype = ring.dtype_for(spec.ring_bits).newbyteorder("=")
        size = spec.num_params

        def build(rng: np.random.Generator, workers: Executor) -> np.ndarray:
            pad = np.empty(size, dtype=dtype)

            def fill(a: int, b: int, gen: np.random.Generator) -> None:
                if noise is None:
                    pad[a:b] = 0
                    return
                share = noise.share(size=b - a, honest=spec.honest, rng=gen)
                pad[a:b] = encoding.to_ring(share, ring_bits=spec.ring_bits)

            # in parallel slices: matters for 10^7-parameter models
            fill_in_slices(size=size, slice_size=_NOISE_SLICE, rng=rng, fill=fill, workers=workers)
            sharing.MaskStream(
                party=me, pair_keys=pair_keys, round_id=step, tensor_id=0, ring_bits=spec.ring_bits
            ).apply(pad)
            return pad

        return build

    def abort(self, *, session_id: bytes, coordinator: str) -> bool:
        """Forget a session; True when it was one of this engine's."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.coordinator != coordinator:
                return False
        self._end(session_id, "aborted")
        log.info("training session %s: aborted by %s", session_id.hex(), coordinator)
        return True

    def close(self) -> None:
        with self._lock:
            open_sessions = list(self._sessions)
        for sid in open_sessions:
            self._end(sid, "the party is shutting down")
        self._pads.close()

    def _end(self, session_id: bytes, why: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            self._closed.add(session_id, why)
            if session is not None:
                self._slots.give_back(session.coordinator)
        if session is not None:
            self.ledger.release(_reservation(session.spec, session_id))
            session.source.close()

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s for s, v in self._sessions.items() if v.expires < now and not v.busy]:
            session = self._sessions.pop(sid)
            self._slots.give_back(session.coordinator)
            self.ledger.release(_reservation(session.spec, sid))
            session.source.close()
            self._closed.add(sid, "expired")


def _check_num_params(spec: TrainSpec, trainable: int) -> None:
    if trainable != spec.num_params:
        raise PolicyError(
            f"num_params={spec.num_params} but model {spec.model!r} has {trainable} trainable "
            "parameters here"
        )


def _charge_id(spec: TrainSpec, session_id: bytes, block: int) -> str:
    return f"{spec.run_id}/{session_id.hex()}/{block}"


def _reservation(spec: TrainSpec, session_id: bytes) -> str:
    """The ledger reservation of a session's steps not yet charged."""
    return f"{spec.run_id}/{session_id.hex()}/*"


# -- the coordinator --------------------------------------------------------------------------


class TrainingClient(Protocol):
    """How the coordinator reaches one site for training."""

    @property
    def party_id(self) -> str: ...

    def train_open(self, *, session_id: bytes, spec: TrainSpec) -> Proposal: ...

    def train_step(
        self,
        *,
        session_id: bytes,
        step: int,
        keys: Sequence[identity.SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
        ring_bits: int,
    ) -> ContributionStream: ...

    def abort(self, *, session_id: bytes, reason: str) -> None: ...


@dataclass
class TrainingSession:
    """The coordinator's side of one training session over ``clients`` (one per site)."""

    spec: TrainSpec
    clients: Sequence[TrainingClient]
    session_id: bytes = field(default_factory=lambda: secrets.token_bytes(SESSION_ID_BYTES))
    _keys: list[identity.SignedKey] = field(default_factory=list)
    _next: int = -1
    _pool: ThreadPoolExecutor | None = None
    budget_remaining: dict[str, float] = field(default_factory=dict)
    #: audit runs, after the last step: every site's canary inclusion bits, in party order
    #: of ``spec.parties`` (mpcdp.audit.canaries)
    audit_inclusion: dict[str, NDArray[np.bool_]] = field(default_factory=dict)

    def open(self) -> None:
        self.clients = order_clients(self.clients, self.spec.parties)
        self._pool = ThreadPoolExecutor(
            max_workers=len(self.clients), thread_name_prefix="train-step"
        )
        try:
            proposals = list(
                self._pool.map(
                    lambda c: c.train_open(session_id=self.session_id, spec=self.spec),
                    self.clients,
                )
            )
            keys = signed_keys(proposals, self.spec.parties)
            for p, pid in zip(proposals, self.spec.parties, strict=True):
                if p.length != self.spec.num_params:
                    raise ProtocolError(
                        f"party {pid!r} announced {p.length} words, the run has "
                        f"{self.spec.num_params}"
                    )
        except Exception as exc:
            self._abort(str(exc))
            raise RoundAborted(self.spec.run_id, exc) from exc
        self._keys = keys
        self._next = self.spec.start_step

    def step(
        self, *, parameters: NDArray[np.float32], full: bool, out: np.ndarray | None = None
    ) -> NDArray[np.int32] | NDArray[np.int64]:
        """Run the next step; returns the decoded sum (integer units, signed; int32 in
        Z_2^32, a view of the summed words). ``out``: a C-contiguous array of
        ``num_params`` ring words (uint32 for Z_2^32, uint64 for Z_2^64) to sum into instead
        of a new one (a loop that reuses one saves an allocation of the model's size per
        step); its contents are overwritten."""
        if self._pool is None or self._next < 0:
            raise ProtocolError("open the training session first")
        if self._next >= self.spec.end_step:
            raise ProtocolError(f"the session's {self.spec.steps} steps are done")
        dtype = ring.dtype_for(self.spec.ring_bits).newbyteorder("=")
        if out is None:
            total = np.zeros(self.spec.num_params, dtype=dtype)
        else:
            if (
                not isinstance(out, np.ndarray)
                or out.dtype != dtype
                or out.shape != (self.spec.num_params,)
                or not out.flags.c_contiguous
                or not out.flags.writeable
            ):
                what = (
                    f"{out.dtype} of shape {out.shape}"
                    if isinstance(out, np.ndarray)
                    else type(out).__name__
                )
                raise ParameterError(
                    "out",
                    what,
                    f"must be a writeable C-contiguous {dtype} array of shape "
                    f"({self.spec.num_params},)",
                )
            total = out
            total.fill(0)
        step = self._next
        first = step == self.spec.start_step
        keys = self._keys if first else []
        lock = threading.Lock()
        params = np.ascontiguousarray(parameters, dtype=np.float32)

        last = step + 1 == self.spec.end_step
        reveals: dict[str, bytes] = {}

        def one(client: TrainingClient) -> float:
            stream = client.train_step(
                session_id=self.session_id,
                step=step,
                keys=keys,
                parameters=params,
                full=full,
                ring_bits=self.spec.ring_bits,
            )
            reveals[client.party_id] = stream.audit_inclusion
            return accumulate(stream, total, lock, client.party_id, None)

        try:
            remaining = list(self._pool.map(one, self.clients))
            self._check_reveals(reveals, last=last)
        except Exception as exc:
            self._abort(str(exc))
            raise RoundAborted(f"{self.spec.run_id} step {step}", exc) from exc
        self.budget_remaining = dict(zip(self.spec.parties, remaining, strict=True))
        self._next = step + 1
        return encoding.signed_view(total)

    def _check_reveals(self, reveals: Mapping[str, bytes], *, last: bool) -> None:
        """Inclusion bits come with the last step of an audit run, from every site, and
        never otherwise."""
        wanted = last and self.spec.audit_canaries > 0
        for party in self.spec.parties:
            data = reveals.get(party, b"")
            if not wanted:
                if data:
                    raise ProtocolError(f"party {party!r} revealed canary bits out of place")
                continue
            self.audit_inclusion[party] = unpack_inclusion(
                data, count=self.spec.audit_canaries, party=party
            )

    def _abort(self, reason: str) -> None:
        abort_all(self.clients, session_id=self.session_id, reason=reason)

    def close(self) -> None:
        """End the session (tells sites to forget it when steps remain)."""
        if self._pool is not None:
            if 0 <= self._next < self.spec.end_step:
                self._abort("closed by the coordinator")
            self._pool.shutdown(wait=True)
            self._pool = None
