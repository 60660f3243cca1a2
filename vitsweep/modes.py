"""What `python run.py mode=...` does: build the components from the config and run them.

    train       fit, then score the test split with the best checkpoint, then draw the figures
    eval        score the test split with ckpt_path
    visualize   draw the figures of ckpt_path (conf/viz)

Each mode reads top to bottom like lightning-hydra-template's `train.py`: instantiate, run, log,
return the monitored value. The bookkeeping every job shares (its record, resume, the failure
policy) is `vitsweep.job`.
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitsweep.data.datamodule import trained_normalization
from vitsweep.job import JobRecord, run_job
from vitsweep.logger.run_logger import RunLogger
from vitsweep.trainer.checkpoint import restore
from vitsweep.trainer.loop import resolve_device, seed_everything
from vitsweep.viz import confusion_matrix_figure, save_figure

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig, from_checkpoint: bool = False) -> torch.nn.Module:
    """The model of cfg.model. `from_checkpoint`: every weight will come from ckpt_path, so the factory
    does not load model.pretrained first (for timm:NAME that would be a download)."""
    return instantiate(cfg.model, pretrained=None) if from_checkpoint else instantiate(cfg.model)


def log_test_metrics(trainer, model, data, loss_fn, job: JobRecord, logger: RunLogger, step: int,
                     epoch: int) -> dict[str, float]:
    """Score the test split, log it, and draw the confusion matrix (single-label runs)."""
    metrics, logits, labels = trainer.evaluate(model, data, "test", loss_fn, return_outputs=True)
    logger.log(metrics, step=step, epoch=epoch)
    if labels.dim() == 1:
        png = save_figure(confusion_matrix_figure(logits, labels, data.class_names), job.job_dir / "confusion_matrix.png")
        logger.log_images({"test/confusion_matrix": png}, step=step)
    return metrics


def headline(metrics: dict[str, float]) -> str:
    """'val/acc 0.9312  test/acc 0.9100 ...' without the per-class values (those are in metrics.jsonl)."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.count("/") < 2)


def train(cfg: DictConfig, job: JobRecord, logger: RunLogger) -> float | None:
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    model = build_model(cfg, from_checkpoint=bool(cfg.ckpt_path))  # cheap, fails fast before any data is read
    if getattr(model, "load_report", None) is not None:
        logger.update_summary(pretrained=model.load_report.as_dict())
    figure_report = instantiate(cfg.viz)  # a bad viz option fails now, not after training
    figure_report.check(model)
    resume_state = restore(model, cfg.ckpt_path) if cfg.ckpt_path else None
    data = instantiate(cfg.data)
    log.info("%s", model.summary())
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
    # issue 9 (research controls): what trains (prompt tuning, freezing) and the tokens each layer sees (pruning)
    logger.update_summary(num_trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                          tokens_per_layer=model.tokens_per_layer() if hasattr(model, "tokens_per_layer") else None)

    result = trainer.fit(model, data, augment, loss_fn, optimizer, scheduler, logger, job.checkpoint_dir,
                         seed=cfg.seed, checkpoint_extra={"config": config, "wandb_id": logger.run_id},
                         resume_state=resume_state)
    logger.update_summary(best_value=result.best_value, best_epoch=result.best_epoch,
                          epochs_completed=result.epochs_completed, steps=result.steps,
                          stopped_by_time=result.stopped_by_time)

    # the test split is scored once, with the best checkpoint; its val metrics come from fit()
    restore(model, job.checkpoint_dir / "best.pt", map_location=trainer.device)
    best_val = {k: v for k, v in (result.best_metrics or {}).items() if k.startswith("val/")}
    test = log_test_metrics(trainer, model, data, loss_fn, job, logger, result.steps, result.epochs_completed)
    final = best_val | test
    logger.update_summary(metrics=final)
    log.info("best checkpoint: %s", headline(final))
    if figure_report.enabled_at_end:  # attention and explanations of the best checkpoint, on fixed images
        figures = figure_report.write_for(model, data, cfg.model.image_size, job.job_dir / "figures")
        logger.log_images(figures, step=result.steps)
        log.info("figures: %d PNGs in %s", len(figures), job.job_dir / "figures")
    return result.best_value


def evaluate(cfg: DictConfig, job: JobRecord, logger: RunLogger) -> float | None:
    if not cfg.ckpt_path:
        raise ValueError("mode=eval needs ckpt_path=PATH (a last.pt or best.pt written by run.py)")
    model = build_model(cfg, from_checkpoint=True)
    state = restore(model, cfg.ckpt_path)
    data = instantiate(cfg.data, **trained_normalization(state))  # normalization=auto: the training run's stats
    logger.update_summary(normalization=data.normalization_stats())
    trainer = instantiate(cfg.trainer)
    model.to(trainer.device)
    data.to(trainer.device)
    loss_fn = instantiate(cfg.loss, train_labels=data.split("train").labels)
    metrics = log_test_metrics(trainer, model, data, loss_fn, job, logger, state.get("step", 0), state.get("epoch", 0))
    logger.update_summary(metrics=metrics)
    log.info("%s", headline(metrics))
    return metrics.get(cfg.trainer.monitor.replace("val/", "test/"))


def visualize(cfg: DictConfig, job: JobRecord, logger: RunLogger) -> None:
    """What the checkpoint's ViT attends to and why it decides, for viz.images or the first
    viz.num_images of viz.split: PNGs in <job dir>/figures/, logged to the logger as images."""
    if not cfg.ckpt_path:
        raise ValueError("mode=visualize needs ckpt_path=PATH (a last.pt or best.pt written by run.py)")
    figure_report = instantiate(cfg.viz)
    model = build_model(cfg, from_checkpoint=True)
    state = restore(model, cfg.ckpt_path)
    data = instantiate(cfg.data, **trained_normalization(state))  # normalization=auto: the training run's stats
    device = resolve_device(cfg.trainer.device)
    model.to(device)
    data.to(device)
    figures = figure_report.write_for(model, data, cfg.model.image_size, job.job_dir / "figures")
    logger.log_images(figures, step=state.get("step", 0))
    logger.update_summary(figures={name: str(path) for name, path in figures.items()})
    log.info("%s", "\n".join(f"{name}: {path}" for name, path in figures.items()))


MODES = {"train": train, "eval": evaluate, "visualize": visualize}


def run(cfg: DictConfig) -> float:
    """The job `run.py` starts: the mode `cfg.mode`, with the bookkeeping of `vitsweep.job`."""
    return run_job(cfg, MODES)
