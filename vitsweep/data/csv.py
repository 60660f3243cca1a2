"""A manifest CSV, one row per image: for data that is not a class-per-folder tree.

    image,label,split,lat,lon                  single-label: one label column
    tiles/0001.tif,riot,train,48.14,11.58
    image,riot,crowd,split                     multi-label: label_columns=[riot,crowd], 0/1 each
    tiles/0002.tif,1,0,test

- image_column: file paths relative to the CSV's folder: photos, .npy or .tif arrays, decoded and
  disk-cached by imagefolder's functions (same dtype rules, same data.channels_last). A time series:
  several paths in one cell joined by `frame_separator` (`a.tif;b.tif;c.tif`, one frame each, oldest
  first), or one 4-D array (T frames); every row needs the same number of frames.
- dates_column (when the CSV has it): the date of each frame, ISO (2021-03-01), joined by the same
  separator, as many as the row has frames; kept as Split.dates (days since 1970-01-01). An empty cell
  or date: unknown.
- label_columns: one column -> single-label; the classes are its distinct values, sorted (as numbers
  when all are integers). Several columns -> multi-label: labels (N, K) float multi-hot, each value
  0 or 1, and the classes are the column names.
- split_column: train / val / test for each row. A CSV without that column is split with split_seed:
  a stratified test_fraction, then val_fraction of the rest; with no val rows, val is carved from train.
- metadata_columns: numeric columns kept per sample as Split.metadata (N, M) float32, in this order,
  for metadata inputs (vitsweep.model.metadata); `auto` keeps every other column whose cells are all
  numbers or empty. An empty cell is a missing value (NaN), which the model masks.
- categorical_columns: columns whose values are categories (a region, a sensor): kept as
  Split.categories (N, K) int64, each value's index among the column's sorted distinct values; an
  empty cell is missing (-1).
- targets (given by the task: `task.targets()`): {name: reader} (vitsweep/data/targets.py), each
  reading its columns: class indices (an empty cell: -1, missing), numbers (empty: NaN), or a path per
  row to a mask file (.png/.npy, read as data=maskfolder; empty: no label). A reader that names no
  column reads `label_columns`. One target gives a tensor of labels, several a dict keyed by name.
"""

from __future__ import annotations

import csv
import datetime
from collections.abc import Sequence
from pathlib import Path

import torch

from vitsweep.data.imagefolder import decode_cached, kept
from vitsweep.data.maskfolder import read_mask
from vitsweep.data.splits import Split, Splits, carve_validation, map_targets
from vitsweep.data.targets import CsvFiles, RequiredClassLabels, TargetReader, is_number

SPLIT_NAMES = ("train", "val", "test")


def read_targets(rows: list[dict], columns: list[str], targets: dict[str, TargetReader], label_columns: list[str],
                 files: CsvFiles) -> tuple[dict, dict, set[str]]:
    """{name: labels}, {name: class names} and the columns used: each target read by its reader from its
    columns (a reader that names none reads data.source.label_columns)."""
    labels, class_names, used = {}, {}, set()
    for name, reader in targets.items():
        names = reader.columns or label_columns
        for column in names:
            if column not in columns:
                if not reader.columns:
                    raise ValueError(f"data.source.label_columns: data.root={files.manifest} has no column {column!r} "
                                     f"(it has: {', '.join(columns)}): set data.source.label_columns")
                raise ValueError(f"the task reads column {column!r} for {name}, which data.root={files.manifest} "
                                 f"lacks (columns: {', '.join(columns)})")
        used.update(names)
        labels[name], class_names[name] = reader.from_csv([[row[c].strip() for c in names] for row in rows], names,
                                                          files)
    return labels, class_names, used


def parse_metadata(rows: list[dict], columns: list[str], metadata_columns: str | Sequence[str],
                   used: set[str]) -> tuple[torch.Tensor | None, list[str]]:
    """(N, M) float32 of the metadata columns (NaN where a cell is empty), or None when there are none; and
    their names."""
    if metadata_columns == "auto":
        names = [c for c in columns if c not in used and any(row[c].strip() for row in rows)
                 and all(is_number(row[c]) or not row[c].strip() for row in rows)]
    else:
        names = list(metadata_columns)
        for name in names:
            if name not in columns:
                raise ValueError(f"data.source.metadata_columns names {name!r}, which the CSV lacks "
                                 f"(columns: {', '.join(columns)})")
            bad = next((i for i, row in enumerate(rows) if row[name].strip() and not is_number(row[name])), None)
            if bad is not None:
                raise ValueError(f"data=csv: row {bad + 2} has {name}={rows[bad][name]!r}: metadata columns "
                                 f"hold numbers (an empty cell is a missing value); name text columns in "
                                 f"data.source.categorical_columns")
    if not names:
        return None, []
    values = [[float(row[c]) if row[c].strip() else float("nan") for c in names] for row in rows]
    return torch.tensor(values, dtype=torch.float32), names


def parse_categories(rows: list[dict], columns: list[str],
                     categorical_columns: Sequence[str]) -> tuple[torch.Tensor | None, dict[str, list[str]]]:
    """(N, K) int64 value indices of the categorical columns (-1 where a cell is empty), or None; and each
    column's values, sorted."""
    names = list(categorical_columns or [])
    for name in names:
        if name not in columns:
            raise ValueError(f"data.source.categorical_columns names {name!r}, which the CSV lacks "
                             f"(columns: {', '.join(columns)})")
    if not names:
        return None, {}
    values = {name: sorted({row[name].strip() for row in rows} - {""}) for name in names}
    index = {name: {value: i for i, value in enumerate(values[name])} for name in names}
    codes = [[index[name].get(row[name].strip(), -1) for name in names] for row in rows]
    return torch.tensor(codes, dtype=torch.int64), values


