"""Unit tests, one folder per mpcdp package."""
