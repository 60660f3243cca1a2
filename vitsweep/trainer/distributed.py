"""Data-parallel training (trainer.strategy=ddp): torch.distributed across processes started by
`torchrun` or by SLURM (hydra/launcher=slurm, one task per GPU), the model in DistributedDataParallel.

Two process groups:
- the job's bootstrap group (gloo, on the CPU), joined by every process as it starts: rank 0 (the
  process Hydra composed the config for) sends the job to the others through it (`share_job`,
  `receive_job`; the job side of this is vitsweep.run.ranks);
- the training group the Trainer opens (`join_ranks`): nccl on CUDA, gloo on the CPU, with
  trainer.ddp_timeout_s, the longest any rank waits for the others. A rank that dies leaves the others
  waiting at most that long in their next collective (gloo usually notices at once: the dead peer's
  socket closes), and their error ends the job, which rank 0 records as failed.

The data of one optimizer step: the epoch's permutation is a function of (seed, epoch) only
(DataModule.epoch_order); data.batch_size = B is the global batch, and rank r of W takes rows
[r*B/W, (r+1)*B/W) of each one. DDP averages the gradients, so W ranks take the step one process takes
with batch B. Random draws per sample (crop windows, augmentation, mixup partners, dropout, drop
path) come from each rank's own RNG stream, seeded from (seed, epoch, rank); rank 0 keeps the
single-process seed.

Evaluation is exact over the whole split: each rank scores a contiguous share of the evaluation
batches, and the logits and labels are gathered, in order, on every rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "single", "ddp")
# how long the other ranks wait for rank 0 to compose the config and share the job (seconds)
BOOTSTRAP_TIMEOUT_S = 300


class RankStopped(RuntimeError):
    """torchrun stopped this rank (SIGTERM) because another rank of the job failed."""


# ------------------------------------------------------------------------------------ who am I

@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as its launcher set it up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str | None = None  # torchrun | submitit | env (RANK... set by hand) | None: one process


def launched() -> Launch:
    """Who this process is: torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or a submitit job with several
    tasks (hydra/launcher=slurm with gpus_per_node x nodes > 1), whose SLURM variables submitit's
    TorchDistributedEnvironment turns into the same (MASTER_ADDR: the job's first node)."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            # each task keeps every GPU of its node visible: Ranks picks cuda:LOCAL_RANK
            environment = submitit.helpers.TorchDistributedEnvironment()
            environment.export(set_cuda_visible_devices=False, overwrite=True)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Launch()
    launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in os.environ
                else "submitit" if os.environ.get("SUBMITIT_EXECUTOR") else "env")
    return Launch(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")), launcher=launcher)


def is_follower() -> bool:
    """A rank > 0: it runs the job rank 0 shares, and writes nothing."""
    return launched().rank > 0


# ------------------------------------------------------------------ the bootstrap group, the job

_job_shared = False
_sigterm_before = signal.SIG_DFL  # the handler start() replaced, put back by stop()


def start(launch: Launch) -> None:
    """Join the job's bootstrap group (gloo): env:// for several processes, an in-memory store for one
    (trainer.strategy=ddp in a single process)."""
    global _job_shared, _sigterm_before
    _job_shared = False
    timeout = datetime.timedelta(seconds=BOOTSTRAP_TIMEOUT_S)
    if launch.world_size == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)  # env://: MASTER_ADDR/PORT, RANK, WORLD_SIZE
    if launch.launcher == "torchrun":
        # torchrun stops the other ranks with SIGTERM when one fails: end as a failed job, not a killed one
        _sigterm_before = signal.signal(signal.SIGTERM, _stop_on_sigterm)


def stop() -> None:
    """Leave every process group of the job (the next job of a multirun starts afresh)."""
    global _sigterm_before
    if dist.is_initialized():
        dist.destroy_process_group()
    if signal.getsignal(signal.SIGTERM) in (_stop_on_sigterm, signal.SIG_IGN):
        signal.signal(signal.SIGTERM, _sigterm_before)
    _sigterm_before = signal.SIG_DFL


