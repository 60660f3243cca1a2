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
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from vitsweep.data.decode_progress import DecodeProgress
from vitsweep.data.splits import Split, Splits, carve_validation
from vitsweep.data.targets import class_labels_only
from vitsweep.logger.atomic_file import OutputWriteError, write_atomic

log = logging.getLogger(__name__)

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
ARRAY_EXTENSIONS = (".npy", ".tif", ".tiff")
IMAGE_EXTENSIONS = PHOTO_EXTENSIONS + ARRAY_EXTENSIONS
KEPT_DTYPES = ("uint8", "uint16", "int16", "int32", "float16", "float32")  # stored as they are
CACHE_FORMAT = 3  # bump when the decoded form changes, so old caches are not reused
DECODE_CHUNK = 256  # files a decoding thread takes at a time
BAD_FILE_POLICIES = ("error", "skip")  # data.on_bad_file: an unreadable file stops the job, or is left out


def list_split(split_dir: Path, class_names: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    classes = class_names or sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a class absent from this split
        # file names sorted as strings (Path comparisons cost 1 s on CIFAR-10's 60,000 files)
        names = sorted(entry.name for entry in os.scandir(class_dir) if entry.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(class_dir / file_name for file_name in names)
        labels.extend([label] * len(names))
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


class BadImageFile(ValueError):
    """A file the loader lists that no decoder can read (truncated, corrupt, or not an image)."""


def read_photo(path: Path, in_channels: int) -> torch.Tensor:
    """A photo file -> (C, H, W) tensor of its dtype (uint8, or uint16 for 16-bit PNGs), converted to
    in_channels where that is a colour conversion (grey <-> RGB, alpha dropped). torchvision decodes
    jpg/png/gif/webp; Pillow what it cannot (bmp, and any format a build of torchvision lacks)."""
    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(in_channels, ImageReadMode.UNCHANGED)
    if path.suffix.lower() in (".gif", ".webp"):
        mode = ImageReadMode.UNCHANGED  # their decoders ignore the mode (with a warning); converted below
    try:
        image = decode_image(str(path), mode=mode)
    except RuntimeError:
        image = read_with_pillow(path)
    if image.dim() == 4:  # an animated GIF: its first frame
        image = image[0]
    return match_channels(image, in_channels)


def read_with_pillow(path: Path) -> torch.Tensor:
    """Pillow's decoders, for what torchvision cannot read; BadImageFile when Pillow cannot either."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.load()
            if opened.mode in ("P", "1", "CMYK", "YCbCr", "LAB", "HSV"):  # palette, bilevel, print, video: to RGB(A)
                opened = opened.convert("RGBA" if "transparency" in opened.info else "RGB")
            array = np.asarray(opened)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:  # Pillow's parsers raise all of these
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadImageFile(f"{path} is not a readable image ({reason}): fix or remove it, or set "
                           f"data.on_bad_file=skip to leave unreadable files out") from None
    if array.dtype.byteorder == ">":  # big-endian 16-bit modes (I;16B): to the machine's order
        array = array.astype(array.dtype.newbyteorder("="))
    array = array[..., None] if array.ndim == 2 else array  # (H, W, C)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def match_channels(image: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(C, H, W) -> in_channels where the difference is colour, not content: RGB -> grey, grey -> RGB,
    an alpha channel dropped. Other counts are left for the caller's in_channels check."""
    channels = image.shape[0]
    if channels in (2, 4) and in_channels == channels - 1:
        return image[:-1]  # alpha dropped
    if channels in (2, 4) and in_channels in (1, 3):
        image, channels = image[:-1], channels - 1
    if channels == 3 and in_channels == 1:
        return TF.rgb_to_grayscale(image.float()).round().to(image.dtype)
    if channels == 1 and in_channels == 3:
        return image.expand(3, -1, -1).clone()
    return image


def read_image(path: Path, image_size: int, in_channels: int, channels_last: bool | None = None) -> torch.Tensor:
    """Decode one file to a (C, image_size, image_size) tensor of the file's dtype."""
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        try:
            image = read_array(path, in_channels, channels_last)
        except ValueError as err:
            if str(err).startswith(str(path)):
                raise  # our own check of its shape or dtype: a setting to change, not a broken file
            raise BadImageFile(f"{path} is not a readable array ({err}): fix or remove it, or set "
                               f"data.on_bad_file=skip to leave unreadable files out") from None
        except (OSError, EOFError, RuntimeError) as err:  # truncated .npy, corrupt TIFF
            raise BadImageFile(f"{path} is not a readable array ({type(err).__name__}: {err}): fix or remove it, "
                               f"or set data.on_bad_file=skip to leave unreadable files out") from None
    else:
        image = read_photo(path, in_channels)
    if image.shape[-3] != in_channels:
        raise ValueError(f"data.in_channels={in_channels} but {path} has {image.shape[-3]} channels: set data.in_channels")
    if image.shape[-2:] != (image_size, image_size):
        image = TF.resize(image, [image_size, image_size], antialias=True)  # keeps the dtype, uint16 included
    return image


def to_dtype(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An integer image rescaled into another integer dtype (uint16 <-> uint8 by the ratio of their maxima)
    or into float [0, 1], so that DataModule.to_float reads the same values from either."""
    if dtype.is_floating_point:
        return image.float().div(torch.iinfo(image.dtype).max).to(dtype)
    scale = torch.iinfo(dtype).max / torch.iinfo(image.dtype).max
    return (image.double() * scale).round().clamp(0, torch.iinfo(dtype).max).to(dtype)


def scalable(source: torch.dtype, target: torch.dtype) -> bool:
    """Integers scale into floats ([0, 1]) and unsigned integers into each other (uint16 <-> uint8)."""
    if source.is_floating_point:
        return False
    return target.is_floating_point or not (source.is_signed or target.is_signed)


def common_dtype(images: list[torch.Tensor], paths: list[Path]) -> list[torch.Tensor]:
    """One tensor holds one dtype: the images in a minority dtype (a few 16-bit PNGs among 8-bit JPEGs)
    are scaled into the dtype most files have, with one line saying so. Floats are not squeezed into
    integers: a float file among integer ones is refused, naming it."""
    counts: dict[torch.dtype, int] = {}
    for image in images:
        counts[image.dtype] = counts.get(image.dtype, 0) + 1
    if len(counts) < 2:
        return images
    target = max(counts, key=lambda dtype: (counts[dtype], torch.finfo(dtype).bits if dtype.is_floating_point
                                            else torch.iinfo(dtype).bits))
    for image, path in zip(images, paths):
        if image.dtype != target and not scalable(image.dtype, target):
            raise ValueError(f"{path} holds {str(image.dtype).removeprefix('torch.')} values but most files hold "
                             f"{str(target).removeprefix('torch.')}: convert the files to one dtype")
    minority = {str(d).removeprefix("torch."): n for d, n in counts.items() if d != target}
    log.info("%s of %d images are %s: scaled into %s, the dtype of the others", sum(minority.values()), len(images),
             "/".join(minority), str(target).removeprefix("torch."))
    return [image if image.dtype == target else to_dtype(image, target) for image in images]


def decode_all(paths: list[Path], image_size: int, in_channels: int, channels_last: bool | None = None,
               on_bad_file: str = "error", what: str = "images", cached: bool = False, reader=None
               ) -> tuple[torch.Tensor, list[int]]:
    """(N kept, C, image_size, image_size) tensor of the files decoded by `reader` (default read_image;
    maskfolder.read_mask for masks), and the indices of the unreadable ones left out (on_bad_file=skip;
    with error the first one is raised, naming its path)."""
    reader = reader or read_image
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"data.on_bad_file={on_bad_file} is not one of: {', '.join(BAD_FILE_POLICIES)}")

    def decode(chunk: list[Path]) -> list[torch.Tensor | BadImageFile]:
        decoded = []
        for path in chunk:
            try:
                decoded.append(reader(path, image_size, in_channels, channels_last))
            except BadImageFile as err:
                decoded.append(err)  # the caller decides: stop (error) or leave it out (skip)
                if on_bad_file == "error":
                    break
        return decoded

    progress = DecodeProgress(len(paths), what, cached)
    images, kept_paths, skipped = [], [], []
    # numpy's and tifffile's reads release the GIL, so threads read arrays in parallel; each thread takes
    # a chunk of files, not one (a task per small JPEG: 2,800 files/s on two cores; chunks: 8,000)
    workers = os.cpu_count() or 1
    size = max(1, min(DECODE_CHUNK, len(paths) // (4 * workers)))
    chunks = [paths[start:start + size] for start in range(0, len(paths), size)]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        index = 0
        for chunk in pool.map(decode, chunks):
            for image in chunk:
                if isinstance(image, BadImageFile):
                    if on_bad_file == "error":
                        raise image
                    log.warning("skipped (data.on_bad_file=skip): %s", image)
                    skipped.append(index)
                else:
                    images.append(image)
                    kept_paths.append(paths[index])
                index += 1
            progress.update(len(chunk))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # an error or a signal does not wait for the rest
    progress.close(skipped=len(skipped))
    if not images:
        raise ValueError(f"none of the {len(paths)} files of {what} could be read: see the lines above")
    shapes = {tuple(image.shape[:-3]): path for image, path in zip(images, kept_paths)}
    if len(shapes) > 1:  # time series (4-D arrays) of different lengths, or mixed with images
        (first, a), (second, b) = list(shapes.items())[:2]
        raise ValueError(f"{a} has {first[0] if first else 1} frame(s) but {b} has {second[0] if second else 1}: "
                         f"every sample of a dataset needs the same number of frames")
    return torch.stack(common_dtype(images, kept_paths)), skipped


def cache_key(listing: dict[str, list[Path]], image_size: int, in_channels: int, channels_last: bool | None) -> str:
    """Every file's absolute path, size and modification time (folders resolved once each: resolving
    each of 60,000 paths took 3 s)."""
    h = hashlib.sha1(f"{CACHE_FORMAT}|{image_size}|{in_channels}|{channels_last}".encode())
    folders: dict[Path, Path] = {}
    for split, paths in listing.items():
        for p in paths:
            folder = folders.get(p.parent) or folders.setdefault(p.parent, p.parent.resolve())
            st = os.stat(p)
            h.update(f"{split}|{folder / p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_cache(cache_file: Path, listing: dict[str, list[Path]]) -> dict | None:
    """The cache's {"tensors", "skipped"} when it is whole and matches the listing; None (with one warning,
    the file removed) when it cannot be read: a killed copy, a full disk, a truncated file."""
    try:
        cached = torch.load(cache_file, weights_only=True)
        tensors, skipped = cached["tensors"], cached["skipped"]
        for split, paths in listing.items():
            if len(tensors[split]) != len(paths) - len(skipped[split]):
                raise ValueError(f"{split} holds {len(tensors[split])} images for {len(paths)} files")
        return cached
    except Exception as err:  # noqa: BLE001 -- any damage: decode again
        reason = (str(err).strip().splitlines() or [""])[0][:120]
        log.warning("data cache %s is unreadable (%s: %s): rebuilding it", cache_file, type(err).__name__, reason)
        cache_file.unlink(missing_ok=True)
        return None


def decode_cached(listing: dict[str, list[Path]], image_size: int, in_channels: int, channels_last: bool | None,
                  cache_dir: str | None, name: str, on_bad_file: str = "error", reader=None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """({split: (N, C, image_size, image_size) tensor (masks: (N, S, S) with reader=read_mask)}, {split:
    indices of unreadable files left out}) for the files of each split, read from the disk cache `cache_dir/<name>-<key>.pt` while every file is
    unchanged, decoded (and cached) otherwise."""
    key = cache_key(listing, image_size, in_channels, channels_last)
    cache_file = Path(cache_dir).expanduser() / f"{name}-{key}.pt" if cache_dir else None
    cached = read_cache(cache_file, listing) if cache_file is not None and cache_file.exists() else None
    if cached is None:
        paths = [path for split_paths in listing.values() for path in split_paths]  # all splits: one dtype
        images, skipped_all = decode_all(paths, image_size, in_channels, channels_last, on_bad_file, what=name,
                                         cached=cache_file is not None, reader=reader)
        cached = {"tensors": {}, "skipped": {}}
        start, kept_start, skipped_all = 0, 0, set(skipped_all)
        for split, split_paths in listing.items():
            skipped = [i - start for i in range(start, start + len(split_paths)) if i in skipped_all]
            kept = len(split_paths) - len(skipped)
            cached["tensors"][split], cached["skipped"][split] = images[kept_start:kept_start + kept].clone(), skipped
            start, kept_start = start + len(split_paths), kept_start + kept
        if cache_file is not None:
            try:  # atomic and synced: a killed run never leaves half a cache
                write_atomic(cache_file, lambda f: torch.save(cached, f))
            except OutputWriteError as err:
                log.warning("data cache not written, continuing without it: %s", err)
    skipped_files = [listing[split][i] for split in listing for i in cached["skipped"][split]]
    if skipped_files and on_bad_file == "error":  # a cache built with on_bad_file=skip
        raise BadImageFile(f"{skipped_files[0]} is not a readable image ({len(skipped_files)} such files): fix or "
                           f"remove it, or set data.on_bad_file=skip to leave unreadable files out")
    return cached["tensors"], cached["skipped"]


def load_imagefolder(root: str, image_size: int, in_channels: int = 3, channels_last: bool | None = None,
                     cache_dir: str | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                     on_bad_file: str = "error", targets: dict | None = None) -> Splits:
    class_labels_only(targets, "imagefolder")
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

    tensors, skipped = decode_cached(listing, image_size, in_channels, channels_last, cache_dir,
                                     f"imagefolder-{root.name}", on_bad_file)
    splits = {s: Split(tensors[s], torch.tensor(kept(labels[s], skipped[s]), dtype=torch.int64)) for s in listing}
    if "val" not in splits:
        splits["train"], splits["val"] = carve_validation(splits["train"], val_fraction, split_seed)
    return Splits(splits["train"], splits["val"], splits["test"], class_names=classes,
                  skipped_files=[str(listing[s][i]) for s in listing for i in skipped[s]])


def kept(items: list, skipped: list[int]) -> list:
    """`items` without the positions of the files left out (data.on_bad_file=skip)."""
    left_out = set(skipped)
    return [item for i, item in enumerate(items) if i not in left_out]
