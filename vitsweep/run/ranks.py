"""One job, several processes (trainer.strategy=ddp): rank 0 leads, the other ranks follow.

The trap this avoids (lightning-hydra-template #393): every process parsing sys.argv with Hydra,
each making its own job dir (`${now:...}` differs by a second) and writing its own logs. Here:

- rank 0 is the process Hydra composed the config for. It creates the job dir, decides resume
  (`resume=true`, SLURM requeue), and then shares the job, its resolved config and JobRecord, with
  the other ranks (`vitsweep.run.job.run_job` calls `share_job` once the config is final);
- the other ranks never compose: torchrun's ranks > 0 go from run.py straight to `follow`; under
  hydra/launcher=slurm every task runs Hydra's job (in the job dir the submitter fixed), and the
  tasks after the first drop Hydra's run.log handler and follow;
- a follower runs the same mode with the shared config and a `FollowerLogger`, which records
  nothing: only rank 0 writes checkpoints, summary.json, metrics.jsonl, run.log, figures, the W&B
  run. A follower's errors go to stderr, tagged with its rank (its warnings would repeat rank 0's).

The collectives themselves are vitsweep.trainer.distributed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vitsweep.run.job import Mode, UserError, user_error
from vitsweep.trainer import distributed

log = logging.getLogger(__name__)

FOLLOWED_MODES = ("train", "eval", "pretrain")  # mode=visualize draws on rank 0 alone


class FollowerLogger:
    """The RunLogger of a rank > 0: the same calls, nothing recorded (rank 0 keeps the job's record)."""

    run_id = None

    def __init__(self):
        self.summary: dict = {}

    def start_backend(self, config: dict, job) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int) -> None:
        pass

    def update_summary(self, **fields) -> None:
        self.summary.update(fields)

    def finish(self, status: str, error: str | None = None) -> None:
        pass


@contextmanager
def leading(cfg: DictConfig) -> Iterator[None]:
    """Around rank 0's job (or the only process's): start the job's process group when it has several
    processes or asks for trainer.strategy=ddp; on the way out, tell the followers to stop if the job
    ended before it was shared (skipped by resume=true, refused), and leave the group."""
    launch = distributed.launched()
    if launch.world_size == 1 and OmegaConf.select(cfg, "trainer.strategy") != "ddp":
        yield
        return
    if launch.launcher == "torchrun" and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise UserError("torchrun runs one job (the other ranks follow it): drop -m, or sweep multi-GPU jobs "
                        "with hydra/launcher=slurm (docs/scale.md)")
    distributed.start(launch)
    try:
        yield
    finally:
        # a follower that is gone already needs no telling
        with suppress(RuntimeError):
            if not distributed.job_shared():
                distributed.share_job(None, None)
        distributed.stop()


def quiet_logging(rank: int) -> None:
    """A follower logs errors only, on stderr, tagged with its rank: Hydra's run.log handler (set up
    on every SLURM task) is rank 0's alone, and its warnings would repeat rank 0's."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.ERROR)


def follow(modes: dict[str, Mode]) -> float:
    """A rank > 0: wait for the job rank 0 shares, run its mode with its config, writing nothing.
    Returns the mode's value (NaN when there was nothing to run); a failure exits like rank 0's: 2 for
    bad input (rank 0 prints the `error:` line), 1 otherwise; in a multirun it returns NaN instead, so
    that the sweep goes on."""
    launch = distributed.launched()
    quiet_logging(launch.rank)
    distributed.start(launch)
    shared = None
    try:
        shared = distributed.receive_job()
        if shared is None or OmegaConf.create(shared["config"]).mode not in FOLLOWED_MODES:
            return float("nan")  # rank 0 ended the job before it began (skipped, refused), or runs it alone
        cfg = OmegaConf.create(shared["config"])
        if shared["threads"]:
            torch.set_num_threads(shared["threads"])
        value = modes[cfg.mode](cfg, shared["job"], FollowerLogger())
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        bad_input = user_error(err) is not None
        if not bad_input:  # rank 0 may only see that this rank is gone: say why here
            log.exception("failed (%s)", type(err).__name__)  # the traceback ends with the error
        if shared is not None and shared["job"].multirun:
            return float("nan")
        raise SystemExit(2 if bad_input else 1) from None
    finally:
        distributed.stop()
    return float("nan") if value is None else float(value)

