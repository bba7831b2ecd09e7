"""A party node's lifecycle (node): load party.toml and the declared datasets, open the budget
ledger, build the query and training engines, serve them over mTLS gRPC, stop cleanly.
"""
