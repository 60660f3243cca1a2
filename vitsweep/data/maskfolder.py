"""Images with a segmentation mask each (data=maskfolder), for task=segmentation:

    DIR/train/images/<name>.<ext>      photos or arrays of any channel count (what data=imagefolder reads)
    DIR/train/masks/<name>.png|.npy    the class index of every pixel (uint8; 255 = no label)
    DIR/test/...                       the same; DIR/val/... optional (else carved from train)
    DIR/classes.txt                    optional: one class name per line, in index order

A mask is matched to its image by file stem. Masks are resized to image_size by nearest neighbour (a
label is never interpolated); images as in data=imagefolder. Both are decoded once and cached under
`cache_dir` while the files are unchanged. data=csv reads a column of mask paths with the same reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vitsweep.data.imagefolder import IMAGE_EXTENSIONS, decode_cached
from vitsweep.data.splits import Split, Splits, carve_validation
from vitsweep.data.targets import masks_only

MASK_EXTENSIONS = (".png", ".npy")


def read_mask(path: Path, image_size: int, in_channels: int = 1, channels_last: bool | None = None) -> torch.Tensor:
    """One mask file -> (image_size, image_size) uint8 class indices (255: no label)."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2 or array.dtype.kind not in "iub":
            raise ValueError(f"{path} holds a {array.ndim}-D {array.dtype} array: a mask is (H, W) integer class indices")
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{path} holds class indices outside 0..255: masks store uint8 (255 = no label)")
        mask = torch.from_numpy(array.astype(np.uint8))
    elif path.suffix.lower() == ".png":
        mask = decode_image(str(path), mode=ImageReadMode.GRAY)[0]
        if mask.dtype != torch.uint8:
            raise ValueError(f"{path} is a {mask.dtype} PNG: masks are 8-bit PNGs of class indices")
    else:
        raise ValueError(f"{path}: masks are .png or .npy files of class indices")
    if tuple(mask.shape) != (image_size, image_size):
        mask = TF.resize(mask[None], [image_size, image_size], interpolation=InterpolationMode.NEAREST)[0]
    return mask


def paired_files(split_dir: Path) -> tuple[list[Path], list[Path]]:
    """(image paths, mask paths) of one split, matched by file stem, sorted."""
    images = {p.stem: p for p in sorted((split_dir / "images").iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    masks = {p.stem: p for p in sorted((split_dir / "masks").iterdir()) if p.suffix.lower() in MASK_EXTENSIONS}
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise FileNotFoundError(f"{split_dir}: {len(unmatched)} image(s) or mask(s) without their pair, e.g. "
                                f"{unmatched[0]}: every images/<name>.* needs masks/<name>.png|.npy")
    if not images:
        raise FileNotFoundError(f"{split_dir}/images holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    names = sorted(images)
    return [images[n] for n in names], [masks[n] for n in names]


def load_maskfolder(root: str, image_size: int, in_channels: int = 3, num_classes: int | None = None,
                    channels_last: bool | None = None, cache_dir: str | None = None, val_fraction: float = 0.1,
                    split_seed: int = 0, targets: dict | None = None) -> Splits:
    masks_only(targets, "maskfolder")
    root = Path(root).expanduser().resolve()
    splits_present = [s for s in ("train", "val", "test") if (root / s / "images").is_dir()]
    if "train" not in splits_present or "test" not in splits_present:
        raise FileNotFoundError(f"data.root={root} must hold train/images, train/masks, test/images and test/masks "
                                f"(val/ optional): point data.root at such a tree")
    images, masks = {}, {}
    for split in splits_present:
        images[split], masks[split] = paired_files(root / split)
    name = f"maskfolder-{root.name}"
    image_tensors, _ = decode_cached(images, image_size, in_channels, channels_last, cache_dir, name)
    mask_tensors, _ = decode_cached(masks, image_size, 1, None, cache_dir, f"{name}-masks", reader=read_mask)
    splits = {s: Split(image_tensors[s], mask_tensors[s]) for s in splits_present}
    if "val" not in splits:
        splits["train"], splits["val"] = carve_validation(splits["train"], val_fraction, split_seed)
    classes_file = root / "classes.txt"
    class_names = (classes_file.read_text().split("\n") if classes_file.is_file()
                   else [str(k) for k in range(num_classes or 0)])
    return Splits(splits["train"], splits["val"], splits["test"], [c for c in class_names if c])
