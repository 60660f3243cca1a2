"""Synthetic image time series and metadata tables with planted signals (for tests and experiments).

Each sample is T = `frames` frames (N, T, C, H, W) uint8 (frames=1: plain images (N, C, H, W)), with
revisit dates (a start in 2020, then every 20-40 days) and metadata: numeric columns `events` (a count
around 500: the scale the model must standardize) and `population` (a distractor), and the categorical
column `region` (north, south, east, west). A `signal` decides what the label depends on:

    motion     2 classes, right / left: a square blob moves `step` pixels per frame along its row on a
               periodic (wrap-around) image, from a uniformly random column. Every single frame shows the blob
               at a uniformly random place whatever the direction, and a left-moving clip is a right-moving one
               played backwards: no single frame and no average of frames tells; only their order does.
    metadata   2 classes, low / high: high when z(events) + the region's effect > 0. The images are noise
               and a blob at a random place: only the metadata tells. Regression targets: that score.
    forecast   a blob moves along its row with its own speed (either direction, not wrapping); the target is
               the blob's column `horizon` frames after the last one: its centre in pixels (regression) or its
               bin among `num_classes` equal bins of the width (classification, "the next frame's class").
               The horizon is data: the same task learns any horizon the data gives.
    riot       the seed author's study in miniature, 2 classes, calm / riot: a crowd blob in the last bands of
               a multispectral revisit series grows or shrinks over the frames; riot when it grows and the
               metadata's score (as for `metadata`) is positive. Neither the frames nor the metadata alone
               get beyond about 75%.

`metadata_missing` blanks that share of the metadata cells (NaN, or -1 for the region), to test masking.
"""

from __future__ import annotations

import torch

from vitsweep.data.splits import Split, Splits

SIGNALS = ("motion", "metadata", "forecast", "riot")
REGIONS = ["east", "north", "south", "west"]  # sorted, as data=csv indexes categories
REGION_EFFECT = torch.tensor([-0.8, -0.3, 0.3, 0.8])
EPOCH_2020 = 18262.0  # 2020-01-01 in days since 1970-01-01


