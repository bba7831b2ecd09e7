"""Tests that start real processes or servers: party serve, localnet, torchrun."""
