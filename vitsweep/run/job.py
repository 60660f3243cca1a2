"""Job bookkeeping around every mode, so that each job ends cleanly (lightning-hydra-template's
`task_wrapper`): who the job is (`JobRecord`), skipping or resuming an earlier attempt (`resume=true`,
SLURM requeue), threads per job, the run record's lifecycle, and the failure policy:

- bad input (a ValueError, a missing file, a NaN loss): one `error:` line, exit 2, no traceback;
- any job that fails: its summary.json says failed with the reason, its W&B run ends with exit code 1;
- in a multirun the failed job is recorded and the sweep goes on (it returns NaN; under Optuna it
  raises, and the study records a FAIL trial);
- SIGTERM / SIGINT / a SLURM preemption (vitsweep/trainer/interrupt.py): last.pt at the current step,
  status `interrupted`, one line, exit 128 + signal (or submitit's requeue); `resume=true` continues it.
  A signal that finds the job already failing (torchrun stops the other ranks when one dies) leaves
  the record `failed`, with the error that came first.

What each mode does is in `vitsweep.run.modes`; this module does not import it (the modes come in as an
argument), so the two can be read apart.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from vitsweep.logger.atomic_file import OutputWriteError, write_atomic
from vitsweep.logger.run_logger import RunLogger
from vitsweep.model.pretrained import PretrainedLoadError
from vitsweep.run.lock import JobDirBusy, JobDirLock
from vitsweep.run.trained_config import adopt_trained_config
from vitsweep.trainer import interrupt
from vitsweep.trainer.checkpoint import load_checkpoint
from vitsweep.trainer.distributed import share_job

log = logging.getLogger(__name__)

# bad input: one line, no traceback (PretrainedLoadError: model.pretrained can't be fetched or fitted;
# OutputWriteError: a full disk or a read-only folder, named by path)
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, FloatingPointError, PretrainedLoadError, OutputWriteError)

Mode = Callable[[DictConfig, "JobRecord", RunLogger, "dict | None"], "float | None"]  # + ckpt_path's checkpoint
FITTING_MODES = ("train", "pretrain")  # the modes that train, checkpoint and resume from last.pt


class UserError(SystemExit):
    """A refusal before any work: printed as one `error:` line, exit code 2."""

    def __init__(self, message: str):
        log.error("error: %s", message)
        super().__init__(2)


@dataclass
class JobRecord:
    """Where this job lives and how it differs from the defaults (for names, groups and tags)."""

    job_dir: Path
    overrides: list[str]  # this job's command-line overrides, resume=... left out
    multirun: bool
    group: str | None  # one W&B group per sweep
    name: str
    tags: list[str]
    sweeper: str  # the Hydra sweeper's _target_ (the failure policy differs under Optuna)
    resume_run_id: str | None = None  # the W&B run a resumed training job continues

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> JobRecord:
        hydra_cfg = HydraConfig.get()
        # resume=true says how to run the job, not what it is: a resumed job keeps its name, tags and identity
        overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("resume=")]
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        # outputs/multirun/<date>/<time> -> "<date>_<time>": one W&B group per sweep, unique across days
        sweep_name = "_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None
        return cls(
            job_dir=Path(hydra_cfg.runtime.output_dir),
            overrides=overrides,
            multirun=multirun,
            group=f"{cfg.task_name}-{sweep_name}" if multirun else None,
            name=",".join(overrides) or "defaults",
            tags=[o for o in overrides if not o.startswith(("ckpt_path=", "hydra."))][:64],
            sweeper=hydra_cfg.sweeper.get("_target_", ""),
        )

    @property
    def checkpoint_dir(self) -> Path:
        return self.job_dir / "checkpoints"


# ------------------------------------------------------------------------------ earlier attempts

def resumed_run_id(cfg: DictConfig, checkpoint: dict | None) -> str | None:
    """The W&B run id stored in the checkpoint a training run resumes from: the run goes on in W&B too."""
    if cfg.mode not in FITTING_MODES or checkpoint is None:
        return None
    return checkpoint.get("wandb_id")


def requeued_by_slurm() -> bool:
    """A SLURM job that was preempted or timed out and requeued (submitit does that) resumes itself."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def requeued_by_submitit(job_dir: Path) -> bool:
    """submitit requeued this job after its preemption signal (recorded in summary.json by the attempt
    it stopped); submitit_local restarts it with no SLURM_RESTART_COUNT to tell."""
    path = job_dir / "summary.json"
    if not os.environ.get("SUBMITIT_EXECUTOR") or not path.is_file():
        return False
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return False
    return summary.get("status") == "interrupted" and bool(summary.get("requeued"))


