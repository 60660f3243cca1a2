"""One process per job dir (vitsweep/run/lock.py, taken by vitsweep.run.job.run_job).

A second run of a running job dir (resume=true in a second terminal) is refused in one line, exit 2, and
writes nothing; a lock left by a dead process on this machine, or by an earlier attempt of a requeued
SLURM job on another node, is taken over; a live process's lock, or another SLURM job's, refuses; the lock
goes when the job ends, however it ends. The second runs are run_job in this process; the first, whose
lock is held by another process, is `python run.py`."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, read_metrics, read_summary
from test_reliability import start_cli

from vitsweep.run.lock import LOCK_FILE, JobDirBusy, JobDirLock
from vitsweep.trainer import interrupt

HOST = socket.gethostname()
SLURM = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT")


@pytest.fixture
def job_config(monkeypatch):
    """`compose(job_dir, overrides)`: the job's config as Hydra gives it to run_job in `job_dir` (not under
    SLURM unless the test says so). The signal handlers run_job installs, and the interrupt state it
    leaves, are put back afterwards."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    for name in SLURM:
        monkeypatch.delenv(name, raising=False)

    def composed(job_dir: Path, overrides: list[str]):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        cfg.hydra.runtime.output_dir = str(job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it before the job runs
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as in a real job: the job's config without Hydra's own node
        return cfg

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield composed
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    interrupt._state.__init__()


def run_job(cfg, mode) -> float:
    from vitsweep.run.job import run_job

    return run_job(cfg, {"train": mode})


def never_runs(*args):
    raise AssertionError("the refused run went on to train")


def lock_record(job_dir: Path) -> dict:
    return json.loads((job_dir / LOCK_FILE).read_text())


def write_lock(job_dir: Path, **record) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / LOCK_FILE).write_text(json.dumps({"since": "2026-01-01 00:00:00", "slurm_job_id": None,
                                                 "slurm_restart_count": 0, **record}))


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------ a second run of a running job

# 2 epochs of 32 steps: the first run is still training a few seconds after it says `running`
FIRST = [*TINY_RUN, "logger=none", "data.source.num_train=512", "data.batch_size=16", "trainer.max_epochs=2",
         "trainer.log_every_n_steps=1", "resume=true"]


