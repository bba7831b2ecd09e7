"""What the command line says when it refuses: an unknown dataset or column with the names
the federation offers (:func:`with_valid_names`, through :func:`mpcdp.errors.valid_names`),
and a refusal that says once what was charged (:func:`refusal_text`).

A query refused by every party carries each party's own "nothing was charged" and the
coordinator's summary of the same; the user reads it once, in the summary (the last one,
which covers every party). What a command prints itself (a party left out of a query, a
roster change) is not also logged as a warning while it runs (:func:`said_here`). Nothing
happens at import time.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mpcdp.errors import MpcdpError, ParameterError, valid_names

if TYPE_CHECKING:
    from mpcdp.federation import Federation

__all__ = ["refusal_text", "said_here", "with_valid_names"]

_NOTHING = "nothing was charged"
#: an earlier "nothing was charged" with what joins it to its sentence
_EARLIER = re.compile(r"(?:;\s*|,?\s+and\s+|\s*\()?nothing was charged\)?")


def refusal_text(exc: BaseException | str) -> str:
    """``exc``'s message (or ``exc``, a message) with "nothing was charged" said at most
    once (the last time)."""
    text = str(exc)
    if text.count(_NOTHING) <= 1:
        return text
    head, _, tail = text.rpartition(_NOTHING)
    return _EARLIER.sub("", head) + _NOTHING + tail


def with_valid_names(
    fed: Federation, exc: MpcdpError, *, training: bool, dataset: str = ""
) -> MpcdpError:
    """``exc`` with the valid names added when it is a ParameterError about an unknown
    ``dataset`` (those every party offers: example datasets when ``training``, the others
    when not) or ``column`` (the columns of ``dataset``); else ``exc`` itself. Asks the parties
    for their public metadata (Describe) once more; if that fails, ``exc`` as it is."""
    if not isinstance(exc, ParameterError) or exc.name not in ("dataset", "column"):
        return exc
    try:
        answers = fed.describe()
    except MpcdpError:
        return exc
    offered = [
        {d.name: d for d in a.datasets if (d.kind == "examples") == training}
        for a in answers.values()
    ]
    if exc.name == "dataset":
        names = set.intersection(*(set(o) for o in offered)) if offered else set()
        if str(exc.value) in names:
            return exc
        hint = valid_names(str(exc.value), names)
        if not names:
            other = sorted({d.name for a in answers.values() for d in a.datasets})
            hint = (
                f"no dataset {'to train on' if training else 'to query'} is offered by every "
                f"party (the datasets offered: {', '.join(other) or 'none'}; `mpcdp datasets` "
                "lists them with their kinds)"
            )
    else:
        named = [d for a in answers.values() for d in a.datasets if d.name == dataset]
        if any(d.kind == "examples" for d in named):
            hint = f"{dataset!r} is a dataset to train on (mpcdp train), with no columns to query"
        else:
            columns = {c.name for d in named for c in d.columns}
            hint = valid_names(str(exc.value), columns)
    return ParameterError(exc.name, exc.value, f"{exc.reason}; {hint}")


@contextlib.contextmanager
def said_here(logger: str) -> Iterator[None]:
    """While a command prints what ``logger`` warns of itself (the parties left out of a
    query, a training run's roster changes), that logger's warnings are held back, unless
    the log is at INFO or below (``mpcdp -v``)."""
    log = logging.getLogger(logger)
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        yield
        return
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
