"""Unit tests of mpcdp.sql: the compiler, the plan, the renderer and its execution."""