def how_to_run(overrides: list[str]) -> list[str]:
    """The overrides that say how to run a job rather than which job it is: a training job resumed from
    ckpt_path is the same job as the one that wrote it."""
    return [o for o in overrides if not o.startswith(("ckpt_path=", "resume="))]


def earlier_attempt(job_dir: Path, overrides: list[str]) -> dict | None:
    """The summary.json that an earlier run of this same job left in its job dir, or None if none ran."""
    path = job_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if sorted(how_to_run(summary.get("overrides") or [])) != sorted(how_to_run(overrides)):
        other_job = " ".join(summary.get("overrides") or [])
        raise UserError(f"resume=true, but {job_dir} holds another job ({other_job}): resume with the command "
                        f"and hydra.sweep.dir of the sweep that wrote it")
    return summary


def resume(cfg: DictConfig, job: JobRecord) -> float | None:
    """resume=true: skip a job that completed before (returning its stored best value, so a sweeper
    still gets its number) or point ckpt_path at the last.pt of one that stopped early. Must run
    before the RunLogger rewrites summary.json with status "running"."""
    summary = earlier_attempt(job.job_dir, job.overrides)
    if summary is None:
        return None
    if summary.get("status") == "completed":
        best = summary.get("best_value")
        log.info("[resume] %s completed before: skipped (%s best %s)", job.job_dir, summary.get("monitor"), best)
        return float("nan") if best is None else float(best)
    last = job.checkpoint_dir / "last.pt"
    if last.is_file():  # this job's own latest state, newer than any ckpt_path it was first started from
        cfg.ckpt_path = str(last)
        log.info("[resume] %s stopped early (%s): continuing from %s", job.job_dir, summary.get("status"), last)
    return None


def carry_best_forward(ckpt_path: str | Path, ckpt_dir: Path, resume_state: dict, write: bool = True) -> None:
    """Resuming from ckpt_path into another job dir: copy the run's best.pt (beside ckpt_path) into this
    job's checkpoints, so the test split is scored with the best epoch of the whole run even when no epoch
    after the resume beats it. Without one to copy, the best is tracked afresh from the resume on (one
    warning line), so that best.pt always exists at the end."""
    source = Path(ckpt_path).expanduser().resolve().with_name("best.pt")
    target = Path(ckpt_dir) / "best.pt"
    if source == target.resolve():
        return  # resuming in place: best.pt is already here

    def copy(file) -> None:
        with open(source, "rb") as best:
            shutil.copyfileobj(best, file)

    if source.is_file():
        if not write:  # DDP: another rank (rank 0) makes the copy
            return
        write_atomic(target, copy)
        log.info("resumed into a new job dir: %s carried forward to %s", source, target)
    elif resume_state.get("best_value") is not None:
        log.warning("ckpt_path=%s has no best.pt beside it: the best epoch is tracked afresh from the resume on "
                    "(the earlier best, %s, has no weights to test)", ckpt_path, resume_state["best_value"])
        resume_state["best_value"] = resume_state["best_epoch"] = resume_state["best_metrics"] = None


