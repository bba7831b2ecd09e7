"""Unit tests of mpcdp.party."""
