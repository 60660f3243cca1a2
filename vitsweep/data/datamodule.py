"""Batches straight from the in-memory uint8 tensors, on the training device.

No DataLoader, no worker processes, no per-sample PIL work: each epoch is one seeded permutation,
and a batch is an index into a tensor that already lives on the device. Conversion to float,
augmentation (vitsweep.augment) and normalization all run batched where the model runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from vitsweep.data.splits import Split, Splits


class DataModule:
    def __init__(self, source: Splits, image_size: int, in_channels: int, num_classes: int,
                 batch_size: int = 128, eval_batch_size: int = 512,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.splits, self.class_names = source, source.class_names
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        train = self.splits.train
        if train.images.shape[1] != in_channels:
            raise ValueError(f"data.in_channels={in_channels} but the images have {train.images.shape[1]} channels: "
                             f"set data.in_channels={train.images.shape[1]}")
        if tuple(train.images.shape[-2:]) != (image_size, image_size):
            raise ValueError(f"data.image_size={image_size} but the images are {tuple(train.images.shape[-2:])}: "
                             f"set data.image_size to match")
        if len(self.class_names) and len(self.class_names) != num_classes:
            raise ValueError(f"data.num_classes={num_classes} but the data has {len(self.class_names)} classes "
                             f"({', '.join(self.class_names[:5])}...): set data.num_classes={len(self.class_names)}")
        self.mean = torch.tensor(mean if mean is not None else [0.5] * in_channels).view(1, -1, 1, 1)
        self.std = torch.tensor(std if std is not None else [0.5] * in_channels).view(1, -1, 1, 1)
        if self.mean.numel() != in_channels or self.std.numel() != in_channels:
            raise ValueError(f"data.mean/data.std need {in_channels} values (one per channel), "
                             f"got {self.mean.numel()} and {self.std.numel()}")
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> "DataModule":
        """Move every split to the device once (CIFAR-10 as uint8 is 180 MB)."""
        self.device = torch.device(device)
        for name in ("train", "val", "test"):
            split = getattr(self.splits, name)
            setattr(self.splits, name, Split(split.images.to(self.device), split.labels.to(self.device)))
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def split(self, name: str) -> Split:
        return getattr(self.splits, name)

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """Raw batch -> float in [0, 1] (uint8 photos) or as stored (float arrays)."""
        return images.float().div_(255) if images.dtype == torch.uint8 else images.float()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def steps_per_epoch(self) -> int:
        return len(self.splits.train) // self.batch_size  # drop_last, so every step has a full batch

    def train_batches(self, epoch: int, seed: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (images in [0, 1], labels) batches; the order depends only on (seed, epoch), so a
        resumed run sees the same batches. `skip` drops the first batches (mid-epoch resume)."""
        train = self.splits.train
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(train), generator=generator).to(self.device)
        for step in range(skip, self.steps_per_epoch()):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self.to_float(train.images[index]), train.labels[index]

    def eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = self.split(split)
        for start in range(0, len(data), self.eval_batch_size):
            end = start + self.eval_batch_size
            yield self.to_float(data.images[start:end]), data.labels[start:end]
