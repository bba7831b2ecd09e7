"""Compile an analyst's SQL text into a typed :class:`~mpcdp.sql.typed_plan.SqlQuery`.

The WHERE clause is :mod:`mpcdp.sql.where`'s, the refusals and caps :mod:`mpcdp.sql.refusals`'s
(both named here too).

The text is parsed by sqlglot (dialect-neutral, one statement) and the syntax tree is walked
with an ALLOW-list: every node is either one of the constructs below or refused with a
:class:`SqlRefusal` naming it ("JOIN is not supported", "function LOWER is not supported").
The compiler reads only the PUBLIC declaration (:class:`~mpcdp.sql.typed_plan.TableDecl`), never
data, so a refusal says nothing about any row and every party refuses the same texts.

The subset::

    SELECT [group columns,] aggregates FROM <declared table>
    [WHERE predicate] [GROUP BY categorical columns]

* Aggregates: COUNT(*), COUNT(col), SUM(col), AVG(col), MEDIAN(col), QUANTILE(col, p)
  (also spelled QUANTILE_CONT(col, p), PERCENTILE_CONT(col, p) or PERCENTILE_CONT(p) WITHIN
  GROUP (ORDER BY col)), each with an optional alias. SUM, AVG and quantiles need a numeric
  column with declared bounds (the sensitivity comes from them); COUNT(col) takes any
  declared column. Labels: the alias, else "count", "count_<col>", "sum_<col>",
  "avg_<col>", "median_<col>", "quantile_<col>_<p>"; labels must be distinct.
* WHERE: =, <>, !=, <, <=, >, >=, [NOT] IN (constants), [NOT] BETWEEN, IS [NOT] NULL, AND,
  OR, NOT, parentheses; each comparison between one declared column and constants. A
  number goes with a numeric column (as a float), a quoted string with a categorical one;
  categorical columns allow only equality tests (=, <>, IN), since string order depends on
  the engine's collation. Column and table names match the declaration exactly (case
  included): the renderer always quotes them. The filter reads raw values (before
  clamping) with SQL's three-valued logic: a row is kept only where the predicate is TRUE,
  so a comparison with a NULL value drops the row, and so does its negation.
* GROUP BY: declared categorical columns, each exactly once, and the same set in the SELECT
  list. The keys of each are PUBLIC (why: mpcdp.sql.typed_plan): the declared categories, or the
  analyst's list ``keys[column]`` (distinct non-empty strings, at most MAX_KEYS of at most
  MAX_KEY_LENGTH characters), which then replaces them.
* Quantile bins: the analyst's ``bins`` uniform bins over [lower, upper] when given (an
  explicit argument is never ignored; any public choice of bins is as private as another),
  else the column's declared ``edges`` if it has any, else DEFAULT_BINS = 64 uniform bins.

Epsilon split: ``weights`` gives one positive finite number per aggregate, in SELECT order;
they are normalised to add up to 1. Without it every aggregate gets the same share 1/k. The
share is the aggregate's; the lead splits it further among the aggregate's measures.

Caps (each refused naming the parameter and the value): the text (MAX_TEXT_BYTES), the
nesting of the WHERE clause (MAX_DEPTH), bins per quantile (MAX_BINS), measures per cell
(MAX_MEASURES: PostgreSQL returns at most 1664 columns), cells (MAX_CELLS) and cells x
measures (MAX_VALUES, the length of each party's contribution), keys per column (MAX_KEYS),
constants per IN list (MAX_KEYS) and the length of every string (MAX_KEY_LENGTH).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import sqlglot
from sqlglot import exp

from mpcdp.config.datasets import ColumnSpec
from mpcdp.sql.refusals import (
    CLAUSES,
    DEFAULT_BINS,
    MAX_BINS,
    MAX_CELLS,
    MAX_DEPTH,
    MAX_KEY_LENGTH,
    MAX_KEYS,
    MAX_LABEL_LENGTH,
    MAX_MEASURES,
    MAX_TEXT_BYTES,
    MAX_VALUES,
    SqlRefusal,
    construct,
    refuse,
    unsupported,
)
from mpcdp.sql.typed_plan import (
    Aggregate,
    AggregateKind,
    SqlQuery,
    TableDecl,
)
from mpcdp.sql.where import WhereCompiler, checked_string, numeric_literal, unparen

__all__ = [
    "DEFAULT_BINS",
    "MAX_BINS",
    "MAX_CELLS",
    "MAX_DEPTH",
    "MAX_KEYS",
    "MAX_KEY_LENGTH",
    "MAX_MEASURES",
    "MAX_TEXT_BYTES",
    "MAX_VALUES",
    "SqlRefusal",
    "compile_sql",
]

# --- aggregates --------------------------------------------------------------------------

_QUANTILE_NAMES = ("QUANTILE", "QUANTILE_CONT", "PERCENTILE_CONT")


def _aggregate_parts(
    c: WhereCompiler, node: exp.Expr
) -> tuple[AggregateKind, str | None, float | None, str]:
    """(kind, column, p, default label) of an aggregate expression, or a refusal."""
    if isinstance(node, exp.Count):
        arg = node.this
        if isinstance(arg, exp.Star):
            return "count", None, None, "count"
        if isinstance(arg, exp.Distinct):
            refuse(node, "COUNT(DISTINCT ...) is not supported")
        if node.expressions or arg is None:
            refuse(node, "COUNT takes * or one column")
        column = c.column_name(unparen(arg))
        return "count", column, None, f"count_{column}"
    if isinstance(node, exp.Sum | exp.Avg | exp.Median):
        if node.expressions or node.this is None:
            refuse(node, f"{node.sql_name()} takes one column")
        if isinstance(node.this, exp.Distinct):
            refuse(node, f"{node.sql_name()}(DISTINCT ...) is not supported")
        column = c.column_name(unparen(node.this))
        if isinstance(node, exp.Median):
            return "quantile", column, 0.5, f"median_{column}"
        kind: AggregateKind = "sum" if isinstance(node, exp.Sum) else "avg"
        return kind, column, None, f"{kind}_{column}"
    col_node: exp.Expr | None
    p_node: exp.Expr | None
    if isinstance(node, exp.Quantile):
        col_node, p_node = node.this, node.args.get("quantile")
    elif isinstance(node, exp.PercentileCont) and node.args.get("expression") is not None:
        col_node, p_node = node.this, node.args.get("expression")
    elif isinstance(node, exp.Anonymous) and str(node.name).upper() in _QUANTILE_NAMES:
        args = node.expressions
        if len(args) != 2:
            refuse(node, f"{str(node.name).upper()} takes a column and a level p")
        col_node, p_node = args
    elif isinstance(node, exp.WithinGroup) and isinstance(node.this, exp.PercentileCont):
        order = node.expression
        p_node = node.this.this
        items = order.expressions if isinstance(order, exp.Order) else []
        if len(items) != 1 or not isinstance(items[0], exp.Ordered) or items[0].args.get("desc"):
            refuse(node, "PERCENTILE_CONT needs WITHIN GROUP (ORDER BY one column ascending)")
        col_node = items[0].this
    else:
        if isinstance(node, exp.AggFunc | exp.Func):
            unsupported(node)
        if isinstance(node, exp.Column):
            refuse(node, "column is neither in GROUP BY nor inside an aggregate")
        unsupported(node, " in the SELECT list")
    if col_node is None or p_node is None:
        refuse(node, "a quantile takes a column and a level p")
    column = c.column_name(unparen(col_node))
    p = numeric_literal(p_node)
    if p is None or not 0.0 < p < 1.0:
        refuse(node, "the quantile level p must be a number in (0, 1)")
    return "quantile", column, p, f"quantile_{column}_{p!r}"


def _bounds(column: ColumnSpec, func: str) -> tuple[float, float]:
    """The declared bounds of the numeric column that ``func`` (SUM, AVG, a quantile) reads."""
    lo, hi = column.lower, column.upper
    fragment = f"{func}({column.name})"
    if column.categorical:
        raise SqlRefusal(
            "sql",
            fragment,
            f"{func} on categorical column {column.name!r} is not supported: it needs a "
            "numeric column",
        )
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise SqlRefusal(
            "sql", fragment, f"column {column.name!r} needs finite declared bounds lower <= upper"
        )
    return float(lo), float(hi)


def _edges(column: ColumnSpec, bins: int | None) -> tuple[float, ...]:
    lo, hi = _bounds(column, "quantile")
    declared = tuple(column.edges)
    if declared and bins is None:
        e = tuple(float(x) for x in declared)
        ok = (
            len(e) >= 2
            and all(math.isfinite(x) for x in e)
            and all(b > a for a, b in itertools.pairwise(e))
            and lo <= e[0]
            and e[-1] <= hi
        )
        if not ok:
            raise SqlRefusal(
                "edges",
                list(e),
                f"declared edges of column {column.name!r} must be >= 2 strictly increasing "
                f"finite numbers within its bounds [{lo!r}, {hi!r}]",
            )
        if len(e) - 1 > MAX_BINS:
            raise SqlRefusal("edges", len(e) - 1, f"at most {MAX_BINS} bins per quantile")
        return e
    n = DEFAULT_BINS if bins is None else bins
    if not lo < hi:
        raise SqlRefusal(
            "sql",
            f"quantile({column.name})",
            f"a quantile of column {column.name!r} needs declared bounds lower < upper",
        )
    edges = (*(lo + (hi - lo) * i / n for i in range(n)), hi)
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise SqlRefusal("bins", n, f"too many bins for the bounds [{lo!r}, {hi!r}]")
    return edges


def _check_bins(bins: int | None) -> None:
    if bins is None:
        return
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise SqlRefusal("bins", bins, f"must be an int in [1, {MAX_BINS}]")


def _weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0 / n,) * n
    ws = list(weights)
    if len(ws) != n:
        raise SqlRefusal("weights", ws, f"need one weight per aggregate ({n})")
    for w in ws:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise SqlRefusal("weights", ws, "each weight must be a finite number > 0")
    total = math.fsum(float(w) for w in ws)
    return tuple(float(w) / total for w in ws)


def _keys(
    group_by: tuple[str, ...], c: WhereCompiler, keys: Mapping[str, Sequence[str]] | None
) -> tuple[tuple[str, ...], ...]:
    given = dict(keys or {})
    for name in given:
        if name not in group_by:
            raise SqlRefusal(
                "keys", name, f"keys are only taken for GROUP BY columns {list(group_by)}"
            )
    out: list[tuple[str, ...]] = []
    for name in group_by:
        if name not in given:
            out.append(tuple(c.spec(name).categories))
            continue
        ks = given[name]
        if isinstance(ks, str | bytes) or not isinstance(ks, Sequence):
            raise SqlRefusal(f"keys[{name!r}]", ks, "must be a list of strings")
        if not 1 <= len(ks) <= MAX_KEYS:
            raise SqlRefusal(f"keys[{name!r}]", len(ks), f"need 1..{MAX_KEYS} keys")
        for k in ks:
            if not isinstance(k, str) or not k:
                raise SqlRefusal(f"keys[{name!r}]", k, "each key must be a non-empty string")
            checked_string(k, k, name=f"keys[{name!r}]")
        if len(set(ks)) != len(ks):
            raise SqlRefusal(f"keys[{name!r}]", list(ks), "keys must be distinct")
        out.append(tuple(ks))
    return tuple(out)


#: UNION, INTERSECT, EXCEPT (one base class; its name changed across sqlglot versions).
_SET_OPERATION: type[exp.Expr] = getattr(exp, "SetOperation", exp.Union)


def _select(text: str) -> exp.Select:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise SqlRefusal("sql", f"{size} bytes", f"the text is limited to {MAX_TEXT_BYTES} bytes")
    try:
        statements = [s for s in sqlglot.parse(text) if s is not None]
    except RecursionError:
        refuse(text, "the text nests too deeply")
    except Exception as exc:  # sqlglot's own errors, and any failure of it on hostile text
        refuse(text, f"cannot parse: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    if len(statements) != 1:
        refuse(text, f"exactly one statement is supported, got {len(statements)}")
    (stmt,) = statements
    if isinstance(stmt, _SET_OPERATION):
        unsupported(stmt)
    if not isinstance(stmt, exp.Select):
        refuse(stmt, f"{type(stmt).__name__.upper()} statements are not supported: only SELECT")
    for key, value in stmt.args.items():
        if not value or key.rstrip("_") in ("expressions", "from", "where", "group"):
            continue
        what = CLAUSES.get(key.rstrip("_"), f"the clause {key.rstrip('_').upper()}")
        refuse(stmt, f"{what} is not supported")
    return stmt


def _table_name(stmt: exp.Select, tables: Mapping[str, TableDecl]) -> TableDecl:
    source = stmt.args.get("from_", stmt.args.get("from"))
    if source is None:
        refuse(stmt, "a FROM clause naming one declared table is required")
    if not isinstance(source, exp.From) or source.expressions:
        refuse(source, "FROM takes one declared table")
    t = source.this
    if isinstance(t, exp.Subquery | exp.Select):
        unsupported(t, " in FROM")
    if not isinstance(t, exp.Table) or not isinstance(t.this, exp.Identifier):
        inner = t.this if isinstance(t, exp.Table) else t
        if isinstance(inner, exp.Func):
            refuse(
                t,
                f"table function {construct(inner).removeprefix('function ')} is not "
                "supported: name a declared table",
            )
        refuse(t, "FROM takes one declared table")
    if t.args.get("db") or t.args.get("catalog"):
        refuse(t, "a qualified table name is not supported: name a declared table")
    if t.args.get("alias"):
        refuse(t, "a table alias is not supported")
    for key, value in t.args.items():
        if value and key not in ("this",):
            what = CLAUSES.get(key.rstrip("_"), key.rstrip("_").upper())
            refuse(t, f"{what} is not supported")
    name = str(t.this.name)
    if name not in tables:
        refuse(t, f"table {name!r} is not declared (declared: {sorted(tables)})")
    decl = tables[name]
    if decl.name != name:
        raise SqlRefusal("tables", name, f"the declaration is named {decl.name!r}")
    return decl


def _label(alias: exp.Expr) -> str:
    ident = alias.args.get("alias")
    name = str(ident.name) if isinstance(ident, exp.Identifier) else ""
    if not name or len(name) > MAX_LABEL_LENGTH or not name.isprintable():
        refuse(alias, f"an alias must be 1..{MAX_LABEL_LENGTH} printable characters")
    return name


def compile_sql(
    text: str,
    *,
    tables: Mapping[str, TableDecl],
    keys: Mapping[str, Sequence[str]] | None = None,
    bins: int | None = None,
    weights: Sequence[float] | None = None,
) -> SqlQuery:
    """Compile ``text`` against the declared ``tables`` (module docstring); raises
    :class:`SqlRefusal` for anything outside the subset or the caps."""
    if not isinstance(text, str) or not text.strip():
        raise SqlRefusal("sql", text, "must be non-empty SQL text")
    _check_bins(bins)
    stmt = _select(text)
    table = _table_name(stmt, tables)
    c = WhereCompiler(table)

    # GROUP BY
    group_by: list[str] = []
    group = stmt.args.get("group")
    if group is not None:
        for key, value in group.args.items():
            if value and key != "expressions":
                refuse(group, f"GROUP BY {key.upper()} is not supported")
        for g in group.expressions:
            g = unparen(g)
            if isinstance(g, exp.Literal):
                refuse(g, "GROUP BY position is not supported: name the column")
            if not isinstance(g, exp.Column):
                unsupported(g, " in GROUP BY")
            name = c.column_name(g)
            if not c.spec(name).categorical:
                refuse(
                    g,
                    f"GROUP BY on numeric column {name!r} is not supported: group by a "
                    "categorical column",
                )
            if name in group_by:
                refuse(g, f"column {name!r} appears twice in GROUP BY")
            group_by.append(name)

    # SELECT list
    selected: list[str] = []
    parts: list[tuple[AggregateKind, str | None, float | None, str]] = []
    for item in stmt.expressions:
        if isinstance(item, exp.Alias):
            inner = item.this
            if isinstance(unparen(inner), exp.Column):
                refuse(item, "an alias on a group column is not supported")
            kind, column, p, _ = _aggregate_parts(c, inner)
            parts.append((kind, column, p, _label(item)))
            continue
        if isinstance(item, exp.Column):
            name = c.column_name(item)
            if name not in group_by:
                refuse(
                    item,
                    f"column {name!r} in the SELECT list must be in GROUP BY or inside an "
                    "aggregate",
                )
            if name in selected:
                refuse(item, f"column {name!r} appears twice in the SELECT list")
            selected.append(name)
            continue
        parts.append(_aggregate_parts(c, item))
    missing = [g for g in group_by if g not in selected]
    if missing:
        refuse(stmt, f"GROUP BY column(s) {missing} must also be in the SELECT list")
    if not parts:
        refuse(stmt, "the SELECT list needs at least one aggregate")
    labels = [label for *_, label in parts] + group_by
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        refuse(stmt, f"duplicate output column name(s) {dup}: give each aggregate an alias")

    where_node = stmt.args.get("where")
    where = None if where_node is None else c.predicate(where_node.this)

    shares = _weights(weights, len(parts))
    aggregates: list[Aggregate] = []
    for (kind, column, p, label), w in zip(parts, shares, strict=True):
        lo = hi = 0.0
        edges: tuple[float, ...] = ()
        if kind in ("sum", "avg"):
            assert column is not None
            lo, hi = _bounds(c.spec(column), kind.upper())
        elif kind == "quantile":
            assert column is not None
            edges = _edges(c.spec(column), bins)
        aggregates.append(
            Aggregate(
                kind=kind,
                column=column,
                p=p,
                edges=edges,
                label=label,
                weight=w,
                lower=lo,
                upper=hi,
            )
        )
    key_lists = _keys(tuple(group_by), c, keys)
    q = SqlQuery(
        table=table.name,
        aggregates=tuple(aggregates),
        where=where,
        group_by=tuple(group_by),
        keys=key_lists,
    )
    n_measures = len(q.measures())
    if n_measures > MAX_MEASURES:
        raise SqlRefusal("measures", n_measures, f"at most {MAX_MEASURES} measures per cell")
    if q.n_cells > MAX_CELLS:
        raise SqlRefusal("cells", q.n_cells, f"at most {MAX_CELLS} cells (keys x keys ...)")
    if q.n_cells * n_measures > MAX_VALUES:
        raise SqlRefusal(
            "cells x measures",
            q.n_cells * n_measures,
            f"at most {MAX_VALUES} values per contribution",
        )
    return q
