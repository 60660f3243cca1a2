"""vitsweep compare on sweep dirs built here (docs/outputs.md layout) and on real W&B offline runs."""

import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import scipy.stats
import wandb
from conftest import offline_wandb_env

from vitsweep import cli, compare
from vitsweep.compare import discover_runs, group_by_seed, group_stats, main, swept_keys

# job number -> (overrides, best val/acc, status); a 2x2 grid over depth and lr, two more seeds of
# one grid cell, and one failed job whose partial best would rank first if failures were not last
SWEEP = {
    0: (["data=digits", "model.depth=2", "optimizer.lr=0.001", "seed=0"], 0.70, "completed"),
    1: (["data=digits", "model.depth=2", "optimizer.lr=0.01", "seed=0"], 0.75, "completed"),
    2: (["data=digits", "model.depth=4", "optimizer.lr=0.001", "seed=0"], 0.80, "completed"),
    3: (["data=digits", "model.depth=4", "optimizer.lr=0.01", "seed=0"], 0.86, "completed"),
    4: (["data=digits", "model.depth=4", "optimizer.lr=0.01", "seed=1"], 0.90, "completed"),
    5: (["data=digits", "model.depth=4", "optimizer.lr=0.01", "seed=2"], 0.88, "completed"),
    6: (["data=digits", "model.depth=8", "optimizer.lr=0.1", "seed=0"], 0.95, "failed"),
}
SEED_GROUP = [3, 4, 5]
EPOCHS = 3


def expected_test_acc(best_value):
    return round(best_value - 0.02, 4)


def write_job(job_dir, overrides, best_value, status):
    """A job dir as the training loop leaves it: .hydra/overrides.yaml, metrics.jsonl, summary.json."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {override}\n" for override in overrides))
    epochs_run = EPOCHS if status == "completed" else 2
    val_accs = [round(best_value * (epoch + 1) / epochs_run, 4) for epoch in range(epochs_run)]
    rows = []
    for epoch, val_acc in enumerate(val_accs):
        step, time_s = 10 * (epoch + 1), 1.0 + epoch
        rows.append({"step": step, "epoch": epoch, "time_s": time_s, "train/loss": 2.0 - val_acc})
        rows.append(
            {"step": step, "epoch": epoch, "time_s": time_s, "val/acc": val_acc, "val/loss": 1 - val_acc}
        )
    if status == "completed":  # as the loop logs it: the best checkpoint's val metrics again, beside test/*
        test_metrics = {"test/acc": expected_test_acc(best_value), "test/loss": 1.0 - best_value}
        rows.append({"step": 30, "epoch": EPOCHS, "time_s": 5.0, "val/acc": best_value, **test_metrics})
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = {"val/acc": val_accs[-1]}
    if status == "completed":
        metrics.update({"test/acc": expected_test_acc(best_value), "test/loss": 1.0 - best_value})
    summary = {
        "status": status,
        "error": "RuntimeError: loss is nan" if status == "failed" else None,
        "monitor": "val/acc",
        "monitor_mode": "max",
        "best_value": best_value,
        "best_epoch": epochs_run - 1,
        "metrics": metrics,
        "wall_time_s": 10.0 + len(overrides),
        "num_params": 1000,
        "overrides": overrides,
        "seed": int(overrides[-1].split("=")[1]),
        "epochs_completed": epochs_run,
        "steps": 10 * epochs_run,
        "job_dir": str(job_dir),
        "run_name": job_dir.name,
        "group": "sweep",
    }
    (job_dir / "summary.json").write_text(json.dumps(summary, indent=2))


@pytest.fixture
def sweep_dir(tmp_path):
    sweep = tmp_path / "multirun" / "12-00-00"
    for job_number, (overrides, best_value, status) in SWEEP.items():
        write_job(sweep / str(job_number), overrides, best_value, status)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def table_rows(printed, first_column):
    """The rows of the printed table whose header starts with first_column, each split on 2+ spaces."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_column + " "))
    rows = []
    for line in lines[start + 2 :]:  # skip the header and the dashes under it
        if not line.strip():
            break
        rows.append([cell.strip() for cell in line.split("  ") if cell.strip()])
    return lines[start].split(), rows


