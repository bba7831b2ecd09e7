"""The vocabulary of the SQL compiler's refusals (mpcdp.sql.compile): the error type, the
caps every part of a query is held to, and the words that name a construct outside the
supported subset ("JOIN is not supported", "function LOWER is not supported"). A refusal
quotes only the analyst's own text, never data.
"""

from __future__ import annotations

from typing import NoReturn

from sqlglot import exp

from mpcdp.errors import ParameterError

__all__ = [
    "CLAUSES",
    "DEFAULT_BINS",
    "MAX_BINS",
    "MAX_CELLS",
    "MAX_DEPTH",
    "MAX_KEYS",
    "MAX_KEY_LENGTH",
    "MAX_LABEL_LENGTH",
    "MAX_MEASURES",
    "MAX_TEXT_BYTES",
    "MAX_VALUES",
    "SqlRefusal",
    "construct",
    "refuse",
    "text_of",
    "unsupported",
]

DEFAULT_BINS = 64
MAX_BINS = 1000
MAX_MEASURES = 1600
MAX_CELLS = 10**6
MAX_VALUES = 10**7
MAX_KEYS = 10**5
MAX_KEY_LENGTH = 256
MAX_TEXT_BYTES = 64 * 1024
MAX_DEPTH = 64
MAX_LABEL_LENGTH = 128


class SqlRefusal(ParameterError):
    """A query outside the supported subset, or a parameter of it outside its domain.

    ``name`` is "sql" for the text (``value``: the offending fragment, ``reason``: what is
    not supported) or the parameter's name (keys, bins, weights)."""


def refuse(node: exp.Expr | str, reason: str) -> NoReturn:
    fragment = node if isinstance(node, str) else text_of(node)
    raise SqlRefusal("sql", fragment, reason)


def text_of(node: exp.Expr) -> str:
    """The SQL text of ``node``, as a refusal quotes it."""
    try:
        return node.sql()
    except Exception:  # a node sqlglot cannot print back still has a name
        return type(node).__name__


# --- naming a construct ------------------------------------------------------------------

_NAMES: dict[type[exp.Expr], str] = {
    exp.Join: "JOIN",
    exp.Union: "UNION",
    exp.Intersect: "INTERSECT",
    exp.Except: "EXCEPT",
    exp.With: "WITH (CTE)",
    exp.CTE: "WITH (CTE)",
    exp.Subquery: "subquery",
    exp.Select: "subquery",
    exp.Exists: "EXISTS (subquery)",
    exp.Window: "window function",
    exp.Distinct: "DISTINCT",
    exp.Having: "HAVING",
    exp.Order: "ORDER BY",
    exp.Limit: "LIMIT",
    exp.Offset: "OFFSET",
    exp.Star: "`*` outside COUNT(*)",
    exp.Like: "LIKE",
    exp.ILike: "ILIKE",
    exp.Cast: "CAST",
    exp.Case: "CASE",
    exp.Filter: "FILTER",
    exp.Placeholder: "a parameter placeholder",
    exp.Boolean: "a boolean constant",
    exp.Null: "NULL outside IS [NOT] NULL",
    exp.NullSafeEQ: "IS NOT DISTINCT FROM",
    exp.NullSafeNEQ: "IS DISTINCT FROM",
    exp.Add: "arithmetic (+)",
    exp.Sub: "arithmetic (-)",
    exp.Mul: "arithmetic (*)",
    exp.Div: "arithmetic (/)",
    exp.Mod: "arithmetic (%)",
    exp.DPipe: "string concatenation (||)",
    exp.Tuple: "a tuple",
    exp.Literal: "a constant",
}

#: SELECT clauses, by sqlglot's argument name (with any trailing "_" removed).
#: how a refusal names a clause of SELECT outside the subset
CLAUSES: dict[str, str] = {
    "with": "WITH (CTE)",
    "joins": "JOIN",
    "laterals": "LATERAL",
    "having": "HAVING",
    "order": "ORDER BY",
    "limit": "LIMIT",
    "offset": "OFFSET",
    "distinct": "DISTINCT",
    "qualify": "QUALIFY",
    "windows": "WINDOW",
    "into": "SELECT INTO",
    "sort": "SORT BY",
    "cluster": "CLUSTER BY",
    "distribute": "DISTRIBUTE BY",
    "locks": "FOR UPDATE",
    "sample": "TABLESAMPLE",
    "settings": "SETTINGS",
    "format": "FORMAT",
    "prewhere": "PREWHERE",
    "connect": "CONNECT BY",
    "match": "MATCH_RECOGNIZE",
    "pivots": "PIVOT",
    "kind": "SELECT AS STRUCT/VALUE",
    "options": "OPTION",
}


def construct(node: exp.Expr) -> str:
    for cls in type(node).__mro__:
        if cls in _NAMES:
            return _NAMES[cls]
    if isinstance(node, exp.Anonymous):
        return f"function {str(node.name).upper()}"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name()}"
    if isinstance(node, exp.Binary):
        return f"operator {type(node).__name__.upper()}"
    return type(node).__name__.upper()


def unsupported(node: exp.Expr, where: str = "") -> NoReturn:
    refuse(node, f"{construct(node)} is not supported{where}")
