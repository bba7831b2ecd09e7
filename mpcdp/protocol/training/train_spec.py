"""A training session as every site receives and checks it: :class:`TrainSpec`, its digest,
its sensitivities, noise and privacy events, and the choice of the fixed-point scale (see the
package docstring for the protocol). Nothing happens at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mpcdp.audit.canaries import (
    AUDIT_KINDS,
    MAX_CANARIES,
)
from mpcdp.dp import events as ev
from mpcdp.dp.mechanisms import Skellam
from mpcdp.errors import (
    HeadroomError,
    ParameterError,
)
from mpcdp.protocol.query.query_spec import validate_parties
from mpcdp.protocol.training.evaluation import (
    check_eval_fields,
    eval_count,
    eval_event,
    eval_words,
    is_eval_point,
)
from mpcdp.protocol.training.fingerprint import check_entries

log = logging.getLogger(__name__)

CLIPPING_MODES = ("flat", "automatic")
_SPEC_LABEL = b"mpcdp train spec v1\n"
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
    #: the per-example loss every site must have declared: "cross_entropy", "mse" or an
    #: import path (mpcdp.train.declared)
    loss: str = "cross_entropy"
    #: the coordinator's model, parameter by parameter and buffer by buffer, and its SHA-256
    #: (mpcdp.protocol.training.fingerprint); both empty: no architecture check (a site
    #: then checks the trainable parameter count only)
    architecture: tuple[str, ...] = ()
    fingerprint: str = ""
    #: the options the coordinator set for the model's factory, as canonical JSON (sorted
    #: keys, no spaces; :func:`encode_model_options`); "" for none. A site allows only the
    #: options its party.toml lets a coordinator choose, within their declared ranges.
    model_options: str = ""
    #: evaluation at the sites (mpcdp.protocol.training.evaluation): before every step that
    #: is a multiple of ``eval_every`` and after the session's last step (0: never), each
    #: site scores the model on its held-out split, its losses clipped to
    #: ``eval_loss_bound``, and the total gets Skellam(``eval_mu``) noise
    eval_every: int = 0
    eval_mu: float = 0.0
    eval_loss_bound: float = 0.0

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
        if not isinstance(self.loss, str) or not 1 <= len(self.loss) <= 128:
            raise ParameterError("loss", self.loss, "must be 1..128 characters")
        object.__setattr__(self, "architecture", tuple(self.architecture))
        check_entries(self.architecture, self.fingerprint)
        decode_model_options(self.model_options)  # strict: canonical JSON of plain values
        check_eval_fields(
            eval_every=self.eval_every, eval_mu=self.eval_mu, eval_loss_bound=self.eval_loss_bound
        )
        object.__setattr__(self, "eval_mu", float(self.eval_mu))
        object.__setattr__(self, "eval_loss_bound", float(self.eval_loss_bound))
        if self.eval_every and self.audit_canaries:
            # an audit run's bound is about its steps alone
            raise ParameterError("eval_every", self.eval_every, "must be 0 in an audit run")
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

    def options(self) -> dict[str, str | int | float | bool]:
        """The coordinator's model options (see ``model_options``)."""
        return decode_model_options(self.model_options)

    @property
    def honest(self) -> int:
        return len(self.parties) - self.colluders

    @property
    def end_step(self) -> int:
        """One past the session's last step."""
        return self.start_step + self.steps

    @property
    def evaluations(self) -> int:
        """How many evaluations at the sites this session makes (counted, not listed)."""
        return eval_count(
            eval_every=self.eval_every, start_step=self.start_step, end_step=self.end_step
        )

    def is_eval_point(self, step: int) -> bool:
        """Whether this session evaluates at the sites before step ``step``."""
        return is_eval_point(
            eval_every=self.eval_every,
            start_step=self.start_step,
            end_step=self.end_step,
            step=step,
        )

    def index_of(self, party: str) -> int:
        try:
            return self.parties.index(party)
        except ValueError:
            raise ParameterError(
                "parties", list(self.parties), f"does not include {party!r}"
            ) from None


#: the most characters of a spec's model options, and of one string value
MAX_MODEL_OPTIONS = 4096
_MAX_OPTION_TEXT = 256
_OPTION_NAME = re.compile(r"[A-Za-z_]\w{0,63}", re.ASCII)


def encode_model_options(options: Mapping[str, Any] | None) -> str:
    """Model options as a spec carries them: canonical JSON ("" when there are none).
    ParameterError naming ``model_options`` for a name that is not a keyword argument or a
    value that is not a string, a finite number or a boolean."""
    if not options:
        return ""
    for name, value in options.items():
        if not isinstance(name, str) or not _OPTION_NAME.fullmatch(name):
            raise ParameterError("model_options", name, "each name must be a keyword argument")
        if not (
            isinstance(value, bool | int | str)
            or (isinstance(value, float) and math.isfinite(value))
        ) or (isinstance(value, str) and len(value) > _MAX_OPTION_TEXT):
            raise ParameterError(
                f"model_options.{name}",
                value,
                f"must be a string (at most {_MAX_OPTION_TEXT} characters), a finite number or "
                "a boolean",
            )
    text = json.dumps(dict(options), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_MODEL_OPTIONS:
        raise ParameterError("model_options", f"{len(text)} characters", "must be at most 4096")
    return text


def decode_model_options(text: str) -> dict[str, str | int | float | bool]:
    """The options of a spec's ``model_options``: strict (canonical JSON of an object of
    plain values, exactly as :func:`encode_model_options` writes it), else ParameterError."""
    if not isinstance(text, str):
        raise ParameterError("model_options", text, "must be a string")
    if text == "":
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        raise ParameterError("model_options", text[:80], "is not JSON") from None
    if not isinstance(obj, dict) or not obj:
        raise ParameterError("model_options", text[:80], "must be a JSON object of options")
    if encode_model_options(obj) != text:
        raise ParameterError("model_options", text[:80], "is not in canonical form")
    return obj


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


def run_event(spec: TrainSpec) -> ev.Skellam | ev.Composite:
    """The privacy event of the whole session: its steps and its evaluations."""
    steps = step_event(spec, steps=spec.steps)
    evaluations = spec.evaluations
    if not evaluations:
        return steps
    words = eval_words(spec.loss)
    return ev.Composite(parts=(steps, eval_event(spec.eval_mu, words=words, count=evaluations)))


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
