"""The README, docs, demos, benchmarks and containers, run as a user runs them."""
