"""Data-parallel training (trainer.strategy=ddp, docs/scale.md).

End to end, with real `torchrun` processes (gloo on the CPU, 2 ranks) and a real submitit job of 2
tasks (the path hydra/launcher=slurm takes): 2 ranks with global batch B follow 1 process with batch
B step for step and report its val metrics; only rank 0 writes, in one job dir, with one W&B run; a
rank killed with SIGKILL ends the job as failed, and the job resumes with the same number of ranks or
another. In-process: the shards of the data, the seeds per rank, DDP in a one-rank group, and the
sbatch script and per-task environment of a 2 nodes x 4 GPUs SLURM job.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_MODEL, offline_env, read_metrics, read_summary, run_cli
from test_launchers import slurm_launcher_config
from test_training_options import fit

from vitsweep.data import DataModule
from vitsweep.data.synthetic import load_synthetic
from vitsweep.logger.wandb_offline import find_offline_runs, read_offline_run
from vitsweep.trainer import Trainer, distributed, loop
from vitsweep.trainer.distributed import Launch, Ranks

# 2 epochs of 10 steps of global batch 16 (drop_path 0 and no augmentation: nothing random per sample,
# so 1 and 2 processes take the same steps); val split of 64 in eval batches of 24, 24, 16 (uneven shares).
# A constant lr, so that a run of 1 epoch resumed to 2 follows the 2-epoch run (a cosine schedule's
# length is max_epochs).
RUN = ["data=synthetic", *TINY_MODEL, "model.drop_path=0", "scheduler=constant", "data.source.num_train=160",
       "data.batch_size=16", "data.eval_batch_size=24", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
       "trainer.progress_bar=false", "viz.enabled_at_end=false", "trainer.ddp_timeout_s=60"]
STEPS_PER_EPOCH = 10


def torchrun(args: list[str], tmp_path: Path, nproc: int = 2, background: bool = False, timeout: float = 300):
    """`torchrun --nproc_per_node=nproc run.py args` (gloo on the CPU, W&B offline); job dir tmp_path/run."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "run.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**offline_env(tmp_path), "PYTHONPATH": str(ROOT)}
    if background:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-5000:]}")
    return proc


def step_losses(job_dir: Path) -> list[float]:
    return [record["train/loss_step"] for record in read_metrics(job_dir) if "train/loss_step" in record]


