"""Reliability under realistic abuse (issue 15), one section per case the issue lists:

1. two launches in the same second never share an output dir;
2. eval, visualize and resume take the model, data shape and normalization from the checkpoint;
3. resuming into a new job dir carries best.pt forward;
4. SIGTERM / SIGINT / preemption keep the state: last.pt at the step, status interrupted, exit 128 + signal;
5. bad files and caches are named (or skipped and counted), every listed extension decodes;
6. a full disk gives one line and leaves no temp file;
7. an unreachable W&B server costs a warning, not the run;
8. a multirun ends with a table of its jobs and a non-zero exit code when one failed.

Signals go to real `python run.py` processes; the disk-full case mounts a small tmpfs (skipped, with the
reason, where mounting is not allowed)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_RUN, offline_env, read_metrics, read_summary, run_cli
from PIL import Image

from vitsweep.data import imagefolder
from vitsweep.data.imagefolder import load_imagefolder
from vitsweep.logger.wandb_offline import find_offline_runs, read_offline_run

QUICK = [*TINY_RUN, "logger=none", "data.source.num_train=64"]  # a job of a few seconds


def start_cli(args: list[str], cwd: Path, multirun: bool = False) -> subprocess.Popen:
    """`python run.py` started, not waited for (the caller signals it or runs others beside it)."""
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "run.py"), *(["-m"] if multirun else []), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=offline_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------ 1. output dirs that cannot collide

def test_claim_dir_gives_each_of_many_racing_threads_its_own_dir(tmp_path):
    from vitsweep.run.output_dir import claim_dir

    barrier, claimed = threading.Barrier(8), []

    def claim():
        barrier.wait()  # all at once: the same name asked for in the same instant
        claimed.append(claim_dir(tmp_path / "outputs" / "12-00-00"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(claimed)) == 8 and all(path.is_dir() for path in claimed)
    assert {path.name for path in claimed} == {"12-00-00", *(f"12-00-00_{i}" for i in range(1, 8))}


@pytest.mark.slow
def test_two_sweeps_launched_at_once_never_share_a_dir(tmp_path):
    """Two multiruns started together, three times over. The sweep dir is the default's pattern at the
    granularity of a day, so every launch asks for the same folder (with the default's seconds they
    collide only when they start in the same second, 1 time in 4 in the issue's probe)."""
    same_name = "hydra.sweep.dir=outputs/multirun/${now:%Y-%m-%d}"
    sweeps = []
    for round_ in range(3):
        procs = [start_cli([f"seed={10 * round_ + 2 * k},{10 * round_ + 2 * k + 1}", *QUICK, same_name], tmp_path,
                           multirun=True) for k in range(2)]
        for proc in procs:
            returncode, out, err = finish(proc)
            assert returncode == 0, err[-3000:]
            sweeps.append(out)
    sweep_dirs = sorted(p for p in (tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweep_dirs) == 6  # one dir per sweep, none shared
    seeds_seen = []
    for sweep_dir in sweep_dirs:
        jobs = sorted(sweep_dir.glob("*/summary.json"))
        assert len(jobs) == 2  # both jobs of the sweep in its one claimed dir, and no one else's
        seeds = sorted(read_summary(job.parent)["seed"] for job in jobs)
        assert seeds[1] == seeds[0] + 1 and seeds[0] % 2 == 0  # the two seeds of one launch
        for job in jobs:
            assert read_summary(job.parent)["status"] == "completed"
            assert len([r for r in read_metrics(job.parent) if "test/acc" in r]) == 1  # not interleaved
        seeds_seen += seeds
    assert sorted(seeds_seen) == sorted(s for r in range(3) for s in range(10 * r, 10 * r + 4))


@pytest.mark.slow
def test_two_runs_launched_at_once_never_share_a_dir(tmp_path):
    same_name = "hydra.run.dir=outputs/runs/${now:%Y-%m-%d}"
    procs = [start_cli([f"seed={seed}", *QUICK, same_name], tmp_path) for seed in (0, 1)]
    for proc in procs:
        returncode, _, err = finish(proc)
        assert returncode == 0, err[-3000:]
    run_dirs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(run_dirs) == 2
    assert sorted(read_summary(d)["seed"] for d in run_dirs) == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
                                       "hydra.launcher.timeout_min=20"]], ids=["joblib", "submitit_local"])
