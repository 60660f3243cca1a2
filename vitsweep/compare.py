"""Compare runs offline: a table of the swept overrides, the metrics and the cost, a CSV and figures.

    vitsweep compare outputs/multirun/2024-05-01/12-00-00 [MORE_DIRS...] [--out DIR]
                     [--metrics 'val/acc,test/*,cost/*'] [--per-class]
    python -m vitsweep.compare ...

A DIR can be a sweep dir, a job dir, a dir of many sweeps, or a dir of W&B offline runs. Job dirs
(dirs holding summary.json, see docs/outputs.md) are read from summary.json and metrics.jsonl;
W&B offline runs outside job dirs are read from their run-*.wandb file.

The columns are, by default, the monitored metric (its best value), the test metrics without the
per-class ones (`--per-class` brings those back) and the cost (parameters, forward GFLOPs per image,
training images/s, peak memory); `--metrics` picks others by name or pattern. Runs that differ only
by their seed are also shown as one row per setting, mean ± sample std, with Welch's t-test of the
monitored metric against the best setting. The figures: `comparison.png` (learning curves, mean and
a ± std band over seeds; the monitored metric against each swept parameter with error bars, on a log
axis when its values span 10x or more) and `cost.png` (the monitored metric against GFLOPs per image
and training images/s, with the Pareto front marked).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import statistics
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT = "(default)"  # shown for a key that some runs override and this one does not

# the cost columns of summary.json's "cost" block shown by default, and their table headers
COST_COLUMNS = {
    "cost/params": "params",
    "cost/gflops_per_image": "GFLOPs",
    "cost/train_images_per_s": "img/s",
    "cost/peak_memory_mib": "peak MiB",
}
SIGNIFICANCE_LEVELS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))


@dataclass
class Run:
    """One job's outcome, from a job dir or from a W&B offline run."""

    name: str  # short and unique: the job dir relative to the dir given, or the W&B run name and id
    path: Path  # the job dir or the run-*.wandb file
    overrides: dict[str, str]  # "model.depth=4" -> {"model.depth": "4"}
    status: str  # "completed" | "failed" | "running"
    monitor: str  # the metric the run selects its best checkpoint by, e.g. "val/acc"
    monitor_mode: str  # "max" | "min"
    best_value: float | None = None
    best_epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # final values: test/*, the best epoch's val/*
    cost: dict[str, float] = field(default_factory=dict)  # "cost/params", "cost/gflops_per_image", ...
    config: dict[str, Any] = field(default_factory=dict)  # the flat resolved config, where it was written
    wall_time_s: float | None = None
    error: str | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch, monitored metric)


# ----------------------------------------------------------------------------- reading runs


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """Hydra override strings to {key: value}; "+key=v" and "++key=v" count as "key=v"."""
    parsed = {}
    for override in overrides:
        key, _, value = str(override).partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def read_overrides_yaml(path: Path) -> list[str]:
    """The list Hydra writes to .hydra/overrides.yaml ("- key=value" lines), without a YAML parser."""
    if not path.exists():
        return []
    lines = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]
    return [line[1:-1] if line[:1] in "'\"" and line[-1:] == line[:1] else line for line in lines]


