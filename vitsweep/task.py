"""What `run.py` runs: build the components from the config, dispatch on `mode`, and make sure
every job ends cleanly: its summary says completed or failed, its W&B run is finished with the
right exit code, and in a multirun a failed job is recorded while the sweep goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vitsweep.data.datamodule import trained_normalization
from vitsweep.logger.run_logger import RunLogger
from vitsweep.models.pretrained import PretrainedLoadError
from vitsweep.trainer.checkpoint import check_architecture, load_checkpoint
from vitsweep.trainer.loop import resolve_device, seed_everything

# bad input: one line, no traceback (PretrainedLoadError: model.pretrained can't be fetched or fitted)
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, FloatingPointError, PretrainedLoadError)


def job_info(cfg: DictConfig) -> dict:
    """Where this job lives and how it differs from the defaults (for names, groups and tags)."""
    hydra_cfg = HydraConfig.get()
    # resume=true says how to run the job, not what it is: a resumed job keeps its name, tags and identity
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("resume=")]
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # outputs/multirun/<date>/<time> -> "<date>_<time>": one W&B group per sweep, unique across days
    sweep_name = "_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None
    return {
        "job_dir": Path(hydra_cfg.runtime.output_dir),
        "overrides": overrides,
        "multirun": multirun,
        "group": f"{cfg.task_name}-{sweep_name}" if multirun else None,
        "name": ",".join(overrides) or "defaults",
        "tags": [o for o in overrides if not o.startswith(("ckpt_path=", "hydra."))][:64],
        "sweeper": hydra_cfg.sweeper.get("_target_", ""),
    }


def build_model(cfg: DictConfig, from_checkpoint: bool = False) -> torch.nn.Module:
    """The model of cfg.model; `from_checkpoint`: its weights come from ckpt_path, so model.pretrained
    (a download for timm:NAME) is not loaded first."""
    return instantiate(cfg.model, pretrained=None) if from_checkpoint else instantiate(cfg.model)


def train(cfg: DictConfig, logger: RunLogger, info: dict) -> float | None:
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    model = build_model(cfg, from_checkpoint=bool(cfg.ckpt_path))  # cheap, fails fast before any data is read
    figure_report = instantiate(cfg.viz)  # a bad viz option fails now, not after training
    figure_report.check(model)
    resume_state = None
    if cfg.ckpt_path:
        resume_state = load_checkpoint(cfg.ckpt_path)
        check_architecture(model, resume_state["model"], cfg.ckpt_path)
        model.load_state_dict(resume_state["model"])
    data = instantiate(cfg.data)
    print(model.summary(), flush=True)
    trainer = instantiate(cfg.trainer)
    model.to(trainer.device)
    data.to(trainer.device)
    augment = instantiate(cfg.augment).to(trainer.device)
    # the training labels: for loss.class_weights=balanced, and to check multi_label against the data
    loss_fn = instantiate(cfg.loss, train_labels=data.split("train").labels)
    optimizer = instantiate(cfg.optimizer, model=model)
    steps_per_epoch = data.steps_per_epoch() // cfg.trainer.accumulate_grad_batches  # optimizer steps
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_steps=cfg.trainer.max_epochs * steps_per_epoch,
                            steps_per_epoch=steps_per_epoch)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"].update(data.normalization_stats())  # the mean/std in use (computed if normalization=auto)
    logger.update_summary(num_params=sum(p.numel() for p in model.parameters()),
                          normalization=data.normalization_stats())

    ckpt_dir = info["job_dir"] / "checkpoints"
    result = trainer.fit(model, data, augment, loss_fn, optimizer, scheduler, logger, ckpt_dir, seed=cfg.seed,
                         checkpoint_extra={"config": config, "wandb_id": info.get("wandb_id")},
                         resume_state=resume_state)
    logger.update_summary(best_value=result.best_value, best_epoch=result.best_epoch,
                          epochs_completed=result.epochs_completed, steps=result.steps,
                          stopped_by_time=result.stopped_by_time)

    # the test split is scored once, with the best checkpoint
    best = load_checkpoint(ckpt_dir / "best.pt", map_location=trainer.device)
    model.load_state_dict(best["model"])
    # the best epoch's validation metrics come from fit(): no second pass over the val split
    best_val = {k: v for k, v in (result.best_metrics or {}).items() if k.startswith("val/")}
    confusion_png = info["job_dir"] / "confusion_matrix.png"
    test = trainer.evaluate(model, data, "test", loss_fn, confusion_matrix_png=confusion_png)
    logger.log(test, step=result.steps, epoch=result.epochs_completed)
    if confusion_png.is_file():  # single-label runs
        logger.log_images({"test/confusion_matrix": confusion_png}, step=result.steps)
    final = best_val | test
    logger.update_summary(metrics=final)
    print("best checkpoint: " + "  ".join(f"{k} {v:.4f}" for k, v in final.items() if k.count("/") < 2),
          flush=True)  # per-class values are in metrics.jsonl and summary.json
    if figure_report.enabled_at_end:  # attention and explanations of the best checkpoint, on fixed images
        figures = figure_report.write_for(model, data, cfg.model.image_size, info["job_dir"] / "figures")
        logger.log_images(figures, step=result.steps)
        print(f"figures: {len(figures)} PNGs in {info['job_dir'] / 'figures'}", flush=True)
    return result.best_value


def evaluate(cfg: DictConfig, logger: RunLogger, info: dict) -> float | None:
    if not cfg.ckpt_path:
        raise ValueError("mode=eval needs ckpt_path=PATH (a last.pt or best.pt written by run.py)")
    model = build_model(cfg, from_checkpoint=True)
    state = load_checkpoint(cfg.ckpt_path)
    check_architecture(model, state["model"], cfg.ckpt_path)
    model.load_state_dict(state["model"])
    data = instantiate(cfg.data, **trained_normalization(state))  # normalization=auto: the training run's stats
    logger.update_summary(normalization=data.normalization_stats())
    trainer = instantiate(cfg.trainer)
    model.to(trainer.device)
    data.to(trainer.device)
    confusion_png = info["job_dir"] / "confusion_matrix.png"
    loss_fn = instantiate(cfg.loss, train_labels=data.split("train").labels)
    metrics = trainer.evaluate(model, data, "test", loss_fn, confusion_matrix_png=confusion_png)
    logger.log(metrics, step=state.get("step", 0), epoch=state.get("epoch", 0))
    if confusion_png.is_file():  # single-label runs
        logger.log_images({"test/confusion_matrix": confusion_png}, step=state.get("step", 0))
    logger.update_summary(metrics=metrics)
    print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.count("/") < 2), flush=True)
    return metrics.get(cfg.trainer.monitor.replace("val/", "test/"))


def visualize(cfg: DictConfig, logger: RunLogger, info: dict) -> None:
    """What the checkpoint's ViT attends to and why it decides, for viz.images or the first
    viz.num_images of viz.split: PNGs in <job dir>/figures/, logged to the logger as images."""
    if not cfg.ckpt_path:
        raise ValueError("mode=visualize needs ckpt_path=PATH (a last.pt or best.pt written by run.py)")
    figure_report = instantiate(cfg.viz)
    model = build_model(cfg, from_checkpoint=True)
    state = load_checkpoint(cfg.ckpt_path)
    check_architecture(model, state["model"], cfg.ckpt_path)
    model.load_state_dict(state["model"])
    data = instantiate(cfg.data, **trained_normalization(state))  # normalization=auto: the training run's stats
    device = resolve_device(cfg.trainer.device)
    model.to(device)
    data.to(device)
    figures = figure_report.write_for(model, data, cfg.model.image_size, info["job_dir"] / "figures")
    logger.log_images(figures, step=state.get("step", 0))
    logger.update_summary(figures={name: str(path) for name, path in figures.items()})
    print("\n".join(f"{name}: {path}" for name, path in figures.items()), flush=True)


MODES = {"train": train, "eval": evaluate, "visualize": visualize}


def resumed_run_id(cfg: DictConfig) -> str | None:
    """The W&B run id stored in the checkpoint a training run resumes from: the run goes on in W&B too."""
    if cfg.mode != "train" or not cfg.ckpt_path or not Path(cfg.ckpt_path).is_file():
        return None  # a bad ckpt_path is reported by train(), with the backend run already open
    try:
        return torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("wandb_id")
    except Exception:  # noqa: BLE001 -- train() reports an unreadable checkpoint clearly
        return None


def requeued_by_slurm() -> bool:
    """A SLURM job that was preempted or timed out and requeued (submitit does that) resumes itself."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def earlier_attempt(job_dir: Path, overrides: list[str]) -> dict | None:
    """The summary.json that an earlier run of this same job left in its job dir, or None if none ran."""
    path = job_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if sorted(summary.get("overrides") or []) != sorted(overrides):
        other_job = " ".join(summary.get("overrides") or [])
        print(f"error: resume=true, but {job_dir} holds another job ({other_job}): resume with the command "
              f"and hydra.sweep.dir of the sweep that wrote it", file=sys.stderr)
        raise SystemExit(2)
    return summary