def _stop_on_sigterm(signum, frame) -> None:
    if sys.exc_info()[0] is not None:
        return  # already failing (the collective that noticed the dead rank): let the job record that
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the job's clean-up must not be interrupted
    raise RankStopped("torchrun stopped this rank (SIGTERM): another rank of the job failed, see its error")


def share_job(config: dict | None, job) -> None:
    """Rank 0: send the job (its resolved config and JobRecord; None: nothing to run) to the other
    ranks, once. Without a process group (one process, no DDP) there is no one to tell."""
    global _job_shared
    if not dist.is_initialized() or _job_shared:
        return
    dist.broadcast_object_list([None if config is None else
                                {"config": config, "job": job, "threads": torch.get_num_threads()}], src=0)
    _job_shared = True


def job_shared() -> bool:
    return _job_shared


def receive_job() -> dict | None:
    """A rank > 0: the job rank 0 shares ({"config", "job", "threads"}), or None if there is none to run."""
    message = [None]
    dist.broadcast_object_list(message, src=0)
    return message[0]


@contextmanager
def rank_zero_first(timeout_s: float) -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks once it is through (or failed): a download or a
    disk cache (data=cifar10, data=imagefolder) is written by one process, then read by the others.
    They wait at most timeout_s (trainer.ddp_timeout_s)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.get_rank() > 0:
        dist.monitored_barrier(timeout=timeout)  # the bootstrap group: gloo, on the CPU
    try:
        yield
    finally:
        if dist.get_rank() == 0:
            dist.monitored_barrier(timeout=timeout)


# -------------------------------------------------------------------------- the trainer's ranks

class Ranks:
    """The ranks of training, as the Trainer uses them. With one process (strategy single) every
    method is the identity and nothing is communicated."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, group=None):
        self.device, self.rank, self.world_size, self.group = device, rank, world_size, group
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs and figures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in DistributedDataParallel (same start weights on every rank: rank 0's are broadcast;
        gradients averaged over the ranks in backward)."""
        if not self.distributed:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, process_group=self.group, gradient_as_bucket_view=True)
        return self.ddp

    def sync_gradients(self, sync: bool) -> None:
        """Whether the next backward averages the gradients over the ranks (off on the micro-batches
        accumulate_grad_batches adds up locally: DDP's no_sync, set before the forward)."""
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = sync

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"data.batch_size={batch_size} is the global batch, split evenly over the "
                             f"{self.world_size} ranks: make it a multiple of {self.world_size}")

    def seed(self, seed: int) -> int:
        """This rank's seed for a (seed, epoch) seed: rank 0 keeps it (one rank is the single-process run),
        the others draw independent streams from (seed, rank)."""
        if self.rank == 0:
            return seed
        state = np.random.SeedSequence([seed % 2**63, self.rank]).generate_state(1, dtype=np.uint64)
        return int(state[0] % 2**63)

    def rng_states(self, state: dict) -> list[dict]:
        """Every rank's RNG state (capture_rng_state), in rank order, for a checkpoint."""
        if not self.distributed:
            return [state]
        states = [None] * self.world_size
        dist.all_gather_object(states, state, group=self.group)
        return states

    def stored_rng_state(self, checkpoint: dict) -> dict | None:
        """This rank's RNG state in a checkpoint written mid-epoch, or None when the checkpoint was written
        by another number of ranks (the rank then reseeds: see docs/scale.md, "resume")."""
        states = checkpoint.get("rng_by_rank") or [checkpoint["rng"]]
        return states[self.rank] if len(states) == self.world_size else None

    def sum(self, *values: torch.Tensor | float) -> tuple[torch.Tensor, ...] | tuple[float, ...]:
        """Each value summed over the ranks (one all-reduce for all of them)."""
        if not self.distributed:
            return values
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in values])
        dist.all_reduce(stacked, group=self.group)
        return tuple(stacked.unbind())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a per-rank value (every rank's batch has the same size)."""
        return self.sum(value)[0] / self.world_size if self.distributed else value

    def any(self, flag: bool) -> bool:
        """True on every rank when it is on any: decisions that change the control flow (stop for
        max_time) must be the same everywhere, or the ranks wait for each other forever."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def agree(self, value: float) -> float:
        """Rank 0's value on every rank: inputs to decisions that must match everywhere (the time budget's
        lr plan and stop), where each rank's own clock would differ by a little."""
        if not self.distributed:
            return value
        shared = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(shared, src=0, group=self.group)
        return float(shared.item())

    def gather_rows(self, chunks: Sequence[torch.Tensor | dict[str, torch.Tensor]]):
        """Concatenate this rank's chunks (N_r, ...), tensors or dicts of them (named outputs or targets), and
        gather every rank's, in rank order: (sum N_r, ...) on every rank, per name for dicts. A rank may have
        none (a split with fewer batches than ranks): it learns the names, shapes and dtypes from the others,
        so every rank makes the same collectives."""
        if not chunks or isinstance(chunks[0], torch.Tensor):
            local = torch.cat(list(chunks)) if chunks else None
        else:
            local = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
        if not self.distributed:
            return local
        # every rank's layout: (rows, trailing shape, dtype), a dict of them, or None if it has no rows
        if local is None:
            layout = None
        elif isinstance(local, dict):
            layout = {name: layout_of(rows) for name, rows in local.items()}
        else:
            layout = layout_of(local)
        layouts = [None] * self.world_size
        dist.all_gather_object(layouts, layout, group=self.group)
        named = next(layout for layout in layouts if layout is not None)
        if isinstance(named, dict):  # the names in one rank's order: the same collectives on every rank
            return {name: self.gather_tensor(None if local is None else local[name],
                                             [None if layout is None else layout[name] for layout in layouts])
                    for name in named}
        return self.gather_tensor(local, layouts)

    def gather_tensor(self, local: torch.Tensor | None, layouts: list) -> torch.Tensor:
        """Every rank's rows of one tensor, in rank order, given every rank's (rows, trailing, dtype) or None."""
        _, trailing, dtype = next(layout for layout in layouts if layout is not None)
        rows = [0 if layout is None else layout[0] for layout in layouts]
        # all_gather takes equal shapes: every share padded to the longest
        padded = torch.zeros((max(rows), *trailing), dtype=dtype, device=self.device)
        if local is not None:
            padded[:len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(gathered, rows)])

    def barrier(self) -> None:
        if not self.distributed:
            return
        if self.device.type == "cuda":
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)


