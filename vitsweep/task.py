"""What `run.py` runs: build the components from the config, dispatch on `mode`, and make sure
every job ends cleanly: its summary says completed or failed, its W&B run is finished with the
right exit code, and in a multirun a failed job is recorded while the sweep goes on.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitsweep.logger.run_logger import RunLogger
from vitsweep.trainer.checkpoint import check_architecture, load_checkpoint

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)  # bad input: one line, no traceback wall


def job_info(cfg: DictConfig) -> dict:
    """Where this job lives and how it differs from the defaults (for names, groups and tags)."""
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_name = Path(hydra_cfg.sweep.dir).name if multirun else None
    return {
        "job_dir": Path(hydra_cfg.runtime.output_dir),
        "overrides": overrides,
        "multirun": multirun,
        "group": f"{cfg.task_name}-{sweep_name}" if multirun else None,
        "name": ",".join(overrides) or "defaults",
        "tags": [o for o in overrides if not o.startswith(("ckpt_path=", "hydra."))][:64],
    }


def build_model(cfg: DictConfig) -> torch.nn.Module:
    return instantiate(cfg.model)


def train(cfg: DictConfig, logger: RunLogger, info: dict) -> float | None:
    model = build_model(cfg)  # cheap, and fails fast on shape errors before any data is read
    resume_state = None
    if cfg.ckpt_path:
        resume_state = load_checkpoint(cfg.ckpt_path)
        check_architecture(model, resume_state["model"], cfg.ckpt_path)
        model.load_state_dict(resume_state["model"])
        info["wandb_id"] = resume_state.get("wandb_id")
    data = instantiate(cfg.data)
    print(model.summary(), flush=True)
    trainer = instantiate(cfg.trainer)
    model.to(trainer.device)
    data.to(trainer.device)
    augment = instantiate(cfg.augment).to(trainer.device)
    loss_fn = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer, model=model)
    total_steps = cfg.trainer.max_epochs * (data.steps_per_epoch() // cfg.trainer.accumulate_grad_batches)
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_steps=total_steps,
                            steps_per_epoch=data.steps_per_epoch() // cfg.trainer.accumulate_grad_batches)
    config = OmegaConf.to_container(cfg, resolve=True)
    num_params = sum(p.numel() for p in model.parameters())
    logger.update_summary(num_params=num_params)
    logger.start_backend(config={**config, "num_params": num_params, "overrides": info["overrides"]}, run_info=info)

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
    final = trainer.evaluate(model, data, "val", loss_fn) | trainer.evaluate(model, data, "test", loss_fn)
    logger.log(final, step=result.steps, epoch=result.epochs_completed)
    logger.update_summary(metrics=final)
    print("best checkpoint: " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()), flush=True)
    return result.best_value


def evaluate(cfg: DictConfig, logger: RunLogger, info: dict) -> float | None:
    if not cfg.ckpt_path:
        raise ValueError("mode=eval needs ckpt_path=PATH (a last.pt or best.pt written by run.py)")
    model = build_model(cfg)
    state = load_checkpoint(cfg.ckpt_path)
    check_architecture(model, state["model"], cfg.ckpt_path)
    model.load_state_dict(state["model"])
    data = instantiate(cfg.data)
    trainer = instantiate(cfg.trainer)
    model.to(trainer.device)
    data.to(trainer.device)
    logger.start_backend(config=OmegaConf.to_container(cfg, resolve=True), run_info=info)
    metrics = trainer.evaluate(model, data, "test", instantiate(cfg.loss))
    logger.log(metrics, step=state.get("step", 0), epoch=state.get("epoch", 0))
    logger.update_summary(metrics=metrics)
    print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return metrics.get(cfg.trainer.monitor.replace("val/", "test/"))


MODES = {"train": train, "eval": evaluate}


def _user_error(err: BaseException) -> BaseException | None:
    """The ValueError/FileNotFoundError behind a Hydra InstantiationException, if that is what it is."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err if isinstance(err, USER_ERRORS) else None


def run(cfg: DictConfig) -> float:
    """One Hydra job. Returns the monitored metric (for sweepers); NaN when a multirun job failed."""
    if cfg.mode not in MODES:
        print(f"error: mode={cfg.mode} is not one of: {', '.join(MODES)}", file=sys.stderr)
        raise SystemExit(2)
    info = job_info(cfg)
    logger = RunLogger(info["job_dir"], backend=instantiate(cfg.logger) if cfg.get("logger") else None, summary={
        "monitor": cfg.trainer.monitor, "monitor_mode": cfg.trainer.monitor_mode, "best_value": None,
        "best_epoch": None, "overrides": info["overrides"], "seed": cfg.seed, "mode": cfg.mode,
        "job_dir": str(info["job_dir"]), "run_name": info["name"], "group": info["group"],
    })
    try:
        value = MODES[cfg.mode](cfg, logger, info)
    except BaseException as err:  # noqa: BLE001 -- record every failure, KeyboardInterrupt included
        user_error = _user_error(err)
        message = f"{type(user_error or err).__name__}: {user_error or err}"
        logger.finish(status="failed", error=message)
        if isinstance(err, KeyboardInterrupt):
            raise
        if info["multirun"]:  # record and go on with the sweep
            print(f"[job {info['job_dir'].name} failed] {message}", file=sys.stderr)
            if user_error is None:
                traceback.print_exc()
            return float("nan")
        if user_error is not None:
            print(f"error: {user_error}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    logger.finish(status="completed")
    return float("nan") if value is None else float(value)