def resume(cfg: DictConfig, info: dict) -> float | None:
    """resume=true: skip a job that completed before (returning its stored best value, so a sweeper
    still gets its number) or point ckpt_path at the last.pt of one that stopped early. Must run
    before the RunLogger rewrites summary.json with status "running"."""
    job_dir = info["job_dir"]
    summary = earlier_attempt(job_dir, info["overrides"])
    if summary is None:
        return None
    if summary.get("status") == "completed":
        best = summary.get("best_value")
        print(f"[resume] {job_dir} completed before: skipped ({summary.get('monitor')} best {best})",
              flush=True)
        return float("nan") if best is None else float(best)
    last = job_dir / "checkpoints" / "last.pt"
    if last.is_file() and not cfg.ckpt_path:
        cfg.ckpt_path = str(last)
        print(f"[resume] {job_dir} stopped early ({summary.get('status')}): continuing from {last}",
              flush=True)
    return None


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


def _user_error(err: BaseException) -> BaseException | None:
    """The ValueError/FileNotFoundError behind a Hydra InstantiationException, if that is what it is."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, MissingMandatoryValue):
        return ValueError(f"{err.full_key} has no value: set it on the command line ({err.full_key}=...)")
    return err if isinstance(err, USER_ERRORS) else None


def run(cfg: DictConfig) -> float:
    """One Hydra job. Returns the monitored metric (for sweepers); NaN when a multirun job failed (under
    Optuna the failure is raised instead, and the study records a FAIL trial)."""
    if cfg.mode not in MODES:
        print(f"error: mode={cfg.mode} is not one of: {', '.join(MODES)}", file=sys.stderr)
        raise SystemExit(2)
    info = job_info(cfg)
    if cfg.mode == "train" and (cfg.get("resume") or requeued_by_slurm()):
        stored_value = resume(cfg, info)
        if stored_value is not None:
            return stored_value
    # jobs running side by side share the machine's cores: threads, else a submitit launcher's cpus_per_task
    # (joblib's workers need neither: loky limits each to cores / n_jobs through OMP_NUM_THREADS)
    cpus_per_task = OmegaConf.select(HydraConfig.get(), "launcher.cpus_per_task", default=None)
    threads = cfg.get("threads") or cpus_per_task
    if threads:
        torch.set_num_threads(threads)
    logger = RunLogger(info["job_dir"], backend=instantiate(cfg.logger) if cfg.get("logger") else None, summary={
        "monitor": cfg.trainer.monitor, "monitor_mode": cfg.trainer.monitor_mode, "best_value": None,
        "best_epoch": None, "overrides": info["overrides"], "seed": cfg.seed, "mode": cfg.mode,
        "job_dir": str(info["job_dir"]), "run_name": info["name"], "group": info["group"],
        "threads": torch.get_num_threads(),
    })
    try:
        # the backend run starts before anything is built, so a job that fails early still shows as failed
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        info["wandb_id"] = resumed_run_id(cfg)
        logger.start_backend(config={**config, "overrides": info["overrides"]}, run_info=info)
        value = MODES[cfg.mode](cfg, logger, info)
    except BaseException as err:
        user_error = _user_error(err)
        message = f"{type(user_error or err).__name__}: {user_error or err}"
        logger.finish(status="failed", error=message)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, or submitit requeueing a preempted job
            raise
        if info["multirun"]:  # record and go on with the sweep
            print(f"[job {info['job_dir'].name} failed] {message}", file=sys.stderr)
            if user_error is None:
                traceback.print_exc()
            if "optuna" in info["sweeper"].lower():
                raise  # Optuna records a raising job as a FAIL trial, but a NaN value stops the whole search
            return float("nan")
        if user_error is not None:
            print(f"error: {user_error}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    logger.finish(status="completed")
    return float("nan") if value is None else float(value)
