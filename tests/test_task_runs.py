"""Every task trains through `python run.py` and learns what it is shown: the task experiment files in
one multirun, a multispectral CSV with a class and a count per crop, a mask folder; multi-task resume
is exact and eval reproduces the test metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL, read_metrics, read_summary, run_cli
from torchvision.io import write_png

NO_FIGURES = {"viz": {"enabled_at_end": False}}
CASES = {  # a test-only config group: each case is an experiment file, as a user runs it
    "regression": {"defaults": ["/experiment/regression_synthetic@_here_"], **NO_FIGURES},
    "segmentation_pixel": {"defaults": ["/experiment/segmentation_synthetic@_here_"],
                           "viz": {"enabled_at_end": True, "num_images": 2}},
    "segmentation_patch": {"defaults": ["/experiment/segmentation_synthetic@_here_"],
                           "data": {"label_granularity": "patch"}, **NO_FIGURES},
    "multi_task": {"defaults": ["/experiment/riot_multitask_synthetic@_here_"], **NO_FIGURES},
}


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tasks")
    group = tmp / "conf" / "case"
    group.mkdir(parents=True)
    for name, body in CASES.items():
        (group / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(body))
    run_cli([f"hydra.searchpath=[file://{tmp / 'conf'}]", f"+case={','.join(CASES)}", "logger=none",
             "trainer.progress_bar=false"], tmp, multirun=True)
    jobs = {}
    for summary in (tmp / "sweep").glob("*/summary.json"):
        overrides = json.loads(summary.read_text())["overrides"]
        jobs[next(o.split("=")[1] for o in overrides if o.startswith("+case="))] = summary.parent
    return jobs


@pytest.mark.slow
def test_regression_learns_a_planted_target(learned):
    summary = read_summary(learned["regression"])
    assert summary["status"] == "completed" and summary["task"] == "regression", summary["error"]
    assert summary["monitor"] == "val/rmse" and summary["monitor_mode"] == "min"
    assert summary["metrics"]["test/r2"] > 0.9, summary["metrics"]
    assert summary["metrics"]["test/mae"] < 10  # in the target's own unit (0..100)
    assert (learned["regression"] / "regression_scatter.png").stat().st_size > 0


@pytest.mark.slow
def test_segmentation_of_synthetic_shapes(learned):
    pixel, patch = read_summary(learned["segmentation_pixel"]), read_summary(learned["segmentation_patch"])
    assert pixel["status"] == patch["status"] == "completed", (pixel["error"], patch["error"])
    assert pixel["metrics"]["test/miou"] > 0.8, pixel["metrics"]
    assert patch["metrics"]["test/pixel_acc"] > 0.9, patch["metrics"]  # per patch: each patch's majority label
    assert {"test/iou/class_1", "test/iou/class_2", "test/iou/class_3"} <= set(pixel["metrics"])
    figures = learned["segmentation_pixel"] / "figures"
    assert (figures / "segmentation.png").stat().st_size > 0 and (figures / "explanations.png").is_file()


@pytest.mark.slow
def test_a_two_head_multi_task_run_learns_both_heads(learned):
    job = learned["multi_task"]
    summary = read_summary(job)
    assert summary["status"] == "completed", summary["error"]
    metrics = summary["metrics"]
    assert metrics["test/riot/acc"] > 0.9 and metrics["test/crowd/r2"] > 0.8, metrics
    assert summary["monitor"] == "val/riot/acc" and summary["best_value"] == pytest.approx(metrics["val/riot/acc"])
    assert (job / "riot_confusion_matrix.png").is_file() and (job / "crowd_regression_scatter.png").is_file()
    log_vars = torch.load(job / "checkpoints" / "best.pt", weights_only=True)["model"]["head.log_vars"]
    assert log_vars.shape == (2,) and not torch.equal(log_vars, torch.zeros(2))  # uncertainty weights learnt
    epochs = [row for row in read_metrics(job) if "val/riot/acc" in row]
    assert epochs and all("train/riot/acc" in row and "train/crowd/mae" in row for row in epochs)


# ------------------------------------------------------------------------ your own data, multi-task


def crops_csv(root: Path, n: int = 160, bands: int = 6, size: int = 16) -> Path:
    """6-band .npy crops whose riot label is a bright band 0 and whose crowd size scales band 1; some cells
    empty (missing labels)."""
    rng = np.random.default_rng(0)
    (root / "crops").mkdir(parents=True)
    rows = []
    for i in range(n):
        riot, crowd = int(rng.integers(2)), float(rng.uniform(0, 500))
        crop = rng.uniform(0, 0.3, (bands, size, size)).astype(np.float32)
        crop[0] += 0.6 * riot
        crop[1] += crowd / 500
        np.save(root / "crops" / f"{i}.npy", crop)
        split = "train" if i < 100 else "val" if i < 130 else "test"
        rows.append({"image": f"crops/{i}.npy", "riot": "" if i % 17 == 3 else riot,
                     "crowd_size": "" if i % 13 == 5 else f"{crowd:.1f}", "events": i % 7, "split": split})
    with open(root / "crops.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "crops.csv"


HEADS = "task.heads={riot:{type:classification,column:riot},crowd:{type:regression,column:crowd_size}}"
MULTI_TASK_CSV = ["task=multi_task", HEADS,
                  "data=csv", "data.in_channels=6", "data.image_size=16", "data.batch_size=20",
                  "data.normalization=auto", *TINY_MODEL, "trainer.progress_bar=false", "viz.enabled_at_end=false",
                  "logger=none", "optimizer.lr=3e-3", "model.dropout=0.1"]


@pytest.mark.slow
def test_multispectral_csv_trains_as_multi_task_with_missing_cells(tmp_path):
    manifest = crops_csv(tmp_path)
    run_cli([*MULTI_TASK_CSV, f"data.root={manifest}", "trainer.max_epochs=8"], tmp_path)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed", summary["error"]
    metrics = summary["metrics"]
    assert metrics["test/riot/acc"] > 0.8 and metrics["test/crowd/r2"] > 0.5, metrics
    assert all(np.isfinite(value) for value in metrics.values())


@pytest.mark.slow
def test_multi_task_resume_is_exact_and_eval_reproduces_the_test_metrics(tmp_path):
    manifest = crops_csv(tmp_path / "data")
    args = [*MULTI_TASK_CSV, f"data.root={manifest}", "trainer.max_epochs=2", "task.weighting=uncertainty"]
    run_cli(args, tmp_path / "straight")
    run_cli([*args, "trainer.max_time=0"], tmp_path / "stopped")  # stops after the first step, mid-epoch
    last = tmp_path / "stopped" / "run" / "checkpoints" / "last.pt"
    run_cli([*args, f"ckpt_path={last}"], tmp_path / "resumed")
    straight, resumed = read_summary(tmp_path / "straight" / "run"), read_summary(tmp_path / "resumed" / "run")
    assert resumed["steps"] == straight["steps"]
    a = torch.load(tmp_path / "straight" / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert "head.log_vars" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert resumed["metrics"] == pytest.approx(straight["metrics"])

    best = tmp_path / "straight" / "run" / "checkpoints" / "best.pt"
    run_cli([*args, "mode=eval", f"ckpt_path={best}"], tmp_path / "eval")
    evaluated = read_summary(tmp_path / "eval" / "run")["metrics"]
    tested = {k: v for k, v in straight["metrics"].items() if k.startswith("test/")}
    assert evaluated == pytest.approx(tested)


# ----------------------------------------------------------------------------------- mask folder


def mask_tree(root: Path, size: int = 16) -> None:
    """Two classes: a bright square (class 1) on a dark background (class 0), any position; PNG masks."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 96), ("test", 24)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            top, left = rng.integers(0, size - 8, 2)
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[top:top + 8, left:left + 8] = 1
            image = (rng.uniform(0, 0.3, (3, size, size)) + 0.6 * mask).clip(0, 1)
            write_png(torch.from_numpy((image * 255).astype(np.uint8)), str(root / split / "images" / f"{i}.png"))
            np.save(root / split / "masks" / f"{i}.npy", mask) if i % 2 else write_png(
                torch.from_numpy(mask)[None], str(root / split / "masks" / f"{i}.png"))
    (root / "classes.txt").write_text("background\nsquare\n")


@pytest.mark.slow
def test_maskfolder_trains_segmentation_and_names_its_classes(tmp_path):
    mask_tree(tmp_path / "tree")
    run_cli(["task=segmentation", "data=maskfolder", f"data.root={tmp_path / 'tree'}", "data.image_size=16",
             "data.batch_size=16", *TINY_MODEL, "trainer.max_epochs=6", "trainer.progress_bar=false",
             "viz.enabled_at_end=false", "logger=none", "augment=[flips,rotation]"], tmp_path)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed", summary["error"]
    assert {"test/iou/background", "test/iou/square"} <= set(summary["metrics"])
    assert summary["metrics"]["test/miou"] > 0.6, summary["metrics"]


@pytest.mark.slow
def test_mixup_with_masks_and_tasks_on_the_wrong_data_fail_in_one_line(tmp_path):
    for case, args, message in [
        ("mixup", ["task=segmentation", "data=synthetic", "augment=mixup"], "augment=mixup blends two images"),
        ("digits", ["task=regression", "data=digits"], "data=digits gives one class label per image"),
    ]:
        proc = run_cli([*args, *TINY_MODEL, "trainer.max_epochs=1", "logger=none", "viz.enabled_at_end=false"],
                       tmp_path / case, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