def parse_dates(rows: list[dict], column: str, separator: str, frames: int) -> torch.Tensor:
    """(N, T) float32 days since 1970-01-01 of each frame (NaN: an empty cell or entry)."""
    epoch = datetime.date(1970, 1, 1)
    days = []
    for line, row in enumerate(rows, start=2):
        cell = row[column].strip()
        if not cell:
            days.append([float("nan")] * frames)
            continue
        entries = [entry.strip() for entry in cell.split(separator)]
        if len(entries) != frames:
            raise ValueError(f"data=csv: row {line} has {len(entries)} date(s) in {column} for {frames} frame(s): give "
                             f"one ISO date per frame, joined by {separator!r}")
        try:
            days.append([float((datetime.date.fromisoformat(e) - epoch).days) if e else float("nan") for e in entries])
        except ValueError:
            raise ValueError(f"data=csv: row {line} has {column}={cell!r}: dates are ISO, e.g. 2021-03-01") from None
    return torch.tensor(days, dtype=torch.float32)


def frame_paths(rows: list[dict], manifest: Path, image_column: str, separator: str) -> tuple[list[Path], int]:
    """Every row's frame files, row after row, and the number of frames per row (1: one file per row)."""
    cells = [[manifest.parent / part.strip() for part in row[image_column].split(separator)] for row in rows]
    counts = {len(cell) for cell in cells}
    if len(counts) > 1:
        line = next(i for i, cell in enumerate(cells, start=2) if len(cell) != len(cells[0]))
        raise ValueError(f"data=csv: row {line} has {len(cells[line - 2])} frame(s) in {image_column} but row 2 has "
                         f"{len(cells[0])}: every sample needs the same number of frames")
    paths = [path for cell in cells for path in cell]
    missing = next((i for i, path in enumerate(paths) if not path.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"data=csv: row {missing // len(cells[0]) + 2} names {paths[missing]}, which does not "
                                f"exist: image paths are relative to the CSV's folder")
    return paths, len(cells[0])


def load_csv(root: str, image_size: int, in_channels: int = 3, channels_last: bool | None = None,
             image_column: str = "image", label_columns: str | Sequence[str] = "label",
             split_column: str | None = "split", metadata_columns: str | Sequence[str] = "auto",
             cache_dir: str | None = None, test_fraction: float = 0.2, val_fraction: float = 0.1,
             split_seed: int = 0, on_bad_file: str = "error", targets: dict | None = None,
             categorical_columns: Sequence[str] = (), dates_column: str | None = "dates",
             frame_separator: str = ";") -> Splits:
    manifest = Path(root).expanduser().resolve()
    if not manifest.is_file():
        raise FileNotFoundError(f"data.root={manifest} is not a file: with data=csv, point data.root at the "
                                f"manifest CSV (one row per image, paths relative to its folder)")
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = list(reader.fieldnames or []), list(reader)
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    if image_column not in columns:
        raise ValueError(f"data.source.image_column: data.root={manifest} has no column {image_column!r} "
                         f"(it has: {', '.join(columns)}): set data.source.image_column")
    if not rows:
        raise ValueError(f"data.root={manifest} has a header but no rows")

    def read_masks(paths: list[Path], name: str) -> torch.Tensor:
        return decode_cached({"rows": paths}, image_size, 1, None, cache_dir, f"csv-{manifest.stem}-{name}",
                             reader=read_mask)[0]["rows"]

    targets = targets or {"label": RequiredClassLabels("label")}  # no task: the class label column(s)
    labels, class_names, used = read_targets(rows, columns, targets, label_columns,
                                             CsvFiles(manifest, image_size, read_masks))
    if len(labels) == 1:  # one target: a tensor of labels, not a dict
        labels, class_names = next(iter(labels.values())), next(iter(class_names.values()))
    has_dates = dates_column is not None and dates_column in columns
    categories, category_values = parse_categories(rows, columns, categorical_columns)
    metadata, metadata_names = parse_metadata(rows, columns, metadata_columns, used={
        image_column, split_column, *used, *category_values, *([dates_column] if has_dates else [])})
    paths, frames = frame_paths(rows, manifest, image_column, frame_separator)
    tensors, skipped = decode_cached({"rows": paths}, image_size, in_channels, channels_last, cache_dir,
                                     f"csv-{manifest.stem}", on_bad_file)
    images = tensors["rows"]
    if skipped["rows"]:  # unreadable files left out (data.on_bad_file=skip): their rows go too
        if frames > 1:
            raise ValueError(f"data.on_bad_file=skip leaves out whole samples, but {paths[skipped['rows'][0]]} is one "
                             f"frame of a time series: fix or remove that file (or its row)")
        rows = kept(rows, skipped["rows"])
        index = torch.tensor(kept(list(range(len(paths))), skipped["rows"]), dtype=torch.int64)
        labels = map_targets(lambda target: target[index], labels)
        metadata = None if metadata is None else metadata[index]
        categories = None if categories is None else categories[index]
    if frames > 1:  # a cell of several paths: one frame each
        if images.dim() != 4:
            raise ValueError(f"data=csv: a cell of {image_column} lists {frames} files, one frame each, but they are "
                             f"time series themselves (4-D arrays): name one file per frame, or one 4-D file per row")
        images = images.view(len(rows), frames, *images.shape[1:])  # (N, T, C, H, W)
    dates = parse_dates(rows, dates_column, frame_separator, images.shape[1] if images.dim() == 5 else 1) \
        if has_dates else None
    everything = Split(images, labels, metadata, categories, dates)

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
    return Splits(train, val, test, class_names=class_names, metadata_columns=metadata_names,
                  category_values=category_values, skipped_files=[str(paths[i]) for i in skipped["rows"]])