def val_metrics(job_dir: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k.startswith("val/")} for record in read_metrics(job_dir)
            if "val/loss" in record]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, batch 16, 2 epochs."""
    tmp_path = tmp_path_factory.mktemp("one_process")
    run_cli([*RUN, "logger=none"], tmp_path)
    return tmp_path / "run"


# ------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_two_ranks_follow_one_process_and_only_rank_0_writes(one_process, tmp_path):
    torchrun(RUN, tmp_path)
    job_dir = tmp_path / "run"
    # the same 20 steps: each rank took its half of each global batch of 16, and DDP averaged the gradients
    single, ddp = step_losses(one_process), step_losses(job_dir)
    assert len(single) == len(ddp) == 2 * STEPS_PER_EPOCH
    assert ddp == pytest.approx(single, abs=1e-4)
    # val metrics over the whole split (64 images; rank 0 scored 24 of them, rank 1 the other 40), every epoch
    for ours, reference in zip(val_metrics(job_dir), val_metrics(one_process), strict=True):
        assert ours.keys() == reference.keys()
        assert ours == pytest.approx(reference, abs=1e-5)
    summary = read_summary(job_dir)
    assert summary["status"] == "completed" and summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["metrics"]["test/acc"] == pytest.approx(read_summary(one_process)["metrics"]["test/acc"])
    # one job dir (rank 1 composed no config and made no dir), holding rank 0's files only
    assert {p.name for p in tmp_path.iterdir()} - {"wandb_home"} == {"run"}  # W&B makes its home when it needs it
    assert sorted(p.name for p in job_dir.iterdir()) == [".hydra", "checkpoints", "confusion_matrix.png",
                                                         "metrics.jsonl", "run.log", "summary.json", "wandb"]
    assert sorted(p.name for p in (job_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert len(read_metrics(job_dir)) == len(read_metrics(one_process))  # one writer: no line twice
    run_log = (job_dir / "run.log").read_text()
    assert run_log.count("epoch 0:") == 1 and "[rank 1]" not in run_log
    (run_file,) = find_offline_runs(job_dir)  # one W&B run
    run = read_offline_run(run_file)
    assert run.finished and run.exit_code == 0
    # every rank's RNG stream is in the checkpoint, for an exact mid-epoch resume
    checkpoint = torch.load(job_dir / "checkpoints" / "last.pt", weights_only=True)
    assert len(checkpoint["rng_by_rank"]) == 2
    assert not torch.equal(checkpoint["rng_by_rank"][0]["torch"], checkpoint["rng_by_rank"][1]["torch"])


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_in_one_process_on_the_same_curve(one_process, tmp_path):
    torchrun([*RUN, "trainer.max_epochs=1", "logger=none"], tmp_path / "two_ranks")
    last = tmp_path / "two_ranks" / "run" / "checkpoints" / "last.pt"
    # epoch 2 of 2, in one process (monitoring val/loss, which falls every epoch here: this new job dir gets
    # its own best.pt, which the test split is scored with)
    monitor_loss = ["trainer.monitor=val/loss", "trainer.monitor_mode=min"]
    run_cli([*RUN, "logger=none", f"ckpt_path={last}", *monitor_loss], tmp_path / "one_rank")
    resumed = tmp_path / "one_rank" / "run"
    assert step_losses(resumed) == pytest.approx(step_losses(one_process)[STEPS_PER_EPOCH:], abs=1e-4)
    assert val_metrics(resumed)[-1] == pytest.approx(val_metrics(one_process)[-1], abs=1e-5)


# DINO, the method with the most to share between ranks (the centre's all_reduce of the teacher's outputs, the
# teacher following the student after each step), with its kNN monitor: val (64 images) is one eval batch of
# 256, which rank 1 scores, and rank 0 gathers the named outputs (features, loss) without a batch of its own
PRETRAIN = ["mode=pretrain", "pretrain=dino", "pretrain.out_dim=64", "pretrain.hidden_dim=32",
            "pretrain.bottleneck_dim=16", "pretrain.num_local_crops=2", "data=synthetic", *TINY_MODEL,
            "data.source.num_train=64", "data.batch_size=16", "trainer.max_epochs=2", "trainer.progress_bar=false",
            "viz.enabled_at_end=false", "logger=none", "trainer.ddp_timeout_s=60"]


@pytest.mark.slow
def test_two_ranks_pretrain_an_encoder(tmp_path):
    torchrun(PRETRAIN, tmp_path)
    job_dir = tmp_path / "run"
    summary = read_summary(job_dir)
    assert summary["status"] == "completed" and summary["steps"] == 2 * 64 // 16
    assert {"val/knn_acc", "val/loss", "val/feature_std"} <= summary["metrics"].keys()
    assert [record["epoch"] for record in read_metrics(job_dir) if "val/loss" in record] == [0, 1]  # one writer
    state = torch.load(job_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    encoder = {name: tensor for name, tensor in state.items() if name.startswith("encoder.")}
    assert "encoder.patch_embed.proj.weight" in encoder and len(encoder) > 10
    assert state["teacher_updates"] > 0 and state["center"].abs().sum() > 0  # the teacher and its centre moved


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (read from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            status = (proc / "status").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        parent = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_killed_rank_ends_the_job_as_failed_and_it_resumes(tmp_path):
    args = [*RUN, "trainer.strategy=ddp", "trainer.max_epochs=12", "data.source.num_train=320"]
    launcher = torchrun(args, tmp_path, background=True)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    victim = worker_pid(launcher.pid, rank=1)
    assert victim is not None, launcher.communicate()[0][-3000:]
    os.kill(victim, 9)
    killed_at = time.time()
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.time() - killed_at < 60 + 30, output[-3000:]  # within trainer.ddp_timeout_s (gloo: at once)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed", output[-3000:]
    assert summary["error"]
    epochs_before = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= epochs_before < 12

    torchrun([*args, "resume=true"], tmp_path)  # the same 2 ranks, from last.pt
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 12
    epochs_logged = [record["epoch"] for record in read_metrics(tmp_path / "run") if "val/loss" in record]
    assert epochs_logged[-(12 - epochs_before):] == list(range(epochs_before, 12))  # went on, did not restart
    runs = [read_offline_run(path) for path in find_offline_runs(tmp_path / "run")]
    assert len({run.run_id for run in runs}) == 1  # the same W&B run, continued


@pytest.mark.slow
def test_slurm_style_tasks_follow_rank_0(one_process, tmp_path):
    """hydra/launcher=slurm's path, on this machine: submitit runs Hydra's job in each of 2 tasks; task 0
    leads, task 1 follows (its run.log handler dropped), and they train as the torchrun ranks do."""
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    run_cli([*launcher, *RUN, "logger=none"], tmp_path, multirun=True, fresh_process=True)
    job_dir = tmp_path / "sweep" / "0"
    assert read_summary(job_dir)["status"] == "completed"
    assert step_losses(job_dir) == pytest.approx(step_losses(one_process), abs=1e-4)
    for ours, reference in zip(val_metrics(job_dir), val_metrics(one_process), strict=True):
        assert ours == pytest.approx(reference, abs=1e-5)  # approx compares a list of dicts exactly
    assert (job_dir / "run.log").read_text().count("epoch 0:") == 1
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [".submitit", "0", "multirun.yaml"]


# ------------------------------------------------------------------------------------ in-process

def small_data(batch_size=16, eval_batch_size=24) -> DataModule:
    source = load_synthetic(image_size=8, in_channels=1, num_classes=3, num_train=64, num_val=40, num_test=8)
    return DataModule(source, image_size=8, in_channels=1, num_classes=3, batch_size=batch_size,
                      eval_batch_size=eval_batch_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_takes_its_share_of_every_global_batch(world_size):
    data = small_data()
    whole = list(data.train_batches(epoch=3, seed=1, skip=1))
    shares = [list(data.train_batches(epoch=3, seed=1, skip=1, rank=r, world_size=world_size))
              for r in range(world_size)]
    for step, (images, labels) in enumerate(whole):
        assert torch.equal(torch.cat([share[step][0] for share in shares]), images)
        assert torch.equal(torch.cat([share[step][1] for share in shares]), labels)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_eval_shares_cover_the_split_once_in_order(world_size):
    data = small_data(eval_batch_size=8)  # 5 batches of val: some ranks get 2, 1, or (5 ranks) 1 each
    shares = [[labels for _, labels in data.eval_batches("val", rank=r, world_size=world_size)]
              for r in range(world_size)]
    assert torch.equal(torch.cat([chunk for share in shares for chunk in share]), data.split("val").labels)
    assert sum(len(share) for share in shares) == 5


def test_each_rank_draws_its_own_stream_and_rank_0_keeps_the_single_process_seed():
    seeds = {rank: Ranks(torch.device("cpu"), rank, 4).seed(7003) for rank in range(4)}
    assert seeds[0] == 7003
    assert len(set(seeds.values())) == 4
    assert Ranks(torch.device("cpu"), 1, 4).seed(7004) != seeds[1]  # another epoch, another stream
    assert Ranks(torch.device("cpu"), 1, 2).seed(7003) == seeds[1]  # a function of (seed, epoch, rank)


def test_a_mid_epoch_resume_restores_each_ranks_stream_only_with_as_many_ranks():
    checkpoint = {"rng": "rank0", "rng_by_rank": ["rank0", "rank1"]}
    assert Ranks(torch.device("cpu"), 1, 2).stored_rng_state(checkpoint) == "rank1"
    assert Ranks(torch.device("cpu"), 0, 3).stored_rng_state(checkpoint) is None  # reseeded
    assert Ranks(torch.device("cpu")).stored_rng_state({"rng": "single"}) == "single"
    assert Ranks(torch.device("cpu")).stored_rng_state(checkpoint) is None


def test_global_batch_must_split_evenly_over_the_ranks():
    with pytest.raises(ValueError, match=r"data.batch_size=10 is the global batch.*multiple of 4"):
        Ranks(torch.device("cpu"), 0, 4).check_batch_size(10)


def test_strategy_options_fail_clearly_without_their_process_group():
    with pytest.raises(ValueError, match=r"trainer.strategy=dp is not one of: auto, single, ddp"):
        Trainer(device="cpu", strategy="dp")
    with pytest.raises(ValueError, match=r"trainer.strategy=ddp needs the job's process group.*torchrun"):
        Trainer(device="cpu", strategy="ddp")
    with pytest.raises(ValueError, match=r"trainer.ddp_timeout_s=0"):
        Trainer(device="cpu", strategy="ddp", ddp_timeout_s=0)
    trainer = Trainer(device="cpu")  # auto, one process: the single-device path, nothing wrapped
    assert not trainer.ranks.distributed and trainer.ranks.wrap(model := torch.nn.Linear(2, 2)) is model


@pytest.fixture
def one_rank_group():
    distributed.start(Launch())  # what run.py does for trainer.strategy=ddp in a single process
    yield
    distributed.stop()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_in_a_one_rank_group_trains_as_the_single_device_loop(one_rank_group, tmp_path, accumulate):
    single, _, single_model, *_ = fit(tmp_path, "single", max_epochs=2, accumulate_grad_batches=accumulate)
    ddp, _, ddp_model, trainer, _ = fit(tmp_path, "ddp", max_epochs=2, strategy="ddp",
                                        accumulate_grad_batches=accumulate)
    assert isinstance(trainer.ranks.ddp, torch.nn.parallel.DistributedDataParallel)
    assert (ddp.steps, ddp.best_value) == (single.steps, pytest.approx(single.best_value))
    theirs = single_model.state_dict()
    for name, ours in ddp_model.state_dict().items():
        assert torch.allclose(ours, theirs[name], atol=1e-6), name
    assert "module." not in next(iter(torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]))


def ddp_rank_on_its_own_clock(rank: int, port: int, tick_s: float, tmp_path: Path, results) -> None:
    """Rank `rank` of 2 (gloo, CPU) fitting under trainer.max_time, with a clock of its own: each reading of
    the loop's clock advances it by tick_s, so a run's elapsed time is a count of readings, not a race."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)  # as torchrun's ranks: two processes on a few cores
    clock = itertools.count(0.0, tick_s)
    loop.time = SimpleNamespace(time=lambda: next(clock))  # the loop's `time.time()`, in this process only
    distributed.start(Launch(rank=rank, world_size=2, launcher="env"))
    try:
        result, *_ = fit(tmp_path, f"rank{rank}", max_epochs=50, strategy="ddp", max_time=100, ddp_timeout_s=20)
        results.put((rank, result.steps, result.stop_reason))
    except Exception as err:  # noqa: BLE001 -- the test reports it
        results.put((rank, None, f"{type(err).__name__}: {err}"))
    finally:
        distributed.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="forks the two ranks")