def expected_order():
    """Job numbers by best val/acc, highest first, failed jobs last."""
    return sorted(SWEEP, key=lambda number: (SWEEP[number][2] == "failed", -SWEEP[number][1]))


def test_table_is_sorted_best_first_with_swept_columns(sweep_dir, capsys):
    assert main([str(sweep_dir)]) == 0
    header, rows = table_rows(capsys.readouterr().out, "run")
    # data=digits is the same in every job: not a column
    assert header == [
        "run",
        "model.depth",
        "optimizer.lr",
        "seed",
        "val/acc",
        "test/acc",
        "test/loss",
        "status",
        "wall_time_s",
    ]
    assert [row[0] for row in rows] == [f"12-00-00/{number}" for number in expected_order()]
    for row, number in zip(rows, expected_order()):
        overrides, best_value, status = SWEEP[number]
        assert row[1:4] == [override.split("=")[1] for override in overrides[1:]]
        assert float(row[4]) == pytest.approx(best_value)
        assert row[-2] == status
    assert rows[-1][5:7] == ["-", "-"]  # the failed job has no test metrics


def test_tables_show_an_optuna_lr_to_four_significant_digits(tmp_path, capsys):
    sweep = tmp_path / "search"
    for number, (lr, seed, best) in enumerate([("0.0017108329210577344", 0, 0.7), ("0.0017108329210577344", 1, 0.72),
                                               ("3e-4", 0, 0.6), ("0.003", 0, 0.65)]):
        write_job(sweep / str(number), ["data=digits", f"optimizer.lr={lr}", "model.depth=2", f"seed={seed}"], best,
                  "completed")
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    _, rows = table_rows(printed, "run")
    assert [row[1] for row in rows] == ["0.001711", "0.001711", "0.003", "0.0003"]
    assert [row[2] for row in rows] == ["1", "0", "0", "0"]  # the seeds: integers as they are
    _, groups = table_rows(printed, "optimizer.lr")
    assert [row[0] for row in groups] == ["0.001711", "0.003", "0.0003"]  # the seed group, then the others
    assert "0.0017108329210577344" not in printed


def test_reads_validation_curve_without_the_final_test_row(sweep_dir):
    runs = {run.name: run for run in discover_runs(sweep_dir)}
    curve = runs["12-00-00/4"].curve
    assert [epoch for epoch, _ in curve] == list(range(EPOCHS))
    assert curve[-1][1] == pytest.approx(SWEEP[4][1])
    assert [epoch for epoch, _ in runs["12-00-00/6"].curve] == [0, 1]  # failed after two epochs


def test_seed_group_mean_and_sample_std(sweep_dir, capsys):
    seed_values = [SWEEP[number][1] for number in SEED_GROUP]  # 0.86, 0.90, 0.88
    runs = discover_runs(sweep_dir)
    groups = group_by_seed(runs, swept_keys(runs))
    assert len(groups) == len(SWEEP) - len(SEED_GROUP) + 1
    settings, members = groups[0]  # the best mean comes first
    assert settings == {"model.depth": "4", "optimizer.lr": "0.01"}
    assert sorted(run.overrides["seed"] for run in members) == ["0", "1", "2"]
    mean, std, count = group_stats(members, "val/acc")
    assert mean == pytest.approx(0.88) and mean == pytest.approx(statistics.mean(seed_values))
    assert std == pytest.approx(0.02) and std == pytest.approx(statistics.stdev(seed_values))
    assert count == 3
    assert group_stats(members, "test/acc")[:2] == pytest.approx((0.86, 0.02))

    assert main([str(sweep_dir)]) == 0
    header, rows = table_rows(capsys.readouterr().out, "model.depth")
    assert header[:3] == ["model.depth", "optimizer.lr", "val/acc"]
    assert rows[0][:3] == ["4", "0.01", "0.8800 ± 0.0200 (n=3)"]
    assert rows[0][-2] == "3 completed"
    assert rows[1][:3] == ["4", "0.001", "0.8000 ± 0.0000 (n=1)"]
    assert rows[-1][:3] == ["8", "0.1", "-"] and rows[-1][-2] == "1 failed"


