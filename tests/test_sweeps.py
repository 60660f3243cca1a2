"""Sweeps from the command line: ablation files, W&B hygiene of multirun jobs, resumable sweeps, and
multi-seed runs summarised by `vitsweep compare`."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN, offline_env, read_metrics, read_summary, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vitsweep.logger.wandb_offline import find_offline_runs, read_offline_run

ABLATIONS = sorted(path.stem for path in (ROOT / "conf" / "experiment" / "ablation").glob("*.yaml"))
RECIPES = sorted(path.stem for path in (ROOT / "conf" / "experiment").glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_names_its_task(recipe):
    cfg = compose_train([f"experiment={recipe}"])
    assert cfg.task_name == recipe  # the W&B group of its sweeps starts with it
    # no dangling interpolation (data and paths need a running Hydra job to resolve)
    for section in ("model", "optimizer", "scheduler", "loss", "augment", "trainer"):
        OmegaConf.to_container(cfg[section], resolve=True, throw_on_missing=True)


def test_cifar10_recipes_train_on_cifar10_with_their_budgets():
    cpu = compose_train(["experiment=cifar10_cpu"])
    assert cpu.data.source._target_.endswith("load_cifar10") and cpu.model.embed_dim == 64  # the recipe's own
    assert cpu.trainer.max_time is not None and cpu.trainer.max_time > 0
    tiny = compose_train(["experiment=cifar10_vit_tiny"])
    assert tiny.model.embed_dim == 192 and tiny.loss.label_smoothing == pytest.approx(0.1)
    assert tiny.data.batch_size == 128 and 100 <= tiny.trainer.max_epochs <= 200
    assert tiny.optimizer.name == "adamw" and tiny.optimizer.weight_decay == pytest.approx(0.05)


def test_every_ablation_sets_its_task_name():
    """Its W&B group. That every cell of every grid composes and builds: tests/test_recipe_builds.py."""
    for ablation in ABLATIONS:
        assert compose_train([f"experiment=ablation/{ablation}"]).task_name == f"ablation_{ablation}"


# ------------------------------------------------------------------ a 2x2 grid with one failing job

# ablation/depth_width, shrunk for a test: depth fixed at 1, its width axis narrowed to 2 values, crossed
# with num_heads. embed_dim 32 with 3 heads cannot be split into heads: that job fails, the others train.
GRID = ["experiment=ablation/depth_width", "model.depth=1", "model.embed_dim=32,48", "model.num_heads=2,3"]
FAILING = {"model.embed_dim": 32, "model.num_heads": 3}


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    swept = ("model.embed_dim", "model.depth", "model.num_heads")
    tiny = [arg for arg in TINY_RUN if arg.split("=")[0] not in swept]
    proc = run_cli([*GRID, *tiny], tmp, multirun=True, check=False)  # logger: wandb (offline), the default
    # the FAILING cell fails, so the sweep exits 1 after running every job (docs/sweeps.md)
    assert proc.returncode == 1 and "1 of 4 jobs did not complete" in proc.stderr, proc.stderr[-3000:]
    return tmp / "sweep", proc


def compare(sweep_dir: Path, out_dir: Path) -> subprocess.CompletedProcess:
    """`vitsweep compare SWEEP_DIR --out OUT_DIR`"""
    return subprocess.run([sys.executable, "-m", "vitsweep.compare", str(sweep_dir), "--out", str(out_dir)],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)


def job_dirs(sweep_dir: Path) -> list[Path]:
    numbered = [path for path in sweep_dir.iterdir() if path.name.isdigit()]
    return sorted(numbered, key=lambda path: int(path.name))


def is_failing(overrides: list[str]) -> bool:
    return all(f"{key}={value}" in overrides for key, value in FAILING.items())


@pytest.mark.slow
def test_grid_from_ablation_file_writes_four_job_dirs(grid_sweep):
    sweep_dir, _ = grid_sweep
    dirs = job_dirs(sweep_dir)
    assert len(dirs) == 4
    assert (sweep_dir / "multirun.yaml").is_file()
    cells = set()
    for job_dir in dirs:
        summary = read_summary(job_dir)
        assert (job_dir / ".hydra" / "config.yaml").is_file()
        assert summary["group"].startswith("ablation_depth_width-")
        cell = [o for o in summary["overrides"] if o.split("=")[0] in ("model.embed_dim", "model.num_heads")]
        cells.add(tuple(cell))
        if is_failing(summary["overrides"]):
            assert summary["status"] == "failed"
            assert "num_heads" in summary["error"]
        else:
            assert summary["status"] == "completed", summary["error"]
            assert summary["best_value"] is not None
            assert (job_dir / "checkpoints" / "best.pt").is_file()
    assert len(cells) == 4  # every cell of the grid, once


@pytest.mark.slow
def test_grid_jobs_each_have_their_own_wandb_run_in_one_group(grid_sweep):
    sweep_dir, _ = grid_sweep
    run_files = find_offline_runs(sweep_dir)
    assert len(run_files) == 4
    runs = [read_offline_run(path) for path in run_files]
    assert len({run.run_id for run in runs}) == 4  # four runs, never two jobs in one
    groups = {run.group for run in runs}
    assert len(groups) == 1 and groups.pop().startswith("ablation_depth_width-")
    for path, run in zip(run_files, runs):
        job_dir = next(parent for parent in path.parents if parent.parent == sweep_dir)
        summary = read_summary(job_dir)
        assert run.group == summary["group"] and run.name == summary["run_name"]
        assert run.finished
        for override in summary["overrides"]:
            assert override in run.tags
        # the overrides as flat, typed config keys beside the nested config
        embed_dim = int(next(o for o in summary["overrides"] if o.startswith("model.embed_dim="))[16:])
        assert run.config["model.embed_dim"] == embed_dim == run.config["model"]["embed_dim"]
        assert run.config["model.depth"] == 1 and run.config["task_name"] == "ablation_depth_width"
        if is_failing(summary["overrides"]):
            assert run.exit_code != 0
            assert run.summary["status"] == "failed" and "num_heads" in run.summary["error"]
        else:
            assert run.exit_code == 0
            assert run.summary["status"] == "completed"
            assert run.summary["val/acc_best"] == pytest.approx(summary["best_value"])
            # the run holds this job's own training history, not another job's
            logged = [row["val/acc"] for row in run.history if "val/acc" in row and "test/acc" not in row]
            epoch_rows = [row for row in read_metrics(job_dir) if "train/loss" in row and "val/acc" in row]
            jsonl = [row["val/acc"] for row in epoch_rows]
            assert logged == pytest.approx(jsonl)


@pytest.mark.slow
def test_compare_prints_the_grid_and_plots_it(grid_sweep, tmp_path):
    sweep_dir, _ = grid_sweep
    proc = compare(sweep_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 runs" in proc.stdout
    header = proc.stdout.splitlines()[2]
    assert "model.embed_dim" in header and "model.num_heads" in header
    assert proc.stdout.count("failed") >= 1
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "comparison.csv").read_text().count("\n") == 5  # header + 4 runs


# ----------------------------------------------------------------------------- resume=true

SEEDS = ["seed=0,1,2", *[a for a in TINY_RUN if not a.startswith("trainer.max_epochs")],
         "trainer.max_epochs=2", "data.source.num_train=1024", "logger=none"]


def interrupted_sweep(tmp: Path) -> Path:
    """Run the 3-seed sweep and kill it (SIGKILL, no clean-up) once job 1 has saved its first epoch:
    job 0 completed, job 1 stopped after epoch 1 of 2, job 2 never started."""
    sweep_dir = tmp / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *SEEDS, f"hydra.sweep.dir={sweep_dir}"]
    last = sweep_dir / "1" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(cmd, cwd=tmp, env=offline_env(tmp), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last.exists(), "the sweep ended before job 1 saved a checkpoint"
    return sweep_dir


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    sweep_dir = interrupted_sweep(tmp)
    before = {
        "job0_metrics": (sweep_dir / "0" / "metrics.jsonl").read_text(),
        "job1_metrics": read_metrics(sweep_dir / "1"),
        "job1_status": read_summary(sweep_dir / "1")["status"],
        "job1_epoch": torch.load(sweep_dir / "1" / "checkpoints" / "last.pt", weights_only=True)["epoch"],
        "job2_started": (sweep_dir / "2" / "summary.json").exists(),
    }
    proc = run_cli([*SEEDS, "resume=true"], tmp, multirun=True)
    return sweep_dir, before, proc


@pytest.mark.slow
def test_interrupted_sweep_is_in_the_state_the_resume_test_needs(resumed_sweep):
    _, before, _ = resumed_sweep
    assert before["job1_status"] == "running"  # killed: nothing rewrote its summary
    assert before["job1_epoch"] == 1  # one of two epochs saved
    assert not before["job2_started"]


@pytest.mark.slow
def test_resume_skips_the_completed_job(resumed_sweep):
    sweep_dir, before, proc = resumed_sweep
    assert f"[resume] {sweep_dir / '0'} completed before: skipped" in proc.stdout
    assert (sweep_dir / "0" / "metrics.jsonl").read_text() == before["job0_metrics"]  # not one step trained


@pytest.mark.slow
def test_resume_continues_the_interrupted_job_from_its_last_checkpoint(resumed_sweep):
    sweep_dir, before, proc = resumed_sweep
    assert f"continuing from {sweep_dir / '1' / 'checkpoints' / 'last.pt'}" in proc.stdout
    rows = read_metrics(sweep_dir / "1")
    new_rows = rows[len(before["job1_metrics"]):]
    assert new_rows and all(row["epoch"] >= 1 for row in new_rows)  # epoch 0 was not trained again
    summary = read_summary(sweep_dir / "1")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2


@pytest.mark.slow
def test_resume_trains_the_job_that_never_started(resumed_sweep):
    sweep_dir, _, _ = resumed_sweep
    summary = read_summary(sweep_dir / "2")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert {row["epoch"] for row in read_metrics(sweep_dir / "2") if "train/loss" in row} == {0, 1}
    assert all(o != "resume=true" and not o.startswith("resume=") for o in summary["overrides"])


@pytest.mark.slow
def test_seed_sweep_gives_mean_and_std_in_compare(resumed_sweep, tmp_path):
    """`python run.py -m seed=0,1,2 ...` then `vitsweep compare SWEEP_DIR`: one row, mean ± std of 3."""
    sweep_dir, _, _ = resumed_sweep
    proc = compare(sweep_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    best = [read_summary(sweep_dir / str(job))["best_value"] for job in range(3)]
    assert f"{statistics.mean(best):.4f} ± {statistics.stdev(best):.4f} (n=3)" in proc.stdout


@pytest.mark.slow
def test_resume_refuses_a_job_dir_of_another_job(tmp_path):
    job_dir = tmp_path / "run"
    job_dir.mkdir()
    (job_dir / "summary.json").write_text(json.dumps({"status": "completed", "overrides": ["seed=5"]}))
    proc = run_cli([*TINY_RUN, "logger=none", "resume=true"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "resume=true" in proc.stderr and "holds another job" in proc.stderr
    assert json.loads((job_dir / "summary.json").read_text())["overrides"] == ["seed=5"]  # left as it was


def test_a_requeued_slurm_job_resumes(monkeypatch):
    from vitsweep.run.job import requeued_by_slurm

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert not requeued_by_slurm()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not requeued_by_slurm()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeued_by_slurm()


def test_earlier_attempt_matches_a_job_by_its_overrides_in_any_order(tmp_path):
    from vitsweep.run.job import earlier_attempt

    assert earlier_attempt(tmp_path, ["seed=1"]) is None  # never ran
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running", "overrides": ["seed=1", "a=2"]}))
    assert earlier_attempt(tmp_path, ["a=2", "seed=1"])["status"] == "running"
    with pytest.raises(SystemExit):
        earlier_attempt(tmp_path, ["seed=2", "a=2"])
