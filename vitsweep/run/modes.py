"""What `python run.py mode=...` does: build the components from the config and run them.

    train       fit, then score the test split with the best checkpoint, then draw the figures
    eval        score the test split with ckpt_path
    visualize   draw the figures of ckpt_path (conf/viz)
    pretrain    self-supervised pretraining of the encoder (conf/pretrain: mae, dino), then its figures

Each mode reads top to bottom like lightning-hydra-template's `train.py`: instantiate, run, log,
return the monitored value. The bookkeeping every job shares (its record, resume, the failure
policy) is `vitsweep.run.job`.
"""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitsweep.data.datamodule import trained_normalization
from vitsweep.logger.run_logger import RunLogger
from vitsweep.model.metadata import reads_metadata
from vitsweep.pretrain import ENCODER_PREFIX
from vitsweep.run.build import build_data, model_and_data
from vitsweep.run.job import JobRecord, UserError, run_job
from vitsweep.run.ranks import follow, leading
from vitsweep.trainer import interrupt
from vitsweep.trainer.checkpoint import carry_best_forward, load_checkpoint, restore
from vitsweep.trainer.cost import forward_flops, gflops, run_cost
from vitsweep.trainer.distributed import is_follower, rank_zero_first
from vitsweep.trainer.loop import resolve_device, seed_everything
from vitsweep.viz import save_figure, split_figures
from vitsweep.viz.pretrain import pretrain_figures

log = logging.getLogger(__name__)


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


def skipped_files(data) -> dict:
    """summary.json fields: how many unreadable files data.on_bad_file=skip left out, and the first 100."""
    files = data.splits.skipped_files
    return {"num_skipped_files": len(files), "skipped_files": files[:100]}


def headline(metrics: dict[str, float], task) -> str:
    """'val/acc 0.9312  test/acc 0.9100 ...' without the per-class values (those are in metrics.jsonl)."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if task.is_headline(k))


def train(cfg: DictConfig, job: JobRecord, logger: RunLogger) -> float | None:
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    task = instantiate(cfg.task)
    trainer = instantiate(cfg.trainer)  # before the data: a bad trainer option fails before any is read
    trainer.clock.lap("other")  # start-up: the job's wall time is split into data/train/eval/other
    with rank_zero_first(cfg.trainer.ddp_timeout_s):  # DDP: one process downloads or fills the disk cache
        model, data = model_and_data(cfg, task, from_checkpoint=bool(cfg.ckpt_path))
    if getattr(model, "load_report", None) is not None:
        logger.update_summary(pretrained=model.load_report.as_dict())
    figure_report = instantiate(cfg.viz)  # a bad viz option fails now, not after training
    figure_report.check(model)
    resume_state = restore(model, cfg.ckpt_path) if cfg.ckpt_path else None
    if resume_state is not None:  # into a new job dir: the run's best.pt comes along, so the test scores the best
        carry_best_forward(cfg.ckpt_path, job.checkpoint_dir, resume_state, write=not is_follower())  # DDP: rank 0
    task.setup_task(data, model)  # checks the targets, fits the task's statistics
    log.info("%s", model.summary())
    model.to(trainer.device)
    data.to(trainer.device)
    trainer.clock.lap("data")
    augment = instantiate(cfg.augment).to(trainer.device)
    optimizer = instantiate(cfg.optimizer, model=model)
    steps_per_epoch = data.steps_per_epoch() // cfg.trainer.accumulate_grad_batches  # optimizer steps
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_steps=cfg.trainer.max_epochs * steps_per_epoch,
                            steps_per_epoch=steps_per_epoch)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"].update(data.normalization_stats())  # the mean/std in use (computed if normalization=auto)
    num_params = sum(p.numel() for p in model.parameters())
    # FLOPs on `meta`, of one image (one frame of a time series); a model that reads metadata columns needs
    # them in its forward: not counted (gflops_per_image null)
    flops = (None if reads_metadata(cfg.model)
             else forward_flops(model, (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)))
    logger.update_summary(num_params=num_params, normalization=data.normalization_stats(), task=task.kind,
                          cost={"params": num_params, "gflops_per_image": gflops(flops)}, **skipped_files(data))
    # research controls: what trains (prompt tuning, freezing) and the tokens each layer sees (pruning)
    logger.update_summary(num_trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                          tokens_per_layer=model.tokens_per_layer() if hasattr(model, "tokens_per_layer") else None)
    logger.update_summary(**data.input_summary())  # time series: frames; metadata: columns, missing cells

    with interrupt.at_step_boundaries():  # a signal stops training after the running step, with last.pt saved
        result = trainer.fit(model, data, augment, task, optimizer, scheduler, logger, job.checkpoint_dir,
                             seed=cfg.seed, resume_state=resume_state,
                             checkpoint_extra={"config": config, "wandb_id": logger.run_id,
                                               "task": task.task_state()})
    logger.update_summary(best_value=result.best_value, best_epoch=result.best_epoch,
                          epochs_completed=result.epochs_completed, steps=result.steps,
                          stopped_by_time=result.stopped_by_time, stop_reason=result.stop_reason,
                          budget=result.budget)

    # the test split is scored once, with the best checkpoint; its val metrics come from fit()
    restore(model, job.checkpoint_dir / "best.pt", map_location=trainer.device)
    best_val = {k: v for k, v in (result.best_metrics or {}).items() if k.startswith("val/")}
    trainer.clock.lap("other")
    test = log_test_metrics(trainer, model, data, task, job, logger, result.steps, result.epochs_completed)
    trainer.clock.lap("eval")
    final = best_val | test
    logger.update_summary(metrics=final)
    log.info("best checkpoint: %s", headline(final, task))
    # attention and explanations of the best checkpoint, on fixed images (DDP: rank 0 draws them)
    if figure_report.enabled_at_end and trainer.ranks.is_main:
        figures = figure_report.write_for(model, data, cfg.model.image_size, job.job_dir / "figures", task=task)
        logger.log_images(figures, step=result.steps)
        log.info("figures: %d PNGs in %s", len(figures), job.job_dir / "figures")
    trainer.clock.lap("other")
    # what the run cost: parameters, forward GFLOPs per image, images/s, peak memory, time per part
    logger.update_summary(cost=run_cost(num_params, flops, result.train_images, trainer.clock, trainer.device))
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
    logger.update_summary(normalization=data.normalization_stats(), task=task.kind, **skipped_files(data),
                          **data.input_summary())
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
    """The job `run.py` starts: the mode `cfg.mode`, with the bookkeeping of `vitsweep.run.job`. Data-parallel
    (vitsweep.run.ranks): rank 0 leads the job; a SLURM task after the first follows it."""
    if is_follower():
        return follow(MODES)
    check_method_group(cfg)
    with leading(cfg):
        return run_job(cfg, MODES)


def follow_rank0() -> float:
    """torchrun's ranks > 0 (run.py): rank 0's job, with its config, writing nothing."""
    return follow(MODES)
