"""Batches straight from the in-memory tensors, on the training device.

No DataLoader, no worker processes, no per-sample PIL work: each epoch is one seeded permutation (or
one seeded weighted draw, with data.balance_ratio), and a batch is an index into a tensor that already
lives on the device. Conversion to float, cropping, augmentation (vitsweep.augment) and normalization
all run batched where the model runs.

The input data strategy (docs/parameters.md, "Input Data Strategy") lives here:
- crop_size: the stored images keep image_size, the decode size; the model sees crop_size windows:
  a random one per sample for training, the centre one for evaluation, or with eval_crop=tiled a grid
  of windows covering the image, whose logits the trainer averages.
- normalization: fixed (data.mean / data.std) or auto: the per-channel statistics of the training
  split, computed once at start, before augmentation; checkpoints store them and eval mode reuses them.
- balance_ratio: the share of balance_class in each training epoch, by weighted sampling with
  replacement, still a function of (seed, epoch) only, so resume is exact.
- label_granularity: image (a label per image), pixel (a mask per image: a class per pixel) or patch
  (masks whose labels the task reads per patch token); masks are cropped, resized and augmented with
  their images (vitsweep.data.splits.is_mask).
- resize_to: every batch (after cropping, before augmentation) is resized on the device to this side,
  e.g. 32 px CIFAR-10 to the 224 px a pretrained ViT-S/16 expects; the stored images stay small.

Time series and metadata (vitsweep.data.inputs): samples of T frames are batched (B, T, C, H, W), every
frame of a sample cut at its sample's crop window; samples that carry metadata or dates come as an
`Inputs` holding them beside the images. `metadata_spec` gives the model the metadata columns and their
training statistics; `input_summary` what the run's summary records (frames, missing metadata cells).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from vitsweep.data.crops import random_crops
from vitsweep.data.inputs import Batch, Inputs
from vitsweep.data.splits import Split, Splits, Targets, map_masks, map_targets
from vitsweep.data.targets import TargetReader, reader_for

NORMALIZATIONS = ("fixed", "auto")
EVAL_CROPS = ("center", "tiled")
LABEL_GRANULARITIES = ("auto", "image", "patch", "pixel")  # auto: the task's own (segmentation: pixel)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Stored batch -> float32: integer images scaled by their dtype's maximum into [0, 1] (uint8 / 255,
    uint16 / 65535), float arrays as stored."""
    if images.is_floating_point():
        return images.float()
    return images.float().div_(torch.iinfo(images.dtype).max)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of to_float(images) (N, C, H, W) over every pixel (of every frame, for
    time series (N, T, C, H, W)), in float64 chunks."""
    images = images.flatten(0, 1) if images.dim() == 5 else images  # frames are images alike
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = to_float(images[start:start + chunk]).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)  # a constant band stays finite
    return mean.tolist(), std.tolist()


def tile_offsets(image_size: int, crop_size: int) -> list[int]:
    """Window offsets along one side for eval_crop=tiled: as few windows as cover the side, evenly spread."""
    n = math.ceil(image_size / crop_size)
    if n == 1:
        return [0]
    return [round(i * (image_size - crop_size) / (n - 1)) for i in range(n)]


def members_of(labels: torch.Tensor, class_index: int) -> torch.Tensor:
    """(N,) bool: samples labelled class_index (single-label) or carrying it (multi-hot (N, K))."""
    return labels == class_index if labels.dim() == 1 else labels[:, class_index] > 0.5


def trained_normalization(checkpoint: dict) -> dict:
    """DataModule arguments that make eval mode normalize with the statistics the checkpoint's run
    computed (data.normalization=auto), instead of recomputing them on whatever data eval reads."""
    data_cfg = (checkpoint.get("config") or {}).get("data") or {}
    if data_cfg.get("normalization") != "auto":
        return {}
    return {"normalization": "fixed", "mean": data_cfg["mean"], "std": data_cfg["std"]}


class DataModule:
    def __init__(self, source: Splits, image_size: int, in_channels: int, num_classes: int,
                 batch_size: int = 128, eval_batch_size: int = 512,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 normalization: str = "fixed", crop_size: int | None = None, eval_crop: str = "center",
                 balance_ratio: float | None = None, balance_class: int | str | None = None,
                 label_granularity: str = "auto", root: str | None = None, channels_last: bool | None = None,
                 resize_to: int | None = None, on_bad_file: str = "error",
                 targets: dict[str, TargetReader] | None = None):
        # root, channels_last and on_bad_file are read by `source` (as ${..root}): they sit at the top of
        # data/*.yaml because that is where users set them, and the DataModule itself has no use for them.
        # targets: the task's readers (the same the source read with), for target_summary
        if label_granularity not in LABEL_GRANULARITIES:
            raise ValueError(f"data.label_granularity={label_granularity} is not one of: "
                             f"{', '.join(LABEL_GRANULARITIES)}")
        self.label_granularity = label_granularity
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("in_channels", in_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key}={value} must be a whole number >= 1")
        empty = [name for name in ("train", "val", "test") if not len(getattr(source, name))]
        if empty:
            raise ValueError(f"data: the {' and '.join(empty)} split holds no images: check data.root / data.source")
        self.splits, self.targets = source, dict(targets or {})
        class_names = source.class_names
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        train = self.splits.train
        if train.images.shape[-3] != in_channels:  # (N, C, H, W), or (N, T, C, H, W) for time series
            raise ValueError(f"data.in_channels={in_channels} but the images have {train.images.shape[-3]} channels: "
                             f"set data.in_channels={train.images.shape[-3]}")
        if tuple(train.images.shape[-2:]) != (image_size, image_size):
            raise ValueError(f"data.image_size={image_size} but the images are {tuple(train.images.shape[-2:])}: "
                             f"set data.image_size to match")
        if isinstance(class_names, list) and len(class_names) and len(class_names) != num_classes:
            raise ValueError(f"data.num_classes={num_classes} but the data has {len(class_names)} classes "
                             f"({', '.join(class_names[:5])}...): set data.num_classes={len(class_names)}")
        labels = train.labels  # class labels: (N,) integers, or (N, K) multi-hot floats with class names
        single_label = isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point()
        multi_hot = (isinstance(labels, torch.Tensor) and labels.dim() == 2 and isinstance(class_names, list)
                     and labels.shape[1] == len(class_names) == num_classes)
        present = (len(labels.unique()) if single_label else int((labels.sum(0) > 0).sum()) if multi_hot else None)
        if present is not None and (num_classes < 2 or present < 2):  # refused here, not after an epoch (torchmetrics needs 2 classes)
            raise ValueError(f"data.num_classes={num_classes} and the training split holds {present} class(es): a "
                             f"classifier needs at least 2 classes to train on: add images of another class")

        self.crop_size = image_size if crop_size is None else crop_size
        if not 0 < self.crop_size <= image_size:
            raise ValueError(f"data.crop_size={crop_size} must be in [1, data.image_size={image_size}]: crops are "
                             f"cut from the images as decoded; raise data.image_size to crop from larger images")
        if eval_crop not in EVAL_CROPS:
            raise ValueError(f"data.eval_crop={eval_crop} is not one of: {', '.join(EVAL_CROPS)}")
        self.center_offset = (image_size - self.crop_size) // 2
        self.eval_offsets = (tile_offsets(image_size, self.crop_size) if eval_crop == "tiled"
                             else [self.center_offset])
        self.eval_views = len(self.eval_offsets) ** 2  # windows per image in the trainer's evaluation
        if resize_to is not None and resize_to < 1:
            raise ValueError(f"data.resize_to={resize_to} must be a side in pixels (e.g. 224), or null")
        self.resize_to = resize_to  # batches are resized on the device to this side (pretrained models' input size)

        if normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization={normalization} is not one of: {', '.join(NORMALIZATIONS)}")
        if normalization == "auto":  # from the stored training images: after decode, before augmentation
            mean, std = channel_stats(train.images)
        # (1, C, 1, 1) broadcasts over images (B, C, H, W) and frames (B, T, C, H, W) alike
        self.mean = torch.tensor(mean if mean is not None else [0.5] * in_channels).view(1, -1, 1, 1)
        self.std = torch.tensor(std if std is not None else [0.5] * in_channels).view(1, -1, 1, 1)
        if self.mean.numel() != in_channels or self.std.numel() != in_channels:
            raise ValueError(f"data.mean/data.std need {in_channels} values (one per channel), "
                             f"got {self.mean.numel()} and {self.std.numel()}: or set data.normalization=auto")

        self.sample_weights = None  # (N,) float64 on the CPU, for the seeded draw of each epoch
        if balance_ratio is not None:
            self.sample_weights = self.balance_weights(balance_ratio, balance_class)
        self.device = torch.device("cpu")

    def balance_weights(self, ratio: float, balance_class: int | str | None) -> torch.Tensor:
        """Per-sample weights under which `balance_class` makes up `ratio` of the draws."""
        if not 0 < ratio < 1:
            raise ValueError(f"data.balance_ratio={ratio} is the share of data.balance_class in each training "
                             f"epoch: use a value in (0, 1), or null for the natural share")
        if balance_class is None:
            raise ValueError(f"data.balance_ratio={ratio} needs data.balance_class: the class index or name whose "
                             f"share it sets, e.g. data.balance_class=1")
        names = self.class_names()
        if isinstance(balance_class, str) and balance_class in names:
            index = names.index(balance_class)
        elif isinstance(balance_class, int) and 0 <= balance_class < self.num_classes:
            index = balance_class
        else:
            raise ValueError(f"data.balance_class={balance_class} is not a class index in [0, {self.num_classes}) "
                             f"nor a class name ({', '.join(names[:10])})")
        labels = self.splits.train.labels
        if isinstance(labels, dict) or labels.is_floating_point() and labels.dim() == 1 or labels.dim() > 2:
            raise ValueError(f"data.balance_ratio={ratio} balances a class, but these targets are not one class "
                             f"label per image: drop data.balance_ratio")
        members = members_of(labels, index).cpu()
        count = int(members.sum())
        if count in (0, len(members)):
            raise ValueError(f"data.balance_class={balance_class}: {count} of the {len(members)} training samples are "
                             f"in it, so no weighting can make its share {ratio}: pick a class with and without members")
        return torch.where(members, ratio / count, (1 - ratio) / (len(members) - count)).double()

    def to(self, device: torch.device) -> DataModule:
        """Move every split to the device once (CIFAR-10 as uint8 is 180 MB)."""
        self.device = torch.device(device)
        for name in ("train", "val", "test"):  # images, labels, metadata, categories, dates
            setattr(self.splits, name, getattr(self.splits, name).map_rows(lambda t: t.to(self.device)))
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def split(self, name: str) -> Split:
        return getattr(self.splits, name)

    # ------------------------------------------------------------- what tasks read besides batches (DatasetInfo)

    def class_names(self, target: str | None = None) -> list[str]:
        """The class names of `target` (a task's target name; None: the only one), [] when it has none."""
        names = self.splits.class_names
        if isinstance(names, dict):
            return list(names.get(target, [])) if target is not None else []
        return list(names or [])

    def target_summary(self, target: str | None = None, split: str = "train") -> dict:
        """The targets of a split summarized by their reader (vitsweep/data/targets.py): shape, dtype, counts."""
        labels = self.split(split).labels
        if isinstance(labels, dict):
            labels = labels[target]
        elif len(self.targets) > 1:
            raise ValueError(f"the task reads {len(self.targets)} targets ({', '.join(self.targets)}), but the data gives "
                             f"one target per image: use data=csv or data=synthetic, which read every target")
        reader = self.targets.get(target) if target is not None else None
        if reader is None and len(self.targets) == 1:
            reader = next(iter(self.targets.values()))
        return (reader or reader_for(labels)).summarize(labels)  # readers unknown (built in Python): by form

    @property
    def frames(self) -> int | None:
        """T of a time series (N, T, C, H, W), None for images."""
        return self.splits.train.frames

    @property
    def balanced(self) -> bool:
        """Whether each training epoch is a weighted draw (data.balance_ratio)."""
        return self.sample_weights is not None

    def use_all_splits(self) -> None:
        """Train on the images of every split, unlabelled (-1): self-supervised pretraining's use_all_splits."""
        splits = self.splits
        images = torch.cat([splits.train.images, splits.val.images, splits.test.images])
        splits.train = Split(images, torch.full((len(images),), -1, dtype=torch.int64, device=images.device))

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        return to_float(images)

    def resize(self, images: torch.Tensor, targets: Targets):
        """Float batch (B, C, h, w) -> (B, C, resize_to, resize_to), bicubic (antialiased when shrinking), and
        the masks among the targets by nearest neighbour; unchanged when resize_to is null. Runs on the
        device, batched: 32 px CIFAR to 224 px for a ViT-S/16. Frames (B, T, C, h, w) likewise."""
        if self.resize_to is None or tuple(images.shape[-2:]) == (self.resize_to, self.resize_to):
            return images, targets
        size = (self.resize_to, self.resize_to)
        targets = map_masks(lambda m: F.interpolate(m[:, None].float(), size=size, mode="nearest")[:, 0].to(m.dtype),
                            targets, images)
        shrinking = self.resize_to < max(images.shape[-2:])
        planes = images.flatten(1, 2) if images.dim() == 5 else images  # frames: (B, T * C, h, w)
        resized = F.interpolate(planes, size=size, mode="bicubic", align_corners=False,
                                antialias=shrinking)  # not clamped: float arrays (reflectances) keep their range
        return resized.view(*images.shape[:-2], *size), targets

    def normalize(self, batch: Batch) -> Batch:
        """(x - mean) / std per channel, of images, frames, or an Inputs' images (its metadata is the model's
        to standardize)."""
        if isinstance(batch, Inputs):
            return batch.with_images(self.normalize(batch.images))
        return (batch - self.mean) / self.std

    def normalization_stats(self) -> dict[str, list[float]]:
        """The per-channel mean and std in use (the computed ones with normalization=auto)."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def model_inputs(self, split: Split, images: torch.Tensor, index, views: int = 1) -> Batch:
        """What the model reads for the samples `index` of `split`, whose images (each `views` times) are
        `images`: the images alone, or an Inputs with their metadata, categories and dates."""
        if split.metadata is None and split.categories is None and split.dates is None:
            return images
        inputs = Inputs(images, split.metadata, split.categories, split.dates).map_extras(lambda t: t[index])
        return inputs.map_extras(lambda t: t.repeat_interleave(views, dim=0)) if views > 1 else inputs

    def metadata_spec(self) -> dict:
        """The metadata the model reads (vitsweep.model.metadata): numeric column names with the training
        split's mean and std (over the cells present), and each categorical column's number of values."""
        train = self.splits.train
        spec = {"numeric": list(self.splits.metadata_columns), "mean": [], "std": [],
                "categorical": {name: len(values) for name, values in self.splits.category_values.items()}}
        if train.metadata is not None:
            values = train.metadata.double().cpu()
            present = ~values.isnan()
            count = present.sum(dim=0).clamp_min(1)
            mean = torch.where(present, values, 0).sum(dim=0) / count
            var = torch.where(present, values - mean, 0).square().sum(dim=0) / (count - 1).clamp_min(1)
            spec["mean"], spec["std"] = mean.tolist(), var.sqrt().clamp_min(1e-6).tolist()  # a constant column: finite
            if not spec["numeric"]:  # a loader that names no columns
                spec["numeric"] = [f"metadata_{j}" for j in range(values.shape[1])]
        return spec

    def input_summary(self) -> dict:
        """For summary.json: frames per sample and dates (time series), the metadata columns and how many of
        their cells are missing, per split and column; {} for image datasets without metadata."""
        summary = {}
        train = self.splits.train
        if train.frames is not None:
            summary["frames"] = train.frames
            summary["dates"] = train.dates is not None
        if train.metadata is not None or train.categories is not None:
            names = self.metadata_spec()["numeric"] + list(self.splits.category_values)
            missing = {}
            for split_name in ("train", "val", "test"):
                split = self.split(split_name)
                counts = ([] if split.metadata is None else split.metadata.isnan().sum(dim=0).tolist()) + \
                         ([] if split.categories is None else (split.categories < 0).sum(dim=0).tolist())
                missing[split_name] = dict(zip(names, counts))
            summary["metadata"] = {"columns": names, "missing": missing,
                                   "missing_cells": sum(sum(counts.values()) for counts in missing.values())}
        return summary

    def steps_per_epoch(self) -> int:
        return len(self.splits.train) // self.batch_size  # drop_last, so every step has a full batch

    def epoch_order(self, epoch: int, seed: int) -> torch.Tensor:
        """The training sample indices of an epoch: a function of (seed, epoch) only."""
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        n = len(self.splits.train)
        if self.sample_weights is None:
            return torch.randperm(n, generator=generator)
        return torch.multinomial(self.sample_weights, n, replacement=True, generator=generator)

    def train_batches(self, epoch: int, seed: int, skip: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[tuple[torch.Tensor, Targets]]:
        """Shuffled (images in [0, 1], targets) batches; the order depends only on (seed, epoch), so a
        resumed run sees the same batches. `skip` drops the first batches (mid-epoch resume). Crop
        positions come from the global RNG, which the trainer seeds per epoch and checkpoints mid-epoch.
        Data-parallel: batch_size is the global batch; rank r of world_size gets its r-th equal share."""
        train = self.splits.train
        order = self.epoch_order(epoch, seed).to(self.device)
        share = self.batch_size // world_size
        for step in range(skip, self.steps_per_epoch()):
            index = order[step * self.batch_size + rank * share:step * self.batch_size + (rank + 1) * share]
            images, targets = train.images[index], map_targets(lambda t, index=index: t[index], train.labels)
            if self.crop_size < self.image_size:  # on the stored dtype: fewer bytes to move
                images, targets = random_crops(images, self.crop_size, targets)
            images, targets = self.resize(self.to_float(images), targets)
            yield self.model_inputs(train, images, index), targets  # with their metadata and dates, if any

    def average_views(self, outputs):
        """(B * eval_views, ...) outputs of each image's eval windows (eval_crop=tiled) -> (B, ...) means."""
        views = self.eval_views
        if views == 1:
            return outputs
        if isinstance(outputs, dict):
            return {name: self.average_views(value) for name, value in outputs.items()}
        return outputs.view(-1, views, *outputs.shape[1:]).mean(dim=1)

    def eval_windows(self, images: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        """(B, C, S, S) -> (B * len(offsets)**2, C, crop, crop): each image's windows, consecutive
        (masks (B, S, S) likewise)."""
        if self.crop_size == self.image_size:
            return images
        size = self.crop_size
        windows = [images[..., top:top + size, left:left + size] for top in offsets for left in offsets]
        return torch.stack(windows, dim=1).flatten(0, 1)

    def eval_batches(self, split: str, all_views: bool = False, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, Targets]]:
        """(images in [0, 1], targets) of a split, in order: one input per target, the centre window when
        cropping (masks cut to the same window). all_views (the trainer's evaluation): every window of
        data.eval_crop per image, consecutive, (B * eval_views, C, crop, crop); the trainer averages
        each image's outputs over them. Data-parallel: rank r of world_size gets the r-th contiguous share
        of the same batches."""
        data = self.split(split)
        offsets = self.eval_offsets if all_views else [self.center_offset]
        per_batch = max(1, self.eval_batch_size // len(offsets) ** 2)
        starts = range(0, len(data), per_batch)
        for start in starts[rank * len(starts) // world_size:(rank + 1) * len(starts) // world_size]:
            stored = data.images[start:start + per_batch]
            targets = map_targets(lambda t, start=start: t[start:start + per_batch], data.labels)
            targets = map_masks(lambda m: self.eval_windows(m[:, None], [self.center_offset])[:, 0], targets, stored)
            images, targets = self.resize(self.to_float(self.eval_windows(stored, offsets)), targets)
            yield self.model_inputs(data, images, slice(start, start + per_batch), views=len(offsets) ** 2), targets
