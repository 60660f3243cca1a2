"""What `python run.py mode=...` does, top to bottom, like lightning-hydra-template's `train.py`: build the
components (vitsweep.run.build: one build for every mode), run them, log, return the monitored value.

    train       fit, then score the test split with the best checkpoint, then draw the figures
    pretrain    fit a self-supervised method (conf/pretrain: mae, dino) around the encoder, then its figures
    eval        score the test split with ckpt_path
    visualize   draw the figures of ckpt_path (conf/viz)

train and pretrain share one fitting path (`fit`): the same signals, checks, checkpoints and cost records.
A mode gets the checkpoint of ckpt_path already read (once per job, by vitsweep.run.job); the bookkeeping
every job shares (its record, resume, the failure policy, the job dir's lock) is vitsweep.run.job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitsweep.logger.run_logger import RunLogger
from vitsweep.model.metadata import reads_metadata
from vitsweep.pretrain import ENCODER_PREFIX
from vitsweep.run.build import Built, build
from vitsweep.run.job import JobRecord, UserError, carry_best_forward, run_job
from vitsweep.run.ranks import follow, leading
from vitsweep.trainer import interrupt
from vitsweep.trainer.checkpoint import restore
from vitsweep.trainer.cost import forward_flops, gflops, run_cost
from vitsweep.trainer.distributed import is_follower, rank_zero_first
from vitsweep.trainer.loop import FitResult, Trainer, resolve_device, seed_everything
from vitsweep.viz import save_figure

log = logging.getLogger(__name__)


def skipped_files(data) -> dict:
    """summary.json fields: how many unreadable files data.on_bad_file=skip left out, and the first 100."""
    files = data.splits.skipped_files
    return {"num_skipped_files": len(files), "skipped_files": files[:100]}


def headline(metrics: dict[str, float], task) -> str:
    """'val/acc 0.9312  test/acc 0.9100 ...' without the per-class values (those are in metrics.jsonl)."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if task.is_headline(k))


def score_test_split(trainer: Trainer, built: Built, job: JobRecord, logger: RunLogger, step: int,
                     epoch: int) -> dict[str, float]:
    """Score the test split, log it, and draw the task's figures of it (confusion matrix, scatter)."""
    metrics, evaluator = trainer.validate(built.model, built.data, "test", built.task, return_evaluator=True)
    logger.log(metrics, step=step, epoch=epoch)
    if trainer.ranks.is_main:  # DDP: rank 0 writes
        figures = {f"test/{name}": save_figure(figure, job.job_dir / f"{name}.png")
                   for name, figure in built.task.figures(evaluator, built.data).items()}
        logger.log_images(figures, step=step)
    return metrics


def draw_figures(cfg: DictConfig, built: Built, figure_report, job: JobRecord, logger: RunLogger, step: int) -> dict:
    """The end-of-run figures of a few images (vitsweep.viz.report): attention, explanations and the task's
    own; a pretraining method's are its own only (MAE reconstructions, DINO teacher attention)."""
    out_dir = job.job_dir / "figures"
    if cfg.mode == "pretrain":
        images, targets, names = figure_report.inputs(built.data, cfg.model.image_size)
        style = {"rgb_bands": figure_report.rgb_bands, "mean": built.data.mean.flatten().tolist(),
                 "std": built.data.std.flatten().tolist()}
        drawn = built.task.sample_figures(built.model, images, None, targets, names, style)
        figures = {f"viz/{key}": save_figure(figure, out_dir / f"{key}.png") for key, figure in drawn.items()}
    else:
        figures = figure_report.write_for(built.model, built.data, cfg.model.image_size, out_dir, task=built.task)
    logger.log_images(figures, step=step)
    log.info("figures: %d PNGs in %s", len(figures), out_dir)
    return figures


@dataclass
class Fitted:
    built: Built
    trainer: Trainer
    result: FitResult
    figure_report: object  # vitsweep.viz.report.FigureReport
    num_params: int
    flops: int | None


