"""Unit tests of mpcdp.protocol."""