def test_no_group_table_without_repeated_settings(sweep_dir, capsys):
    for number in SEED_GROUP[1:]:
        shutil.rmtree(sweep_dir / str(number))
    assert main([str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    assert "± " not in printed and "(n=" not in printed


def test_writes_csv_and_png(sweep_dir, tmp_path):
    out_dir = tmp_path / "report"
    assert main([str(sweep_dir), "--out", str(out_dir)]) == 0
    assert not (sweep_dir / "comparison.csv").exists()

    with open(out_dir / "comparison.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["run"] for row in rows] == [f"12-00-00/{number}" for number in expected_order()]
    for row, number in zip(rows, expected_order()):
        overrides, best_value, status = SWEEP[number]
        assert {key: row[key] for key in ["data", "model.depth", "optimizer.lr", "seed"]} == dict(
            override.split("=") for override in overrides
        )
        assert float(row["val/acc"]) == best_value
        assert row["status"] == status and row["monitor"] == "val/acc" and row["monitor_mode"] == "max"
        if status == "completed":
            assert float(row["test/acc"]) == expected_test_acc(best_value) and row["error"] == ""
        else:
            assert row["test/acc"] == "" and row["error"] == "RuntimeError: loss is nan"

    image = matplotlib.image.imread(out_dir / "comparison.png")
    height, width, channels = image.shape
    assert height >= 300 and width >= 1000 and channels in (3, 4)  # curves + depth + lr panels
    assert image.std() > 0.01  # something was drawn


def test_default_out_dir_dir_of_sweeps_and_single_job(sweep_dir, tmp_path, capsys):
    second_sweep = sweep_dir.parent / "13-00-00"
    write_job(second_sweep / "0", ["model.depth=16", "optimizer.lr=0.01", "seed=0"], 0.99, "completed")
    assert main([str(sweep_dir.parent)]) == 0  # a dir of two sweeps
    _, rows = table_rows(capsys.readouterr().out, "run")
    assert len(rows) == len(SWEEP) + 1 and rows[0][0] == "multirun/13-00-00/0"
    assert (sweep_dir.parent / "comparison.csv").exists() and (sweep_dir.parent / "comparison.png").exists()

    assert main([str(sweep_dir / "2")]) == 0  # one job: no swept columns, still a table and a plot
    header, rows = table_rows(capsys.readouterr().out, "run")
    assert header == ["run", "val/acc", "test/acc", "test/loss", "status", "wall_time_s"]
    assert rows == [["2", "0.8000", "0.7800", "0.2000", "completed", "14.0"]]
    assert matplotlib.image.imread(sweep_dir / "2" / "comparison.png").shape[1] >= 500


def test_overlapping_dirs_and_half_written_summary(sweep_dir, capsys):
    (sweep_dir / "6" / "summary.json").write_text('{"status": "runn')  # caught mid-write
    assert main([str(sweep_dir), str(sweep_dir / "3")]) == 0
    captured = capsys.readouterr()
    _, rows = table_rows(captured.out, "run")
    assert sorted(row[0] for row in rows) == sorted(f"12-00-00/{number}" for number in range(6))
    assert "skipping" in captured.err and "12-00-00/6" in captured.err


def test_clear_error_for_missing_or_empty_dir(tmp_path, capsys):
    assert main([str(tmp_path / "no-such-sweep")]) != 0
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no-such-sweep" in error and "does not exist" in error

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) != 0
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no runs" in error
    assert not (tmp_path / "empty" / "comparison.csv").exists()


def test_cli_dispatch(sweep_dir, capsys):
    assert cli.main(["compare", str(sweep_dir)]) == 0
    assert "12-00-00/4" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) != 0
    assert "compare" in capsys.readouterr().err


def run_module(*args):
    command = [sys.executable, "-m", "vitsweep.compare", *map(str, args)]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)


