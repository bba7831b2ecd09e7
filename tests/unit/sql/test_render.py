"""render(): the text is generated from the plan only (quoted identifiers, every constant a
parameter) in each dialect; to_matrix() refuses what the query cannot produce."""

from __future__ import annotations

import re
from decimal import Decimal

import numpy as np
import pytest

from mpcdp.config.datasets import ColumnSpec
from mpcdp.errors import DataError, ParameterError
from mpcdp.sql.compile import compile_sql
from mpcdp.sql.render import DIALECTS, MAX_POSTGRES_PARAMS, Dialect, render, to_matrix
from mpcdp.sql.typed_plan import TableDecl
from tests.unit.sql.decls import RAISES, TABLES

SALT = bytes(range(16))
HOSTILE = "x'); DROP TABLE raises; --"
TEXT = (
    "SELECT dept, COUNT(*), AVG(raise), MEDIAN(score), SUM(raise) AS s, COUNT(level) AS n "
    "FROM raises WHERE year >= 2024 AND level IN ('1', '2') AND dept <> 'a''b%?' "
    "GROUP BY dept"
)
MARKER = {"duckdb": "?", "spark": "?", "postgres": "%s"}


def _relation(dialect: Dialect) -> str:
    return "`raises`" if dialect == "spark" else '"raises"'


@pytest.mark.parametrize("dialect", DIALECTS)
def test_constants_keys_and_salt_are_parameters_never_text(dialect: Dialect) -> None:
    q = compile_sql(TEXT, tables=TABLES, keys={"dept": ["eng", HOSTILE, "50%?"]}, bins=4)
    e = render(q, table=RAISES, relation=_relation(dialect), dialect=dialect, salt=SALT)
    body = e.text.replace(_relation(dialect), "")
    assert "'" not in body  # no string literal at all: nothing the analyst wrote is text
    for value in (HOSTILE, "a'b%?", "50%", SALT.hex(), "2024"):
        assert value not in e.text
    for param in ("eng", HOSTILE, "50%?", "a'b%?", "1", "2", SALT.hex(), 2024.0):
        assert param in e.params
    markers = e.text.replace("%%", "").count("%s") if dialect == "postgres" else e.text.count("?")
    assert markers == len(e.params)
    if dialect != "postgres":
        assert "%s" not in e.text


@pytest.mark.parametrize("dialect", DIALECTS)
def test_identifiers_are_quoted_for_the_dialect(dialect: Dialect) -> None:
    odd = 'we"ird`%s?'
    table = TableDecl(
        name="t",
        columns=(ColumnSpec(odd, categories=("a",)), ColumnSpec("x", 0.0, 1.0)),
        privacy_unit='p`"id',
        max_rows_per_unit=3,
    )
    q = compile_sql(
        f'SELECT "{odd.replace(chr(34), 2 * chr(34))}", SUM(x) FROM t '
        f'GROUP BY "{odd.replace(chr(34), 2 * chr(34))}"',
        tables={"t": table},
    )
    e = render(q, table=table, relation="rel%", dialect=dialect, salt=SALT)
    if dialect == "spark":
        assert '`we"ird``%s?`' in e.text and '`p``"id`' in e.text
    elif dialect == "duckdb":
        assert '"we""ird`%s?"' in e.text and '"p`""id"' in e.text
    else:  # psycopg reads % as a marker: every other % is doubled
        assert '"we""ird`%%s?"' in e.text and "FROM rel%%" in e.text


@pytest.mark.parametrize("dialect", DIALECTS)
def test_labels_and_where_strings_never_reach_the_text(dialect: Dialect) -> None:
    q = compile_sql(
        'SELECT COUNT(*) AS "n\'); DROP TABLE raises; --" FROM raises '
        "WHERE dept IN ('a''); DROP TABLE raises; --')",
        tables=TABLES,
    )
    assert q.aggregates[0].label == "n'); DROP TABLE raises; --"
    e = render(q, table=RAISES, relation="r", dialect=dialect, salt=SALT)
    assert "DROP" not in e.text and "'" not in e.text
    assert "a'); DROP TABLE raises; --" in e.params


def test_the_relation_is_inserted_verbatim_after_from() -> None:
    q = compile_sql("SELECT COUNT(*) FROM raises", tables=TABLES)
    e = render(
        q,
        table=RAISES,
        relation="read_parquet('/data/raises.parquet')",
        dialect="duckdb",
        salt=SALT,
    )
    assert " FROM read_parquet('/data/raises.parquet') WHERE " in e.text


