"""The targets a run learns from, as the loaders read them: the data side of the task contract.

A task hands the loader one reader per target (`task.targets()`, vitsweep/task/): {name: reader}. The
loader asks each reader for its target from whatever the loader has (a CSV column, a mask per image, a
class per image, a planted synthetic signal) and never asks which task it serves. Each reader is one of
the formats a `Split` holds (vitsweep/data/splits.py); an objective picks the format it learns from:

    ClassLabels   (N,) int64 class indices, -1 missing; several columns: (N, K) float multi-hot
    Values        (N, T) float32 numbers, NaN missing
    Masks         (N, H, W) uint8 a class per pixel, 255 (IGNORE_INDEX) where there is no label

`summarize` is what a task reads of a split's targets besides batches (class counts, the mean and std of
values, the largest class of a mask): one pass over the labels, so that a source that cannot hold them
whole can answer it shard by shard (`merge`) or from a manifest (vitsweep/data/dataset_info.py).

A new format is a subclass: `from_csv`, `statistics`, `missing_value`, and a planted signal in
data/synthetic.py if tests want one. A loader that can give one format only (a class per image, a mask per
image) refuses the others in one line (`class_labels_only`, `masks_only`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vitsweep.data.splits import IGNORE_INDEX


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def is_integer(text: str) -> bool:
    return text.lstrip("-").isdigit()


def class_order(values) -> list[str]:
    """Distinct non-empty cell values, sorted: integers as numbers, first, then the rest as text."""
    return sorted({v for v in values if v}, key=lambda v: (not is_integer(v), int(v) if is_integer(v) else v))


@dataclass
class CsvFiles:
    """What data=csv gives a reader besides the cells: the manifest (paths are relative to its folder), the
    decode size, and the loader's mask decoding (decoded once, disk-cached)."""

    manifest: Path
    image_size: int
    read_masks: Callable[[list[Path], str], torch.Tensor]


class TargetReader:
    """One target of a task, read by the loaders. `name` keys it among the targets of a batch (a dict when
    a task has several); `columns` are what data=csv reads for it (empty: the loader's own label column)."""

    format = ""  # class | values | mask: what the loaders that synthesize signals plant for it
    what = ""  # said in refusals: "class labels", "numbers", "masks"

    def __init__(self, name: str, columns: Sequence[str] = ()):
        self.name, self.columns = name, [c for c in columns if c]

    def from_csv(self, cells: list[list[str]], columns: list[str], files: CsvFiles) -> tuple[torch.Tensor, list[str]]:
        """The target from the cells of its `columns`, one list per row, and its class names ([] if none);
        `files` reads what the cells name."""
        raise ValueError(f"data=csv cannot read {self.what} for {self.name}")

    def summarize(self, labels: torch.Tensor) -> dict:
        """What a task reads of a split's targets: their shape and dtype, and the format's statistics."""
        return {"count": len(labels), "shape": tuple(labels.shape[1:]), "dtype": str(labels.dtype).removeprefix("torch."),
                **self.statistics(labels)}

    def statistics(self, labels: torch.Tensor) -> dict:
        return {}

    def blank(self, labels: torch.Tensor, share: float, generator: torch.Generator) -> None:
        """Mark a random `share` of the samples' labels missing, in place (synthetic data's `missing`)."""
        if share <= 0:
            return
        gone = torch.rand(len(labels), generator=generator) < share
        labels[gone] = self.missing_value(labels)

    def missing_value(self, labels: torch.Tensor):
        raise NotImplementedError


class ClassLabels(TargetReader):
    """Class indices (N,) int64, -1 missing; from several 0/1 columns, multi-hot (N, K) float."""

    format, what = "class", "class labels"

    def from_csv(self, cells, columns, files):
        if len(cells[0]) > 1:  # several 0/1 columns: multi-label
            for line, row in enumerate(cells, start=2):
                for column, value in zip(columns, row):
                    if not is_number(value) or float(value) not in (0.0, 1.0):
                        raise ValueError(f"data=csv: row {line} has {column}={value!r}: multi-label columns hold 0 or 1")
            return torch.tensor([[float(v) for v in row] for row in cells]), list(columns)
        values = [row[0] for row in cells]
        names = self.class_order(values)
        index = {name: i for i, name in enumerate(names)}
        return torch.tensor([index[v] if v else -1 for v in values], dtype=torch.int64), names

    def class_order(self, values: list[str]) -> list[str]:
        return class_order(values)

    def statistics(self, labels):
        if labels.is_floating_point() and labels.dim() == 2:  # multi-hot: rows with a NaN are unlabelled
            labelled = labels[~labels.isnan().any(dim=1)]
            counts = labelled.sum(dim=0)
        elif labels.dim() == 1 and not labels.is_floating_point():
            labelled = labels[labels >= 0]
            counts = torch.bincount(labelled, minlength=int(labels.max()) + 1 if len(labelled) else 0).float()
        else:
            return {}
        return {"labelled": len(labelled), "class_counts": counts.cpu().tolist()}

    def missing_value(self, labels):
        return float("nan") if labels.is_floating_point() else -1


