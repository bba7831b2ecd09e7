"""Unit tests of mpcdp.audit."""