def test_every_job_of_a_sweep_lands_in_the_claimed_dir_whatever_the_launcher(tmp_path, launcher):
    """The joblib and submitit workers recompose each job's config in another process: they too must
    use the claimed dir (here `<year>_1`, as `<year>` is taken), not the name the pattern resolves to."""
    year = time.strftime("%Y")
    (tmp_path / "sweeps" / year).mkdir(parents=True)  # another launch owns it
    proc = start_cli([*launcher, "seed=0,1", *QUICK, "hydra.sweep.dir=sweeps/${now:%Y}"], tmp_path, multirun=True)
    returncode, _, err = finish(proc)
    assert returncode == 0, err[-3000:]
    claimed = tmp_path / "sweeps" / f"{year}_1"
    assert sorted(read_summary(claimed / str(job))["seed"] for job in (0, 1)) == [0, 1]
    assert read_summary(claimed / "0")["job_dir"].endswith(f"sweeps/{year}_1/0")
    assert list((tmp_path / "sweeps" / year).iterdir()) == []  # nothing written into the other launch's dir


# --------------------------------------------------- 2 + 3. what eval, visualize and resume restore

TRAINED = [*TINY_RUN, "logger=none", "model.norm_placement=post", "model/attention=local"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained with options that do not change any weight's shape: only the stored config tells."""
    tmp = tmp_path_factory.mktemp("trained")
    run_cli(TRAINED, tmp)
    return tmp / "run"


@pytest.mark.slow
def test_eval_scores_the_model_that_was_trained(trained, tmp_path):
    # the same data, none of the model options repeated: the model comes from the checkpoint's config
    run_cli(["mode=eval", "data=synthetic", f"ckpt_path={trained / 'checkpoints' / 'best.pt'}", "logger=none"],
            tmp_path)
    evaluated = read_summary(tmp_path / "run")
    assert evaluated["status"] == "completed"
    assert evaluated["metrics"]["test/acc"] == pytest.approx(read_summary(trained)["metrics"]["test/acc"], abs=1e-6)
    assert evaluated["metrics"]["test/loss"] == pytest.approx(read_summary(trained)["metrics"]["test/loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "visualize", "train"])
def test_an_override_that_contradicts_the_checkpoint_is_refused_in_one_line(trained, tmp_path, mode):
    ckpt = trained / "checkpoints" / ("last.pt" if mode == "train" else "best.pt")
    proc = run_cli([f"mode={mode}", "data=synthetic", f"ckpt_path={ckpt}", "logger=none",
                    "model.norm_placement=pre"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = nonempty_lines(proc.stderr)
    assert line.startswith("error: ") and "Traceback" not in proc.stderr
    assert "model.norm_placement=post" in line and "model.norm_placement=pre" in line  # the key, both values


@pytest.mark.slow
def test_visualize_draws_the_model_that_was_trained(trained, tmp_path):
    """The attention maps drawn without the model options are those drawn with them: the same model."""
    common = ["mode=visualize", "data=synthetic", f"ckpt_path={trained / 'checkpoints' / 'best.pt'}", "logger=none",
              "viz.num_images=1", "viz.explain=[]"]
    run_cli(common, tmp_path / "bare")
    run_cli([*common, "model.norm_placement=post", "model/attention=local"], tmp_path / "told")
    bare, told = (sorted((tmp_path / name / "run" / "figures").glob("*.png")) for name in ("bare", "told"))
    assert [p.name for p in bare] == [p.name for p in told] and bare
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(bare, told))


@pytest.mark.slow
def test_resume_into_a_new_dir_carries_best_forward_and_the_model_config(trained, tmp_path):
    """The README's resume command, into a new job dir, after the last epoch was saved (no epoch left to
    beat the stored best) and without repeating the model options: best.pt comes along and the test
    split is scored with it, on the model that was trained."""
    last = trained / "checkpoints" / "last.pt"
    run_cli([*[a for a in TINY_RUN if not a.startswith("model")], "logger=none", f"ckpt_path={last}"], tmp_path)
    resumed = read_summary(tmp_path / "run")
    assert resumed["status"] == "completed", resumed["error"]
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert resumed["metrics"]["test/acc"] == pytest.approx(read_summary(trained)["metrics"]["test/acc"], abs=1e-6)


# ------------------------------------------------------------------------------------ 4. signals

LONG = [*TINY_RUN, "trainer.max_epochs=2", "data.source.num_train=2048", "data.batch_size=16",
        "trainer.log_every_n_steps=1", "model.dropout=0.1", "augment=basic"]  # 128 steps an epoch


def wait_for_training(job_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the job has logged an optimizer step (it is training, with its handlers in place)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = job_dir / "metrics.jsonl"
        if metrics.exists() and "train/loss_step" in metrics.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"the job never started training: {proc.poll()} {proc.stderr.read() if proc.stderr else ''}")


def sigterm_while_training(args: list[str], job_dir: Path) -> dict:
    """`python run.py args` in job_dir, sent SIGTERM once it trains: it exits 128 + SIGTERM with one line that says
    how to resume, records `interrupted`, and its last.pt holds the step it stopped on (returned)."""
    proc = start_cli([*args, f"hydra.run.dir={job_dir}"], job_dir.parent)
    wait_for_training(job_dir, proc)
    proc.send_signal(signal.SIGTERM)
    returncode, _, err = finish(proc)
    assert returncode == 128 + signal.SIGTERM
    (line,) = nonempty_lines(err)  # one line on stderr, no traceback
    assert line.startswith("interrupted by SIGTERM") and "resume=true" in line
    summary = read_summary(job_dir)
    assert summary["status"] == "interrupted" and summary["error"].startswith("SIGTERM")
    state = torch.load(job_dir / "checkpoints" / "last.pt", weights_only=True)
    logged_steps = [row["step"] for row in read_metrics(job_dir) if "train/loss_step" in row]  # every step
    assert state["step"] == logged_steps[-1]  # saved at the step it stopped on
    return state


@pytest.mark.slow
def test_sigterm_keeps_the_step_and_resume_true_continues_exactly(tmp_path):
    run_cli([*LONG, "logger=none"], tmp_path / "straight")

    job_dir = tmp_path / "stopped" / "run"
    state = sigterm_while_training(LONG, job_dir)  # logger: wandb, offline
    assert 0 < state["step"] < 256
    (wandb_run,) = find_offline_runs(job_dir)
    assert read_offline_run(wandb_run).finished  # the W&B run was closed, not left empty

    # the same command plus resume=true continues from that step, to the same weights as a straight run
    run_cli([*LONG, "resume=true"], tmp_path / "stopped")
    assert read_summary(job_dir)["status"] == "completed"
    straight = torch.load(tmp_path / "straight" / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(job_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_ctrl_c_records_interrupted_with_one_line_not_a_traceback(tmp_path):
    job_dir = tmp_path / "run"
    proc = start_cli([*LONG, "logger=none", f"hydra.run.dir={job_dir}"], tmp_path)
    wait_for_training(job_dir, proc)
    proc.send_signal(signal.SIGINT)
    returncode, _, err = finish(proc)
    assert returncode == 128 + signal.SIGINT
    (line,) = nonempty_lines(err)
    assert line.startswith("interrupted by SIGINT")
    assert read_summary(job_dir)["status"] == "interrupted"
    assert (job_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    job_dir = tmp_path / "run"
    proc = start_cli([*LONG, f"hydra.run.dir={job_dir}"], tmp_path)  # W&B's finish keeps the first one busy
    wait_for_training(job_dir, proc)
    proc.send_signal(signal.SIGINT)
    # the second follows at once: the first is being handled (the step finishing, last.pt, the W&B run
    # closing), which on a quiet machine can take well under 0.1 s
    time.sleep(0.01)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGINT)
    returncode, _, err = finish(proc)
    assert still_running, "the job ended within 0.01 s of the first Ctrl-C: nothing left to abort"
    assert returncode == 128 + signal.SIGINT
    assert "aborted: second SIGINT" in err and "Traceback" not in err
    assert read_summary(job_dir)["status"] == "interrupted"


@pytest.fixture
def job_in_process(tmp_path):
    """run_job in this process on a composed config (job dir: tmp_path/run), with the signal handlers it
    installs, and the interrupt state it leaves, put back afterwards."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from vitsweep.run.job import run_job
    from vitsweep.trainer import interrupt

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={ROOT}", "logger=none"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real job: the job's config without Hydra's own node
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield lambda mode: run_job(cfg, {"train": mode})
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    interrupt._state.__init__()


def dead_rank(*args) -> None:
    raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")  # what gloo raises on a dead rank


def test_a_sigterm_while_the_failure_is_recorded_waits_for_the_record(job_in_process, tmp_path, monkeypatch):
    """torchrun SIGTERMs the other ranks a fraction of a second after one dies: rank 0, already failing
    on its collective, still writes summary.json `failed` (CI once caught it mid-write, left `running`)."""
    from vitsweep.logger.run_logger import RunLogger

    write_summary = RunLogger.write_summary

    def signalled_midway(self):
        if self.summary.get("status") == "failed":
            os.kill(os.getpid(), signal.SIGTERM)  # delivered at once, in this (the main) thread
        write_summary(self)

    monkeypatch.setattr(RunLogger, "write_summary", signalled_midway)
    with pytest.raises(SystemExit) as ended:
        job_in_process(dead_rank)
    assert ended.value.code == 1
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and "Connection closed by peer" in summary["error"]


def test_a_signal_raised_while_an_error_unwinds_records_the_error(job_in_process, tmp_path):
    def failing_then_signalled(*args):
        try:
            dead_rank()
        finally:  # the SIGTERM lands while the error unwinds the stack (a finally block, a context's exit)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as ended:
        job_in_process(failing_then_signalled)
    assert ended.value.code == 1
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and summary["error"].startswith("RuntimeError: Connection closed")


def test_a_signal_to_a_healthy_job_still_records_interrupted(job_in_process, tmp_path, monkeypatch):
    """The contrast: outside training, with no error under way, SIGTERM stops the job as `interrupted`."""
    from vitsweep.trainer import interrupt

    def exit_process(code):
        raise SystemExit(code)  # exit_for ends the process with os._exit: here, this test's SystemExit

    monkeypatch.setattr(interrupt.os, "_exit", exit_process)
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # exit_for flushes the logs: keep pytest's open

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as ended:
        job_in_process(signalled)
    assert ended.value.code == 128 + signal.SIGTERM
    assert read_summary(tmp_path / "run")["status"] == "interrupted"


def test_resume_true_continues_a_job_first_started_from_a_ckpt_path(tmp_path):
    """The README's resume command (ckpt_path=...) stopped too; resume=true with the job's own command
    is the same job, not 'another job'."""
    from vitsweep.run.job import earlier_attempt

    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed",
                                                       "overrides": ["seed=1", "ckpt_path=/old/last.pt"]}))
    assert earlier_attempt(tmp_path, ["seed=1"])["status"] == "failed"
    assert earlier_attempt(tmp_path, ["seed=1", "ckpt_path=/other/last.pt"])["status"] == "failed"


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_resumes_from_its_step(tmp_path):
    """submitit's preemption signal (USR2, what SLURM sends before it preempts or times out) reaches the
    job: last.pt at the step, submitit requeues, and the new attempt continues from there."""
    sweep_dir = tmp_path / "sweep"
    proc = start_cli(["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
                      "hydra.launcher.timeout_min=20", "seed=0", *LONG, "logger=none",
                      f"hydra.sweep.dir={sweep_dir}"], tmp_path, multirun=True)
    job_dir = sweep_dir / "0"
    wait_for_training(job_dir, proc)
    os.kill(read_summary(job_dir)["pid"], signal.SIGUSR2)
    returncode, _, err = finish(proc)
    assert returncode == 0, err[-3000:]
    log_text = (job_dir / "run.log").read_text()
    assert "interrupted by SIGUSR2" in log_text and "submitit requeues it" in log_text
    assert f"continuing from {job_dir / 'checkpoints' / 'last.pt'}" in log_text
    summary = read_summary(job_dir)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    steps = [row["step"] for row in read_metrics(job_dir) if "train/loss_step" in row]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step trained twice


# -------------------------------------------------------------------------- 5. bad files and caches

def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def photo_tree(root: Path, extension: str = "png", per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            for i in range(per_class):
                write_image(root / split / cls / f"{i}.{extension}", rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize("extension", sorted(ext.lstrip(".") for ext in imagefolder.PHOTO_EXTENSIONS))
def test_every_listed_photo_extension_decodes(tmp_path, extension):
    data = load_imagefolder(str(photo_tree(tmp_path / "tree", extension)), image_size=8, val_fraction=0.34)
    assert data.train.images.shape[1:] == (3, 8, 8) and data.train.images.dtype == torch.uint8
    grey = load_imagefolder(str(tmp_path / "tree"), image_size=8, in_channels=1, val_fraction=0.34)
    assert grey.test.images.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_an_unreadable_image_is_named_by_path(tmp_path, damage):
    root = photo_tree(tmp_path / "tree", "jpg")
    bad = root / "train" / "dog" / "1.jpg"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.write_text("this is not a JPEG")
    with pytest.raises(ValueError) as raised:  # a BadImageFile: one line, exit 2 through run.py
        load_imagefolder(str(root), image_size=8, val_fraction=0.34)
    message = str(raised.value)
    assert str(bad) in message and "data.on_bad_file=skip" in message and "\n" not in message


def test_on_bad_file_skip_leaves_the_file_out_and_counts_it(tmp_path):
    root = photo_tree(tmp_path / "tree", "png", per_class=4)
    bad = root / "train" / "cat" / "2.png"
    bad.write_text("not a PNG")
    cache = tmp_path / "cache"
    data = load_imagefolder(str(root), image_size=8, val_fraction=0.25, cache_dir=str(cache), on_bad_file="skip")
    assert data.skipped_files == [str(bad)]
    assert len(data.train) + len(data.val) == 7 and len(data.test) == 8
    assert (data.train.labels == 0).sum() + (data.val.labels == 0).sum() == 3  # its label went with it
    again = load_imagefolder(str(root), image_size=8, val_fraction=0.25, cache_dir=str(cache), on_bad_file="skip")
    assert again.skipped_files == [str(bad)] and torch.equal(again.train.images, data.train.images)
    with pytest.raises(ValueError, match=str(bad)):  # the cache does not hide it from on_bad_file=error
        load_imagefolder(str(root), image_size=8, val_fraction=0.25, cache_dir=str(cache))


@pytest.mark.slow
def test_skipped_files_are_counted_in_the_summary(tmp_path):
    root = photo_tree(tmp_path / "tree", "png", per_class=8)
    (root / "train" / "cat" / "0.png").write_text("not a PNG")
    args = [a for a in TINY_RUN if a != "data=synthetic"]
    run_cli([*args, "logger=none", "data=imagefolder", f"data.root={root}", "data.image_size=8",
             "data.num_classes=2", "model.patch_size=4", "data.on_bad_file=skip", "data.batch_size=4"], tmp_path)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["num_skipped_files"] == 1 and summary["skipped_files"] == [str(root / "train" / "cat" / "0.png")]


def test_a_corrupt_cache_is_named_and_rebuilt(tmp_path, caplog):
    root = photo_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    first = load_imagefolder(str(root), image_size=8, cache_dir=str(cache), val_fraction=0.34)
    (cache_file,) = cache.glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:200])  # a copy killed halfway
    with caplog.at_level(logging.WARNING):
        rebuilt = load_imagefolder(str(root), image_size=8, cache_dir=str(cache), val_fraction=0.34)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(cache_file) in warning and "rebuilding" in warning and "\n" not in warning
    assert torch.equal(rebuilt.train.images, first.train.images)
    again = load_imagefolder(str(root), image_size=8, cache_dir=str(cache), val_fraction=0.34)  # rewritten whole
    assert torch.equal(again.test.images, first.test.images)


def test_16_bit_images_are_scaled_into_the_common_dtype(tmp_path):
    root = photo_tree(tmp_path / "tree", "png")
    deep = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)  # 0 .. 59400
    Image.fromarray(deep).save(root / "train" / "dog" / "0.png")  # a 16-bit grey PNG among 8-bit RGB ones
    data = load_imagefolder(str(root), image_size=10, val_fraction=0.34)
    assert data.train.images.dtype == torch.uint8
    images = torch.cat([data.train.images, data.val.images])
    expected = torch.from_numpy(np.round(deep / 257).astype(np.uint8))
    assert any(torch.equal(image[0], expected) and torch.equal(image[1], expected) for image in images)


def test_the_first_decode_shows_progress(tmp_path, caplog, monkeypatch):
    from vitsweep.data import decode_progress

    monkeypatch.setattr(decode_progress, "INTERVAL_S", 0.0)  # a line per file, so a small tree shows some
    root = photo_tree(tmp_path / "tree")
    with caplog.at_level(logging.INFO, logger="vitsweep.data"):
        load_imagefolder(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), val_fraction=0.34)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("decoding 12 files of imagefolder-tree")
    progress = [m for m in messages if "files/s, eta" in m]
    assert progress and all("/12 files" in m for m in progress)
    assert messages[-1].startswith("decoded 12 files of imagefolder-tree in")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitsweep.data"):
        load_imagefolder(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), val_fraction=0.34)
    assert not caplog.records  # from the cache: nothing to decode, nothing to say


@pytest.mark.slow
@pytest.mark.parametrize("content", ["some notes, not a checkpoint\n", "augment: none\nseed: [0, 1]\n"],
                         ids=["text", "yaml"])
def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path, content):
    not_a_checkpoint = tmp_path / "best.pt"
    not_a_checkpoint.write_text(content)
    for mode in ("eval", "train"):
        proc = run_cli([*TINY_RUN, "logger=none", f"mode={mode}", f"ckpt_path={not_a_checkpoint}"], tmp_path / mode,
                       check=False)
        assert proc.returncode == 2
        (line,) = nonempty_lines(proc.stderr)
        assert line.startswith(f"error: ckpt_path={not_a_checkpoint} is not a readable vitsweep checkpoint")


@pytest.mark.slow
def test_one_class_data_is_refused_before_training(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for i in range(4):
            write_image(root / split / "only" / f"{i}.png", np.full((8, 8, 3), 40 * i, dtype=np.uint8))
    args = [a for a in TINY_RUN if a != "data=synthetic"]
    proc = run_cli([*args, "logger=none", "data=imagefolder", f"data.root={root}", "data.image_size=8",
                    "data.num_classes=1", "model.patch_size=4"], tmp_path, check=False)
    assert proc.returncode == 2
    (line,) = nonempty_lines(proc.stderr)
    assert line.startswith("error: data.num_classes=1") and "at least 2 classes" in line
    assert not read_metrics(tmp_path / "run")  # not one step trained
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------- 6. a full disk

def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {proc.stderr.strip()}")


@pytest.mark.slow
def test_a_full_disk_gives_one_line_and_leaves_no_temp_file(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "4m")
    try:
        job_dir = disk / "run"
        args = [*TINY_RUN, "logger=none", f"hydra.run.dir={job_dir}"]
        returncode, _, err = finish(start_cli(args, tmp_path))  # one epoch, with room
        assert returncode == 0, err[-3000:]
        last = job_dir / "checkpoints" / "last.pt"
        before = hashlib.sha256(last.read_bytes()).hexdigest()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "ballast").write_bytes(b"\0" * (free - 48 * 1024))  # 48 KB left: less than a checkpoint
        returncode, _, err = finish(start_cli([*args, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path))
        assert returncode == 2, err[-3000:]
        (line,) = nonempty_lines(err)  # not four chained tracebacks
        assert line.startswith(f"error: cannot write {job_dir / 'checkpoints'}/") and "No space left" in line
        assert not list(job_dir.rglob("*.tmp"))
        assert read_summary(job_dir)["status"] == "failed"
        assert hashlib.sha256(last.read_bytes()).hexdigest() == before  # the old checkpoint is intact
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------- 7. W&B out of reach

def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # free now, and nothing listens there once the socket is closed


@pytest.mark.slow
def test_an_unreachable_wandb_server_falls_back_to_offline_and_trains(tmp_path):
    env = {"WANDB_MODE": None, "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    start = time.time()
    proc = run_cli([*TINY_RUN, "logger.mode=online", "logger.init_timeout_s=5"], tmp_path, env=env, timeout=400)
    assert time.time() - start < 300  # not stalled on the server
    warnings = [line for line in nonempty_lines(proc.stderr) if "W&B" in line]
    assert len(warnings) == 1 and "logging offline" in warnings[0] and "wandb sync" in warnings[0]
    assert "Traceback" not in proc.stderr
    assert read_summary(tmp_path / "run")["status"] == "completed"
    (offline_run,) = find_offline_runs(tmp_path / "run")
    assert read_offline_run(offline_run).finished


# ---------------------------------------------------------------------- 8. the end of a multirun

@pytest.mark.slow
def test_a_multirun_ends_with_a_table_and_its_exit_code_can_be_kept_at_zero(tmp_path):
    # num_heads=3 cannot split embed_dim 32: that job fails at once
    proc = run_cli([*QUICK, "model.num_heads=2,3", "hydra.callbacks.sweep_report.failed_exit_code=0"], tmp_path,
                   multirun=True)
    assert proc.returncode == 0
    table = proc.stdout[proc.stdout.index(f"sweep {tmp_path / 'sweep'}: 2 jobs"):].splitlines()
    assert table[0].endswith("1 completed, 1 failed") and table[1].split()[:4] == ["job", "status", "val/acc", "dir"]
    assert table[2].split()[:2] == ["0", "completed"] and str(tmp_path / "sweep" / "0") in table[2]
    assert table[3].split()[:2] == ["1", "failed"] and "model.embed_dim=32" in table[3]