class RequiredClassLabels(ClassLabels):
    """The loader's own label column(s) (data.source.label_columns): every row labelled."""

    def from_csv(self, cells, columns, files):
        empty = next((line for line, row in enumerate(cells, start=2) if "" in row), None)
        if empty is not None:
            raise ValueError(f"data=csv: row {empty} has no {columns[0]}: every row needs a label")
        return super().from_csv(cells, columns, files)

    def class_order(self, values):  # as numbers when all are integers, else as text
        return sorted(set(values), key=int if all(is_integer(v) for v in values) else str)


class Values(TargetReader):
    """Numbers (N, T) float32, one column per value, NaN missing."""

    format, what = "values", "numbers"

    def from_csv(self, cells, columns, files):
        for line, row in enumerate(cells, start=2):
            for column, value in zip(columns, row):
                if value and not is_number(value):
                    raise ValueError(f"data=csv: row {line} has {column}={value!r}: regression targets are numbers "
                                     f"(an empty cell is a missing value)")
        return torch.tensor([[float(v) if v else float("nan") for v in row] for row in cells]), []

    def statistics(self, labels):
        if not labels.is_floating_point():
            return {}
        values = labels.double().view(len(labels), -1).cpu()
        valid = ~values.isnan()
        count = valid.sum(dim=0)
        total = torch.where(valid, values, 0.0).sum(dim=0)
        squares = torch.where(valid, values, 0.0).square().sum(dim=0)
        return {"present": count.tolist(), "sum": total.tolist(), "sum_sq": squares.tolist()}

    def missing_value(self, labels):
        return float("nan")


class Masks(TargetReader):
    """A class per pixel (N, H, W) uint8, IGNORE_INDEX where there is no label."""

    format, what = "mask", "masks"

    def from_csv(self, cells, columns, files):
        paths = [files.manifest.parent / row[0] if row[0] else None for row in cells]
        bad = next((i for i, path in enumerate(paths) if path is not None and not path.is_file()), None)
        if bad is not None:
            raise FileNotFoundError(f"data=csv: row {bad + 2} names mask {paths[bad]}, which does not exist")
        present = [path for path in paths if path is not None]
        decoded = files.read_masks(present, self.name) if present else None  # (n, S, S) uint8
        size = files.image_size
        masks = torch.full((len(cells), size, size), IGNORE_INDEX, dtype=torch.uint8)
        if decoded is not None:
            masks[torch.tensor([path is not None for path in paths])] = decoded
        return masks, []

    def statistics(self, labels):
        labelled = labels[labels != IGNORE_INDEX]
        return {"max_class": int(labelled.max()) if labelled.numel() else -1}

    def missing_value(self, labels):
        return IGNORE_INDEX


def reader_for(labels: torch.Tensor, name: str = "") -> TargetReader:
    """The reader of labels whose task is not known (a DataModule built in Python without readers), by their
    form: class indices, masks; float labels are numbers or multi-hot rows: summarized as both."""
    if labels.is_floating_point():
        return FloatLabels(name)
    if labels.dim() == 3:
        return Masks(name)
    return ClassLabels(name)


class FloatLabels(Values):
    """Float labels of unknown meaning: the statistics of numbers and of multi-hot rows."""

    def statistics(self, labels):
        return {**ClassLabels.statistics(self, labels), **super().statistics(labels)}


def merge_summaries(parts: list[dict]) -> dict:
    """One summary from the summaries of a split's parts (shards): counts and sums add, maxima take the max."""
    merged = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if key in ("count", "labelled"):
                merged[key] = merged[key] + value
            elif key in ("present", "sum", "sum_sq", "class_counts"):
                longer, shorter = (merged[key], value) if len(merged[key]) >= len(value) else (value, merged[key])
                merged[key] = [a + (shorter[i] if i < len(shorter) else 0) for i, a in enumerate(longer)]
            elif key == "max_class":
                merged[key] = max(merged[key], value)
    return merged


def only(wanted: type[TargetReader], gives: str, hint: str, targets: dict[str, TargetReader] | None,
         source: str) -> None:
    """A loader that can give one kind of target (a class per image, a mask per image) refuses a task that
    asks for anything else, in one line, before reading a file."""
    readers = list((targets or {}).values())
    if len(readers) > 1 or any(not isinstance(reader, wanted) for reader in readers):
        asked = " + ".join(f"{reader.what} ({name})" for name, reader in (targets or {}).items())
        raise ValueError(f"data={source} gives {gives}, but the task asks for {asked}: {hint}")


def class_labels_only(targets: dict[str, TargetReader] | None, source: str) -> None:
    only(ClassLabels, "one class label per image",
         "use data=csv (columns per target), data=maskfolder (masks) or data=synthetic", targets, source)


def masks_only(targets: dict[str, TargetReader] | None, source: str) -> None:
    only(Masks, "a mask per image", "use task=segmentation (or data=csv for other targets)", targets, source)
