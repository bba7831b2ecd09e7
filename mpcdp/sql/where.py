"""The WHERE clause of an analyst's SQL, compiled into a typed predicate
(:mod:`mpcdp.sql.typed_plan`) against the table's PUBLIC declaration: =, <>, !=, <, <=, >,
>=, [NOT] IN, [NOT] BETWEEN, IS [NOT] NULL, AND, OR, NOT and parentheses, each comparison
between one declared column and constants (the subset, and why categorical columns allow
only equality tests: mpcdp.sql.compile). Everything else is refused with the construct's
name (mpcdp.sql.refusals). Long AND/OR chains are walked without recursion.
"""

from __future__ import annotations

import math

from sqlglot import exp

from mpcdp.config.datasets import ColumnSpec
from mpcdp.sql.refusals import (
    MAX_DEPTH,
    MAX_KEY_LENGTH,
    MAX_KEYS,
    SqlRefusal,
    refuse,
    text_of,
    unsupported,
)
from mpcdp.sql.typed_plan import (
    And,
    Between,
    Compare,
    CompareOp,
    Constant,
    InList,
    IsNull,
    Not,
    Or,
    Predicate,
    TableDecl,
)

__all__ = ["WhereCompiler", "checked_string", "numeric_literal", "unparen"]


class WhereCompiler:
    """Column references and the WHERE clause of one query against ``table``."""

    def __init__(self, table: TableDecl) -> None:
        self.table = table

    def column_name(self, node: exp.Expr) -> str:
        """The declared column that ``node`` names (a plain or table-qualified column)."""
        if not isinstance(node, exp.Column):
            unsupported(node)
        if isinstance(node.this, exp.Star):
            refuse(node, "`*` is only supported in COUNT(*)")
        if not isinstance(node.this, exp.Identifier):
            unsupported(node.this)
        extra = [k for k, v in node.args.items() if v and k not in ("this", "table")]
        if extra or node.args.get("db") or node.args.get("catalog"):
            refuse(node, "only a column name, optionally qualified by the table, is supported")
        qualifier = node.args.get("table")
        if qualifier is not None:
            if not isinstance(qualifier, exp.Identifier) or qualifier.name != self.table.name:
                refuse(node, f"columns may only be qualified by the table {self.table.name!r}")
        name = str(node.this.name)
        if self.table.column(name) is None:
            declared = [c.name for c in self.table.columns]
            refuse(
                node,
                f"column {name!r} is not declared in table {self.table.name!r} "
                f"(declared: {declared})",
            )
        return name

    def spec(self, name: str) -> ColumnSpec:
        col = self.table.column(name)
        assert col is not None  # column_name() checked it
        return col

    # constants

    def constant(self, node: exp.Expr, column: str) -> Constant:
        """A constant compared with ``column``: float for numeric, str for categorical."""
        while isinstance(node, exp.Paren):
            node = node.this
        categorical = self.spec(column).categorical
        if isinstance(node, exp.Literal) and node.is_string:
            if not categorical:
                refuse(
                    node,
                    f"comparing numeric column {column!r} with a string is not supported: "
                    "use a number",
                )
            return checked_string(node, str(node.this))
        number = numeric_literal(node)
        if number is None:
            if isinstance(node, exp.Column):
                refuse(node, "comparing two columns is not supported: compare with a constant")
            if isinstance(node, exp.Null):
                refuse(node, "comparing with NULL is never true: use IS [NOT] NULL")
            unsupported(node, " as a constant")
        if categorical:
            refuse(
                node,
                f"comparing categorical column {column!r} with a number is not supported: "
                "quote it as a string",
            )
        return number

    def numeric_constant(self, node: exp.Expr, column: str) -> float:
        value = self.constant(node, column)
        assert isinstance(value, float)
        return value

    # predicates

    def predicate(self, node: exp.Expr, depth: int = 0) -> Predicate:
        if depth > MAX_DEPTH:
            refuse(node, f"the WHERE clause nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, exp.Paren):
            return self.predicate(node.this, depth + 1)
        if isinstance(node, exp.And | exp.Or):  # flattened: AND and OR are associative
            kind = type(node)
            parts: list[Predicate] = []
            for operand in chain(node, kind):
                p = self.predicate(operand, depth + 1)
                same = And if kind is exp.And else Or
                parts.extend(p.parts if isinstance(p, same) else (p,))
            return And(tuple(parts)) if kind is exp.And else Or(tuple(parts))
        if isinstance(node, exp.Not):
            return Not(self.predicate(node.this, depth + 1))
        if isinstance(node, exp.EQ | exp.NEQ | exp.GT | exp.GTE | exp.LT | exp.LTE):
            return self.compare(node)
        if isinstance(node, exp.In):
            return self.in_list(node)
        if isinstance(node, exp.Between):
            return self.between(node)
        if isinstance(node, exp.Is):
            if not isinstance(node.expression, exp.Null):
                refuse(node, "only IS NULL and IS NOT NULL are supported")
            return IsNull(self.column_name(node.this))
        if isinstance(node, exp.Column):
            refuse(node, "a column alone is not a condition: compare it with a constant")
        unsupported(node, " in WHERE")

    def compare(self, node: exp.Expr) -> Compare:
        ops: dict[type[exp.Expr], tuple[CompareOp, CompareOp]] = {
            exp.EQ: ("=", "="),
            exp.NEQ: ("<>", "<>"),
            exp.GT: (">", "<"),
            exp.GTE: (">=", "<="),
            exp.LT: ("<", ">"),
            exp.LTE: ("<=", ">="),
        }
        op, flipped = ops[type(node)]
        left, right = node.this, node.expression
        if isinstance(unparen(left), exp.Column):
            column = self.column_name(unparen(left))
            other = right
        elif isinstance(unparen(right), exp.Column):
            column = self.column_name(unparen(right))
            other, op = left, flipped
        else:
            for side in (left, right):
                inner = unparen(side)
                if not isinstance(inner, exp.Literal | exp.Neg | exp.Null):
                    unsupported(inner)
            refuse(node, "a comparison needs a declared column on one side")
        value = self.constant(other, column)
        if isinstance(value, str) and op not in ("=", "<>"):
            refuse(
                node,
                f"ordering comparison ({op}) on categorical column {column!r} is not "
                "supported: use =, <> or IN",
            )
        return Compare(column, op, value)

    def in_list(self, node: exp.In) -> InList:
        for arg in ("query", "unnest", "field"):
            if node.args.get(arg):
                refuse(node, "IN needs a list of constants (a subquery is not supported)")
        extra = [k for k, v in node.args.items() if v and k not in ("this", "expressions")]
        if extra:
            refuse(node, f"IN with {extra} is not supported")
        column = self.column_name(unparen(node.this))
        items = node.expressions
        if not 1 <= len(items) <= MAX_KEYS:
            refuse(node, f"an IN list needs 1..{MAX_KEYS} constants, got {len(items)}")
        return InList(column, tuple(self.constant(v, column) for v in items))

    def between(self, node: exp.Between) -> Between:
        extra = [k for k, v in node.args.items() if v and k not in ("this", "low", "high")]
        if extra:
            refuse(node, f"BETWEEN with {extra} is not supported")
        column = self.column_name(unparen(node.this))
        if self.spec(column).categorical:
            refuse(
                node,
                f"BETWEEN on categorical column {column!r} is not supported: use IN",
            )
        low = self.numeric_constant(node.args["low"], column)
        high = self.numeric_constant(node.args["high"], column)
        return Between(column, low, high)


def chain(node: exp.Expr, kind: type[exp.Expr]) -> list[exp.Expr]:
    """The operands of a chain ``a AND b AND c`` (of one ``kind``), in textual order, without
    recursion (a long chain is a deep tree: one level per operator)."""
    out: list[exp.Expr] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if type(n) is kind:
            stack.extend((n.expression, n.this))
        else:
            out.append(n)
    return out


def unparen(node: exp.Expr) -> exp.Expr:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def checked_string(node: exp.Expr | str, text: str, *, name: str = "sql") -> str:
    fragment = node if isinstance(node, str) else text_of(node)
    if len(text) > MAX_KEY_LENGTH:
        raise SqlRefusal(name, fragment, f"strings are limited to {MAX_KEY_LENGTH} characters")
    if "\x00" in text:
        raise SqlRefusal(name, fragment, "strings may not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SqlRefusal(name, fragment, "strings must be valid Unicode") from None
    return text


def numeric_literal(node: exp.Expr) -> float | None:
    """The value of a numeric literal (optionally negated, parenthesised), else None."""
    node = unparen(node)
    sign = 1.0
    while isinstance(node, exp.Neg):
        sign = -sign
        node = unparen(node.this)
    if not isinstance(node, exp.Literal) or node.is_string:
        return None
    try:
        value = sign * float(str(node.this))
    except ValueError:
        refuse(node, "not a number")
    if not math.isfinite(value):
        refuse(node, "a numeric constant must be finite")
    return value
