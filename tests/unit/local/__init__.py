"""Unit tests of mpcdp.local."""
