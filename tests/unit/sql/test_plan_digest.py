"""The plan's canonical encoding and digest: stable, versioned, and sensitive to every field."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from mpcdp.sql.compile import compile_sql
from mpcdp.sql.typed_plan import (
    Aggregate,
    And,
    Between,
    Compare,
    InList,
    IsNull,
    Not,
    Or,
    Predicate,
    SqlQuery,
    canonical,
    digest,
)
from tests.unit.sql.decls import TABLES

TEXT = (
    "SELECT dept, COUNT(*), AVG(raise) AS a, MEDIAN(raise) FROM raises "
    "WHERE year >= 2024 AND (level IN ('1', '2') OR raise BETWEEN 1 AND 2) "
    "AND NOT score IS NULL GROUP BY dept"
)


def _query() -> SqlQuery:
    return compile_sql(TEXT, tables=TABLES, bins=4, weights=[1, 2, 1])


def test_digest_is_stable_across_compilations_and_pinned() -> None:
    a, b = _query(), _query()
    assert a == b and canonical(a) == canonical(b) and digest(a) == digest(b)
    assert digest(a) == hashlib.sha256(b"mpcdp sql plan v1\n" + canonical(a)).digest()
    # pinned: a change of the encoding must change the version label (and this value)
    assert digest(a).hex() == PINNED


PINNED = "7501a254b4bd1f6201ac583d66ec665d73107c231a35c68a0891225f86537d16"


def test_canonical_is_sorted_json_with_repr_floats_and_typed_constants() -> None:
    obj = json.loads(canonical(_query()))
    assert list(obj) == sorted(obj)
    agg = obj["aggregates"][1]
    assert agg == {
        "column": "raise",
        "edges": [],
        "kind": "avg",
        "label": "a",
        "lower": "0.0",
        "p": None,
        "upper": "5000.0",
        "weight": "0.5",
    }
    first = obj["where"]["and"][0]
    assert first == {"compare": {"column": "year", "op": ">=", "value": {"num": "2024.0"}}}
    assert obj["where"]["and"][1]["or"][0]["in"]["values"] == [{"str": "1"}, {"str": "2"}]
    assert obj["keys"][0][-1] == "x'); DROP TABLE raises; --"


def _variants(q: SqlQuery) -> list[SqlQuery]:
    """One change of every field (of the query, of each kind of aggregate, of every
    predicate kind) that a party must not confuse with q."""
    r = dataclasses.replace
    count, avg, median = q.aggregates
    out = [
        r(q, table="raises2"),
        r(q, group_by=("level",)),
        r(q, keys=(("eng", "ops"),)),
        r(q, keys=(tuple(reversed(q.keys[0])),)),
        r(q, where=None),
        r(q, aggregates=(count, avg)),
        r(q, aggregates=(avg, count, median)),
        r(q, aggregates=(r(count, label="n"), avg, median)),
        r(q, aggregates=(r(count, column="raise"), avg, median)),
        r(q, aggregates=(r(count, weight=0.3), avg, median)),
        r(q, aggregates=(count, r(avg, kind="sum"), median)),
        r(q, aggregates=(count, r(avg, lower=1.0), median)),
        r(q, aggregates=(count, r(avg, upper=4999.0), median)),
        r(q, aggregates=(count, r(avg, column="year"), median)),
        r(q, aggregates=(count, avg, r(median, p=0.5000001))),
        r(q, aggregates=(count, avg, r(median, edges=(0.0, 1250.0, 2500.0, 3750.0, 5000.5)))),
        r(q, aggregates=(count, avg, r(median, edges=(0.0, 2500.0, 5000.0)))),
    ]
    preds: list[Predicate] = [
        Compare("year", ">=", 2024.0),
        Compare("year", ">", 2024.0),
        Compare("year", ">=", 2023.0),
        Compare("raise", ">=", 2024.0),
        Compare("dept", "=", "2024.0"),
        Compare("dept", "=", "eng"),
        InList("level", ("1", "2")),
        InList("level", ("2", "1")),
        InList("level", ("1",)),
        Between("raise", 1.0, 2.0),
        Between("raise", 1.0, 3.0),
        Between("raise", 0.0, 2.0),
        IsNull("score"),
        IsNull("raise"),
        Not(IsNull("score")),
        And((IsNull("score"), IsNull("raise"))),
        Or((IsNull("score"), IsNull("raise"))),
        Or((IsNull("raise"), IsNull("score"))),
    ]
    out += [r(q, where=p) for p in preds]
    return out


def test_digest_changes_with_every_field() -> None:
    q = _query()
    variants = _variants(q)
    digests = {digest(v) for v in variants} | {digest(q)}
    assert len(digests) == len(variants) + 1


def test_string_and_number_constants_never_collide() -> None:
    a = Compare("dept", "=", "1.0")
    b = Compare("dept", "=", 1.0)
    agg = Aggregate(kind="count", column=None, p=None, edges=(), label="c", weight=1.0)
    qa = SqlQuery(table="t", aggregates=(agg,), where=a, group_by=(), keys=())
    qb = dataclasses.replace(qa, where=b)
    assert digest(qa) != digest(qb)