def read_config_yaml(path: Path) -> dict[str, Any]:
    """The flat composed config Hydra writes to .hydra/config.yaml: the value of a key a run left at its
    default, for plotting it (PyYAML comes with Hydra)."""
    if not path.exists():
        return {}
    import yaml

    try:
        return flatten(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        return {}


def numbers_only(values: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_job_dir(job_dir: Path, name: str) -> Run:
    summary = json.loads((job_dir / "summary.json").read_text())
    overrides = summary.get("overrides")
    if overrides is None:  # not in the contract's summary (older job): Hydra's own record of them
        overrides = read_overrides_yaml(job_dir / ".hydra" / "overrides.yaml")
    monitor = summary.get("monitor") or ""
    rows = []
    metrics_path = job_dir / "metrics.jsonl"
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a job that is still writing it
                continue
    return Run(
        name=name,
        path=job_dir,
        overrides=parse_overrides(overrides),
        status=summary.get("status", "running"),
        monitor=monitor,
        monitor_mode=summary.get("monitor_mode", "max"),
        best_value=summary.get("best_value"),
        best_epoch=summary.get("best_epoch"),
        metrics=numbers_only(summary.get("metrics") or {}),
        cost={f"cost/{k}": v for k, v in numbers_only(summary.get("cost") or {}).items()},
        config=read_config_yaml(job_dir / ".hydra" / "config.yaml"),
        wall_time_s=summary.get("wall_time_s"),
        error=summary.get("error"),
        curve=validation_curve(rows, monitor),
    )


def validation_curve(rows: list[dict[str, Any]], monitor: str) -> list[tuple[float, float]]:
    """(epoch, monitored value) from every log call that has it, except the final test-time call:
    it repeats the best checkpoint's val metrics beside test/* and is no epoch of training."""
    return [
        (row.get("epoch", row.get("step", row.get("_step", index))), row[monitor])
        for index, row in enumerate(rows)
        if isinstance(row.get(monitor), (int, float)) and not any(key.startswith("test/") for key in row)
    ]


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"depth": 4}} -> {"model.depth": 4}"""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_wandb_run(wandb_file: Path) -> Run:
    from vitsweep.logger.wandb_offline import read_offline_run  # imports protobuf: only when needed

    wandb_run = read_offline_run(wandb_file)
    flat_config = flatten(wandb_run.config)
    if isinstance(wandb_run.config.get("overrides"), list):
        overrides = parse_overrides(wandb_run.config["overrides"])
    else:
        overrides = {key: str(value) for key, value in flat_config.items()}
    # the monitor is wherever the training config keeps it (e.g. "checkpoint.monitor")
    config_leaves = {key.rsplit(".", 1)[-1]: value for key, value in flat_config.items()}
    monitor = str(wandb_run.summary.get("monitor") or config_leaves.get("monitor") or "val/acc")
    monitor_mode = wandb_run.summary.get("monitor_mode") or config_leaves.get("monitor_mode")
    monitor_mode = monitor_mode or ("min" if "loss" in monitor or "err" in monitor else "max")

    curve = validation_curve(wandb_run.history, monitor)
    summary = wandb_run.summary
    # vitsweep's WandbLogger copies best_value/best_epoch/error into the summary; other runs: history
    best_value, best_epoch = summary.get("best_value"), summary.get("best_epoch")
    if best_value is None and curve:
        pick = max if monitor_mode == "max" else min
        best_epoch, best_value = pick(curve, key=lambda point: point[1])
    if not wandb_run.finished:
        status = "running"  # or killed: no exit record was written
    else:
        status = "completed" if wandb_run.exit_code == 0 else "failed"
    return Run(
        name=f"{wandb_run.name} ({wandb_run.run_id})" if wandb_run.name else wandb_run.run_id,
        path=wandb_file,
        overrides=overrides,
        status=status,
        monitor=monitor,
        monitor_mode=monitor_mode,
        best_value=best_value,
        best_epoch=best_epoch,
        metrics=numbers_only({k: v for k, v in summary.items() if k.startswith(("test/", "val/"))}),
        cost=numbers_only({k: v for k, v in summary.items() if k.startswith("cost/")}),
        config=flat_config,
        wall_time_s=summary.get("wall_time_s", summary.get("_runtime")),
        error=summary.get("error") or (f"exit code {wandb_run.exit_code}" if status == "failed" else None),
        curve=curve,
    )


def natural_key(text: str) -> list:
    """Sort "2" before "10": job dirs of a multirun are numbered."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def discover_runs(root: Path) -> list[Run]:
    """Every job dir and every W&B offline run (outside a job dir) under root."""
    if root.is_file():
        return [load_wandb_run(root)] if root.suffix == ".wandb" else []
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort(key=natural_key)
        here = Path(dirpath)
        try:
            if "summary.json" in filenames:
                runs.append(load_job_dir(here, name=os.path.relpath(here.resolve(), root.resolve().parent)))
                dirnames.clear()  # the job's own wandb/ run repeats it: do not count it twice
                continue
            for filename in sorted(filenames):
                if filename.startswith("run-") and filename.endswith(".wandb"):
                    runs.append(load_wandb_run(here / filename))
        except (ValueError, OSError) as error:  # a half-written file must not stop the comparison
            print(f"vitsweep compare: skipping {here}: {error}", file=sys.stderr)
    return runs


