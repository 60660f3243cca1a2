"""A class-per-folder tree of images: `root/train/<class>/*`, `root/test/<class>/*`, optional `root/val/`.

Images are decoded and resized once into uint8 tensors, then cached on disk under `cache_dir`; the
cache key covers every file's path, size and modification time, so the cache is reused while the
folder is unchanged and rebuilt when it changes.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from vitsweep.data.splits import Split, Splits, carve_validation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def list_split(split_dir: Path, class_names: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    classes = class_names or sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a class absent from this split
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(path)
                labels.append(label)
    return paths, labels, classes


def read_image(path: Path, image_size: int, in_channels: int) -> torch.Tensor:
    """Decode one file to a (C, image_size, image_size) uint8 tensor."""
    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(in_channels, ImageReadMode.UNCHANGED)
    image = decode_image(str(path), mode=mode)
    if image.shape[0] != in_channels:
        raise ValueError(f"data.in_channels={in_channels} but {path} has {image.shape[0]} channels: set data.in_channels")
    if image.shape[-2:] != (image_size, image_size):
        image = TF.resize(image, [image_size, image_size], antialias=True)
    return image


def decode_all(paths: list[Path], image_size: int, in_channels: int) -> torch.Tensor:
    # torchvision's decoders release the GIL, so threads decode in parallel
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(lambda p: read_image(p, image_size, in_channels), paths, chunksize=256))
    return torch.stack(images)


def cache_key(root: Path, listing: dict[str, list[Path]], image_size: int, in_channels: int) -> str:
    h = hashlib.sha1(f"{root}|{image_size}|{in_channels}".encode())
    for split, paths in listing.items():
        for p in paths:
            st = p.stat()
            h.update(f"{split}|{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_imagefolder(root: str, image_size: int, in_channels: int = 3, cache_dir: str | None = None,
                     val_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    root = Path(root).expanduser().resolve()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(
            f"data.root={root} must hold train/<class>/ and test/<class>/ folders (val/ optional): "
            f"point data.root at such a tree"
        )
    train_paths, train_labels, classes = list_split(root / "train", None)
    if not train_paths:
        raise FileNotFoundError(f"data.root={root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under train/<class>/")
    listing = {"train": train_paths}
    labels = {"train": train_labels}
    for split in ("val", "test"):
        if (root / split).is_dir():
            listing[split], labels[split], _ = list_split(root / split, classes)

    key = cache_key(root, listing, image_size, in_channels)
    cache_file = Path(cache_dir).expanduser() / f"imagefolder-{root.name}-{key}.pt" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        tensors = torch.load(cache_file, weights_only=True)
    else:
        tensors = {split: decode_all(paths, image_size, in_channels) for split, paths in listing.items()}
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            torch.save(tensors, tmp)
            tmp.replace(cache_file)  # atomic: a killed run never leaves half a cache

    splits = {s: Split(tensors[s], torch.tensor(labels[s], dtype=torch.int64)) for s in listing}
    if "val" not in splits:
        splits["train"], splits["val"] = carve_validation(splits["train"], val_fraction, split_seed)
    return Splits(splits["train"], splits["val"], splits["test"], class_names=classes)
