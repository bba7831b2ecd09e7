"""Unit tests of mpcdp.config."""
