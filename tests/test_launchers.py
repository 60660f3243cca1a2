"""Launchers: joblib (parallel local processes) and submitit_local each run a real 2-job sweep; every
job keeps its job dir, summary.json and its own W&B run, and uses its share of the cores. The SLURM
config is checked through the sbatch script submitit would submit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, read_summary, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vitsweep.logger.wandb_offline import find_offline_runs, read_offline_run

TWO_JOBS = ["seed=0,1", *TINY_RUN]


def check_two_jobs(sweep_dir: Path) -> list[dict]:
    summaries = [read_summary(sweep_dir / str(job)) for job in (0, 1)]
    for job, summary in enumerate(summaries):
        assert summary["status"] == "completed", summary["error"]
        assert summary["job_dir"] == str(sweep_dir / str(job))
        assert f"seed={job}" in summary["overrides"]
        assert (sweep_dir / str(job) / ".hydra" / "overrides.yaml").is_file()
    assert len({summary["group"] for summary in summaries}) == 1
    return summaries


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_processes_each_with_its_own_wandb_run(tmp_path):
    # OMP_NUM_THREADS unset, as a user's shell has it: loky then gives each worker its share of the cores
    run_cli(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TWO_JOBS], tmp_path, multirun=True, fresh_process=True,
            env={"OMP_NUM_THREADS": None})
    sweep_dir = tmp_path / "sweep"
    summaries = check_two_jobs(sweep_dir)
    # loky gives each of the 2 workers cores // 2 threads (OMP_NUM_THREADS), which torch follows
    assert [summary["threads"] for summary in summaries] == [max(1, os.cpu_count() // 2)] * 2
    for job in (0, 1):
        (run_file,) = find_offline_runs(sweep_dir / str(job))
        run = read_offline_run(run_file)
        assert run.finished and run.exit_code == 0
        assert run.config["seed"] == job and f"seed={job}" in run.tags
        assert run.group == summaries[job]["group"]


@pytest.mark.slow
def test_submitit_local_runs_each_job_with_its_cpus(tmp_path):
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
                "hydra.launcher.timeout_min=20"]
    run_cli([*launcher, *TWO_JOBS, "logger=none"], tmp_path, multirun=True, fresh_process=True)
    sweep_dir = tmp_path / "sweep"
    summaries = check_two_jobs(sweep_dir)
    assert [summary["threads"] for summary in summaries] == [1, 1]  # threads=null: cpus_per_task
    assert (sweep_dir / ".submitit").is_dir()  # each job ran in its own submitit process


@pytest.mark.slow
def test_threads_key_sets_torch_threads(tmp_path):
    proc = run_cli([*TINY_RUN, "logger=none", "threads=1", "trainer.max_epochs=0"], tmp_path, check=False)
    assert read_summary(tmp_path / "run")["threads"] == 1, proc.stderr


def slurm_launcher_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # as the plugin gets them: instantiated


def test_slurm_launcher_writes_a_requeueable_gpu_job(tmp_path, monkeypatch):
    """The sbatch script submitit would submit for conf/hydra/launcher/slurm.yaml, built the way the
    Hydra plugin builds it (a fake `srun` on PATH stands in for the cluster)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    params = slurm_launcher_config(["hydra.launcher.partition=gpu"])
    assert params["_target_"].endswith("SlurmLauncher")
    params.pop("_target_")
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = "vitsweep"
    executor.update_parameters(**{k if k in base_keys else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@120", "#SBATCH --cpus-per-task=8"):
        assert line in script
    assert "#SBATCH --time=240" in script
    assert executor._executor.max_num_timeout == 3  # timed-out jobs come back, up to 3 times
