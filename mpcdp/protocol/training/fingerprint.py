"""The architecture fingerprint of a training run ("the same model everywhere").

The coordinator describes its model as an ordered list of entries, one per parameter and
buffer (mpcdp.train.architecture writes them), e.g.::

    parameter fc2.weight shape=(10,64) dtype=float32 requires_grad=True
    buffer pos.table shape=(32,8) dtype=float32

and puts the list and its SHA-256 (:func:`fingerprint`) in the TrainSpec, so both are in the
digest every site signs. At TrainOpen each site describes the model it built from the same
declaration and refuses any difference, naming the first one (:func:`check_architecture`).
The values of parameters are never in it (they come from the coordinator with the first
step); buffer values are not either, so a factory must create its buffers deterministically.
Pure: no torch, nothing at import time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from mpcdp.errors import ParameterError, PolicyError

__all__ = [
    "MAX_ENTRIES",
    "MAX_ENTRY_CHARS",
    "check_architecture",
    "check_entries",
    "fingerprint",
    "first_difference",
]

_LABEL = b"mpcdp architecture v1\n"
#: the most entries (parameters + buffers) a spec may describe
MAX_ENTRIES = 1 << 14
#: the longest entry (a parameter's dotted name, shape and dtype)
MAX_ENTRY_CHARS = 512


def fingerprint(entries: Sequence[str]) -> str:
    """Hex SHA-256 of the entries, each on its own line, in order."""
    h = hashlib.sha256(_LABEL)
    for e in entries:
        h.update(e.encode())
        h.update(b"\n")
    return h.hexdigest()


def check_entries(entries: Sequence[str], fp: str) -> None:
    """A spec's architecture: both empty (no fingerprint), or printable entries without
    newlines whose fingerprint is ``fp``."""
    if not entries and not fp:
        return
    if len(entries) > MAX_ENTRIES:
        raise ParameterError("architecture", f"{len(entries)} entries", f"max {MAX_ENTRIES}")
    for e in entries:
        if not isinstance(e, str) or not 1 <= len(e) <= MAX_ENTRY_CHARS or not e.isprintable():
            raise ParameterError(
                "architecture", str(e)[:80], f"entries are 1..{MAX_ENTRY_CHARS} printable chars"
            )
    if fp != fingerprint(entries):
        raise ParameterError("fingerprint", fp, "is not the SHA-256 of the architecture entries")


def _name(entry: str) -> str:
    kind, _, rest = entry.partition(" ")
    return f"{kind} {rest.split(' ', 1)[0]!r}"


def _attributes(entry: str) -> dict[str, str]:
    return dict(w.partition("=")[::2] for w in entry.split(" ")[2:])


def first_difference(here: Sequence[str], there: Sequence[str]) -> str:
    """The first difference between this site's entries and the coordinator's, in words
    ("" when there is none)."""
    for i, (a, b) in enumerate(zip(here, there, strict=False)):
        if a == b:
            continue
        name_a, name_b = _name(a), _name(b)
        if name_a == name_b:
            attrs_a, attrs_b = _attributes(a), _attributes(b)
            for key in [*attrs_a, *(k for k in attrs_b if k not in attrs_a)]:
                va, vb = attrs_a.get(key, "none"), attrs_b.get(key, "none")
                if va != vb:
                    return f"{name_a} has {key} {va} here, {vb} at the coordinator"
            return f"{name_a} is {a!r} here, {b!r} at the coordinator"
        return f"entry {i} is {name_a} here, {name_b} at the coordinator"
    if len(here) > len(there):
        return f"{_name(here[len(there)])} exists here only (entry {len(there)})"
    if len(there) > len(here):
        return f"{_name(there[len(here)])} exists at the coordinator only (entry {len(here)})"
    return ""


def check_architecture(
    *, here: Sequence[str], there: Sequence[str], fp: str, model: str, site: str
) -> None:
    """Refuse (PolicyError, before anything is reserved) when the model this site built
    differs from the coordinator's ``fp``; the message names the first difference."""
    if fingerprint(here) == fp:
        return
    diff = first_difference(here, there) or "its fingerprint differs"
    raise PolicyError(
        f"site {site!r}: model {model!r} differs from the coordinator's: {diff} "
        "(every site and the coordinator must build the same architecture)"
    )
