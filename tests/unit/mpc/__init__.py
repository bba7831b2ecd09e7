"""Unit tests of mpcdp.mpc."""
