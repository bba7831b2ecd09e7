"""Federated DP-SGD training and its empirical privacy audit."""
