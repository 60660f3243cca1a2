"""A manifest CSV, one row per image: for data that is not a class-per-folder tree.

    image,label,split,lat,lon                  single-label: one label column
    tiles/0001.tif,riot,train,48.14,11.58
    image,riot,crowd,split                     multi-label: label_columns=[riot,crowd], 0/1 each
    tiles/0002.tif,1,0,test

- image_column: file paths relative to the CSV's folder: photos, .npy or .tif arrays, decoded and
  disk-cached by imagefolder's functions (same dtype rules, same data.channels_last).
- label_columns: one column -> single-label; the classes are its distinct values, sorted (as numbers
  when all are integers). Several columns -> multi-label: labels (N, K) float multi-hot, each value
  0 or 1, and the classes are the column names.
- split_column: train / val / test for each row. A CSV without that column is split with split_seed:
  a stratified test_fraction, then val_fraction of the rest; with no val rows, val is carved from train.
- metadata_columns: numeric columns kept per sample as Split.metadata (N, M) float32, in this order,
  for metadata inputs; `auto` keeps every other column whose cells are all numbers.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from vitsweep.data.imagefolder import decode_cached, kept
from vitsweep.data.splits import Split, Splits, carve_validation

SPLIT_NAMES = ("train", "val", "test")


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_labels(rows: list[dict], label_columns: list[str]) -> tuple[torch.Tensor, list[str]]:
    """(N,) int64 class indices and the class names, or (N, K) float multi-hot and the column names."""
    if len(label_columns) == 1:
        column = label_columns[0]
        values = [row[column].strip() for row in rows]
        if "" in values:
            raise ValueError(f"data=csv: row {values.index('') + 2} has no {column}: every row needs a label")
        as_integers = all(v.lstrip("-").isdigit() for v in values)
        names = sorted(set(values), key=int if as_integers else str)
        index = {name: i for i, name in enumerate(names)}
        return torch.tensor([index[v] for v in values], dtype=torch.int64), names
    multi_hot = [[row[c].strip() for c in label_columns] for row in rows]
    for line, values in enumerate(multi_hot, start=2):
        for column, value in zip(label_columns, values):
            if not is_number(value) or float(value) not in (0.0, 1.0):
                raise ValueError(f"data=csv: row {line} has {column}={value!r}: multi-label columns hold 0 or 1")
    return torch.tensor([[float(v) for v in values] for values in multi_hot]), list(label_columns)


def parse_metadata(rows: list[dict], columns: list[str], metadata_columns: str | Sequence[str],
                   used: set[str]) -> torch.Tensor | None:
    """(N, M) float32 of the metadata columns, or None when there are none."""
    if metadata_columns == "auto":
        names = [c for c in columns if c not in used and all(is_number(row[c]) for row in rows)]
    else:
        names = list(metadata_columns)
        for name in names:
            if name not in columns:
                raise ValueError(f"data.source.metadata_columns names {name!r}, which the CSV lacks "
                                 f"(columns: {', '.join(columns)})")
            bad = next((i for i, row in enumerate(rows) if not is_number(row[name])), None)
            if bad is not None:
                raise ValueError(f"data=csv: row {bad + 2} has {name}={rows[bad][name]!r}: metadata columns "
                                 f"hold numbers only")
    if not names:
        return None
    return torch.tensor([[float(row[c]) for c in names] for row in rows], dtype=torch.float32)


def load_csv(root: str, image_size: int, in_channels: int = 3, channels_last: bool | None = None,
             image_column: str = "image", label_columns: str | Sequence[str] = "label",
             split_column: str | None = "split", metadata_columns: str | Sequence[str] = "auto",
             cache_dir: str | None = None, test_fraction: float = 0.2, val_fraction: float = 0.1,
             split_seed: int = 0, on_bad_file: str = "error") -> Splits:
    manifest = Path(root).expanduser().resolve()
    if not manifest.is_file():
        raise FileNotFoundError(f"data.root={manifest} is not a file: with data=csv, point data.root at the "
                                f"manifest CSV (one row per image, paths relative to its folder)")
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = list(reader.fieldnames or []), list(reader)
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    for key, name in [("image_column", image_column)] + [("label_columns", c) for c in label_columns]:
        if name not in columns:
            raise ValueError(f"data.source.{key}: data.root={manifest} has no column {name!r} "
                             f"(it has: {', '.join(columns)}): set data.source.{key}")
    if not rows:
        raise ValueError(f"data.root={manifest} has a header but no rows")

    labels, class_names = parse_labels(rows, label_columns)
    metadata = parse_metadata(rows, columns, metadata_columns, used={image_column, split_column, *label_columns})
    paths = [manifest.parent / row[image_column].strip() for row in rows]
    missing = next((i for i, path in enumerate(paths) if not path.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"data=csv: row {missing + 2} names {paths[missing]}, which does not exist: "
                                f"image paths are relative to the CSV's folder")
    tensors, skipped = decode_cached({"rows": paths}, image_size, in_channels, channels_last, cache_dir,
                                     f"csv-{manifest.stem}", on_bad_file)
    if skipped["rows"]:  # unreadable files left out (data.on_bad_file=skip): their rows go too
        rows = kept(rows, skipped["rows"])
        index = torch.tensor(kept(list(range(len(labels))), skipped["rows"]), dtype=torch.int64)
        labels, metadata = labels[index], None if metadata is None else metadata[index]
    everything = Split(tensors["rows"], labels, metadata)

    val = None
    if split_column and split_column in columns:
        names = [row[split_column].strip().lower() for row in rows]
        bad = next((i for i, name in enumerate(names) if name not in SPLIT_NAMES), None)
        if bad is not None:
            raise ValueError(f"data=csv: row {bad + 2} has {split_column}={rows[bad][split_column]!r}: "
                             f"use one of {', '.join(SPLIT_NAMES)}")
        index = {s: torch.tensor([i for i, n in enumerate(names) if n == s], dtype=torch.int64) for s in SPLIT_NAMES}
        if not len(index["train"]) or not len(index["test"]):
            raise ValueError(f"data=csv: the {split_column} column needs train and test rows; "
                             f"it has {', '.join(f'{len(v)} {k}' for k, v in index.items())}")
        train, test = everything.subset(index["train"]), everything.subset(index["test"])
        if len(index["val"]):
            val = everything.subset(index["val"])
    else:  # no split column: a seeded, stratified split
        if not 0 < test_fraction < 1:
            raise ValueError(f"data.source.test_fraction={test_fraction} must be in (0, 1) when the CSV has no "
                             f"{split_column!r} column")
        train, test = carve_validation(everything, test_fraction, split_seed)  # the same stratified hold-out
    if val is None:
        train, val = carve_validation(train, val_fraction, split_seed)
    return Splits(train, val, test, class_names=class_names,
                  skipped_files=[str(paths[i]) for i in skipped["rows"]])