def fit(cfg: DictConfig, job: JobRecord, logger: RunLogger, checkpoint: dict | None) -> Fitted:
    """The fitting path of train and pretrain: build, restore (resume from ckpt_path's last.pt), set the task
    up on the data, then `Trainer.fit` with signals handled at step boundaries. Returns what was fitted."""
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    trainer = instantiate(cfg.trainer)  # before the data: a bad trainer option fails before any is read
    trainer.clock.lap("other")  # start-up: the job's wall time is split into data/train/eval/other
    with rank_zero_first(cfg.trainer.ddp_timeout_s):  # DDP: one process downloads or fills the disk cache
        built = build(cfg, checkpoint)
    task, model, data, backbone = built.task, built.model, built.data, built.backbone
    if getattr(backbone, "load_report", None) is not None:
        logger.update_summary(pretrained=backbone.load_report.as_dict())
    figure_report = instantiate(cfg.viz)  # a bad viz option fails now, not after training
    figure_report.check(backbone)
    if checkpoint is not None:  # resume the run that wrote ckpt_path
        restore(model, cfg.ckpt_path, checkpoint=checkpoint)
        # into a new job dir: the run's best.pt comes along, so the test scores the best
        carry_best_forward(cfg.ckpt_path, job.checkpoint_dir, checkpoint, write=not is_follower())  # DDP: rank 0
    task.setup(data, model)  # checks the targets, fits the task's statistics (pretraining: its images, its monitor)
    if cfg.mode == "pretrain":  # the method's monitor, known once it has seen the data (monitor=auto)
        trainer.monitor, trainer.monitor_mode = task.monitor, task.monitor_mode
        logger.update_summary(monitor=task.monitor, monitor_mode=task.monitor_mode, pretrain=task.name)
    log.info("%s%s", backbone.summary(), f" | pretrain={task.name}" if cfg.mode == "pretrain" else "")
    model.to(trainer.device)
    data.to(trainer.device)
    trainer.clock.lap("data")
    augment = instantiate(cfg.augment).to(trainer.device)
    optimizer = instantiate(cfg.optimizer, model=model)
    steps_per_epoch = data.steps_per_epoch() // cfg.trainer.accumulate_grad_batches  # optimizer steps
    total_steps = cfg.trainer.max_epochs * steps_per_epoch
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    task.attach(model, optimizer, total_steps)  # DINO: the teacher follows the student after every step

    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"].update(data.normalization_stats())  # the mean/std in use (computed if normalization=auto)
    num_params = sum(p.numel() for p in backbone.parameters())
    # FLOPs on `meta`, of one image (one frame of a time series) through the ViT; a model that reads metadata
    # columns needs them in its forward: not counted (gflops_per_image null)
    image_shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    flops = None if reads_metadata(cfg.model) else forward_flops(backbone, image_shape)
    logger.update_summary(num_params=num_params, normalization=data.normalization_stats(), task=task.name,
                          cost={"params": num_params, "gflops_per_image": gflops(flops)}, **skipped_files(data),
                          images_seen_per_epoch=len(data.split("train")))
    # research controls: what trains (prompt tuning, freezing) and the tokens each layer sees (pruning)
    logger.update_summary(num_trainable_params=sum(p.numel() for p in backbone.parameters() if p.requires_grad),
                          tokens_per_layer=backbone.tokens_per_layer() if hasattr(backbone, "tokens_per_layer") else None)
    logger.update_summary(**data.input_summary())  # time series: frames; metadata: columns, missing cells
    extra = {"config": config, "wandb_id": logger.run_id, "task": task.state_dict()}
    if cfg.mode == "pretrain":  # what model.pretrained=<best.pt> loads: the encoder (vitsweep/model/pretrained.py)
        extra["pretrain"] = {"method": task.name, "encoder_prefix": ENCODER_PREFIX}

    with interrupt.at_step_boundaries():  # a signal stops training after the running step, with last.pt saved
        result = trainer.fit(model, data, augment, task, optimizer, scheduler, logger, job.checkpoint_dir,
                             seed=cfg.seed, resume_state=checkpoint, checkpoint_extra=extra)
    logger.update_summary(best_value=result.best_value, best_epoch=result.best_epoch,
                          epochs_completed=result.epochs_completed, steps=result.steps,
                          stopped_by_time=result.stopped_by_time, stop_reason=result.stop_reason,
                          budget=result.budget)
    # the best checkpoint: what the test split is scored with and the figures show
    restore(model, job.checkpoint_dir / "best.pt", map_location=trainer.device)
    return Fitted(built, trainer, result, figure_report, num_params, flops)