# ----------------------------------------------------------------------------- columns


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose values differ across runs, in the order they were first given."""
    all_keys = dict.fromkeys(key for run in runs for key in run.overrides)
    return [key for key in all_keys if len({run.overrides.get(key) for run in runs}) > 1]


def task_heads(runs: list[Run]) -> set[str]:
    """The head names of multi-task runs (task.heads.<name>.type in their config): "test/riot/acc" is
    the riot head's accuracy, not the accuracy of a class called riot."""
    return {key.split(".")[2] for run in runs for key in run.config if key.startswith("task.heads.")}


def is_per_class(column: str, heads: set[str] = frozenset()) -> bool:
    parts = column.split("/")  # "test/f1/cat"; a multi-task head's: "test/riot/f1/cat"
    return len(parts) >= (4 if len(parts) >= 3 and parts[1] in heads else 3)


def all_columns(runs: list[Run]) -> list[str]:
    """Every metric and cost column some run has: the monitors, the other metrics sorted, the cost."""
    monitors = list(dict.fromkeys(run.monitor for run in runs if run.monitor))
    metrics = sorted({key for run in runs for key in run.metrics} - set(monitors))
    cost_keys = {key for run in runs for key in run.cost}
    cost = [key for key in COST_COLUMNS if key in cost_keys] + sorted(cost_keys - set(COST_COLUMNS))
    return monitors + metrics + cost


def metric_columns(runs: list[Run], per_class: bool = False) -> list[str]:
    """The default columns: the monitors, the test metrics (per-class ones only with `per_class`), and
    the cost columns of COST_COLUMNS that some run has."""
    monitors = list(dict.fromkeys(run.monitor for run in runs if run.monitor))
    tests = sorted({key for run in runs for key in run.metrics if key.startswith("test/")} - set(monitors))
    heads = task_heads(runs)
    tests = [key for key in tests if per_class or not is_per_class(key, heads)]
    cost = [key for key in COST_COLUMNS if any(key in run.cost for run in runs)]
    return monitors + tests + cost


def select_columns(runs: list[Run], patterns: list[str], per_class: bool = False) -> list[str]:
    """The columns named by `patterns` (names or fnmatch patterns: 'test/*', 'cost/*'), in the order
    given. A pattern matches per-class columns only with `per_class` or when it names them itself."""
    available, chosen, heads = all_columns(runs), [], task_heads(runs)
    for pattern in patterns:
        matched = [column for column in available if fnmatch.fnmatchcase(column, pattern)
                   and (per_class or not is_per_class(column, heads) or is_per_class(pattern, heads))]
        if not matched:
            raise ValueError(f"--metrics {pattern} matches no column; the runs have: {', '.join(available)}")
        chosen += [column for column in matched if column not in chosen]
    return chosen


def metric_value(run: Run, column: str) -> float | None:
    """A monitored metric's column holds its best value; a cost column, the run's cost; any other, the
    final value."""
    if column == run.monitor:
        return run.best_value
    if column.startswith("cost/"):
        return run.cost.get(column)
    return run.metrics.get(column)


def column_header(column: str) -> str:
    return COST_COLUMNS.get(column, column)


