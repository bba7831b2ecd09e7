"""What a party operator and an analyst declare: party.toml and federation.toml (party_config),
a training dataset's declarations (training_config), the declared columns of a dataset and the
strict loaders of its files (datasets). Reading only: no network, no grpc, no torch.
"""
