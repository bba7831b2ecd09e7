"""Unit tests of mpcdp.dp."""