def format_value(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    if column == "cost/params":
        return f"{value / 1e6:.2f}M"
    if column == "cost/gflops_per_image":
        return f"{value:.4g}"
    if column.startswith("cost/"):
        return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"
    return f"{value:.4f}"


# ----------------------------------------------------------------------------- tabulating


def ranking_key(run: Run) -> tuple:
    """Best first in each run's monitor_mode; runs without a value, then failed runs, last."""
    value = run.best_value
    signed = 0.0 if value is None else (-value if run.monitor_mode == "max" else value)
    return (run.status == "failed", value is None, signed)


def format_number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def blank_if_none(value: Any) -> Any:
    return "" if value is None else value


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    header_line = "  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()
    return "\n".join([header_line, "  ".join("-" * width for width in widths), *lines])


def run_table(runs: list[Run], swept: list[str], metrics: list[str]) -> str:
    header = ["run", *swept, *map(column_header, metrics), "status", "wall_time_s"]
    rows = [
        [
            run.name,
            *(short_value(run.overrides.get(key, DEFAULT), 4) for key in swept),
            *(format_value(column, metric_value(run, column)) for column in metrics),
            run.status,
            format_number(run.wall_time_s, 1),
        ]
        for run in runs
    ]
    return format_table(header, rows)


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1; 0 for a single value) and count."""
    if len(values) == 1:
        return values[0], 0.0, 1
    return statistics.mean(values), statistics.stdev(values), len(values)


def group_values(members: list[Run], column: str) -> list[float]:
    """A metric's values over the group's runs that did not fail and have it."""
    values = [metric_value(run, column) for run in members if run.status != "failed"]
    return [value for value in values if value is not None]


def group_stats(members: list[Run], column: str) -> tuple[float, float, int] | None:
    """mean_std of a metric over the group's runs that did not fail; None when none has it."""
    values = group_values(members, column)
    return mean_std(values) if values else None


