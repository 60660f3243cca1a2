"""`python run.py` end to end: train, test with the best checkpoint, eval, resume, multirun, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, read_metrics, read_summary, run_cli

from vitsweep.logger.wandb_offline import find_offline_runs, read_offline_run
from vitsweep.model import VisionTransformer


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The default job, exactly as a user types it (plus where to write): digits, W&B offline."""
    tmp = tmp_path_factory.mktemp("digits")
    proc = run_cli(["trainer.progress_bar=false"], tmp)
    return tmp, tmp / "run", proc


@pytest.mark.slow
def test_default_run_learns_digits(digits_run):
    _, job_dir, proc = digits_run
    summary = read_summary(job_dir)
    assert summary["status"] == "completed", summary
    assert summary["metrics"]["test/acc"] >= 0.95, summary["metrics"]  # the quickstart's promise (README)
    assert summary["best_value"] == pytest.approx(summary["metrics"]["val/acc"])
    assert summary["num_params"] > 0 and summary["epochs_completed"] == 30
    assert summary["steps"] == 30 * (1293 // 32)  # vit_cpu on the digits' 1,293 training images, batch 32
    assert (job_dir / "checkpoints" / "last.pt").is_file() and (job_dir / "checkpoints" / "best.pt").is_file()
    assert "flattened_patch_dim" in proc.stdout  # the model summary is printed at start


@pytest.mark.slow
def test_metrics_jsonl_has_every_epoch(digits_run):
    _, job_dir, _ = digits_run
    records = read_metrics(job_dir)
    val_epochs = [r["epoch"] for r in records if "val/acc" in r]
    assert val_epochs == list(range(30))
    assert all("val/acc_top5" in r and "train/loss" in r for r in records if "val/acc" in r)
    assert sum("test/acc" in r for r in records) == 1


@pytest.mark.slow
def test_default_run_is_a_finished_offline_wandb_run(digits_run):
    _, job_dir, _ = digits_run
    [path] = find_offline_runs(job_dir)
    run = read_offline_run(path)
    summary = read_summary(job_dir)
    assert run.finished and run.exit_code == 0
    assert run.config["model"]["depth"] == 4 and run.config["data"]["num_classes"] == 10
    assert run.summary["test/acc"] == pytest.approx(summary["metrics"]["test/acc"])
    assert len([h for h in run.history if "val/acc" in h]) == 30


@pytest.mark.slow
def test_eval_mode_scores_the_checkpoint(digits_run):
    tmp, job_dir, _ = digits_run
    ckpt = job_dir / "checkpoints" / "best.pt"
    run_cli(["mode=eval", f"ckpt_path={ckpt}", "logger=none"], tmp / "eval")
    evaluated = read_summary(tmp / "eval" / "run")
    assert evaluated["status"] == "completed" and evaluated["mode"] == "eval"
    assert evaluated["metrics"]["test/acc"] == pytest.approx(read_summary(job_dir)["metrics"]["test/acc"], abs=1e-6)


def _model_state(job_dir: Path) -> dict:
    return torch.load(job_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tmp_path):
    args = [*TINY_RUN, "trainer.max_epochs=2", "logger=none", "model.dropout=0.1", "augment=basic"]
    run_cli(args, tmp_path / "straight")
    # max_time=0 stops right after the first optimizer step, mid-epoch; then resume from last.pt
    run_cli([*args, "trainer.max_time=0"], tmp_path / "stopped")
    stopped = read_summary(tmp_path / "stopped" / "run")
    assert stopped["stopped_by_time"] and stopped["steps"] == 1
    run_cli([*args, f"ckpt_path={tmp_path / 'stopped' / 'run' / 'checkpoints' / 'last.pt'}"], tmp_path / "resumed")

    straight, resumed = read_summary(tmp_path / "straight" / "run"), read_summary(tmp_path / "resumed" / "run")
    assert resumed["steps"] == straight["steps"] and resumed["epochs_completed"] == 2
    a, b = _model_state(tmp_path / "straight" / "run"), _model_state(tmp_path / "resumed" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert resumed["metrics"]["test/acc"] == pytest.approx(straight["metrics"]["test/acc"])


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_run_and_goes_on_after_failures(tmp_path):
    # 2 x 2 jobs: a good one, a bad value (32 % 3 != 0), a NaN loss (an absurd learning rate), and both
    proc = run_cli([*TINY_RUN, "model.num_heads=2,3", "optimizer.lr=1e-3,1e20", "trainer.gradient_clip_val=null"],
                   tmp_path, multirun=True, check=False)
    # the sweep went on after each failure, then said which jobs failed and exited 1 (docs/sweeps.md)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"sweep {tmp_path / 'sweep'}: 4 jobs, " in proc.stdout and "3 of 4 jobs did not complete" in proc.stderr
    jobs = sorted((p for p in (tmp_path / "sweep").iterdir() if (p / "summary.json").exists()), key=lambda p: int(p.name))
    assert len(jobs) == 4

    def swept(overrides):  # (num_heads, lr) out of all of a job's overrides; Hydra writes 1e-3 as 0.001
        values = dict(o.split("=", 1) for o in overrides)
        return int(values["model.num_heads"]), float(values["optimizer.lr"])

    summaries = {swept(read_summary(j)["overrides"]): read_summary(j) for j in jobs}
    assert summaries[(2, 1e-3)]["status"] == "completed"
    bad_value = summaries[(3, 1e-3)]
    assert bad_value["status"] == "failed" and "model.embed_dim=32" in bad_value["error"]
    nan_loss = summaries[(2, 1e20)]
    assert nan_loss["status"] == "failed" and "FloatingPointError" in nan_loss["error"]

    runs = {swept(r.config["overrides"]): r for r in map(read_offline_run, find_offline_runs(tmp_path / "sweep"))}
    assert len(runs) == 4 and len({r.run_id for r in runs.values()}) == 4  # no two jobs share a run
    assert len({r.group for r in runs.values()}) == 1 and runs[(2, 1e-3)].group
    assert runs[(2, 1e-3)].exit_code == 0
    assert runs[(3, 1e-3)].exit_code == 1 and runs[(2, 1e20)].exit_code == 1
    assert runs[(3, 1e-3)].config["model"]["num_heads"] == 3


def _write_foreign_checkpoint(path: Path) -> str:
    model = VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=4, embed_dim=48, depth=1,
                              num_heads=2, mlp_dim=64)
    torch.save({"model": model.state_dict(), "config": {}}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["patch", "heads", "root", "architecture", "missing_ckpt", "mode"])
def test_bad_input_fails_with_one_line(tmp_path, case):
    foreign = tmp_path / "foreign.pt"
    digest = _write_foreign_checkpoint(foreign)
    args, key = {
        "patch": (["model.patch_size=5"], "model.patch_size=5"),
        "heads": (["model.num_heads=5"], "model.embed_dim=32"),
        "root": (["data=imagefolder", f"data.root={tmp_path / 'nope'}"], "data.root="),
        "architecture": ([f"ckpt_path={foreign}"], f"ckpt_path={foreign}"),
        "missing_ckpt": (["mode=eval", f"ckpt_path={tmp_path / 'nope.pt'}"], "ckpt_path="),
        "mode": (["mode=fly"], "mode=fly"),
    }[case]
    proc = run_cli([*TINY_RUN, "logger=none", *args], tmp_path, check=False,
                   fresh_process=case == "mode")  # one case through the real interpreter's exit
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and key in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == digest  # nothing already saved is damaged
    if case != "mode":
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"



@pytest.mark.slow
def test_run_log_keeps_every_console_line_and_progress_is_periodic_lines_off_a_terminal(tmp_path):
    # progress_bar=auto with stdout/stderr captured (not a terminal): log lines instead of a redrawn bar
    proc = run_cli([*TINY_RUN, "logger=none", "trainer.max_epochs=2", "trainer.progress_bar=auto",
                    "trainer.progress_interval_s=0", "trainer.log_every_n_steps=1"], tmp_path)
    log_text = (tmp_path / "run" / "run.log").read_text()
    assert "flattened_patch_dim" in log_text  # the model summary
    assert "epoch 0: train/loss" in log_text and "epoch 1: train/loss" in log_text
    assert "best checkpoint: " in log_text and "test/acc" in log_text
    assert "epoch 0 [1/8] loss" in log_text and "eta" in log_text  # 256 images / batch 32: 8 steps
    assert "\r" not in proc.stdout + proc.stderr  # no bar redraws in a console log
    # a failing job writes its error there too
    failed = run_cli([*TINY_RUN, "logger=none", "model.patch_size=5"], tmp_path / "bad", check=False)
    assert failed.returncode == 2
    assert "error: model.patch_size=5" in (tmp_path / "bad" / "run" / "run.log").read_text()


@pytest.mark.slow
def test_data_datamodule_takes_a_loader_of_your_own(tmp_path):
    loader = "{_target_:vitsweep.data.synthetic.load_synthetic,image_size:12,in_channels:2,num_classes:3}"
    args = [arg for arg in TINY_RUN if arg != "data=synthetic"]
    run_cli([*args, "logger=none", "data=datamodule", f"data.source={loader}", "data.image_size=12",
             "data.in_channels=2", "data.num_classes=3"], tmp_path)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and "test/acc" in summary["metrics"]
    weights = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert weights["patch_embed.proj.weight"].shape[1] == 2 and weights["head.weight"].shape[0] == 3
