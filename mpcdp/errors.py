"""Exceptions raised by mpcdp.

Every error names the parameter and the value that caused it, so a message that crosses a
process or network boundary still tells the user what to change. Nothing secret (a share,
a noise value, a key) is ever put into an error message.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "AuthError",
    "BudgetExceededError",
    "ConfigError",
    "DataError",
    "DecodeError",
    "HeadroomError",
    "LedgerError",
    "MpcdpError",
    "ParameterError",
    "PartyError",
    "PolicyError",
    "ProtocolError",
    "RankFailure",
    "RoundAborted",
    "SessionError",
    "UnsupportedModuleError",
    "UserImportError",
    "short_repr",
    "valid_names",
]


class MpcdpError(Exception):
    """Base class of every error mpcdp raises on purpose."""


class ParameterError(MpcdpError, ValueError):
    """A parameter has a value outside its domain."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {name}={short_repr(value)}: {reason}")


class UnsupportedModuleError(ParameterError):
    """Per-example clipping refuses a module of the model: ``module_path`` names it (its
    path in ``named_modules()``; "" for the root), ``reason`` says why. A ParameterError
    named "module", so its message reads as any other parameter's."""

    def __init__(self, module_path: str, reason: str) -> None:
        self.module_path = module_path
        super().__init__("module", module_path, reason)


#: Longest echo of a value in an error message (a request can carry megabytes).
MAX_ECHO = 200


def short_repr(value: object) -> str:
    """``repr(value)``, cut to MAX_ECHO characters (with the full length said)."""
    text = repr(value)
    if len(text) <= MAX_ECHO:
        return text
    return f"{text[:MAX_ECHO]}... ({len(text)} characters)"


def valid_names(value: str, valid: Iterable[str]) -> str:
    """What to say about an unknown name (a dataset, model, statistic, loss, command): the
    close matches first, when there are any, then every valid name. The one helper for it,
    so every "unknown name" message reads alike."""
    names = sorted(set(valid))
    if not names:
        return "there are none"
    # a name is close when it, or one of its parts (discrete-laplace: laplace), is close
    key = value.lower()
    parts = {n: [n.lower(), *re.split(r"[-_:.,]", n.lower())] for n in names}
    scored = sorted(
        (-max(difflib.SequenceMatcher(None, key, part).ratio() for part in ps), n)
        for n, ps in parts.items()
    )
    close = [n for score, n in scored[:3] if -score >= 0.6]
    listed = "valid names: " + ", ".join(names)
    if not close:
        return listed
    return f"did you mean {' or '.join(repr(c) for c in close)}? {listed}"


class DecodeError(MpcdpError, ValueError):
    """Bytes that do not decode to exactly one well-formed value (strict decoding)."""


class HeadroomError(MpcdpError, ValueError):
    """A round whose sum plus noise could wrap around the ring modulus."""


class LedgerError(MpcdpError):
    """The budget ledger is inconsistent with a request (e.g. a reused query id)."""


class BudgetExceededError(MpcdpError):
    """A charge would take a dataset's privacy spend beyond its budget."""

    def __init__(
        self, *, dataset: str, requested: str, spent: str, budget: str, delta: float
    ) -> None:
        self.dataset = dataset
        self.requested = requested
        self.spent = spent
        self.budget = budget
        self.delta = delta
        super().__init__(
            f"privacy budget exceeded for dataset={dataset!r}: requested epsilon={requested} "
            f"but spent={spent} of budget={budget} (delta={delta:g}); the query is refused "
            "and nothing was charged"
        )


class DataError(MpcdpError, ValueError):
    """A party's own data file is malformed (the message names file, row, column, value)."""


class PolicyError(MpcdpError):
    """A party refuses a query because it breaks the party's policy (dataset, bounds, ...)."""


class ProtocolError(MpcdpError):
    """A message that breaks the protocol: wrong version, bad signature, malformed stream."""


class SessionError(ProtocolError):
    """An unknown, expired, replayed or foreign session id."""


class AuthError(MpcdpError):
    """A peer whose certificate is not from the federation's CA or not in the allowed names."""


class ConfigError(MpcdpError, ValueError):
    """A configuration file that cannot be used (the message names file and key)."""


class UserImportError(ConfigError):
    """User code at an import path ``package.module:attribute`` could not be imported.

    ``path`` is the import path, ``where`` the declaration that named it; ``module_name`` and
    ``attr`` its two halves. ``cause`` is the exception the import raised (None when the
    module imported but has no ``attr``); ``origin`` the module's file when it imported.
    The message names the declaration, the path and the reason."""

    def __init__(
        self,
        message: str,
        *,
        path: str,
        where: str,
        module_name: str,
        attr: str,
        cause: BaseException | None,
        origin: str | None = None,
    ) -> None:
        self.path = path
        self.where = where
        self.module_name = module_name
        self.attr = attr
        self.cause = cause
        self.origin = origin
        super().__init__(message)


class PartyError(MpcdpError):
    """A call to a party failed; ``party`` names it, ``code`` is the status code name.

    ``outcome`` says what happened: "refused" (the default) when the party answered with an
    error, or e.g. "did not answer within 30 s" or "is unreachable at HOST:PORT" when no
    answer came.
    """

    def __init__(self, party: str, code: str, message: str, *, outcome: str = "refused") -> None:
        self.party = party
        self.code = code
        self.message = message
        self.outcome = outcome
        super().__init__(f"party {party!r} {outcome} ({code}): {message}")


class RoundAborted(MpcdpError):
    """A round failed before the reveal: nothing was revealed. ``cause`` says why.

    When the coordinator can tell what was charged (``charged`` is not None), the message
    says it: ``charged`` maps each party whose upload header arrived (so it charged its
    ledger) to the epsilon it reported in that header; ``not_charged`` lists the parties that
    refused before charging or were never asked to contribute; ``unknown`` the parties that
    failed without an answer (a time-out, a lost connection), whose own ledger is the only
    record of whether they charged. ``abort_failures`` maps each party the abort did not
    reach to why.
    """

    def __init__(
        self,
        query_id: str,
        cause: Exception,
        *,
        charged: Mapping[str, str] | None = None,
        not_charged: Sequence[str] = (),
        unknown: Sequence[str] = (),
        abort_failures: Mapping[str, str] | None = None,
    ) -> None:
        self.query_id = query_id
        self.cause = cause
        self.charged = None if charged is None else dict(charged)
        self.not_charged = tuple(not_charged)
        self.unknown = tuple(unknown)
        self.abort_failures = dict(abort_failures or {})
        text = f"query {query_id} aborted, nothing was revealed: {cause}"
        if charged is not None:
            if not charged and not unknown:
                text += "; nothing was charged"
            else:
                parts = []
                if charged:
                    parts.append(
                        "charged: " + ", ".join(f"{p} (epsilon={e})" for p, e in charged.items())
                    )
                if not_charged:
                    parts.append("not charged: " + ", ".join(not_charged))
                if unknown:
                    parts.append(
                        "not known whether charged (no answer; see the party's ledger): "
                        + ", ".join(unknown)
                    )
                text += "; " + "; ".join(parts)
        if self.abort_failures:
            text += "; the abort did not reach: " + ", ".join(
                f"{p} ({why})" for p, why in self.abort_failures.items()
            )
        super().__init__(text)


class RankFailure(MpcdpError):
    """A worker rank of a site on several processes (mpcdp.train.ranks) failed or stopped
    answering: the step is refused and the site must restart its ranks. Says nothing about
    data: the coordinator is told."""
