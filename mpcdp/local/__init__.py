"""Running a federation on one machine: the whole protocol in one process, no network
(simulation), and real party node processes on localhost with fresh certificates (localnet),
for demos, tests and benchmarks.
"""
