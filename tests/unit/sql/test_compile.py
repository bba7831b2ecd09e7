"""compile_sql: the accepted subset (golden plans), every refusal by name, and the caps."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpcdp.config.datasets import ColumnSpec
from mpcdp.errors import ParameterError
from mpcdp.sql import compile as sqlc
from mpcdp.sql.compile import SqlRefusal, compile_sql
from mpcdp.sql.typed_plan import (
    Aggregate,
    And,
    Between,
    Compare,
    InList,
    IsNull,
    Measure,
    Not,
    Or,
    Predicate,
    SqlQuery,
    TableDecl,
)
from tests.unit.sql.decls import RAISES, TABLES

DEPTS = ("eng", "ops", "x'); DROP TABLE raises; --")


def test_the_issue_query_compiles_to_its_golden_plan() -> None:
    q = compile_sql(
        "SELECT dept, COUNT(*), AVG(raise) FROM raises WHERE year >= 2024 GROUP BY dept",
        tables=TABLES,
    )
    assert q == SqlQuery(
        table="raises",
        aggregates=(
            Aggregate(kind="count", column=None, p=None, edges=(), label="count", weight=0.5),
            Aggregate(
                kind="avg",
                column="raise",
                p=None,
                edges=(),
                label="avg_raise",
                weight=0.5,
                lower=0.0,
                upper=5000.0,
            ),
        ),
        where=Compare("year", ">=", 2024.0),
        group_by=("dept",),
        keys=(DEPTS,),
    )
    assert q.cells() == tuple((d,) for d in DEPTS)
    assert q.measures() == (
        Measure(0, "rows", None, 0.0, 0.0, 1.0),
        Measure(1, "centered_sum", "raise", 0.0, 5000.0, 2500.0),
        Measure(1, "values", "raise", 0.0, 0.0, 1.0),
    )


def test_where_constructs_compile_to_typed_predicates() -> None:
    q = compile_sql(
        "SELECT COUNT(level) AS n FROM raises WHERE (dept = 'eng' OR dept IN ('ops')) "
        "AND raise NOT BETWEEN 1 AND 2.5 AND NOT (year IS NULL) AND year IS NOT NULL "
        "AND 2024 < year AND raise != -3 AND raise <> 4 AND level NOT IN ('1', '2') "
        "AND raises.raise <= 1e3",
        tables=TABLES,
    )
    assert q.aggregates == (
        Aggregate(kind="count", column="level", p=None, edges=(), label="n", weight=1.0),
    )
    assert q.where == And(
        (
            Or((Compare("dept", "=", "eng"), InList("dept", ("ops",)))),
            Not(Between("raise", 1.0, 2.5)),
            Not(IsNull("year")),
            Not(IsNull("year")),
            Compare("year", ">", 2024.0),
            Compare("raise", "<>", -3.0),
            Compare("raise", "<>", 4.0),
            Not(InList("level", ("1", "2"))),
            Compare("raise", "<=", 1000.0),
        )
    )
    assert q.group_by == () and q.keys == () and q.cells() == ((),)


def test_quantile_spellings_and_bins() -> None:
    q = compile_sql(
        "SELECT MEDIAN(raise) AS m, QUANTILE(raise, 0.9), QUANTILE_CONT(raise, 0.1), "
        "PERCENTILE_CONT(raise, 0.2), PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY raise), "
        "MEDIAN(score) FROM raises",
        tables=TABLES,
        bins=4,
    )
    uniform = (0.0, 1250.0, 2500.0, 3750.0, 5000.0)
    assert [(a.kind, a.column, a.p, a.label) for a in q.aggregates] == [
        ("quantile", "raise", 0.5, "m"),
        ("quantile", "raise", 0.9, "quantile_raise_0.9"),
        ("quantile", "raise", 0.1, "quantile_raise_0.1"),
        ("quantile", "raise", 0.2, "quantile_raise_0.2"),
        ("quantile", "raise", 0.25, "quantile_raise_0.25"),
        ("quantile", "score", 0.5, "median_score"),
    ]
    assert all(a.edges == uniform for a in q.aggregates[:5])
    # the analyst's bins are never ignored: uniform over score's bounds too
    assert q.aggregates[5].edges == (-10.0, 0.0, 10.0, 20.0, 30.0)
    # without bins, a column's declared edges
    declared = compile_sql("SELECT MEDIAN(score) FROM raises", tables=TABLES)
    bins = list(declared.measures())
    assert [(m.kind, m.lower, m.upper, m.per_row) for m in bins] == [
        ("bin", -10.0, 0.0, 1.0),
        ("bin", 0.0, 5.0, 1.0),
        ("bin", 5.0, 30.0, 1.0),
    ]
    default = compile_sql("SELECT MEDIAN(raise) FROM raises", tables=TABLES)
    assert len(default.aggregates[0].edges) == sqlc.DEFAULT_BINS + 1
    assert default.aggregates[0].edges[-1] == 5000.0


def test_sum_measure_and_weights_and_keys() -> None:
    q = compile_sql(
        'SELECT "level", dept, SUM(score) AS s, COUNT(*) FROM "raises" GROUP BY dept, level',
        tables=TABLES,
        keys={"dept": ["ops", "hr"]},
        weights=[3, 1],
    )
    assert q.group_by == ("dept", "level")
    assert q.keys == (("ops", "hr"), ("1", "2", "3"))
    assert q.cells()[:4] == (("ops", "1"), ("ops", "2"), ("ops", "3"), ("hr", "1"))
    assert [a.weight for a in q.aggregates] == [0.75, 0.25]
    assert q.measures()[0] == Measure(0, "sum", "score", -10.0, 30.0, 30.0)


# --- refusals ----------------------------------------------------------------------------

REFUSALS = [
    ("SELECT COUNT(*) FROM raises JOIN other ON raises.dept = other.dept", "JOIN"),
    ("SELECT COUNT(*) FROM raises, other", "JOIN"),
    ("SELECT COUNT(*) FROM (SELECT * FROM raises) AS s", "subquery"),
    ("SELECT COUNT(*) FROM raises WHERE dept IN (SELECT dept FROM raises)", "subquery"),
    ("SELECT COUNT(*) FROM raises WHERE EXISTS (SELECT 1)", "EXISTS"),
    ("SELECT COUNT(*) FROM raises WHERE raise > (SELECT 1)", "subquery"),
    ("WITH c AS (SELECT * FROM raises) SELECT COUNT(*) FROM c", "CTE"),
    ("SELECT COUNT(*) FROM raises UNION SELECT COUNT(*) FROM raises", "UNION"),
    ("SELECT COUNT(*) FROM raises EXCEPT SELECT COUNT(*) FROM raises", "EXCEPT"),
    ("SELECT dept, COUNT(*) FROM raises GROUP BY dept HAVING COUNT(*) > 3", "HAVING"),
    ("SELECT COUNT(*) FROM raises ORDER BY 1", "ORDER BY"),
    ("SELECT COUNT(*) FROM raises LIMIT 1", "LIMIT"),
    ("SELECT DISTINCT COUNT(*) FROM raises", "DISTINCT"),
    ("SELECT COUNT(DISTINCT dept) FROM raises", "COUNT(DISTINCT"),
    ("SELECT COUNT(*) OVER () FROM raises", "window function"),
    ("SELECT COUNT(*) FROM raises QUALIFY 1 = 1", "QUALIFY"),
    ("SELECT COUNT(*) FROM raises TABLESAMPLE (10 PERCENT)", "TABLESAMPLE"),
    ("SELECT LOWER(dept) FROM raises", "function LOWER is not supported"),
    ("SELECT MAX(raise) FROM raises", "function MAX is not supported"),
    ("SELECT STDDEV(raise) FROM raises", "is not supported"),
    ("SELECT COUNT(*) FROM raises WHERE LOWER(dept) = 'eng'", "function LOWER"),
    ("SELECT COUNT(*) FROM raises WHERE raise + 1 > 2", "arithmetic (+)"),
    ("SELECT SUM(raise) / 2 FROM raises", "arithmetic (/)"),
    ("SELECT COUNT(*) FROM raises WHERE CAST(raise AS INT) = 1", "CAST"),
    ("SELECT COUNT(*) FROM raises WHERE dept LIKE 'e%'", "LIKE"),
    ("SELECT COUNT(*) FROM raises WHERE raise IS NOT DISTINCT FROM 1", "IS NOT DISTINCT FROM"),
    ("SELECT COUNT(*) FROM raises WHERE raise IS TRUE", "IS NULL and IS NOT NULL"),
    ("SELECT COUNT(*) FROM raises WHERE TRUE", "boolean constant"),
    ("SELECT COUNT(*) FROM raises WHERE raise", "a column alone is not a condition"),
    ("SELECT COUNT(*) FROM raises WHERE raise = year", "comparing two columns"),
    ("SELECT COUNT(*) FROM raises WHERE raise = NULL", "IS [NOT] NULL"),
    ("SELECT COUNT(*) FROM raises WHERE raise = ?", "placeholder"),
    ("SELECT SUM(raise) FILTER (WHERE raise > 1) FROM raises", "FILTER"),
    ("SELECT * FROM raises", "`*`"),
    ("SELECT raises.* FROM raises", "`*`"),
    ("SELECT 1 FROM raises", "a constant is not supported"),
    ("SELECT COUNT(1) FROM raises", "constant"),
    ("SELECT SUM(salary) FROM raises", "column 'salary' is not declared in table 'raises'"),
    ("SELECT COUNT(*) FROM raises WHERE pid = 'p1'", "column 'pid' is not declared"),
    ("SELECT COUNT(*) FROM salaries", "table 'salaries' is not declared"),
    ("SELECT COUNT(*) FROM hr.raises", "qualified table name"),
    ("SELECT COUNT(*) FROM raises AS r", "table alias"),
    ("SELECT COUNT(*) FROM read_csv('/etc/passwd')", "table function READ_CSV"),
    ("SELECT COUNT(other.raise) FROM raises", "qualified by the table 'raises'"),
    ("SELECT raise, COUNT(*) FROM raises GROUP BY raise", "GROUP BY on numeric column 'raise'"),
    ("SELECT COUNT(*) FROM raises GROUP BY ROLLUP (dept)", "ROLLUP"),
    ("SELECT dept, COUNT(*) FROM raises GROUP BY 1", "GROUP BY position"),
    ("SELECT dept, COUNT(*) FROM raises GROUP BY dept, dept", "twice in GROUP BY"),
    ("SELECT dept, COUNT(*) FROM raises", "must be in GROUP BY"),
    ("SELECT COUNT(*) FROM raises GROUP BY dept", "must also be in the SELECT list"),
    ("SELECT dept, dept, COUNT(*) FROM raises GROUP BY dept", "twice in the SELECT list"),
    ("SELECT dept AS d, COUNT(*) FROM raises GROUP BY dept", "alias on a group column"),
    ("SELECT dept FROM raises GROUP BY dept", "at least one aggregate"),
    ("SELECT COUNT(*), COUNT(*) FROM raises", "duplicate output column"),
    ("SELECT dept, COUNT(*) AS dept FROM raises GROUP BY dept", "duplicate output column"),
    ("SELECT COUNT(*) FROM raises WHERE raise = 'high'", "numeric column 'raise' with a string"),
    ("SELECT COUNT(*) FROM raises WHERE dept = 1", "categorical column 'dept' with a number"),
    ("SELECT COUNT(*) FROM raises WHERE level IN ('1', 2)", "with a number"),
    ("SELECT COUNT(*) FROM raises WHERE dept < 'f'", "ordering comparison (<)"),
    ("SELECT COUNT(*) FROM raises WHERE dept BETWEEN 'a' AND 'f'", "BETWEEN on categorical"),
    ("SELECT COUNT(*) FROM raises WHERE raise BETWEEN 'a' AND 'f'", "with a string"),
    ("SELECT SUM(dept) FROM raises", "SUM on categorical column 'dept'"),
    ("SELECT AVG(level) FROM raises", "AVG on categorical column 'level'"),
    ("SELECT MEDIAN(dept) FROM raises", "quantile on categorical column 'dept'"),
    ("SELECT QUANTILE(raise, 1.5) FROM raises", "level p must be a number in (0, 1)"),
    ("SELECT QUANTILE(raise, 0) FROM raises", "level p"),
    ("SELECT QUANTILE(raise, year) FROM raises", "level p"),
    ("SELECT QUANTILE(raise) FROM raises", "quantile"),
    ("SELECT QUANTILE_CONT(raise) FROM raises", "a column and a level p"),
    (
        "SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY raise DESC) FROM raises",
        "ascending",
    ),
    ("SELECT PERCENTILE_DISC(0.5) WITHIN GROUP (ORDER BY raise) FROM raises", "not supported"),
    ("SELECT COUNT(*) FROM raises WHERE raise = 1e999", "must be finite"),
    ("SELECT COUNT(*) FROM raises WHERE dept = 'a\\'b'", "cannot parse"),
    ("SELECT COUNT(*) FROM", "cannot parse"),
    ("SELECT COUNT(*) FROM raises; SELECT 1", "exactly one statement"),
    ("SELECT COUNT(*) FROM raises; DROP TABLE raises", "exactly one statement"),
    ("DROP TABLE raises", "DROP statements are not supported"),
    ("INSERT INTO raises VALUES (1)", "INSERT statements are not supported"),
    ("SELECT COUNT(*)", "FROM clause"),
    # injection through identifiers: an embedded quote makes another (undeclared) name
    ('SELECT COUNT(*) FROM raises WHERE "dept"" = 1 OR ""dept" = \'x\'', "is not declared"),
    ('SELECT SUM("raise""); DROP TABLE raises; --") FROM raises', "is not declared"),
    ('SELECT COUNT(*) FROM "raises""; DROP TABLE raises; --"', "is not declared"),
    ("SELECT COUNT(*) FROM raises WHERE dept = 'eng' OR 1 = 1", "declared column on one side"),
    ("SELECT SUM(RAISE) FROM raises", "column 'RAISE' is not declared"),
]


@pytest.mark.parametrize(("text", "construct"), REFUSALS)
def test_refusals_name_the_construct(text: str, construct: str) -> None:
    with pytest.raises(SqlRefusal) as info:
        compile_sql(text, tables=TABLES)
    assert construct in str(info.value)
    assert isinstance(info.value, ParameterError) and info.value.name == "sql"


def test_declared_names_are_listed_when_a_column_is_unknown() -> None:
    with pytest.raises(SqlRefusal, match=r"declared: \['dept', 'level', 'raise', 'year'"):
        compile_sql("SELECT SUM(salary) FROM raises", tables=TABLES)


def test_string_literal_with_doubled_quote_is_one_constant() -> None:
    q = compile_sql(
        "SELECT COUNT(*) FROM raises WHERE dept = 'x''); DROP TABLE raises; --'",
        tables=TABLES,
    )
    assert q.where == Compare("dept", "=", "x'); DROP TABLE raises; --")


def test_bad_text_arguments() -> None:
    with pytest.raises(SqlRefusal, match="non-empty"):
        compile_sql("   ", tables=TABLES)
    big = "SELECT COUNT(*) FROM raises WHERE " + " OR ".join(["raise = 1"] * 8000)
    with pytest.raises(SqlRefusal, match=f"limited to {sqlc.MAX_TEXT_BYTES} bytes"):
        compile_sql(big, tables=TABLES)
    with pytest.raises(SqlRefusal, match="nests"):
        compile_sql(
            "SELECT COUNT(*) FROM raises WHERE " + "(" * 100 + "raise = 1" + ")" * 100,
            tables=TABLES,
        )
    with pytest.raises(SqlRefusal, match="nests"):
        compile_sql(
            "SELECT COUNT(*) FROM raises WHERE " + "NOT " * 3000 + "raise = 1", tables=TABLES
        )
    long_chain = "SELECT COUNT(*) FROM raises WHERE " + " AND ".join(["raise > 1"] * 2000)
    q = compile_sql(long_chain, tables=TABLES)  # a long flat chain is one level
    assert isinstance(q.where, And) and len(q.where.parts) == 2000


def test_string_constants_are_capped() -> None:
    long = "a" * (sqlc.MAX_KEY_LENGTH + 1)
    with pytest.raises(SqlRefusal, match="limited to 256 characters"):
        compile_sql(f"SELECT COUNT(*) FROM raises WHERE dept = '{long}'", tables=TABLES)


# --- parameters: keys, bins, weights ------------------------------------------------------

GROUPED = "SELECT dept, COUNT(*) FROM raises GROUP BY dept"


@pytest.mark.parametrize(
    ("keys", "name", "why"),
    [
        ({"level": ["1"]}, "keys", "only taken for GROUP BY columns"),
        ({"dept": "eng"}, "keys['dept']", "list of strings"),
        ({"dept": []}, "keys['dept']", "need 1..100000 keys"),
        ({"dept": ["a", "a"]}, "keys['dept']", "distinct"),
        ({"dept": ["a", ""]}, "keys['dept']", "non-empty string"),
        ({"dept": ["a", 3]}, "keys['dept']", "non-empty string"),
        ({"dept": ["a" * 257]}, "keys['dept']", "256 characters"),
        ({"dept": ["a\x00b"]}, "keys['dept']", "NUL"),
        ({"dept": ["\ud800"]}, "keys['dept']", "valid Unicode"),
    ],
)
def test_bad_keys_are_refused_by_name(keys: dict[str, object], name: str, why: str) -> None:
    with pytest.raises(SqlRefusal, match=why) as info:
        compile_sql(GROUPED, tables=TABLES, keys=keys)  # type: ignore[arg-type]
    assert info.value.name == name


def test_too_many_keys_and_cells_are_refused() -> None:
    with pytest.raises(SqlRefusal) as info:
        compile_sql(GROUPED, tables=TABLES, keys={"dept": [str(i) for i in range(100_001)]})
    assert info.value.name == "keys['dept']"
    thousand = [str(i) for i in range(1001)]
    table = TableDecl(
        name="t",
        columns=(ColumnSpec("a", categories=("x",)), ColumnSpec("b", categories=("y",))),
    )
    with pytest.raises(SqlRefusal) as info:
        compile_sql(
            "SELECT a, b, COUNT(*) FROM t GROUP BY a, b",
            tables={"t": table},
            keys={"a": thousand, "b": thousand},
        )
    assert info.value.name == "cells" and info.value.value == 1001 * 1001
    with pytest.raises(SqlRefusal) as info:
        compile_sql(
            "SELECT dept, MEDIAN(raise) FROM raises GROUP BY dept",
            tables=TABLES,
            keys={"dept": [str(i) for i in range(100_000)]},
            bins=1000,
        )
    assert info.value.name == "cells x measures"


@pytest.mark.parametrize("bins", [0, -1, 1001, True, 2.5, "8"])
def test_bad_bins_are_refused(bins: object) -> None:
    with pytest.raises(SqlRefusal) as info:
        compile_sql("SELECT MEDIAN(raise) FROM raises", tables=TABLES, bins=bins)  # type: ignore[arg-type]
    assert info.value.name == "bins"


def test_too_many_measures_are_refused() -> None:
    text = "SELECT MEDIAN(raise) AS a, MEDIAN(year) AS b FROM raises"
    with pytest.raises(SqlRefusal) as info:
        compile_sql(text, tables=TABLES, bins=1000)
    assert info.value.name == "measures" and info.value.value == 2000


@pytest.mark.parametrize(
    "weights", [[1.0], [1.0, 2.0, 3.0], [1.0, 0.0], [1.0, -1.0], [1.0, float("nan")], [True, 1]]
)
def test_bad_weights_are_refused(weights: list[object]) -> None:
    with pytest.raises(SqlRefusal) as info:
        compile_sql(
            "SELECT COUNT(*), SUM(raise) FROM raises",
            tables=TABLES,
            weights=weights,  # type: ignore[arg-type]
        )
    assert info.value.name == "weights"


def test_declared_edges_and_bounds_are_checked() -> None:
    def table(col: ColumnSpec) -> dict[str, TableDecl]:
        return {"t": TableDecl(name="t", columns=(col,))}

    for edges in [(0.0,), (0.0, 0.0, 1.0), (-1.0, 1.0), (0.0, float("inf"))]:
        with pytest.raises(SqlRefusal) as info:
            compile_sql(
                "SELECT MEDIAN(x) FROM t", tables=table(ColumnSpec("x", 0.0, 1.0, edges=edges))
            )
        assert info.value.name == "edges"
    with pytest.raises(SqlRefusal, match="lower < upper"):
        compile_sql("SELECT MEDIAN(x) FROM t", tables=table(ColumnSpec("x", 1.0, 1.0)))
    with pytest.raises(SqlRefusal, match="finite declared bounds"):
        compile_sql("SELECT SUM(x) FROM t", tables=table(ColumnSpec("x", 0.0, float("inf"))))
    with pytest.raises(SqlRefusal, match="declaration is named"):
        compile_sql("SELECT COUNT(*) FROM alias", tables={"alias": RAISES})


def test_table_declarations_are_validated() -> None:
    with pytest.raises(ParameterError, match="name"):
        TableDecl(name="", columns=())
    with pytest.raises(ParameterError, match="distinct"):
        TableDecl(name="t", columns=(ColumnSpec("a"), ColumnSpec("a")))
    with pytest.raises(ParameterError, match="max_rows_per_unit"):
        TableDecl(name="t", columns=(), max_rows_per_unit=0)
    with pytest.raises(ParameterError, match="max_groups_per_unit"):
        TableDecl(name="t", columns=(), max_groups_per_unit=True)
    with pytest.raises(ParameterError, match="privacy_unit"):
        TableDecl(name="t", columns=(), privacy_unit="")


def test_plan_objects_check_their_invariants() -> None:
    with pytest.raises(ParameterError, match="p"):
        Aggregate(kind="quantile", column="x", p=1.0, edges=(0.0, 1.0), label="q", weight=1)
    with pytest.raises(ParameterError, match="strictly increasing"):
        Aggregate(kind="quantile", column="x", p=0.5, edges=(1.0, 0.0), label="q", weight=1)
    with pytest.raises(ParameterError, match="weight"):
        Aggregate(kind="count", column=None, p=None, edges=(), label="c", weight=0)
    with pytest.raises(ParameterError, match="kind"):
        Aggregate(kind="max", column="x", p=None, edges=(), label="c", weight=1)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="needs a column"):
        Aggregate(kind="sum", column=None, p=None, edges=(), label="c", weight=1)
    count = Aggregate(kind="count", column=None, p=None, edges=(), label="c", weight=1)
    with pytest.raises(ParameterError, match="aggregate"):
        SqlQuery(table="t", aggregates=(), where=None, group_by=(), keys=())
    with pytest.raises(ParameterError, match="one key list"):
        SqlQuery(table="t", aggregates=(count,), where=None, group_by=("a",), keys=())
    with pytest.raises(ParameterError, match="distinct"):
        SqlQuery(table="t", aggregates=(count,), where=None, group_by=("a",), keys=(("x", "x"),))


# --- property: random predicates compile to their typed trees ------------------------------

_NUM_COLS = ("raise", "year")
_CAT_COLS = ("dept", "level")


def _num() -> st.SearchStrategy[float]:
    return st.integers(-(10**6), 10**6).map(lambda i: i / 4)


def _text(v: float) -> str:
    return repr(v)


_STR = st.text(alphabet="ab'\"; -)(%?\\é", min_size=0, max_size=8)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


@st.composite
def _atom(draw: st.DrawFn) -> tuple[str, Predicate]:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        col = draw(st.sampled_from(_NUM_COLS))
        op = draw(st.sampled_from(["=", "<>", "<", "<=", ">", ">="]))
        v = draw(_num())
        return f"{col} {op} {_text(v)}", Compare(col, op, v)  # type: ignore[arg-type]
    if choice == 1:
        col = draw(st.sampled_from(_CAT_COLS))
        s = draw(_STR.filter(lambda x: "\\" not in x))
        op = draw(st.sampled_from(["=", "<>"]))
        return f"{col} {op} {_sql_str(s)}", Compare(col, op, s)  # type: ignore[arg-type]
    if choice == 2:
        col = draw(st.sampled_from(_CAT_COLS))
        vals = draw(st.lists(_STR.filter(lambda x: "\\" not in x), min_size=1, max_size=4))
        return f"{col} IN ({', '.join(map(_sql_str, vals))})", InList(col, tuple(vals))
    if choice == 3:
        col = draw(st.sampled_from(_NUM_COLS))
        lo, hi = draw(_num()), draw(_num())
        return f"{col} BETWEEN {_text(lo)} AND {_text(hi)}", Between(col, lo, hi)
    col = draw(st.sampled_from(_NUM_COLS + _CAT_COLS))
    if choice == 4:
        return f"{col} IS NULL", IsNull(col)
    return f"{col} IS NOT NULL", Not(IsNull(col))


def _parts(p: Predicate, kind: type[And] | type[Or]) -> tuple[Predicate, ...]:
    if isinstance(p, kind):
        return p.parts
    return (p,)


def _tree() -> st.SearchStrategy[tuple[str, Predicate]]:
    def extend(
        children: st.SearchStrategy[tuple[str, Predicate]],
    ) -> st.SearchStrategy[tuple[str, Predicate]]:
        def combine(op: str, parts: list[tuple[str, Predicate]]) -> tuple[str, Predicate]:
            text = f" {op} ".join(f"({t})" for t, _ in parts)
            # the compiler flattens nested chains of one operator (they are associative)
            if op == "AND":
                return text, And(tuple(x for _, p in parts for x in _parts(p, And)))
            return text, Or(tuple(x for _, p in parts for x in _parts(p, Or)))

        return st.one_of(
            st.builds(
                combine, st.sampled_from(["AND", "OR"]), st.lists(children, min_size=2, max_size=4)
            ),
            children.map(lambda c: (f"NOT ({c[0]})", Not(c[1]))),
        )

    return st.recursive(_atom(), extend, max_leaves=8)


@settings(
    derandomize=True, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(_tree())
def test_random_predicates_compile_to_their_trees(case: tuple[str, Predicate]) -> None:
    text, expected = case
    q = compile_sql(f"SELECT COUNT(*) FROM raises WHERE {text}", tables=TABLES)
    assert q.where == expected


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "SELECT",
                "FROM",
                "raises",
                "WHERE",
                "GROUP",
                "BY",
                "dept",
                "raise",
                "COUNT(*)",
                "(",
                ")",
                ",",
                "=",
                "'x'",
                "1",
                "AND",
                "OR",
                "NOT",
                "IN",
                "JOIN",
                "*",
                ";",
                "SUM(raise)",
                "MEDIAN(",
                "AS",
                '"',
                "'",
                "--",
                "/*",
                "NULL",
                "IS",
                "BETWEEN",
            ]
        ),
        max_size=14,
    )
)
def test_arbitrary_token_soup_is_refused_or_compiled_never_crashes(tokens: list[str]) -> None:
    try:
        q = compile_sql(" ".join(tokens), tables=TABLES)
    except SqlRefusal:
        return
    assert q.table == "raises" and q.aggregates


def test_plan_dataclasses_are_frozen() -> None:
    q = compile_sql(GROUPED, tables=TABLES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.table = "x"  # type: ignore[misc]
