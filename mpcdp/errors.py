"""Exceptions raised by mpcdp.

Every error names the parameter and the value that caused it, so a message that crosses a
process or network boundary still tells the user what to change. Nothing secret (a share,
a noise value, a key) is ever put into an error message.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceededError",
    "DecodeError",
    "HeadroomError",
    "LedgerError",
    "MpcdpError",
    "ParameterError",
]


class MpcdpError(Exception):
    """Base class of every error mpcdp raises on purpose."""


class ParameterError(MpcdpError, ValueError):
    """A parameter has a value outside its domain."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {name}={value!r}: {reason}")


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
