"""Write this demo's data once: scikit-learn's bundled digits as PNG files, split across three
sites, plus a held-out test set.

Run from this folder:  python prepare.py

Each site gets ``site-X/images/<class>/NNNN.png`` (its own third of the training images) and
``site-X/test-images/<class>/NNNN.png`` (its third of the test images: its held-out split,
for evaluation at the sites); the coordinator gets the same test images as ``test.npz``
(arrays x: N x 1 x 8 x 8 in [0, 1], y: labels), to compare the two evaluations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SITES = ("site-a", "site-b", "site-c")


def main() -> None:
    here = Path(__file__).resolve().parent
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # 8 x 8 in [0, 1]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # a public, fixed split
    test, train = order[:360], order[360:]
    np.savez(here / "test.npz", x=x[test][:, None], y=y[test])
    for k, site in enumerate(SITES):
        for part, indices in (("images", train), ("test-images", test)):
            for i in indices[k :: len(SITES)]:
                folder = here / site / part / str(y[i])
                folder.mkdir(parents=True, exist_ok=True)
                image = Image.fromarray((x[i] * 255).round().astype(np.uint8))
                image.save(folder / f"{i:04d}.png")
        count, held = len(train[k :: len(SITES)]), len(test[k :: len(SITES)])
        print(f"{site}: {count} images, {held} held out")
    print(f"test.npz: {len(test)} images")


if __name__ == "__main__":
    main()
