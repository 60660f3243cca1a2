"""Compare runs offline: a table of the swept overrides and the metrics, a CSV and a plot.

    vitsweep compare outputs/multirun/2024-05-01/12-00-00 [MORE_DIRS...] [--out DIR]
    python -m vitsweep.compare ...

A DIR can be a sweep dir, a job dir, a dir of many sweeps, or a dir of W&B offline runs. Job dirs
(dirs holding summary.json, see docs/outputs.md) are read from summary.json and metrics.jsonl;
W&B offline runs outside job dirs are read from their run-*.wandb file. Runs that differ only by
their seed are also shown as one row, mean ± sample std.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT = "(default)"  # shown for a key that some runs override and this one does not


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
    test_metrics: dict[str, float] = field(default_factory=dict)  # final test/* values
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
        test_metrics={k: v for k, v in (summary.get("metrics") or {}).items() if k.startswith("test/")},
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
        test_metrics={k: v for k, v in summary.items() if k.startswith("test/") and not isinstance(v, dict)},
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


# ----------------------------------------------------------------------------- tabulating


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose values differ across runs, in the order they were first given."""
    all_keys = dict.fromkeys(key for run in runs for key in run.overrides)
    return [key for key in all_keys if len({run.overrides.get(key) for run in runs}) > 1]


def metric_columns(runs: list[Run]) -> list[str]:
    monitors = list(dict.fromkeys(run.monitor for run in runs if run.monitor))
    tests = sorted({key for run in runs for key in run.test_metrics} - set(monitors))
    return monitors + tests


def metric_value(run: Run, column: str) -> float | None:
    """A monitored metric's column holds its best value; a test metric's, its final value."""
    return run.best_value if column == run.monitor else run.test_metrics.get(column)


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
    header = ["run", *swept, *metrics, "status", "wall_time_s"]
    rows = [
        [
            run.name,
            *(run.overrides.get(key, DEFAULT) for key in swept),
            *(format_number(metric_value(run, column)) for column in metrics),
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


def group_stats(members: list[Run], column: str) -> tuple[float, float, int] | None:
    """mean_std of a metric over the group's runs that did not fail; None when none has it."""
    values = [metric_value(run, column) for run in members if run.status != "failed"]
    values = [value for value in values if value is not None]
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


def group_table(groups: list[tuple[dict[str, str], list[Run]]], metrics: list[str]) -> str:
    keys = list(groups[0][0])
    header = [*keys, *metrics, "runs", "wall_time_s"]
    rows = []
    for settings, members in groups:
        cells = [settings[key] for key in keys]
        for column in metrics:
            stats = group_stats(members, column)
            cells.append("-" if stats is None else f"{stats[0]:.4f} ± {stats[1]:.4f} (n={stats[2]})")
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


# ----------------------------------------------------------------------------- plotting


def as_numbers(values: list[str]) -> list[float] | None:
    try:
        numbers = [float(value) for value in values]
    except ValueError:
        return None
    return numbers if all(math.isfinite(number) for number in numbers) else None


def plot_comparison(runs: list[Run], swept: list[str], path: Path) -> None:
    """Left: every run's validation curve. Right: best monitored value against each swept parameter."""
    # Figure + the Agg canvas, not pyplot: no global backend switch, no window, works headless
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    monitor, _ = Counter(run.monitor for run in runs).most_common(1)[0]
    parameters = [key for key in swept if key != "seed"] or swept
    figure = Figure(figsize=(6 + 4 * len(parameters), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    curve_axes, *parameter_axes = figure.subplots(1, 1 + len(parameters), squeeze=False)[0]

    for run in runs:
        if run.curve:
            epochs, values = zip(*run.curve)
            style = "--" if run.status == "failed" else "-"
            label = run.name if len(run.name) <= 40 else run.name[:39] + "…"
            curve_axes.plot(epochs, values, style, marker=".", label=label)
    curve_axes.set(xlabel="epoch", ylabel=monitor, title=f"{monitor}, every run")
    curve_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if 0 < len(runs) <= 12:  # beyond that a legend hides the curves
        curve_axes.legend(fontsize="small")

    ranked = [run for run in runs if run.best_value is not None and run.status != "failed"]
    best_values = [run.best_value for run in ranked]
    for axes, key in zip(parameter_axes, parameters):
        labels = [run.overrides.get(key, DEFAULT) for run in ranked]
        numbers = as_numbers(labels)
        if numbers is not None:
            axes.scatter(numbers, best_values)
            if numbers and min(numbers) > 0 and max(numbers) >= 10 * min(numbers):
                axes.set_xscale("log")  # learning rates, weight decays
        else:
            categories = sorted(set(labels), key=natural_key)
            axes.scatter([categories.index(label) for label in labels], best_values)
            axes.set_xticks(range(len(categories)), categories, rotation=30)
        axes.set(xlabel=key, ylabel=f"best {monitor}", title=f"best {monitor} vs {key}")
    figure.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vitsweep compare",
        description="Compare runs: sweep dirs, job dirs, dirs of sweeps, or dirs of W&B offline runs.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    parser.add_argument(
        "--out", type=Path, help="where to write comparison.csv/.png (default: the first DIR)"
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
    swept, metrics = swept_keys(runs), metric_columns(runs)
    # files first: `vitsweep compare ... | head` closes stdout early and must still leave them
    out_dir = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(runs, swept, metrics, out_dir / "comparison.csv")
    plot_comparison(runs, swept, out_dir / "comparison.png")

    modes = ", ".join(sorted({f"{run.monitor} ({run.monitor_mode})" for run in runs if run.monitor}))
    print(f"{len(runs)} runs, best first by {modes}; failed runs last\n")
    print(run_table(runs, swept, metrics))
    groups = group_by_seed(runs, swept)
    if any(len(members) > 1 for _, members in groups):
        print(f"\n{len(groups)} settings, mean ± sample std over seeds\n")
        print(group_table(groups, metrics))
    print(f"\nwrote {out_dir / 'comparison.csv'} and {out_dir / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