def test_render_refuses_bad_arguments() -> None:
    q = compile_sql("SELECT COUNT(*) FROM raises", tables=TABLES)
    with pytest.raises(ParameterError, match="salt"):
        render(q, table=RAISES, relation="r", dialect="duckdb", salt=b"short")
    with pytest.raises(ParameterError, match="salt"):
        render(q, table=RAISES, relation="r", dialect="duckdb", salt="0" * 32)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="dialect"):
        render(q, table=RAISES, relation="r", dialect="mysql", salt=SALT)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="relation"):
        render(q, table=RAISES, relation=" ", dialect="duckdb", salt=SALT)
    other = TableDecl(name="other", columns=RAISES.columns)
    with pytest.raises(ParameterError, match="reads table 'raises'"):
        render(q, table=other, relation="r", dialect="duckdb", salt=SALT)
    q2 = compile_sql("SELECT SUM(raise) FROM raises", tables=TABLES)
    changed = TableDecl(name="raises", columns=(ColumnSpec("raise", categories=("a",)),))
    with pytest.raises(ParameterError, match="categorical"):
        render(q2, table=changed, relation="r", dialect="duckdb", salt=SALT)
    with pytest.raises(ParameterError, match="does not declare"):
        render(
            q2,
            table=TableDecl(name="raises", columns=()),
            relation="r",
            dialect="duckdb",
            salt=SALT,
        )


def test_postgres_parameter_limit_is_refused_by_count() -> None:
    keys = [f"k{i}" for i in range(MAX_POSTGRES_PARAMS + 1)]
    q = compile_sql(
        "SELECT dept, COUNT(*) FROM raises GROUP BY dept", tables=TABLES, keys={"dept": keys}
    )
    with pytest.raises(ParameterError) as info:
        render(q, table=RAISES, relation="r", dialect="postgres", salt=SALT)
    assert info.value.name == "params"
    e = render(q, table=RAISES, relation="r", dialect="duckdb", salt=SALT)
    assert len(e.params) > MAX_POSTGRES_PARAMS


def test_without_privacy_unit_there_is_no_bounding() -> None:
    table = TableDecl(name="raises", columns=RAISES.columns)
    q = compile_sql("SELECT dept, COUNT(*) FROM raises GROUP BY dept", tables={"raises": table})
    e = render(q, table=table, relation="r", dialect="duckdb", salt=SALT)
    assert "ROW_NUMBER" not in e.text and "md5" not in e.text and SALT.hex() not in e.params
    e = render(q, table=RAISES, relation="r", dialect="duckdb", salt=SALT)
    assert re.search(r"DENSE_RANK\(\) OVER \(PARTITION BY \"u\"", e.text)
    assert re.search(r"ROW_NUMBER\(\) OVER \(PARTITION BY \"u\", \"g0\"", e.text)


# --- to_matrix -------------------------------------------------------------------------------


def test_to_matrix_places_rows_in_cell_order_and_zero_fills() -> None:
    q = compile_sql(
        "SELECT dept, level, COUNT(*), AVG(raise) FROM raises GROUP BY dept, level", tables=TABLES
    )
    rows = [("ops", "2", 3, Decimal("1.5"), np.int64(2)), (HOSTILE, "1", 1, -2.0, 1)]
    m = to_matrix(q, rows)
    assert m.shape == (9, 3) and m.dtype == np.float64
    assert q.cells()[4] == ("ops", "2") and q.cells()[6] == (HOSTILE, "1")
    assert m[4].tolist() == [3.0, 1.5, 2.0] and m[6].tolist() == [1.0, -2.0, 1.0]
    assert np.count_nonzero(m.any(axis=1)) == 2
    single = compile_sql("SELECT COUNT(*) FROM raises", tables=TABLES)
    assert to_matrix(single, [(5,)]).tolist() == [[5.0]]
    assert to_matrix(single, []).tolist() == [[0.0]]


@pytest.mark.parametrize(
    ("row", "why"),
    [
        (("secret-dept", "1", 1, 0.0, 0), "not one of the public keys"),
        ((None, "1", 1, 0.0, 0), "not one of the public keys"),
        (("eng", 1, 1, 0.0, 0), "not one of the public keys"),
        (("eng", "1", 1, 0.0), "has 4 columns"),
        (("eng", "1", "7", 0.0, 0), "not a number"),
        (("eng", "1", True, 0.0, 0), "not a number"),
        (("eng", "1", 1, float("inf"), 0), "not finite"),
    ],
)
def test_to_matrix_refuses_rows_the_query_cannot_produce(row: tuple[object, ...], why: str) -> None:
    q = compile_sql(
        "SELECT dept, level, COUNT(*), AVG(raise) FROM raises GROUP BY dept, level", tables=TABLES
    )
    with pytest.raises(DataError, match=why) as info:
        to_matrix(q, [row])
    assert "secret-dept" not in str(info.value)  # never echoes a value of the data
    with pytest.raises(DataError, match="repeats a cell"):
        to_matrix(q, [("eng", "1", 1, 0.0, 0), ("eng", "1", 1, 0.0, 0)])
