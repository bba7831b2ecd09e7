"""Write the training profile's datasets once: scikit-learn's bundled digits (no download),
split 80/20 into train and test with the fixed public split of ``mpcdp demo digits``, the
training part dealt round-robin to the three sites.

    python make_digits.py OUT      (the compose job train-data runs it in mpcdp-train:latest)

writes OUT/site-alice/digits.npz, OUT/site-bob/digits.npz, OUT/site-carlos/digits.npz
(arrays x: float32 in [0, 1], 64 features; y: int64 labels 0..9: what a site's
``[datasets.digits]`` with ``num_classes = 10`` declares) and OUT/coordinator/test.npz (the
test split the coordinator evaluates on). In compose each of those folders is a named volume
of its own, so every site mounts only its own examples. Does nothing for a file that exists
(``--force`` rewrites).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mpcdp.demos.digits_demo import load_digits_split

SITES = {"site-a": "site-alice", "site-b": "site-bob", "site-c": "site-carlos"}


def main(argv: list[str]) -> int:
    force = "--force" in argv
    args = [a for a in argv if a != "--force"]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0])
    split = load_digits_split(n_sites=3)
    files = {out / SITES[k] / "digits.npz": v for k, v in split.sites.items()}
    files[out / "coordinator" / "test.npz"] = split.test
    for path, (x, y) in files.items():
        if path.exists() and not force:
            print(f"train-data: keeping {path}", file=sys.stderr)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
        tmp.chmod(0o644)
        tmp.replace(path)  # atomic: a site never sees half a file
        counts = np.bincount(y, minlength=10).tolist()
        print(f"train-data: wrote {path}: {len(y)} examples, labels {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
