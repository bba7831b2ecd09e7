"""The salary-average demo from the Python API.

Run:  python demos/salary_average.py [--epsilon 1.0]

Four engineers (Alice, Bob, Carlos, David; reference/mpc_and_dp.txt) compute their average
raise by secure aggregation: first exactly (mechanism none, 3171.5), then with distributed
discrete Laplace noise at the given epsilon, each charging its own SQLite budget ledger.
All four parties run in this process; the networked version is `mpcdp demo salary` once
party nodes exist.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mpcdp import salary_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mpcdp-salary-") as tmp:
        report = salary_demo.run(workdir=Path(tmp), epsilon=args.epsilon)
    print(salary_demo.render(report))


if __name__ == "__main__":
    main()