def layout_of(rows: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
    return len(rows), tuple(rows.shape[1:]), rows.dtype


def join_ranks(strategy: str, device: torch.device, timeout_s: float) -> Ranks:
    """The Trainer's ranks for trainer.strategy: single (this process alone), ddp (every process of the
    job: the training group, nccl on CUDA, gloo on the CPU), or auto (ddp when the job has several
    processes). ddp needs the bootstrap group, which run.py starts (vitsweep.run.ranks)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy={strategy} is not one of: {', '.join(STRATEGIES)}")
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"trainer.ddp_timeout_s={timeout_s} must be a positive number of seconds, e.g. 600")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if strategy == "single" or (strategy == "auto" and world_size == 1):
        if world_size > 1:
            raise ValueError(f"trainer.strategy=single, but this job runs {world_size} processes (torchrun, "
                             f"or a SLURM job with several tasks): set trainer.strategy=ddp (or auto), or "
                             f"start one process")
        return Ranks(device)
    if not dist.is_initialized():
        raise ValueError("trainer.strategy=ddp needs the job's process group: start the job with "
                         "`python run.py` or `torchrun --nproc_per_node=N run.py` (docs/scale.md)")
    if device.type == "cuda":
        # one GPU per rank: cuda:LOCAL_RANK (cuda:0 where SLURM shows each task only its own GPU)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        # a dead peer then surfaces as an exception in the waiting rank after the timeout, which the job
        # records (status failed), instead of NCCL's watchdog tearing the process down
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"trainer.strategy=ddp runs on CUDA (nccl) or the CPU (gloo), not {device.type}: "
                         f"set trainer.device=cuda or trainer.device=cpu")
    group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(device, dist.get_rank(), world_size, group)
