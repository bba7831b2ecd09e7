"""The salary-average demo from the Python API, with real party processes.

Run:  python demos/salary_average.py [--epsilon 1.0] [--local]

Four engineers (Alice, Bob, Carlos, David; docs/salary_example.md) each run a party node
(`mpcdp party serve`, a separate process with its own certificate, CSV file and SQLite
ledger) on loopback. The analyst computes their average raise with secure aggregation over
mutually authenticated gRPC: first exactly (mechanism none, 3171.5), then with distributed
discrete Laplace noise at the given epsilon. `--local` runs all four parties in this process.
The processes and their temporary folder are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mpcdp.demos import salary_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--local", action="store_true", help="all parties in this process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mpcdp-salary-") as tmp:
        if args.local:
            print(salary_demo.render(salary_demo.run(workdir=Path(tmp), epsilon=args.epsilon)))
        else:
            report = salary_demo.run_networked(workdir=Path(tmp), epsilon=args.epsilon)
            print(salary_demo.render_networked(report))


if __name__ == "__main__":
    main()