def test_under_max_time_every_rank_stops_at_the_same_step_whatever_its_own_clock(tmp_path):
    """The time budget plans and stops from rank 0's clock on every rank: rank 1's clock runs four times as
    fast as rank 0's, and still both ranks take the same steps. (A rank that re-planned from its own clock
    would plan fewer steps and stop early, and rank 0's next collective would wait for a peer that has gone.)"""
    context = multiprocessing.get_context("fork")  # the ranks share this process's imports: no start-up
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=ddp_rank_on_its_own_clock, args=(rank, port, tick_s, tmp_path, results))
             for rank, tick_s in ((0, 1.0), (1, 4.0))]
    for process in ranks:
        process.start()
    reports, deadline = {}, time.time() + 60  # a few seconds when the ranks agree; a hang when they do not
    while len(reports) < len(ranks) and time.time() < deadline:
        try:
            rank, steps, how = results.get(timeout=1)
            reports[rank] = steps, how
        except queue.Empty:
            if not any(process.is_alive() for process in ranks):
                break
    for process in ranks:
        process.join(timeout=1)
        if process.is_alive():
            process.kill()  # waiting for a peer that stopped
    assert reports.keys() == {0, 1}, reports
    (steps, how), (steps_1, how_1) = reports[0], reports[1]
    assert how == how_1 == "max_time", reports  # time ended it (not max_epochs), and no rank failed
    assert steps == steps_1 and 0 < steps < 50 * 4, reports