@pytest.mark.slow
def test_a_second_run_of_a_running_job_dir_is_refused_in_one_line_and_writes_nothing(job_config, tmp_path, caplog):
    job_dir = tmp_path / "run"
    second = job_config(job_dir, FIRST)  # composed beforehand: it runs the moment the first says `running`
    first = start_cli([*FIRST, f"hydra.run.dir={job_dir}"], tmp_path)
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline:
        if (job_dir / "summary.json").exists() and read_summary(job_dir)["status"] == "running":
            break
        time.sleep(0.02)
    assert first.poll() is None, first.communicate()[1][-3000:]

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as refused:
        run_job(second, never_runs)  # resume=true, the same job, in a second process
    assert refused.value.code == 2
    (line,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert line.startswith(f"error: {job_dir} is being run by pid {first.pid} on {HOST} since "), line
    assert f": wait for it, or stop it (kill -TERM {first.pid}" in line and "\n" not in line
    summary = read_summary(job_dir)
    assert (summary["status"], summary["pid"]) == ("running", first.pid)  # the first job's record, untouched
    assert lock_record(job_dir)["pid"] == first.pid

    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    summary = read_summary(job_dir)
    assert (summary["status"], summary["pid"], summary["steps"]) == ("completed", first.pid, 2 * 512 // 16)
    steps = [row["step"] for row in read_metrics(job_dir) if "train/loss_step" in row]
    assert steps == list(range(1, 2 * 512 // 16 + 1))  # one writer: every step once, in order
    assert [row["epoch"] for row in read_metrics(job_dir) if "val/loss" in row] == [0, 1]
    assert not (job_dir / LOCK_FILE).exists()  # released when it ended


# --------------------------------------------------------------------------------- stale locks

def test_a_lock_left_by_a_dead_process_on_this_machine_is_taken_over(job_config, tmp_path):
    job_dir = tmp_path / "run"
    write_lock(job_dir, pid=dead_pid(), host=HOST)  # killed -9: its flock went with it, its record stayed
    cfg = job_config(job_dir, ["logger=none"])
    held_by = []
    assert run_job(cfg, lambda *args: held_by.append(lock_record(job_dir)) or 0.5) == 0.5
    assert held_by[0]["pid"] == os.getpid() and held_by[0]["host"] == HOST
    assert read_summary(job_dir)["status"] == "completed"
    assert not (job_dir / LOCK_FILE).exists()


def test_a_requeued_slurm_attempt_takes_over_its_earlier_attempts_lock_and_another_job_is_refused(
        job_config, tmp_path, monkeypatch, caplog):
    """The earlier attempt ran on another node: whether it lives cannot be seen from here, but SLURM runs
    one attempt of a job at a time. A lock of another SLURM job on another node refuses."""
    job_dir = tmp_path / "run"
    write_lock(job_dir, pid=4242, host="gpu07", slurm_job_id="777", slurm_restart_count=0)
    cfg = job_config(job_dir, ["logger=none"])
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # another job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as refused:
        run_job(cfg, never_runs)
    assert refused.value.code == 2
    (line,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert line == (f"error: {job_dir} is being run by pid 4242 on gpu07 (SLURM job 777) since 2026-01-01 00:00:00: "
                    f"wait for it, or stop it (scancel 777; it saves last.pt) and run this again with resume=true; "
                    f"if that run is gone (its machine went down), delete {job_dir / LOCK_FILE}")
    assert sorted(path.name for path in job_dir.iterdir()) == [LOCK_FILE]  # nothing written
    assert lock_record(job_dir)["pid"] == 4242

    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued
    held_by = []
    assert run_job(cfg, lambda *args: held_by.append(lock_record(job_dir)) or 0.5) == 0.5
    assert (held_by[0]["pid"], held_by[0]["slurm_job_id"], held_by[0]["slurm_restart_count"]) == (os.getpid(), "777", 1)
    assert not (job_dir / LOCK_FILE).exists()


def test_a_live_holder_refuses_unless_it_is_an_earlier_attempt_of_this_slurm_job(tmp_path, monkeypatch):
    """A live holder: this process, through another open file (flock locks belong to open files)."""
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    holder = JobDirLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "222")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(JobDirBusy, match=rf"is being run by pid {os.getpid()} on {HOST} \(SLURM job 111\)"):
        JobDirLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same attempt again: two runs of one allocation
    with pytest.raises(JobDirBusy):
        JobDirLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued attempt: waits for the earlier one, then takes over
    taker = JobDirLock.acquire(tmp_path, wait_s=0.2)
    assert lock_record(tmp_path)["slurm_restart_count"] == 1
    holder.release()  # the earlier attempt ends: it leaves the taker's record alone
    assert lock_record(tmp_path)["slurm_restart_count"] == 1
    taker.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_without_flock_the_record_decides_by_pid_on_this_machine(tmp_path, monkeypatch):
    """A filesystem without flock (ENOLCK, ENOSYS on some cluster filesystems): a live pid holds the dir."""
    from vitsweep.run import lock

    monkeypatch.setattr(lock, "try_flock", lambda fd: None)
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        write_lock(tmp_path, pid=sleeper.pid, host=HOST)
        with pytest.raises(JobDirBusy, match=rf"by pid {sleeper.pid} on {HOST} since .*kill -TERM {sleeper.pid};"):
            JobDirLock.acquire(tmp_path)
    finally:
        sleeper.communicate(input="")
    JobDirLock.acquire(tmp_path).release()  # it has ended


# ------------------------------------------------------------------------------ released at the end

def test_the_lock_goes_when_the_job_fails_or_is_interrupted(job_config, tmp_path, monkeypatch):
    held_by = []

    def failing(*args):
        held_by.append(lock_record(tmp_path / "failed"))
        raise ValueError("data.batch_size=0 must be positive")

    with pytest.raises(SystemExit) as ended:
        run_job(job_config(tmp_path / "failed", ["logger=none"]), failing)
    assert ended.value.code == 2 and read_summary(tmp_path / "failed")["status"] == "failed"
    assert held_by[0]["pid"] == os.getpid() and not (tmp_path / "failed" / LOCK_FILE).exists()

    def exit_process(code):
        raise SystemExit(code)  # exit_for ends the process with os._exit: here, this test's SystemExit

    monkeypatch.setattr(interrupt.os, "_exit", exit_process)
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # exit_for flushes the logs: keep pytest's open

    def signalled(*args):
        held_by.append(lock_record(tmp_path / "interrupted"))
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as ended:
        run_job(job_config(tmp_path / "interrupted", ["logger=none"]), signalled)
    assert ended.value.code == 128 + signal.SIGTERM
    assert read_summary(tmp_path / "interrupted")["status"] == "interrupted"
    assert held_by[1]["pid"] == os.getpid() and not (tmp_path / "interrupted" / LOCK_FILE).exists()
