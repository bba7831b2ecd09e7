"""Table declarations shared by the mpcdp.sql tests."""

from __future__ import annotations

from mpcdp.config.datasets import ColumnSpec
from mpcdp.sql.typed_plan import TableDecl

RAISES = TableDecl(
    name="raises",
    columns=(
        ColumnSpec(name="dept", categories=("eng", "ops", "x'); DROP TABLE raises; --")),
        ColumnSpec(name="level", categories=("1", "2", "3")),
        ColumnSpec(name="raise", lower=0.0, upper=5000.0),
        ColumnSpec(name="year", lower=2000.0, upper=2030.0),
        ColumnSpec(name="score", lower=-10.0, upper=30.0, edges=(-10.0, 0.0, 5.0, 30.0)),
    ),
    privacy_unit="pid",
    max_rows_per_unit=2,
    max_groups_per_unit=1,
)
TABLES = {"raises": RAISES}