def group_by_seed(runs: list[Run], swept: list[str]) -> list[tuple[dict[str, str], list[Run]]]:
    """Runs whose swept overrides agree on everything but the seed; best mean monitored value first."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        settings = tuple((key, run.overrides.get(key, DEFAULT)) for key in swept if key != "seed")
        groups.setdefault(settings, []).append(run)

    def ranking(members: list[Run]) -> tuple:
        stats = group_stats(members, members[0].monitor)
        if stats is None:
            return (True, 0.0)
        return (False, -stats[0] if members[0].monitor_mode == "max" else stats[0])

    ranked = sorted(groups.items(), key=lambda item: ranking(item[1]))
    return [(dict(settings), members) for settings, members in ranked]


def welch_p_value(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) that a and b share their mean; None
    below two values on either side. Two spreads of zero: 0 if the means differ, 1 if not."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        return 1.0 if statistics.mean(a) == statistics.mean(b) else 0.0
    from scipy.stats import ttest_ind  # only when there are seeds to compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(ttest_ind(a, b, equal_var=False).pvalue)
    return p_value if math.isfinite(p_value) else None


def significance_mark(p_value: float | None) -> str:
    """'***' p < 0.001, '**' p < 0.01, '*' p < 0.05, '' otherwise (or untestable)."""
    for level, mark in SIGNIFICANCE_LEVELS:
        if p_value is not None and p_value < level:
            return mark
    return ""


def versus_best(groups: list[tuple[dict[str, str], list[Run]]]) -> list[str]:
    """Each setting's monitored metric against the best setting's (the first group): Welch's p-value and
    its mark; 'best' for the best, 'n<2' where a side has fewer than two runs."""
    if not groups:
        return []
    monitor = groups[0][1][0].monitor
    best = group_values(groups[0][1], monitor)
    cells = ["best"]
    for _, members in groups[1:]:
        p_value = welch_p_value(best, group_values(members, monitor))
        cells.append("n<2" if p_value is None else f"p={p_value:.2g} {significance_mark(p_value)}".rstrip())
    return cells


def group_table(groups: list[tuple[dict[str, str], list[Run]]], metrics: list[str]) -> str:
    keys = list(groups[0][0])
    header = [*keys, *map(column_header, metrics), "vs best", "runs", "wall_time_s"]
    rows = []
    for (settings, members), versus in zip(groups, versus_best(groups)):
        cells = [short_value(settings[key], 4) for key in keys]
        for column in metrics:
            stats = group_stats(members, column)
            if stats is None:
                cells.append("-")
            elif column.startswith("cost/"):  # a property of the setting: its mean is enough
                cells.append(format_value(column, stats[0]))
            else:
                cells.append(f"{stats[0]:.4f} ± {stats[1]:.4f} (n={stats[2]})")
        cells.append(versus)
        status_counts = Counter(run.status for run in members)
        cells.append(", ".join(f"{count} {status}" for status, count in status_counts.items()))
        wall_times = [run.wall_time_s for run in members if run.wall_time_s is not None]
        cells.append(format_number(statistics.mean(wall_times) if wall_times else None, 1))
        rows.append(cells)
    return format_table(header, rows)


def write_csv(runs: list[Run], swept: list[str], metrics: list[str], path: Path) -> None:
    """One row per run, every column: all overrides (swept first), metrics, and where the run lives."""
    other_keys = [key for key in dict.fromkeys(k for run in runs for k in run.overrides) if key not in swept]
    header = [
        "run",
        "status",
        *swept,
        *other_keys,
        *metrics,
        "monitor",
        "monitor_mode",
        "best_epoch",
        "wall_time_s",
        "error",
        "path",
    ]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for run in runs:
            writer.writerow(
                [
                    run.name,
                    run.status,
                    *(run.overrides.get(key, DEFAULT) for key in [*swept, *other_keys]),
                    *(blank_if_none(metric_value(run, column)) for column in metrics),
                    run.monitor,
                    run.monitor_mode,
                    blank_if_none(run.best_epoch),
                    blank_if_none(run.wall_time_s),
                    blank_if_none(run.error),
                    run.path,
                ]
            )


# ----------------------------------------------------------------------------- figures


def as_numbers(values: list[str]) -> list[float] | None:
    try:
        numbers = [float(value) for value in values]
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(number) for number in numbers) else None


def axis_scale(values: list[float]) -> str:
    """'log' for positive values spanning 10x or more (learning rates, weight decays), else 'linear'."""
    return "log" if values and min(values) > 0 and max(values) >= 10 * min(values) else "linear"


def pareto_front(points: list[tuple[float, float]], lower_x_is_better: bool = True,
                 higher_y_is_better: bool = True) -> list[int]:
    """Indices of the points that no other point beats: none is at least as good on both axes and better
    on one. Sorted from the cheapest end of x."""
    sign_x = 1 if lower_x_is_better else -1
    sign_y = -1 if higher_y_is_better else 1
    scored = [(sign_x * x, sign_y * y) for x, y in points]  # now lower is better on both

    def beaten(i: int) -> bool:
        return any(other[0] <= scored[i][0] and other[1] <= scored[i][1] and other != scored[i]
                   for other in scored)

    return sorted((i for i in range(len(points)) if not beaten(i)), key=lambda i: scored[i])


def setting_value(run: Run, key: str) -> str:
    """The run's value of a swept key: its override, else the config value it ran with (for a plot's
    axis), else '(default)'."""
    if key in run.overrides:
        return run.overrides[key]
    value = run.config.get(key)
    return DEFAULT if value is None or isinstance(value, (dict, list)) else str(value)


def short_key(key: str) -> str:
    return re.split(r"[./]", key)[-1]  # "optimizer.lr" -> "lr", "model/attention" -> "attention"


def short_value(value: str, digits: int = 3) -> str:
    """A swept value as shown: a non-integer number to `digits` significant digits (an Optuna lr,
    0.0017108329210577344: 0.00171), anything else as it is."""
    number = as_numbers([value])
    return f"{number[0]:.{digits}g}" if number and not value.lstrip("-").isdigit() else value


def setting_label(settings: dict[str, str], width: int = 40, among: list[dict[str, str]] | None = None) -> str:
    """'depth=4, lr=0.01': each key's last part, numbers to 3 digits; cut to `width` characters. With
    `among` (the settings labelled beside it), only the keys whose values differ among those: a legend of
    eight trials that share most of their keys then names what tells them apart."""
    if among:
        differing = [key for key in settings if len({other.get(key) for other in among}) > 1]
        settings = {key: settings[key] for key in differing} or settings
    label = ", ".join(f"{short_key(key)}={short_value(value)}" for key, value in settings.items()) or "all runs"
    return label if len(label) <= width else label[: width - 1] + "…"


def new_figure(panels: int, columns: int = 3):
    """A Figure on the Agg canvas, not pyplot: no global backend switch, no window, works headless."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = math.ceil(panels / columns)
    columns = min(columns, panels)
    figure = Figure(figsize=(5.2 * columns, 4.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, list(axes[:panels])


def set_numeric_axis(axes, values: list[float]) -> None:
    """A log axis with decade ticks for values spanning 10x or more; else at most 6 plain ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    short = FuncFormatter(lambda value, _: f"{value:g}")  # 0.0003, 1e-05, 200
    if axis_scale(values) == "log":
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
        axes.xaxis.set_major_formatter(short)
        axes.xaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5), numticks=6))
        if max(values) < 100 * min(values):  # less than two decades: label the 2, 3, 5 ticks too
            axes.xaxis.set_minor_formatter(short)
    else:
        integer = all(value == int(value) for value in values)
        axes.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=integer))


def tick_labels_overlap(axes) -> bool:
    """Whether any two visible x tick labels of `axes` (major and minor) overlap, as last drawn."""
    renderer = axes.figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in axes.xaxis.get_ticklabels(which="both")
             if label.get_visible() and label.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def untangle_tick_labels(figure) -> None:
    """No two x tick labels of a panel print over each other: where they would, they are slanted, then
    upright; where they still would, the minor labels go, then numeric axes get fewer ticks and categories
    smaller type."""
    from matplotlib.ticker import FixedLocator, LogLocator, MaxNLocator, NullFormatter

    figure.canvas.draw()  # once; again only where labels had to move
    for axes in figure.axes:
        if not axes.get_visible() or not tick_labels_overlap(axes):
            continue
        for rotation, alignment in ((35, "right"), (90, "center")):  # slanted, else upright
            axes.tick_params(axis="x", which="both", labelrotation=rotation)
            for label in axes.xaxis.get_ticklabels(which="both"):
                label.set_horizontalalignment(alignment)
            figure.canvas.draw()
            if not tick_labels_overlap(axes):
                break
        if tick_labels_overlap(axes):
            axes.xaxis.set_minor_formatter(NullFormatter())
            figure.canvas.draw()
        categorical = isinstance(axes.xaxis.get_major_locator(), FixedLocator)
        size, bins = 9.0, 5
        while tick_labels_overlap(axes) and size > 5 and bins > 1:
            if categorical:
                size -= 1
                axes.tick_params(axis="x", labelsize=size)
            elif axes.get_xscale() == "log":
                axes.xaxis.set_major_locator(LogLocator(base=10, numticks=bins))
            else:
                axes.xaxis.set_major_locator(MaxNLocator(nbins=bins))
            bins -= 1
            figure.canvas.draw()


def group_curve(members: list[Run]) -> tuple[list[float], list[float], list[float]]:
    """Epochs, mean and sample std of the monitored metric over the group's runs, epoch by epoch."""
    by_epoch: dict[float, list[float]] = {}
    for run in members:
        for epoch, value in run.curve:
            by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    stats = [mean_std(by_epoch[epoch]) for epoch in epochs]
    return epochs, [mean for mean, _, _ in stats], [std for _, std, _ in stats]


def comparison_figure(runs: list[Run], swept: list[str], highlighted: int = 8):
    """Learning curves (mean over seeds, ± std band; the best `highlighted` settings in colour, the rest
    grey) and the monitored metric against each swept parameter (mean ± std error bars over seeds, one
    line per value of the other parameter when two are swept; a log axis when values span 10x or more)."""
    from matplotlib.ticker import MaxNLocator

    monitor, _ = Counter(run.monitor for run in runs).most_common(1)[0]
    parameters = [key for key in swept if key != "seed"]
    groups = group_by_seed(runs, swept)
    figure, panels = new_figure(1 + len(parameters))
    curve_axes = panels[0]
    for rank, (settings, members) in reversed(list(enumerate(groups))):  # the best drawn last, on top
        epochs, means, stds = group_curve(members)
        if not epochs:
            continue
        failed = all(run.status == "failed" for run in members)
        n = len(members)
        style = {"linestyle": "--" if failed else "-", "marker": ".", "zorder": 3 + len(groups) - rank}
        if rank < highlighted:
            label = setting_label(settings, among=[other for other, _ in groups[:highlighted]])
            style["label"] = f"{label} (n={n})" if n > 1 else label
            style["color"] = f"C{rank % 10}"
        else:
            style.update(color="0.75", linewidth=0.8, marker=None)
        line, = curve_axes.plot(epochs, means, **style)
        if n > 1 and rank < highlighted:
            lower = [mean - std for mean, std in zip(means, stds)]
            upper = [mean + std for mean, std in zip(means, stds)]
            curve_axes.fill_between(epochs, lower, upper, color=line.get_color(), alpha=0.2, linewidth=0)
    seeds = max(len(members) for _, members in groups)
    title = f"{monitor} by epoch" + (", mean ± std over seeds" if seeds > 1 else "")
    if len(groups) > highlighted:
        title += f"\n(best {highlighted} of {len(groups)} settings in colour)"
    curve_axes.set(xlabel="epoch", ylabel=monitor, title=title)
    curve_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve_axes.grid(alpha=0.3)
    if groups:
        handles, labels = curve_axes.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: -handles[i].get_zorder())  # best first
        curve_axes.legend([handles[i] for i in order], [labels[i] for i in order], fontsize="x-small")

    scored = [(settings, members, group_stats(members, monitor)) for settings, members in groups]
    scored = [(settings, members, stats) for settings, members, stats in scored if stats is not None]
    for axes, key in zip(panels[1:], parameters):
        others = [other for other in parameters if other != key]
        # two swept parameters: one line per value of the other (an interaction plot)
        by_other = len(others) == 1 and len({settings[others[0]] for settings, _, _ in scored}) <= 6
        series: dict[str, list] = {}
        for settings, members, stats in scored:
            name = f"{short_key(others[0])}={short_value(settings[others[0]])}" if by_other else ""
            series.setdefault(name, []).append((setting_value(members[0], key), stats[0], stats[1]))
        all_values = [value for points in series.values() for value, _, _ in points]
        numbers = as_numbers(all_values)
        categories = sorted(set(all_values), key=natural_key)
        def series_order(item):  # by the other parameter's value, numerically where it is a number
            value = item[0].partition("=")[2]
            return (0, float(value), "") if as_numbers([value]) else (1, 0.0, value)

        for index, (name, points) in enumerate(sorted(series.items(), key=series_order)):
            points.sort(key=lambda point: float(point[0]) if numbers is not None else categories.index(point[0]))
            xs = [float(value) if numbers is not None else categories.index(value) for value, _, _ in points]
            axes.errorbar(xs, [mean for _, mean, _ in points], yerr=[std for _, _, std in points],
                          fmt="o-" if by_other else "o", capsize=4, alpha=0.85, label=name or None,
                          color=f"C{index % 10}")
        if numbers is not None:
            set_numeric_axis(axes, numbers)
        else:
            axes.set_xticks(range(len(categories)), categories)
            axes.set_xlim(-0.5, len(categories) - 0.5)
        axes.set(xlabel=key, ylabel=f"best {monitor}", title=f"best {monitor} vs {key}")
        axes.grid(alpha=0.3)
        if by_other:
            axes.legend(fontsize="x-small")
    untangle_tick_labels(figure)
    return figure


COST_AXES = {  # cost column -> (axis label, lower is better)
    "cost/gflops_per_image": ("forward GFLOPs per image", True),
    "cost/train_images_per_s": ("training images/s", False),
}


def cost_figure(runs: list[Run], swept: list[str]):
    """The monitored metric (mean ± std over seeds) against each cost of COST_AXES that varies across
    settings, with the Pareto front (the settings no other beats on both) joined and labelled; None when
    no cost varies."""
    monitor, _ = Counter(run.monitor for run in runs).most_common(1)[0]
    monitor_mode = next(run.monitor_mode for run in runs if run.monitor == monitor)
    groups = [(settings, members) for settings, members in group_by_seed(runs, swept)
              if group_stats(members, monitor) is not None]
    panels = []
    for column, (label, lower_is_better) in COST_AXES.items():
        xs = [group_stats(members, column) for _, members in groups]
        if all(x is not None for x in xs) and len({round(x[0], 9) for x in xs}) > 1:
            panels.append((column, label, lower_is_better, xs))
    if not panels:
        return None
    figure, axes_list = new_figure(len(panels), columns=2)
    ys = [group_stats(members, monitor) for _, members in groups]
    for axes, (column, label, lower_is_better, xs) in zip(axes_list, panels):
        points = [(x[0], y[0]) for x, y in zip(xs, ys)]
        front = pareto_front(points, lower_x_is_better=lower_is_better, higher_y_is_better=monitor_mode == "max")
        others = [i for i in range(len(points)) if i not in front]
        axes.errorbar([points[i][0] for i in others], [points[i][1] for i in others],
                      xerr=[xs[i][1] for i in others], yerr=[ys[i][1] for i in others],
                      fmt="o", color="tab:gray", alpha=0.6, capsize=3, label="settings")
        axes.errorbar([points[i][0] for i in front], [points[i][1] for i in front],
                      xerr=[xs[i][1] for i in front], yerr=[ys[i][1] for i in front],
                      fmt="o", color="tab:red", capsize=3, label="Pareto front")
        axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "-", color="tab:red", alpha=0.6)
        for i in front[:8]:  # name the front's settings (the rest are in the table)
            name = setting_label(groups[i][0], width=32, among=[groups[j][0] for j in front[:8]])
            axes.annotate(name, points[i], textcoords="offset points",
                          xytext=(6, -10), fontsize="x-small", color="tab:red")
        set_numeric_axis(axes, [x for x, _ in points])
        better = "lower" if lower_is_better else "higher"
        axes.set(xlabel=f"{label} ({better} is better)", ylabel=f"best {monitor}", title=f"best {monitor} vs {label}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    untangle_tick_labels(figure)
    return figure


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vitsweep compare",
        description="Compare runs: sweep dirs, job dirs, dirs of sweeps, or dirs of W&B offline runs.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    parser.add_argument(
        "--out", type=Path, help="where to write comparison.csv/.png and cost.png (default: the first DIR)"
    )
    parser.add_argument(
        "--metrics", help="columns to show, comma-separated names or patterns: 'val/acc,test/*,cost/*' "
        "(default: the monitor, the test metrics, and params, GFLOPs, img/s, peak MiB)"
    )
    parser.add_argument(
        "--per-class", action="store_true", help="also the per-class metrics (test/<metric>/<class>)"
    )
    args = parser.parse_args(argv)

    runs, seen_paths = [], set()
    for root in args.dirs:
        if not root.exists():
            print(f"vitsweep compare: error: {root} does not exist", file=sys.stderr)
            return 1
        found = discover_runs(root)
        if not found:
            print(
                f"vitsweep compare: error: no runs in {root} (no summary.json, no run-*.wandb)",
                file=sys.stderr,
            )
            return 1
        # "compare sweep sweep/3" names job 3 twice: count it once
        runs += [run for run in found if run.path.resolve() not in seen_paths]
        seen_paths.update(run.path.resolve() for run in found)

    runs.sort(key=ranking_key)
    swept = swept_keys(runs)
    try:
        metrics = (select_columns(runs, [p.strip() for p in args.metrics.split(",") if p.strip()], args.per_class)
                   if args.metrics else metric_columns(runs, per_class=args.per_class))
    except ValueError as error:
        print(f"vitsweep compare: error: {error}", file=sys.stderr)
        return 1
    # files first: `vitsweep compare ... | head` closes stdout early and must still leave them
    out_dir = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(runs, swept, all_columns(runs), out_dir / "comparison.csv")
    written = [out_dir / "comparison.csv"]
    comparison_figure(runs, swept).savefig(out_dir / "comparison.png", dpi=100)
    written.append(out_dir / "comparison.png")
    figure = cost_figure(runs, swept)
    if figure is not None:
        figure.savefig(out_dir / "cost.png", dpi=100)
        written.append(out_dir / "cost.png")

    modes = ", ".join(sorted({f"{run.monitor} ({run.monitor_mode})" for run in runs if run.monitor}))
    print(f"{len(runs)} runs, best first by {modes}; failed runs last\n")
    print(run_table(runs, swept, metrics))
    groups = group_by_seed(runs, swept)
    if any(len(members) > 1 for _, members in groups):
        print(f"\n{len(groups)} settings, mean ± sample std over seeds; vs best: Welch's t-test of "
              f"{groups[0][1][0].monitor} against the best setting (* p<0.05, ** p<0.01, *** p<0.001)\n")
        print(group_table(groups, metrics))
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
