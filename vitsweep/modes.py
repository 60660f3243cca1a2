"""What `python run.py mode=...` does: build the components from the config and run them.

    train       fit, then score the test split with the best checkpoint, then draw the figures
    eval        score the test split with ckpt_path
    visualize   draw the figures of ckpt_path (conf/viz)
    pretrain    self-supervised pretraining of the encoder (conf/pretrain: mae, dino), then its figures

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
from vitsweep.job import JobRecord, UserError, run_job
from vitsweep.logger.run_logger import RunLogger
from vitsweep.pretrain import ENCODER_PREFIX
from vitsweep.ranks import follow, leading
from vitsweep.trainer.checkpoint import load_checkpoint, restore
from vitsweep.trainer.distributed import is_follower, rank_zero_first
from vitsweep.trainer.loop import resolve_device, seed_everything
from vitsweep.viz import save_figure, split_figures
from vitsweep.viz.pretrain import pretrain_figures

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig, task, from_checkpoint: bool = False) -> torch.nn.Module:
    """The model of cfg.model with the task's head(s). `from_checkpoint`: every weight will come from
    ckpt_path, so the factory does not load model.pretrained first (for timm:NAME that would be a download)."""
    args = task.model_args()
    return instantiate(cfg.model, pretrained=None, **args) if from_checkpoint else instantiate(cfg.model, **args)


def build_data(cfg: DictConfig, task, **overrides):
    """The DataModule, its loader asked for the targets the task learns from."""
    return instantiate(cfg.data, source={"targets": task.data_targets()}, **overrides)


def model_and_data(cfg: DictConfig, task, from_checkpoint: bool = False, data_overrides: dict | None = None):
    """Model and data, in that order when the task knows its head sizes from the config (a bad model
    option then fails before any file is read), else the data first (a multi-task head whose class
    count is its column's)."""
    model = build_model(cfg, task, from_checkpoint) if task.heads_known() else None
    data = build_data(cfg, task, **(data_overrides or {}))
    if model is None:
        task.count_classes(data)
        model = build_model(cfg, task, from_checkpoint)
    return model, data


def log_test_metrics(trainer, model, data, task, job: JobRecord, logger: RunLogger, step: int,
                     epoch: int) -> dict[str, float]:
    """Score the test split, log it, and draw the task's figures of it (confusion matrix, scatter)."""
    metrics, evaluator = trainer.evaluate(model, data, "test", task, return_evaluator=True)
    logger.log(metrics, step=step, epoch=epoch)
    if trainer.ranks.is_main:  # DDP: rank 0 writes
        figures = {f"test/{name}": save_figure(figure, job.job_dir / f"{name}.png")
                   for name, figure in split_figures(task, evaluator, data).items()}
        logger.log_images(figures, step=step)
    return metrics


def headline(metrics: dict[str, float], task) -> str:
    """'val/acc 0.9312  test/acc 0.9100 ...' without the per-class values (those are in metrics.jsonl)."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if task.is_headline(k))


def train(cfg: DictConfig, job: JobRecord, logger: RunLogger) -> float | None:
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    task = instantiate(cfg.task)
    with rank_zero_first(cfg.trainer.ddp_timeout_s):  # DDP: one process downloads or fills the disk cache
        model, data = model_and_data(cfg, task, from_checkpoint=bool(cfg.ckpt_path))
    if getattr(model, "load_report", None) is not None:
        logger.update_summary(pretrained=model.load_report.as_dict())
    figure_report = instantiate(cfg.viz)  # a bad viz option fails now, not after training
    figure_report.check(model)
    resume_state = restore(model, cfg.ckpt_path) if cfg.ckpt_path else None
    task.setup_task(data, model)  # checks the targets, fits the task's statistics
    log.info("%s", model.summary())
    trainer = instantiate(cfg.trainer)
    model.to(trainer.device)
    data.to(trainer.device)
    augment = instantiate(cfg.augment).to(trainer.device)
    optimizer = instantiate(cfg.optimizer, model=model)
    steps_per_epoch = data.steps_per_epoch() // cfg.trainer.accumulate_grad_batches  # optimizer steps
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_steps=cfg.trainer.max_epochs * steps_per_epoch,
                            steps_per_epoch=steps_per_epoch)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"].update(data.normalization_stats())  # the mean/std in use (computed if normalization=auto)
    logger.update_summary(num_params=sum(p.numel() for p in model.parameters()),
                          normalization=data.normalization_stats(), task=task.kind)

    result = trainer.fit(model, data, augment, task, optimizer, scheduler, logger, job.checkpoint_dir,
                         seed=cfg.seed, resume_state=resume_state,
                         checkpoint_extra={"config": config, "wandb_id": logger.run_id, "task": task.task_state()})
    logger.update_summary(best_value=result.best_value, best_epoch=result.best_epoch,
                          epochs_completed=result.epochs_completed, steps=result.steps,
                          stopped_by_time=result.stopped_by_time)

    # the test split is scored once, with the best checkpoint; its val metrics come from fit()
    restore(model, job.checkpoint_dir / "best.pt", map_location=trainer.device)
    best_val = {k: v for k, v in (result.best_metrics or {}).items() if k.startswith("val/")}
    test = log_test_metrics(trainer, model, data, task, job, logger, result.steps, result.epochs_completed)
    final = best_val | test
    logger.update_summary(metrics=final)
    log.info("best checkpoint: %s", headline(final, task))
    # attention and explanations of the best checkpoint, on fixed images (DDP: rank 0 draws them)
    if figure_report.enabled_at_end and trainer.ranks.is_main:
        figures = figure_report.write_for(model, data, cfg.model.image_size, job.job_dir / "figures", task=task)
        logger.log_images(figures, step=result.steps)
        log.info("figures: %d PNGs in %s", len(figures), job.job_dir / "figures")
    return result.best_value


def restore_task(task, state: dict) -> None:
    """The task's statistics as the training run fitted them (regression targets' mean and std)."""
    if state.get("task"):
        task.load_task_state(state["task"])


def evaluate(cfg: DictConfig, job: JobRecord, logger: RunLogger) -> float | None:
    if not cfg.ckpt_path:
        raise ValueError("mode=eval needs ckpt_path=PATH (a last.pt or best.pt written by run.py)")
    task = instantiate(cfg.task)
    state = load_checkpoint(cfg.ckpt_path)
    with rank_zero_first(cfg.trainer.ddp_timeout_s):  # DDP: one process downloads or fills the disk cache
        model, data = model_and_data(cfg, task, from_checkpoint=True,
                                     data_overrides=trained_normalization(state))  # normalization=auto: the run's
    restore(model, cfg.ckpt_path, checkpoint=state)
    task.setup_task(data, model)
    restore_task(task, state)
    logger.update_summary(normalization=data.normalization_stats(), task=task.kind)
    trainer = instantiate(cfg.trainer)
    model.to(trainer.device)
    data.to(trainer.device)
    metrics = log_test_metrics(trainer, model, data, task, job, logger, state.get("step", 0), state.get("epoch", 0))
    logger.update_summary(metrics=metrics)
    log.info("%s", headline(metrics, task))
    return metrics.get(cfg.trainer.monitor.replace("val/", "test/"))


def visualize(cfg: DictConfig, job: JobRecord, logger: RunLogger) -> None:
    """What the checkpoint's ViT attends to and why it decides, for viz.images or the first
    viz.num_images of viz.split: PNGs in <job dir>/figures/, logged to the logger as images."""
    if not cfg.ckpt_path:
        raise ValueError("mode=visualize needs ckpt_path=PATH (a last.pt or best.pt written by run.py)")
    figure_report = instantiate(cfg.viz)
    task = instantiate(cfg.task)
    state = load_checkpoint(cfg.ckpt_path)
    model, data = model_and_data(cfg, task, from_checkpoint=True, data_overrides=trained_normalization(state))
    restore(model, cfg.ckpt_path, checkpoint=state)
    task.setup_task(data, model)
    restore_task(task, state)
    device = resolve_device(cfg.trainer.device)
    model.to(device)
    data.to(device)
    figures = figure_report.write_for(model, data, cfg.model.image_size, job.job_dir / "figures", task=task)
    logger.log_images(figures, step=state.get("step", 0))
    logger.update_summary(figures={name: str(path) for name, path in figures.items()})
    log.info("%s", "\n".join(f"{name}: {path}" for name, path in figures.items()))


def pretrain(cfg: DictConfig, job: JobRecord, logger: RunLogger) -> float | None:
    """Pretrain the encoder of cfg.model without labels (vitsweep.pretrain), in the one training loop: the
    method's module is the model, the method answers the loop's calls as a task does. best.pt's `encoder.*`
    tensors are what `model.pretrained=<best.pt>` loads into any task (vitsweep.model.pretrained)."""
    if not cfg.get("pretrain"):
        raise ValueError("mode=pretrain needs a method: add pretrain=mae or pretrain=dino")
    seed_everything(cfg.seed)
    method = instantiate(cfg.pretrain)
    task = instantiate(cfg.task)  # asks the data for its targets: the kNN monitor reads class labels, nothing trains on them
    with rank_zero_first(cfg.trainer.ddp_timeout_s):  # DDP: one process downloads or fills the disk cache
        encoder = instantiate(cfg.model, num_classes=0, **({"pretrained": None} if cfg.ckpt_path else {}))  # no head
        model = method.build(encoder)  # a bad method option fails here, before any data is read
        data = build_data(cfg, task)
    if encoder.load_report is not None:
        logger.update_summary(pretrained=encoder.load_report.as_dict())
    figure_report = instantiate(cfg.viz)
    figure_report.check(encoder)
    method.setup(data, model)  # the images it learns from (pretrain.use_all_splits), the monitor
    resume_state = restore(model, cfg.ckpt_path) if cfg.ckpt_path else None
    log.info("%s | pretrain=%s", encoder.summary(), method.kind)
    trainer = instantiate(cfg.trainer, monitor=method.monitor, monitor_mode=method.monitor_mode)
    model.to(trainer.device)
    data.to(trainer.device)
    augment = instantiate(cfg.augment).to(trainer.device)
    optimizer = instantiate(cfg.optimizer, model=model)
    steps_per_epoch = data.steps_per_epoch() // cfg.trainer.accumulate_grad_batches  # optimizer steps
    total_steps = cfg.trainer.max_epochs * steps_per_epoch
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    method.attach(model, optimizer, total_steps)  # DINO: the teacher follows the student after every step
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"].update(data.normalization_stats())
    logger.update_summary(monitor=method.monitor, monitor_mode=method.monitor_mode, pretrain=method.kind,
                          num_params=sum(p.numel() for p in encoder.parameters()),
                          normalization=data.normalization_stats(), images_seen_per_epoch=len(data.split("train")))

    result = trainer.fit(model, data, augment, method, optimizer, scheduler, logger, job.checkpoint_dir,
                         seed=cfg.seed, resume_state=resume_state,
                         checkpoint_extra={"config": config, "wandb_id": logger.run_id, "task": method.task_state(),
                                           "pretrain": {"method": method.kind, "encoder_prefix": ENCODER_PREFIX}})
    best = job.checkpoint_dir / "best.pt"
    logger.update_summary(best_value=result.best_value, best_epoch=result.best_epoch, metrics=result.best_metrics,
                          epochs_completed=result.epochs_completed, steps=result.steps,
                          stopped_by_time=result.stopped_by_time, encoder_checkpoint=str(best))
    log.info("best epoch %s: %s; fine-tune from it with model.pretrained=%s", result.best_epoch,
             "  ".join(f"{k} {v:.4f}" for k, v in (result.best_metrics or {}).items()), best)
    if figure_report.enabled_at_end and trainer.ranks.is_main:  # MAE reconstructions, DINO attention (rank 0)
        restore(model, best, map_location=trainer.device)
        images, _, names = figure_report.inputs(data, cfg.model.image_size)
        figures = pretrain_figures(model, images, job.job_dir / "figures", names, rgb_bands=figure_report.rgb_bands,
                                   mean=data.mean.flatten().tolist(), std=data.std.flatten().tolist())
        logger.log_images(figures, step=result.steps)
        log.info("figures: %d PNGs in %s", len(figures), job.job_dir / "figures")
    return result.best_value


MODES = {"train": train, "eval": evaluate, "visualize": visualize, "pretrain": pretrain}


def check_method_group(cfg: DictConfig) -> None:
    """A pretrain method is read by mode=pretrain only: elsewhere it would be silently ignored."""
    if cfg.get("pretrain") and cfg.mode != "pretrain":
        raise UserError(f"pretrain={cfg.pretrain._target_.rsplit('.', 1)[-1].lower()} is read by mode=pretrain: add "
                        f"mode=pretrain, or drop pretrain=... (fine-tune with model.pretrained=<its best.pt>)")


def run(cfg: DictConfig) -> float:
    """The job `run.py` starts: the mode `cfg.mode`, with the bookkeeping of `vitsweep.job`. Data-parallel
    (vitsweep.ranks): rank 0 leads the job; a SLURM task after the first follows it."""
    if is_follower():
        return follow(MODES)
    check_method_group(cfg)
    with leading(cfg):
        return run_job(cfg, MODES)


def follow_rank0() -> float:
    """torchrun's ranks > 0 (run.py): rank 0's job, with its config, writing nothing."""
    return follow(MODES)
