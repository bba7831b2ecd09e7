"""Unit tests of mpcdp.train."""
