"""A class-per-folder tree of images: `root/train/<class>/*`, `root/test/<class>/*`, optional `root/val/`.

Files are photos (.jpg .jpeg .png .bmp .gif .webp, decoded by torchvision) or arrays with any channel
count (.npy, and .tif/.tiff through tifffile: multispectral bands). Each file is decoded and resized
to image_size once, keeping its dtype: uint8 stays uint8, uint16 / int16 / float32 arrays are kept as
they are (float64 becomes float32), and DataModule.to_float scales integers into [0, 1] per batch.
The tensors are cached on disk under `cache_dir`; the cache key covers every file's path, size and
modification time, so the cache is reused while the files are unchanged and rebuilt when one changes.
data=csv decodes and caches its files through the same functions.

Array axes: a 2-D array is one band (H, W). A 3-D array is (H, W, C) with data.channels_last=true or
(C, H, W) with false; null detects the channel axis as the end whose length is data.in_channels, and
asks for the setting when both ends match (e.g. (3, 32, 3)). A 4-D array is a time series of T frames,
(T, H, W, C) or (T, C, H, W) by the same rule: the sample becomes (T, C, H, W), and a dataset of them
(N, T, C, H, W) (every sample with the same T).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from vitsweep.data.splits import Split, Splits, carve_validation, check_class_labels_only

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
ARRAY_EXTENSIONS = (".npy", ".tif", ".tiff")
IMAGE_EXTENSIONS = PHOTO_EXTENSIONS + ARRAY_EXTENSIONS
KEPT_DTYPES = ("uint8", "uint16", "int16", "int32", "float16", "float32")  # stored as they are
CACHE_FORMAT = 2  # bump when the decoded form changes, so old caches are not reused


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


def read_array(path: Path, in_channels: int, channels_last: bool | None) -> torch.Tensor:
    """An .npy / .tif array -> (C, H, W) tensor of its own dtype; a 4-D one (a time series) -> (T, C, H, W)."""
    array = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else tifffile.imread(path)
    if array.ndim == 2:
        array = array[None]  # one band
    elif array.ndim in (3, 4):
        frame = array.shape[-3:]  # one image; a 4-D array is frames of them along its first axis
        if channels_last is None:
            first, last = frame[0] == in_channels, frame[-1] == in_channels
            if first == last:
                problem = "both ends" if first else "neither end"
                frames = " (of each frame)" if array.ndim == 4 else ""
                raise ValueError(f"{path} has shape {tuple(array.shape)}: {problem} matches data.in_channels="
                                 f"{in_channels}{frames}; set data.in_channels, or data.channels_last=true "
                                 f"for (H, W, C) / false for (C, H, W)")
            channels_last = last
        if channels_last:
            array = np.moveaxis(array, -1, -3)
    else:
        raise ValueError(f"{path} has shape {tuple(array.shape)}: arrays must be (H, W), (H, W, C) or (C, H, W), "
                         f"or (T, H, W, C) / (T, C, H, W) for a time series")
    if array.dtype == np.float64:
        array = array.astype(np.float32)  # the model computes in float32 at most
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype.name not in KEPT_DTYPES:
        raise ValueError(f"{path} holds {array.dtype} values: convert it to one of {', '.join(KEPT_DTYPES)}, float64")
    return torch.from_numpy(np.ascontiguousarray(array))


def read_image(path: Path, image_size: int, in_channels: int, channels_last: bool | None = None) -> torch.Tensor:
    """Decode one file to a (C, image_size, image_size) tensor of the file's dtype."""
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        image = read_array(path, in_channels, channels_last)
    else:
        mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(in_channels, ImageReadMode.UNCHANGED)
        image = decode_image(str(path), mode=mode)
    if image.shape[-3] != in_channels:
        raise ValueError(f"data.in_channels={in_channels} but {path} has {image.shape[-3]} channels: set data.in_channels")
    if image.shape[-2:] != (image_size, image_size):
        image = TF.resize(image, [image_size, image_size], antialias=True)  # keeps the dtype, uint16 included
    return image