def test_module_entry_point_in_subprocess(sweep_dir, tmp_path):
    result = run_module(sweep_dir)
    assert result.returncode == 0, result.stderr
    assert "0.8800 ± 0.0200 (n=3)" in result.stdout
    assert (sweep_dir / "comparison.csv").exists() and (sweep_dir / "comparison.png").exists()

    result = run_module(tmp_path / "missing")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- W&B offline runs


# name -> (overrides, val/acc per epoch, exit code)
WANDB_RUNS = {
    "depth2": (["model.depth=2", "seed=0"], [0.5, 0.6, 0.65], 0),
    "depth4": (["model.depth=4", "seed=0"], [0.6, 0.8, 0.7], 0),
    "depth8": (["model.depth=8", "seed=0"], [0.9], 1),
}


def test_compare_dir_of_wandb_offline_runs_only(tmp_path, monkeypatch, capsys):
    wandb_root = tmp_path / "runs"
    offline_wandb_env(monkeypatch, wandb_root)
    for name, (overrides, val_accs, exit_code) in WANDB_RUNS.items():
        run = wandb.init(
            mode="offline",
            dir=wandb_root,
            project="vitsweep-test",
            name=name,
            config={"model": {"depth": int(overrides[0].split("=")[1])}, "overrides": overrides},
        )
        for epoch, val_acc in enumerate(val_accs):
            run.log({"epoch": epoch, "val/acc": val_acc})
        if exit_code == 0:
            run.log({"test/acc": val_accs[-1] - 0.05})
        else:  # as vitsweep's WandbLogger.finish records a failure
            run.summary["error"] = "RuntimeError: loss is nan"
        run.finish(exit_code=exit_code)
    wandb.teardown()  # wait for W&B's service to write every record of the runs before reading them back

    # a job dir keeps its own W&B run too; compare must count that job once, from summary.json
    (first_run,) = [path for path in (wandb_root / "wandb").glob("offline-run-*") if path.is_dir()][:1]
    job_dir = wandb_root / "job"
    write_job(job_dir, ["model.depth=32", "seed=0"], 0.5, "completed")
    shutil.copytree(first_run, job_dir / "wandb" / first_run.name)

    assert main([str(wandb_root), "--out", str(tmp_path / "report")]) == 0
    header, rows = table_rows(capsys.readouterr().out, "run")
    assert header == ["run", "model.depth", "val/acc", "test/acc", "test/loss", "status", "wall_time_s"]
    by_best = sorted(WANDB_RUNS, key=lambda name: (WANDB_RUNS[name][2] != 0, -max(WANDB_RUNS[name][1])))
    assert [row[0].split(" (")[0] for row in rows] == [by_best[0], by_best[1], "runs/job", by_best[2]]
    for row in rows:
        if row[0] == "runs/job":
            continue
        overrides, val_accs, exit_code = WANDB_RUNS[row[0].split(" (")[0]]
        assert row[1] == overrides[0].split("=")[1]
        assert float(row[2]) == pytest.approx(max(val_accs))  # best over the history, not the last value
        assert row[-2] == ("completed" if exit_code == 0 else "failed")

    with open(tmp_path / "report" / "comparison.csv", newline="") as file:
        csv_rows = {row["run"].split(" (")[0]: row for row in csv.DictReader(file)}
    assert csv_rows["depth4"]["best_epoch"] == "1"
    assert float(csv_rows["depth4"]["test/acc"]) == pytest.approx(0.7 - 0.05)
    assert csv_rows["depth8"]["error"] == "RuntimeError: loss is nan"
    assert matplotlib.image.imread(tmp_path / "report" / "comparison.png").shape[0] >= 300


