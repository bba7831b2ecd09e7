"""The demos behind ``mpcdp demo``: the salary average (simulated and over a local network)
and federated DP-SGD on scikit-learn's digits (torch, the `train` extra).
"""
