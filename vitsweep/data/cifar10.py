"""CIFAR-10 through torchvision's own loader, downloaded into `root` when the network allows."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

from vitsweep.data.splits import Split, Splits, carve_validation
from vitsweep.data.targets import class_labels_only


def load_cifar10(root: str, download: bool = True, val_fraction: float = 0.1, split_seed: int = 0,
                 targets: dict | None = None) -> Splits:
    class_labels_only(targets, "cifar10")
    root = Path(root).expanduser()

    def split(train: bool) -> Split:
        try:
            ds = CIFAR10(str(root), train=train, download=download)
        except (RuntimeError, OSError) as err:  # not there / corrupt, or offline (URLError is an OSError)
            raise FileNotFoundError(
                f"data=cifar10: CIFAR-10 is not in data.source.root={root} and could not be downloaded "
                f"({type(err).__name__}): put cifar-10-python.tar.gz or the extracted cifar-10-batches-py/ "
                f"there, or train on a folder of images with data=imagefolder data.root=DIR"
            ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        return Split(images, torch.tensor(ds.targets, dtype=torch.int64)), ds.classes

    (train, classes), (test, _) = split(True), split(False)
    train, val = carve_validation(train, val_fraction, split_seed)
    return Splits(train, val, test, class_names=list(classes))