def test_wandb_runs_without_overrides_use_flat_config_and_its_monitor(tmp_path, monkeypatch, capsys):
    wandb_root = tmp_path / "runs"
    offline_wandb_env(monkeypatch, wandb_root)
    val_losses_by_lr = {0.1: [1.0, 0.9], 0.001: [0.8, 0.4]}
    for lr, val_losses in val_losses_by_lr.items():
        config = {"optimizer": {"lr": lr}, "trainer": {"monitor": "val/loss", "monitor_mode": "min"}}
        run = wandb.init(mode="offline", dir=wandb_root, project="vitsweep-test", config=config)
        for epoch, val_loss in enumerate(val_losses):
            run.log({"epoch": epoch, "val/loss": val_loss})
        run.finish()
    wandb.teardown()  # the runs complete on disk before compare reads them (this failed once in a loaded suite)

    assert main([str(wandb_root)]) == 0
    header, rows = table_rows(capsys.readouterr().out, "run")
    assert header == ["run", "optimizer.lr", "val/loss", "status", "wall_time_s"]  # only the key that differs
    lowest_first = sorted(val_losses_by_lr, key=lambda lr: min(val_losses_by_lr[lr]))
    assert [float(row[1]) for row in rows] == lowest_first
    assert [float(row[2]) for row in rows] == [min(val_losses_by_lr[lr]) for lr in lowest_first]


# ----------------------------------------------------------------------------- for researchers: columns,
# significance, figures


