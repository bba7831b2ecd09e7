"""Differential privacy: samplers, mechanisms with share sizing, accounting, budget ledger.

Submodules (import them explicitly; this package imports nothing on its own):

- ``samplers``: integer noise from a CSPRNG (Polya, discrete Laplace, Skellam, discrete
  Gaussian exact and vectorised).
- ``mechanisms``: the release mechanisms of docs/design.md with per-party share sizing for
  h = n - t honest parties.
- ``randomized_response``: the local-DP poll of docs/salary_example.md.
- ``events``, ``rdp``, ``accountant``: privacy events, RDP curves, composition and calibration.
- ``ledger``: the per-party SQLite budget ledger.
"""