def load_synthetic_series(image_size: int = 16, in_channels: int = 3, num_classes: int = 2, frames: int = 4,
                          signal: str = "motion", num_train: int = 512, num_val: int = 128, num_test: int = 128,
                          noise: float = 0.1, step: int = 3, horizon: int = 1, metadata_missing: float = 0.0,
                          split_seed: int = 0, targets: dict | None = None) -> Splits:
    if signal not in SIGNALS:
        raise ValueError(f"data.source.signal={signal!r} is not one of: {', '.join(SIGNALS)}")
    if frames < 1:
        raise ValueError(f"data.source.frames={frames} must be >= 1")
    readers = list((targets or {}).values())
    kind = readers[0].format if readers else "class"
    values_ok = signal in ("metadata", "forecast")
    if len(readers) > 1 or kind not in ("class", "values") or (kind == "values" and not values_ok):
        raise ValueError(f"data=synthetic_series with signal={signal} gives one "
                         f"{'class or number' if values_ok else 'class'} per sample, not "
                         f"{' + '.join(reader.what for reader in readers)}: pick the task that fits (signal=metadata "
                         f"or forecast for task=regression)")
    if kind == "class" and signal != "forecast" and num_classes != 2:
        raise ValueError(f"data.num_classes={num_classes}: signal={signal} has 2 classes; set data.num_classes=2")
    if not 0 <= metadata_missing < 1:
        raise ValueError(f"data.source.metadata_missing={metadata_missing} is a share of cells: use [0, 1)")
    generator = torch.Generator().manual_seed(split_seed)
    band_weights = 0.5 + 0.5 * torch.rand(in_channels, generator=generator)  # the blob's colour

    def make(n: int) -> Split:
        blob = max(2, image_size // 4)
        rows = torch.randint(0, image_size - blob + 1, (n,), generator=generator)
        columns = torch.zeros(n, frames)  # (N, T) left column of the blob in each frame
        sizes = torch.full((n, frames), float(blob))
        events = 500 + 100 * torch.randn(n, generator=generator)
        region = torch.randint(len(REGIONS), (n,), generator=generator)
        score = (events - 500) / 100 + REGION_EFFECT[region]  # what the metadata says
        if signal == "motion":
            labels = torch.randint(2, (n,), generator=generator)  # 0: right, 1: left
            if not 0 < step * 2 < image_size:
                raise ValueError(f"data.source.step={step}: on a {image_size} px periodic image a step must be "
                                 f"in [1, {(image_size - 1) // 2}] px to tell right from left")
            start = torch.randint(0, image_size, (n,), generator=generator).float()
            direction = 1.0 - 2.0 * labels.float()
            columns = torch.remainder(start[:, None] + direction[:, None] * step * torch.arange(frames), image_size)
        elif signal == "metadata":
            labels = (score > 0).long() if kind == "class" else score[:, None]
            columns = torch.randint(0, image_size - blob + 1, (n,), generator=generator).float()[:, None].expand(n, frames)
        elif signal == "forecast":
            span = image_size - blob  # the blob's left column stays in [0, span] up to the forecast frame
            last = frames - 1 + horizon
            speed = (torch.rand(n, generator=generator) * 2 - 1) * span / max(last, 1)
            low = torch.where(speed < 0, -speed * last, 0.0)
            start = low + torch.rand(n, generator=generator) * (span - speed.abs() * last)
            columns = start[:, None] + speed[:, None] * torch.arange(frames)
            future = start + speed * last  # the column `horizon` frames after the last one
            if kind == "values":
                labels = (future + blob / 2)[:, None]  # the blob's centre, in pixels
            else:
                labels = ((future + blob / 2) / image_size * num_classes).long().clamp(0, num_classes - 1)
        else:  # riot
            growing = torch.randint(2, (n,), generator=generator)
            labels = (growing.bool() & (score > 0)).long()
            columns = torch.randint(0, image_size - blob - 1, (n,), generator=generator).float()[:, None].expand(n, frames)
            change = torch.linspace(-1, 1, frames) * (1.0 - 2.0 * (1 - growing.float()))[:, None]  # (N, T)
            sizes = blob + 1.5 * change  # blob - 1.5 .. blob + 1.5 pixels, growing or shrinking
        images = noise * torch.randn(n, frames, in_channels, image_size, image_size, generator=generator) + 0.2
        images += draw_blobs(rows, columns, sizes, image_size, wrap=signal == "motion")[:, :, None] * paint(signal, band_weights)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        dates = EPOCH_2020 + torch.randint(0, 366, (n, 1), generator=generator).float() + torch.cat(
            [torch.zeros(n, 1), torch.randint(20, 41, (n, frames - 1), generator=generator).float().cumsum(1)], 1)
        population = torch.exp(8 + torch.randn(n, generator=generator))
        metadata = torch.stack([events, population], dim=1)
        categories = region[:, None].clone()
        if metadata_missing > 0:
            metadata[torch.rand(metadata.shape, generator=generator) < metadata_missing] = float("nan")
            categories[torch.rand(categories.shape, generator=generator) < metadata_missing] = -1
        return Split(images if frames > 1 else images[:, 0], labels, metadata, categories,
                     dates if frames > 1 else dates[:, :1])

    class_names = {"motion": ["right", "left"], "metadata": ["low", "high"], "riot": ["calm", "riot"],
                   "forecast": [f"bin_{k}" for k in range(num_classes)]}[signal] if kind == "class" else []
    return Splits(make(num_train), make(num_val), make(num_test), class_names,
                  metadata_columns=["events", "population"], category_values={"region": list(REGIONS)})


def draw_blobs(rows: torch.Tensor, columns: torch.Tensor, sizes: torch.Tensor, image_size: int,
               wrap: bool = False) -> torch.Tensor:
    """(N, T, H, W) masks of a square of side sizes[i, t] at (rows[i], columns[i, t]) (wrapping around the
    width when `wrap`), anti-aliased at fractional positions and sizes."""
    pixels = torch.arange(image_size).float() + 1  # pixel k covers [k, k + 1): its right edge
    dx = pixels.view(1, 1, -1) - columns[..., None]  # (N, T, W)
    if wrap:  # a blob past the right edge comes back in from the left
        dx = torch.remainder(dx, image_size)
    width = sizes[..., None]
    in_x = (torch.minimum(dx, width) - torch.maximum(dx - 1, torch.zeros_like(dx))).clamp(0, 1)  # coverage
    dy = pixels.view(1, 1, -1) - rows.float().view(-1, 1, 1)  # (N, 1, H)
    in_y = (torch.minimum(dy, width) - torch.maximum(dy - 1, torch.zeros_like(dy))).clamp(0, 1)  # (N, T, H)
    return in_y[..., :, None] * in_x[..., None, :]  # (N, T, H, W)


def paint(signal: str, band_weights: torch.Tensor) -> torch.Tensor:
    """(C, 1, 1) brightness of the blob per band; the riot crowd shows in the last half of the bands only."""
    weights = band_weights.clone()
    if signal == "riot" and len(weights) > 1:
        weights[: len(weights) // 2] = 0.1
    return 0.7 * weights.view(-1, 1, 1)
