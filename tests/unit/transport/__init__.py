"""Unit tests of mpcdp.transport."""
