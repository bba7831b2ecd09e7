"""The data of this demo project: a folder of PNG images, one sub-folder per class.

``images/3/0042.png`` is an image of class 3. mpcdp imports ``imagefolder:make_dataset`` at
each site (``data`` in party.toml, with ``data_options = { root = "images" }``) and reads
only the items each step's Poisson sample draws, through a DataLoader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class ImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """Grey PNG images under ``root/<class>/``, as (1 x H x W float tensor in [0, 1], class)."""

    def __init__(self, root: Path) -> None:
        self.items = sorted(
            (path, int(label.name))
            for label in root.iterdir()
            if label.is_dir()
            for path in label.glob("*.png")
        )
        if not self.items:
            raise ValueError(f"no <class>/*.png images under {root}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).unsqueeze(0), label


def make_dataset(root: str) -> ImageFolder:
    """The site's images; a relative ``root`` is taken from where the party runs."""
    return ImageFolder(Path(root).resolve())