def add_cost_and_per_class(job_dir, gflops, images_per_s):
    """What run.py writes since summaries carry the cost: a cost block and per-class test metrics."""
    summary = json.loads((job_dir / "summary.json").read_text())
    summary["cost"] = {"params": 1000 * gflops, "gflops_per_image": gflops, "train_images_per_s": images_per_s,
                       "peak_memory_mib": 512.0, "peak_memory_kind": "process_peak_rss", "time_train_s": 9.0}
    if summary["status"] == "completed":
        summary["metrics"].update({"test/acc/cat": 0.5, "test/acc/dog": 0.6})
    (job_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def costed_sweep(sweep_dir):
    for number, (overrides, _, _) in SWEEP.items():
        depth = int(overrides[1].split("=")[1])
        add_cost_and_per_class(sweep_dir / str(number), gflops=0.01 * depth, images_per_s=1000.0 / depth)
    return sweep_dir


def test_default_columns_are_the_monitor_the_test_metrics_and_the_cost(costed_sweep, capsys):
    assert main([str(costed_sweep)]) == 0
    header, rows = table_rows(capsys.readouterr().out, "run")
    assert header[4:] == ["val/acc", "test/acc", "test/loss", "params", "GFLOPs", "img/s", "peak", "MiB", "status",
                          "wall_time_s"]  # ("peak MiB" splits on its space here)
    best = rows[0]  # job 4: depth 4
    assert best[7:11] == ["0.00M", "0.04", "250", "512"]
    assert not any("test/acc/cat" in line for line in capsys.readouterr().out.splitlines())


def test_per_class_and_chosen_metrics(costed_sweep, capsys):
    assert main([str(costed_sweep), "--per-class"]) == 0
    header, _ = table_rows(capsys.readouterr().out, "run")
    assert "test/acc/cat" in header and "test/acc/dog" in header

    assert main([str(costed_sweep), "--metrics", "test/acc,cost/time_*"]) == 0
    header, rows = table_rows(capsys.readouterr().out, "run")
    assert header[4:6] == ["test/acc", "cost/time_train_s"] and rows[0][5] == "9.00"

    assert main([str(costed_sweep), "--metrics", "test/nope*"]) == 1
    error = capsys.readouterr().err
    assert "--metrics test/nope* matches no column" in error and "test/acc" in error


def test_significance_against_the_best_setting_on_a_known_difference():
    def group(name, values):
        return ({"setting": name}, [compare.Run(name=f"{name}{i}", path=Path(name), overrides={}, status="completed",
                                                monitor="val/acc", monitor_mode="max", best_value=value)
                                    for i, value in enumerate(values)])

    best = [0.90, 0.91, 0.92, 0.91]
    worse = [0.80, 0.81, 0.82, 0.81]  # 0.10 lower with the same spread: t = 0.1 / sqrt(2 * var / 4)
    close = [0.905, 0.915, 0.895, 0.91]
    groups = [group("best", best), group("worse", worse), group("close", close), group("single", [0.95])]
    cells = compare.versus_best(groups)
    assert cells[0] == "best" and cells[3] == "n<2"
    assert cells[1].endswith("***") and not cells[2].endswith("*")

    # Welch's t and its degrees of freedom by hand, against the p-value reported
    def welch(a, b):
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        return 2 * scipy.stats.t.sf(abs(t), df)

    p_worse, p_close = compare.welch_p_value(best, worse), compare.welch_p_value(best, close)
    assert p_worse == pytest.approx(welch(best, worse)) and p_worse < 0.001
    assert p_close == pytest.approx(welch(best, close)) and p_close > 0.05
    assert compare.significance_mark(0.03) == "*" and compare.significance_mark(0.2) == ""


def test_seed_groups_are_marked_against_the_best_in_the_printed_table(sweep_dir, capsys):
    for number, value in ((7, 0.70), (8, 0.71)):  # two more seeds of job 2's setting (depth 4, lr 0.001)
        write_job(sweep_dir / str(number), ["data=digits", "model.depth=4", "optimizer.lr=0.001", f"seed={number}"],
                  value, "completed")
    assert main([str(sweep_dir)]) == 0
    header, rows = table_rows(capsys.readouterr().out, "model.depth")
    assert "vs best" in " ".join(header) or "vs" in header
    by_setting = {(row[0], row[1]): row for row in rows}
    assert by_setting[("4", "0.01")][-3] == "best"
    worse = by_setting[("4", "0.001")]  # 0.70-0.80 against 0.86-0.90
    assert worse[-3].startswith("p=") and worse[-3].endswith("*")
    assert by_setting[("2", "0.01")][-3] == "n<2"


def test_pareto_front_on_constructed_points():
    #          cheap and bad, dominated, the knee, dominated, costly and best, a tie in cost with the knee
    points = [(1.0, 0.50), (2.0, 0.45), (2.0, 0.70), (3.0, 0.65), (4.0, 0.90), (2.0, 0.60)]
    assert compare.pareto_front(points) == [0, 2, 4]
    # images/s: higher is better on x too; a lower accuracy is better for a loss
    assert compare.pareto_front(points, lower_x_is_better=False) == [4]
    assert compare.pareto_front(points, higher_y_is_better=False) == [0, 1]  # (2, 0.45) has the lowest y
    assert compare.pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # equal points beat neither


def test_log_axis_is_chosen_for_values_spanning_ten_times_or_more():
    assert compare.axis_scale([1e-4, 3e-4, 1e-3, 3e-3, 1e-2]) == "log"
    assert compare.axis_scale([1e-3, 1e-2]) == "log"
    assert compare.axis_scale([2, 4, 8]) == "linear"  # 4x
    assert compare.axis_scale([-1.0, 10.0, 100.0]) == "linear"  # not positive


def visible_tick_label_overlaps(figure):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    overlaps = []
    for axes in figure.axes:
        labels = [label for label in axes.xaxis.get_ticklabels(which="both") if label.get_visible() and label.get_text()]
        boxes = [label.get_window_extent(renderer) for label in labels]
        overlaps += [(axes.get_xlabel(), labels[i].get_text(), labels[j].get_text())
                     for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    return overlaps


def lr_sweep(tmp_path, learning_rates, seeds=(0, 1), extra=()):
    sweep = tmp_path / "lr_sweep"
    number = 0
    for lr in learning_rates:
        for seed in seeds:
            value = 0.8 - 0.05 * abs(math.log10(lr) + 3) + 0.01 * seed
            write_job(sweep / str(number), [f"optimizer.lr={lr}", f"seed={seed}", *extra], value, "completed")
            add_cost_and_per_class(sweep / str(number), gflops=0.05, images_per_s=900.0 + 10 * seed)
            number += 1
    return discover_runs(sweep)


@pytest.mark.parametrize("learning_rates", [
    [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],  # the grid of an ablation
    [1e-4 * 100 ** (i / 23) for i in range(24)],  # an Optuna search: 24 values, log-uniform over 1e-4..1e-2
    [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],  # exactly one decade
], ids=["grid", "optuna", "one_decade"])
def test_learning_rates_get_a_log_axis_with_readable_ticks(tmp_path, learning_rates):
    runs = lr_sweep(tmp_path, learning_rates)
    figure = compare.comparison_figure(runs, swept_keys(runs))
    curves, lr_axes = figure.axes[:2]
    assert lr_axes.get_xlabel() == "optimizer.lr" and lr_axes.get_xscale() == "log"
    assert visible_tick_label_overlaps(figure) == []
    assert len([label for label in lr_axes.xaxis.get_ticklabels(which="both") if label.get_text()]) >= 2
    # error bars over the two seeds: one bar per setting, as long as the seeds' std
    (bars,) = lr_axes.containers
    assert len(bars.lines[2][0].get_segments()) == len(learning_rates)
    # the curves panel: a mean line and a ± std band per setting
    assert len(curves.collections) >= len(learning_rates[:8])


def test_curve_legend_names_the_keys_that_tell_the_settings_apart(tmp_path):
    """An Optuna sweep's trials share most keys: the legend names those that differ, not a cut-off list."""
    sweep = tmp_path / "search"
    trials = [(4, "cls", "0.002", 0.62), (4, "mean", "0.003", 0.63), (4, "mean", "0.005", 0.61),
              (8, "mean", "0.004", 0.45)]  # the patch-8 trial scores lowest and is left grey
    for number, (patch, pooling, lr, best) in enumerate(trials):
        overrides = [f"model.patch_size={patch}", "model.embed_dim=64", "model.depth=4", f"model.pooling={pooling}",
                     f"optimizer.lr={lr}", "data.batch_size=128"]
        write_job(sweep / str(number), overrides, best, "completed")
    runs = discover_runs(sweep)
    assert "model.patch_size" in swept_keys(runs)
    curves = compare.comparison_figure(runs, swept_keys(runs), highlighted=3).axes[0]
    labels = sorted(text.get_text() for text in curves.get_legend().get_texts())
    assert labels == ["pooling=cls, lr=0.002", "pooling=mean, lr=0.003", "pooling=mean, lr=0.005"]


def test_long_category_names_do_not_overlap(tmp_path):
    sweep = tmp_path / "attention"
    names = ["full", "local_with_a_long_name", "windowed_shifted_variant", "sparse_axial_pattern",
             "sparse_strided_pattern", "another_long_attention_name"]
    for number, name in enumerate(names):
        write_job(sweep / str(number), [f"model/attention={name}", "seed=0"], 0.5 + 0.01 * number, "completed")
    runs = discover_runs(sweep)
    figure = compare.comparison_figure(runs, swept_keys(runs))
    assert visible_tick_label_overlaps(figure) == []
    assert [label.get_text() for label in figure.axes[1].get_xticklabels()] == sorted(names)


def test_cost_figure_marks_the_pareto_front(costed_sweep, tmp_path):
    runs = discover_runs(costed_sweep)
    figure = compare.cost_figure(runs, swept_keys(runs))
    gflops_axes, speed_axes = figure.axes[:2]
    assert "GFLOPs" in gflops_axes.get_xlabel() and "images/s" in speed_axes.get_xlabel()
    # settings by mean val/acc: depth 4/lr 0.01 (0.88, 0.04 GFLOPs) beats depth 2 (0.75, 0.02) on accuracy only;
    # every depth-4 and depth-2 setting below them is dominated
    fronts = [next(container for container in axes.containers if container.get_label() == "Pareto front")
              for axes in (gflops_axes, speed_axes)]
    for front in fronts:
        xs, ys = front.lines[0].get_data()
        assert sorted(zip(map(float, xs), map(float, ys))) in (
            [(0.02, 0.75), (0.04, pytest.approx(0.88))], [(250.0, pytest.approx(0.88)), (500.0, 0.75)])
    assert visible_tick_label_overlaps(figure) == []
    assert main([str(costed_sweep), "--out", str(tmp_path / "report")]) == 0
    assert matplotlib.image.imread(tmp_path / "report" / "cost.png").std() > 0.01


def test_no_cost_figure_without_a_cost_that_varies(sweep_dir, tmp_path):
    assert compare.cost_figure(discover_runs(sweep_dir), swept_keys(discover_runs(sweep_dir))) is None
    assert main([str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    assert not (tmp_path / "report" / "cost.png").exists()