def train(cfg: DictConfig, job: JobRecord, logger: RunLogger, checkpoint: dict | None = None) -> float | None:
    fitted = fit(cfg, job, logger, checkpoint)
    built, trainer, result = fitted.built, fitted.trainer, fitted.result
    best_val = {k: v for k, v in (result.best_metrics or {}).items() if k.startswith("val/")}
    trainer.clock.lap("other")
    test = score_test_split(trainer, built, job, logger, result.steps, result.epochs_completed)  # once, the best
    trainer.clock.lap("eval")
    final = best_val | test
    logger.update_summary(metrics=final)
    log.info("best checkpoint: %s", headline(final, built.task))
    if fitted.figure_report.enabled_at_end and trainer.ranks.is_main:  # DDP: rank 0 draws them
        draw_figures(cfg, built, fitted.figure_report, job, logger, result.steps)
    trainer.clock.lap("other")
    # what the run cost: parameters, forward GFLOPs per image, images/s, peak memory, time per part
    logger.update_summary(cost=run_cost(fitted.num_params, fitted.flops, result.train_images, trainer.clock,
                                        trainer.device))
    return result.best_value


def pretrain(cfg: DictConfig, job: JobRecord, logger: RunLogger, checkpoint: dict | None = None) -> float | None:
    """Pretrain the encoder of cfg.model without labels (vitsweep.pretrain) in the one fit. best.pt's
    `encoder.*` tensors are what `model.pretrained=<best.pt>` loads into any task (vitsweep.model.pretrained)."""
    fitted = fit(cfg, job, logger, checkpoint)
    built, trainer, result = fitted.built, fitted.trainer, fitted.result
    best = job.checkpoint_dir / "best.pt"
    logger.update_summary(metrics=result.best_metrics, encoder_checkpoint=str(best))
    log.info("best epoch %s: %s; fine-tune from it with model.pretrained=%s", result.best_epoch,
             headline(result.best_metrics or {}, built.task), best)
    if fitted.figure_report.enabled_at_end and trainer.ranks.is_main:  # MAE reconstructions, DINO attention
        draw_figures(cfg, built, fitted.figure_report, job, logger, result.steps)
    logger.update_summary(cost=run_cost(fitted.num_params, fitted.flops, result.train_images, trainer.clock,
                                        trainer.device))
    return result.best_value


def restored(cfg: DictConfig, checkpoint: dict | None, mode: str) -> Built:
    """The model of ckpt_path with its task and data, as the checkpoint's run had them: the weights, the
    normalization, the task's fitted statistics (regression's target mean and std)."""
    if checkpoint is None:
        raise ValueError(f"mode={mode} needs ckpt_path=PATH (a last.pt or best.pt written by run.py)")
    with rank_zero_first(cfg.trainer.ddp_timeout_s):  # DDP: one process downloads or fills the disk cache
        built = build(cfg, checkpoint)
    restore(built.model, cfg.ckpt_path, checkpoint=checkpoint)
    built.task.setup(built.data, built.model)
    if checkpoint.get("task"):
        built.task.load_state_dict(checkpoint["task"])
    return built


def evaluate(cfg: DictConfig, job: JobRecord, logger: RunLogger, checkpoint: dict | None = None) -> float | None:
    built = restored(cfg, checkpoint, "eval")
    logger.update_summary(normalization=built.data.normalization_stats(), task=built.task.name,
                          **skipped_files(built.data), **built.data.input_summary())
    trainer = instantiate(cfg.trainer)
    built.model.to(trainer.device)
    built.data.to(trainer.device)
    metrics = score_test_split(trainer, built, job, logger, checkpoint.get("step", 0), checkpoint.get("epoch", 0))
    logger.update_summary(metrics=metrics)
    log.info("%s", headline(metrics, built.task))
    return metrics.get(cfg.trainer.monitor.replace("val/", "test/"))


def visualize(cfg: DictConfig, job: JobRecord, logger: RunLogger, checkpoint: dict | None = None) -> None:
    """What the checkpoint's ViT attends to and why it decides, for viz.images or the first
    viz.num_images of viz.split: PNGs in <job dir>/figures/, logged to the logger as images."""
    figure_report = instantiate(cfg.viz)
    built = restored(cfg, checkpoint, "visualize")
    device = resolve_device(cfg.trainer.device)
    built.model.to(device)
    built.data.to(device)
    figures = draw_figures(cfg, built, figure_report, job, logger, checkpoint.get("step", 0))
    logger.update_summary(figures={name: str(path) for name, path in figures.items()})
    log.info("%s", "\n".join(f"{name}: {path}" for name, path in figures.items()))


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