def test_slurm_job_of_2_nodes_x_4_gpus_has_8_tasks_and_their_distributed_environment(tmp_path, monkeypatch):
    """The sbatch script submitit writes for hydra/launcher=slurm with nodes=2 gpus_per_node=4, then the
    environment each of its 8 tasks derives from the variables SLURM gives it."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    fake_bin = tmp_path / "bin"  # a fake `srun` on PATH stands in for the cluster
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    params = slurm_launcher_config(["hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                                    "hydra.launcher.gpus_per_node=4"])
    params.pop("_target_")
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base_keys else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "export SUBMITIT_EXECUTOR=slurm"):
        assert line in script
    assert "\nsrun " in script  # srun starts the 8 tasks, each running the pickled Hydra job

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "unset")  # so that monkeypatch restores (removes) what the tasks export
        monkeypatch.delenv(name)
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
                        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(name, value)
    tasks = []
    for task in range(8):  # what srun gives task `task` on node task // 4
        monkeypatch.setenv("SLURM_PROCID", str(task))
        monkeypatch.setenv("SLURM_LOCALID", str(task % 4))
        monkeypatch.setenv("SLURM_NODEID", str(task // 4))
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(name, None)  # each task is a fresh process: nothing exported by the one before
        launch = distributed.launched()
        tasks.append((launch, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]))
        assert distributed.is_follower() == (task > 0)
    assert [launch.rank for launch, *_ in tasks] == list(range(8))
    assert [launch.local_rank for launch, *_ in tasks] == [0, 1, 2, 3] * 2
    assert {(launch.world_size, launch.launcher) for launch, *_ in tasks} == {(8, "submitit")}
    assert {(addr, port) for _, addr, port in tasks} == {("gpu07", tasks[0][2])}  # all meet on the first node


def test_one_process_job_is_not_distributed(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched() == Launch() and not distributed.is_follower()