class PrepareSweepDir(Callback):
    """Hydra callback of the Optuna searches (conf/hparams_search/): Optuna opens its SQLite study in the
    sweep dir before any job has created that dir, so create it first. With resume=true, set the earlier
    study aside (optuna.db -> optuna.<time>.db): the seeded sampler then asks the same trials again, the
    completed ones are skipped with their stored values, and the new study ends up whole."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        storage = str(OmegaConf.select(config, "hydra.sweeper.storage", default=None) or "")
        study_file = Path(storage.removeprefix("sqlite:///"))
        if config.get("resume") and storage.startswith("sqlite:///") and study_file.is_file():
            set_aside = study_file.with_name(f"{study_file.stem}.{time.strftime('%Y%m%d-%H%M%S')}.db")
            study_file.rename(set_aside)


# -------------------------------------------------------------------------------- the job itself

def user_error(err: BaseException) -> BaseException | None:
    """The ValueError/FileNotFoundError behind a Hydra InstantiationException, if that is what it is."""
    built = err if isinstance(err, InstantiationException) else None
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if built is not None and isinstance(err, Exception) and not isinstance(err, USER_ERRORS):
        return config_error(built, err)
    if isinstance(err, InterpolationToMissingValueError):  # e.g. model.image_size: ${data.image_size}, unset
        missing = re.search(r"Missing mandatory value: (\S+)", err.msg)
        key = missing.group(1) if missing else err.full_key
        return ValueError(f"{key} has no value: set it on the command line ({key}=...)")
    if isinstance(err, MissingMandatoryValue):
        return ValueError(f"{err.full_key} has no value: set it on the command line ({err.full_key}=...)")
    return err if isinstance(err, USER_ERRORS) else None


def config_error(built: InstantiationException, cause: Exception) -> ValueError:
    """A component its config section could not build (a string where a number goes, a zero that divides):
    the values are the user's, so one line naming the section and what failed, not a traceback."""
    section = re.search(r"full_key: (\S+)", str(built))
    target = re.search(r"target '([^']+)'", str(built))
    key = section.group(1) if section else "the config"
    reason = (str(cause).strip().splitlines() or [""])[0]
    return ValueError(f"{key}: {target.group(1) if target else 'a component'} cannot be built from it "
                      f"({type(cause).__name__}: {reason}): check the {key}.* values for a wrong type or range")


def set_threads(cfg: DictConfig) -> None:
    """Jobs running side by side share the machine's cores: `threads`, else a submitit launcher's
    cpus_per_task (joblib's workers need neither: loky limits each to cores / n_jobs)."""
    cpus_per_task = OmegaConf.select(HydraConfig.get(), "launcher.cpus_per_task", default=None)
    threads = cfg.get("threads") or cpus_per_task
    if threads:
        torch.set_num_threads(threads)


def stop_on_signal(err: interrupt.Interrupted, job: JobRecord, logger: RunLogger, lock: JobDirLock) -> NoReturn:
    """A signal stopped the job: record it as interrupted, finish the W&B run, say so in one line, and
    exit with 128 + signal, or let submitit requeue it (then the next attempt resumes by itself)."""
    requeue = interrupt.will_requeue(err)
    logger.update_summary(requeued=requeue)
    logger.finish(status="interrupted", error=err.signal_name + (f" at {err.where}" if err.where else ""))
    lock.release()  # the record is final; the process ends below without unwinding (os._exit)
    if requeue:
        how = "submitit requeues it and it resumes from last.pt"
    else:
        where = f"hydra.sweep.dir={job.job_dir.parent}" if job.multirun else f"hydra.run.dir={job.job_dir}"
        how = f"continue it with the same command plus {where} resume=true"
    log.warning("interrupted by %s%s: status interrupted; %s", err.signal_name,
                f" at {err.where}" if err.where else "", how)
    interrupt.exit_for(err)