def decode_all(paths: list[Path], image_size: int, in_channels: int, channels_last: bool | None = None,
               reader=None) -> torch.Tensor:
    """The files decoded by `reader` (default read_image; maskfolder.read_mask for masks) and stacked."""
    reader = reader or read_image
    # torchvision's decoders and numpy's reads release the GIL, so threads decode in parallel
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(lambda p: reader(p, image_size, in_channels, channels_last), paths,
                               chunksize=256))
    dtypes = sorted({str(image.dtype).removeprefix("torch.") for image in images})
    if len(dtypes) > 1:  # one tensor, one dtype, one scale in to_float
        raise ValueError(f"the image files mix dtypes ({', '.join(dtypes)}): convert them to one dtype")
    shapes = {tuple(image.shape[:-3]): path for image, path in zip(images, paths)}
    if len(shapes) > 1:  # time series (4-D arrays) of different lengths, or mixed with images
        (first, a), (second, b) = list(shapes.items())[:2]
        raise ValueError(f"{a} has {first[0] if first else 1} frame(s) but {b} has {second[0] if second else 1}: "
                         f"every sample of a dataset needs the same number of frames")
    return torch.stack(images)


def cache_key(listing: dict[str, list[Path]], image_size: int, in_channels: int, channels_last: bool | None) -> str:
    h = hashlib.sha1(f"{CACHE_FORMAT}|{image_size}|{in_channels}|{channels_last}".encode())
    for split, paths in listing.items():
        for p in paths:
            st = p.stat()
            h.update(f"{split}|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def decode_cached(listing: dict[str, list[Path]], image_size: int, in_channels: int, channels_last: bool | None,
                  cache_dir: str | None, name: str, reader=None) -> dict[str, torch.Tensor]:
    """{split: (N, C, image_size, image_size) tensor} for the files of each split (masks: (N, S, S) with
    reader=read_mask), read from the disk cache `cache_dir/<name>-<key>.pt` while every file is unchanged,
    decoded (and cached) otherwise."""
    key = cache_key(listing, image_size, in_channels, channels_last)
    cache_file = Path(cache_dir).expanduser() / f"{name}-{key}.pt" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        return torch.load(cache_file, weights_only=True)
    tensors = {split: decode_all(paths, image_size, in_channels, channels_last, reader)
               for split, paths in listing.items()}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(tensors, tmp)
        tmp.replace(cache_file)  # atomic: a killed run never leaves half a cache
    return tensors


def load_imagefolder(root: str, image_size: int, in_channels: int = 3, channels_last: bool | None = None,
                     cache_dir: str | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                     targets: dict | None = None) -> Splits:
    check_class_labels_only("imagefolder", targets)
    root = Path(root).expanduser().resolve()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(
            f"data.root={root} must hold train/<class>/ and test/<class>/ folders (val/ optional): "
            f"point data.root at such a tree"
        )
    listing, labels, classes = {}, {}, None
    for split in ("train", "val", "test"):
        if (root / split).is_dir():
            listing[split], labels[split], classes = list_split(root / split, classes)
            if not listing[split]:
                hint = "remove the empty val/ (val is then carved from train)" if split == "val" else "add some"
                raise FileNotFoundError(f"data.root={root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                                        f"{split}/<class>/: {hint}")

    tensors = decode_cached(listing, image_size, in_channels, channels_last, cache_dir, f"imagefolder-{root.name}")
    splits = {s: Split(tensors[s], torch.tensor(labels[s], dtype=torch.int64)) for s in listing}
    if "val" not in splits:
        splits["train"], splits["val"] = carve_validation(splits["train"], val_fraction, split_seed)
    return Splits(splits["train"], splits["val"], splits["test"], class_names=classes)