@interrupt.signals_handled  # SIGTERM/SIGINT/preemption while the job runs (vitsweep/trainer/interrupt.py)
def run_job(cfg: DictConfig, modes: dict[str, Mode]) -> float:
    """One Hydra job: `modes[cfg.mode]` wrapped in the bookkeeping above. Returns the monitored metric
    (for sweepers); NaN when a multirun job failed (under Optuna the failure is raised instead)."""
    job = JobRecord.from_hydra(cfg)
    # one process per job dir (vitsweep/run/lock.py), from before resume=true reads it until the record is final
    try:
        lock = JobDirLock.acquire(job.job_dir)
    except (JobDirBusy, OutputWriteError) as err:
        raise UserError(str(err)) from None
    try:
        return run_held_job(cfg, modes, job, lock)
    finally:
        lock.release()  # completed, failed, skipped or refused: the next run may take the dir


def run_held_job(cfg: DictConfig, modes: dict[str, Mode], job: JobRecord, lock: JobDirLock) -> float:
    """run_job's work, in a job dir this process holds."""
    if cfg.mode in FITTING_MODES and (cfg.get("resume") or requeued_by_slurm() or requeued_by_submitit(job.job_dir)):
        stored_value = resume(cfg, job)
        if stored_value is not None:
            return stored_value
    set_threads(cfg)
    logger = RunLogger(job.job_dir, backend=instantiate(cfg.logger) if cfg.get("logger") else None, summary={
        "monitor": cfg.trainer.monitor, "monitor_mode": cfg.trainer.monitor_mode, "best_value": None,
        "best_epoch": None, "overrides": job.overrides, "seed": cfg.seed, "mode": cfg.mode,
        "job_dir": str(job.job_dir), "run_name": job.name, "group": job.group,
        "threads": torch.get_num_threads(), "pid": os.getpid(),  # pid: the process to signal (kill -TERM)
    })
    # a second signal exits at once: the record says interrupted, not running
    interrupt.on_abort(lambda signum: logger.update_summary(status="interrupted", error=f"aborted by signal {signum}"))
    try:
        if cfg.mode not in modes:  # inside: a sweep records it as this job's failure and goes on
            raise ValueError(f"mode={cfg.mode} is not one of: {', '.join(modes)}")
        checkpoint = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None  # read once, for the whole job
        # eval, visualize and resume: the model, data shape and normalization of the checkpoint
        adopt_trained_config(cfg, job.overrides, checkpoint)
        # the backend run starts before anything is built, so a job that fails early still shows as failed
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        share_job(config, job)  # DDP: the other ranks run this config, resume decided (vitsweep.run.ranks)
        job.resume_run_id = resumed_run_id(cfg, checkpoint)
        logger.start_backend(config={**config, "overrides": job.overrides}, job=job)
        value = modes[cfg.mode](cfg, job, logger, checkpoint)
    except BaseException as err:
        if isinstance(err, interrupt.Interrupted):
            # a signal that came while an error unwound the stack: the job had failed (a dead DDP rank)
            err = interrupt.failure_behind(err) or stop_on_signal(err, job, logger, lock)
        bad_input = user_error(err)
        message = f"{type(bad_input or err).__name__}: {bad_input or err}"
        with interrupt.held():  # a signal now (torchrun stopping the other ranks) waits for the record
            logger.finish(status="failed", error=message)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, or submitit requeueing a preempted job
            raise
        if job.multirun:  # record and go on with the sweep
            log.error("[job %s failed] %s", job.job_dir.name, message, exc_info=bad_input is None)
            if interrupt.requested():  # Ctrl-C while the failure was recorded: the sweep ends too
                interrupt.stop("")
            if "optuna" in job.sweeper.lower():
                raise  # Optuna records a raising job as a FAIL trial, but a NaN value stops the whole search
            return float("nan")
        if bad_input is not None:
            raise UserError(str(bad_input)) from None
        log.exception("job failed: %s", message)  # the traceback, into run.log too
        raise SystemExit(1) from None
    logger.finish(status="completed")
    return float("nan") if value is None else float(value)
