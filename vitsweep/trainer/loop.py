"""The one training loop. Reads top to bottom: set-up, resume, then epochs of
(batches -> augment -> forward -> backward -> step), validation, checkpoints, and finally the test
split scored with the best checkpoint.

Reproducibility: every RNG is reseeded from (seed, epoch) at the start of each epoch and the batch
order is a function of (seed, epoch), so a run resumed from `last.pt` follows the same path as an
uninterrupted one. A mid-epoch stop (trainer.max_time) saves the RNG states and the position in
the epoch, and resumes from exactly there.

Data-parallel (trainer.strategy=ddp): each rank trains on its share of every global batch, its own
RNG stream seeded from (seed, epoch, rank); the lines marked `DDP:` are the hooks, and what they do is
vitsweep.trainer.distributed. With one process they change nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3

from vitsweep.model.early_exit import exit_outputs, record_exits
from vitsweep.task.base import average_views
from vitsweep.trainer import interrupt
from vitsweep.trainer.budget import Budget
from vitsweep.trainer.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from vitsweep.trainer.cost import WallClock
from vitsweep.trainer.distributed import join_ranks
from vitsweep.trainer.progress import Progress, use_bar

log = logging.getLogger(__name__)


def detach(outputs):
    """Outputs (a tensor, or a dict of them) cut from the graph."""
    if isinstance(outputs, dict):
        return {name: detach(value) for name, value in outputs.items()}
    return outputs.detach()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


def resolve_device(device: str) -> torch.device:
    if device != "auto":  # checked here, in one line, not by the first tensor moved there
        try:
            resolved = torch.device(str(device))
        except (RuntimeError, TypeError):
            raise ValueError(f"trainer.device={device} is not a device: use auto, cpu, cuda, cuda:1 or mps") from None
        available = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available()), "cpu": 1}
        if available.get(resolved.type, 1) <= (resolved.index or 0):
            raise ValueError(f"trainer.device={device}, but this machine has {available[resolved.type]} "
                             f"{resolved.type} device(s): use trainer.device=auto or cpu")
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class FitResult:
    best_value: float | None
    best_epoch: int | None
    epochs_completed: int
    steps: int
    stopped_by_time: bool
    best_metrics: dict[str, float] | None  # every metric of the best epoch (val/*, train/*)
    stop_reason: str | None = None  # the limit that ended training: max_epochs | max_steps | max_time
    budget: dict | None = None  # Budget.summary(): the schedule's planned steps and what set them
    train_images: int = 0  # training images seen by this process (for images/s; a resumed run counts its own)


class Trainer:
    def __init__(self, max_epochs: int = 10, max_time: float | None = None, max_steps: int | None = None,
                 device: str = "auto",
                 precision: str = "auto", compile: str | bool = "auto", gradient_clip_val: float | None = 1.0,
                 accumulate_grad_batches: int = 1, monitor: str = "val/acc", monitor_mode: str = "max",
                 log_every_n_steps: int = 50, progress_bar: bool | str = "auto",
                 progress_interval_s: float | None = 30.0, ema_decay: float | None = None,
                 strategy: str = "auto", ddp_timeout_s: float = 600):
        if monitor_mode not in ("max", "min"):
            raise ValueError(f"trainer.monitor_mode={monitor_mode!r} is not one of: max, min")
        if accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches={accumulate_grad_batches} must be >= 1")
        for key, value in (("max_epochs", max_epochs), ("log_every_n_steps", log_every_n_steps)):
            if not isinstance(value, int) or value < 1:  # 0 would train nothing, or divide by zero
                raise ValueError(f"trainer.{key}={value} must be a whole number >= 1")
        if gradient_clip_val is not None and not (isinstance(gradient_clip_val, (int, float)) and gradient_clip_val >= 0):
            raise ValueError(f"trainer.gradient_clip_val={gradient_clip_val} must be a max norm >= 0, or null: no clipping")
        self.max_epochs, self.max_time, self.max_steps = max_epochs, max_time, max_steps
        Budget(max_epochs, 1, max_steps, max_time)  # bad limits fail here, before any data is read
        self.clock = WallClock()  # where the time goes (summary "cost"); modes charges data loading and test to it
        self.device = resolve_device(device)
        # DDP: this process's rank in the job, and its device (cuda:LOCAL_RANK); vitsweep.trainer.distributed
        self.ranks = join_ranks(strategy, self.device, ddp_timeout_s)
        self.device = self.ranks.device
        if precision == "auto":  # bf16 where the hardware has it; fp32 on CPU (bf16 is ~10x slower there)
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "32"
        if precision not in ("32", "bf16", "16"):
            raise ValueError(f"trainer.precision={precision!r} is not one of: auto, 32, bf16, 16")
        self.precision = precision
        self.compile = (self.device.type == "cuda") if compile == "auto" else bool(compile)
        self.gradient_clip_val, self.accumulate = gradient_clip_val, accumulate_grad_batches
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.log_every_n_steps = log_every_n_steps
        self.progress_bar = use_bar(progress_bar) and self.ranks.is_main  # DDP: rank 0's bar only
        self.progress_interval_s = progress_interval_s
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"trainer.ema_decay={ema_decay} must be in (0, 1), e.g. 0.999, or null for no EMA")
        self.ema_decay = ema_decay
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def autocast(self):
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.monitor_mode == "max" else value < best

    @torch.inference_mode()
    def evaluate(self, model, data, split: str, task, return_evaluator: bool = False):
        """Loss and metrics of `model` on a split, as the task scores them; with `return_evaluator`, also
        the task's evaluator, which holds what it scored (for figures: confusion matrix, scatter)."""
        model.eval()
        evaluator = task.task_evaluator()
        kept_outputs, kept_targets = [], []  # DDP: this rank's share, gathered below
        for images, targets in data.eval_batches(split, all_views=True, rank=self.ranks.rank,
                                                 world_size=self.ranks.world_size):  # DDP: this rank's share
            with self.autocast(), record_exits(model) as exits:  # model/early_exit: run and score every exit
                outputs = model(data.normalize(images))  # (B * views, ...), views > 1 if eval_crop=tiled
            outputs = exit_outputs(outputs, exits)  # model/early_exit: {"out", "exit_logits", "exit_taken"}
            outputs = average_views(outputs, data.eval_views)  # each image's views averaged
            if self.ranks.distributed:
                kept_outputs.append(outputs)
                kept_targets.append(targets)
            else:
                evaluator.update(outputs, targets)
        if self.ranks.distributed:  # every rank's share, in order: the metrics are over the whole split
            evaluator.update(self.gather(kept_outputs), self.gather(kept_targets))
        metrics = evaluator.compute(split)
        return (metrics, evaluator) if return_evaluator else metrics

    def gather(self, chunks: list):
        """Every rank's batches of outputs or targets (tensors, or dicts of them), joined in rank order."""
        return self.ranks.gather_rows(chunks)  # dicts too: a rank with no batches learns their names from the others

    def fit(self, model, data, augment, task, optimizer, scheduler, logger, ckpt_dir: Path, seed: int,
            checkpoint_extra: dict, resume_state: dict | None = None) -> FitResult:
        raw_model = model  # the un-compiled module: its state_dict has the plain parameter names
        model = self.ranks.wrap(model)  # DDP: DistributedDataParallel; before compile, as torch advises
        if self.compile:
            model = torch.compile(model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "16")
        steps_per_epoch = data.steps_per_epoch() // self.accumulate
        if steps_per_epoch < 1:
            raise ValueError(f"data.batch_size={data.batch_size} x trainer.accumulate_grad_batches={self.accumulate} "
                             f"exceeds the {len(data.split('train'))} training images: lower data.batch_size")
        self.ranks.check_batch_size(data.batch_size)
        # which limit ends training, and the lr schedule (warmup included) stretched onto the steps it allows
        budget = Budget(self.max_epochs, steps_per_epoch, self.max_steps, self.max_time,
                        eval_images=len(data.split("val")) * data.eval_views, batch_size=data.batch_size * self.accumulate)
        scheduler = budget.stretch(scheduler)
        epoch, step, skip_batches, elapsed_before = 0, 0, 0, 0.0
        best_value, best_epoch, best_metrics = None, None, None
        if resume_state is not None:  # continue the run that wrote last.pt
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            scaler.load_state_dict(resume_state["scaler"])
            epoch, step, skip_batches = resume_state["epoch"], resume_state["step"], resume_state["batch_in_epoch"]
            best_value, best_epoch = resume_state.get("best_value"), resume_state.get("best_epoch")
            best_metrics = resume_state.get("best_metrics")
            elapsed_before = resume_state.get("elapsed_s", 0.0)
            budget.load_state_dict(resume_state.get("budget"), step)  # the same schedule as before the stop
            if "raw_model" in resume_state:  # written with EMA on: "model" holds the average
                raw_model.load_state_dict(resume_state["raw_model"])
        # EMA of the weights: what is validated, tested and saved as "model" when on
        ema = ModelEmaV3(raw_model, decay=self.ema_decay) if self.ema_decay else None
        if ema is not None and resume_state is not None and "raw_model" in resume_state:
            ema.module.load_state_dict(resume_state["model"])
        start_time = time.time() - elapsed_before  # max_time counts the time before a resume too

        def checkpoint(name: str, epoch: int, batch_in_epoch: int) -> None:
            rng_by_rank = self.ranks.rng_states(capture_rng_state())  # DDP: every rank's, to resume mid-epoch
            if self.ranks.is_main:  # DDP: rank 0 writes, the other ranks hold the same weights
                weights = ({"model": raw_model.state_dict()} if ema is None
                           else {"model": ema.module.state_dict(), "raw_model": raw_model.state_dict()})
                save_checkpoint(ckpt_dir / name, {
                    **weights, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
                    "best_value": best_value, "best_epoch": best_epoch, "best_metrics": best_metrics,
                    "elapsed_s": time.time() - start_time, "budget": budget.state_dict(),
                    "rng": rng_by_rank[0], **({"rng_by_rank": rng_by_rank} if len(rng_by_rank) > 1 else {}),
                    **checkpoint_extra,
                })
            self.ranks.barrier()  # DDP: the other ranks read what rank 0 wrote (best.pt, after fit)

        budget_spent, train_images = False, 0  # budget_spent: max_steps or max_time (the plan's last step) reached

        def elapsed() -> float:  # DDP: rank 0's clock on every rank, so that every rank plans the same lr and stop
            return self.ranks.agree(time.time() - start_time)

        budget.start(elapsed())
        self.clock.lap("other")
        while epoch < self.max_epochs and not budget_spent:
            model.train()
            # DDP: each rank its own stream, seeded from (seed, epoch, rank); rank 0's is single-process
            if skip_batches == 0 or self.ranks.stored_rng_state(resume_state) is None:
                seed_everything(self.ranks.seed(seed * 1000 + epoch))
            else:
                # mid-epoch resume: the exact RNG position
                restore_rng_state(self.ranks.stored_rng_state(resume_state))
            batches = data.train_batches(epoch, seed, skip=skip_batches * self.accumulate,
                                         rank=self.ranks.rank, world_size=self.ranks.world_size)  # DDP: a share
            batch_in_epoch = skip_batches
            skip_batches = 0
            epoch_loss, epoch_images = torch.zeros((), device=self.device), 0
            epoch_scores = {}  # the task's batch scores (acc, mae, pixel_acc...), summed over images on the device
            window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.time()
            progress = Progress(steps_per_epoch, batch_in_epoch, f"epoch {epoch}", self.progress_bar,
                                self.progress_interval_s)
            for micro_step, (images, targets) in enumerate(batches):
                self.ranks.sync_gradients((micro_step + 1) % self.accumulate == 0)  # DDP: on the last micro-batch
                images, targets = augment(images, targets)
                self.clock.lap("data")
                train_images += images.shape[0]
                with self.autocast():
                    outputs = model(data.normalize(images))  # logits (B, K), or what the task's heads return
                    loss = task.training_loss(outputs, targets)
                scaler.scale(loss / self.accumulate).backward()
                if (micro_step + 1) % self.accumulate:
                    self.clock.lap("train")
                    continue  # accumulate gradients over more micro-batches
                if self.gradient_clip_val:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.gradient_clip_val)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(raw_model)  # ema = decay * ema + (1 - decay) * weights
                step += 1
                batch_in_epoch += 1
                budget.after_step(step, elapsed())  # may re-plan the schedule's length (max_time)
                scheduler.step_update(num_updates=step)

                # bookkeeping stays on the device; one sync per log window, not per step
                loss_detached = loss.detach()
                epoch_loss += loss_detached * images.shape[0]
                for name, value in task.training_scores(detach(outputs), targets).items():
                    epoch_scores[name] = epoch_scores.get(name, 0) + value.detach() * images.shape[0]
                epoch_images += images.shape[0]
                window_loss += loss_detached
                window_steps += 1
                if step % self.log_every_n_steps == 0 or batch_in_epoch == steps_per_epoch:
                    mean_loss = self.ranks.mean(window_loss / window_steps).item()  # DDP: of the global batch
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"training loss is {mean_loss} at step {step}: lower optimizer.lr "
                                                 f"or set trainer.gradient_clip_val")
                    images_per_s = (window_steps * images.shape[0] * self.accumulate * self.ranks.world_size
                                    / (time.time() - window_start))
                    lr = optimizer.param_groups[0]["lr"]
                    logger.log({"train/loss_step": mean_loss, "lr": lr, "train/images_per_s": images_per_s},
                               step=step, epoch=epoch)
                    scores = {name.split("/")[-1]: f"{(total / max(epoch_images, 1)).item():.3f}"
                              for name, total in list(epoch_scores.items())[:2]}
                    progress.set_values(loss=f"{mean_loss:.3f}", **scores, img_s=f"{images_per_s:.0f}", lr=f"{lr:.2e}")
                    window_loss.zero_()
                    window_steps, window_start = 0, time.time()
                progress.update(1)
                self.clock.lap("train")
                # SIGTERM/SIGINT (trainer/interrupt.py): keep this step exactly, then stop; DDP: any rank's signal
                if self.ranks.any(interrupt.requested()):
                    progress.close()
                    checkpoint("last.pt", epoch, batch_in_epoch)
                    interrupt.stop(f"epoch {epoch}, step {step} (last.pt saved mid-epoch)")
                if budget.exhausted(step, elapsed()):
                    budget_spent = batch_in_epoch < steps_per_epoch
                    break
            progress.close()

            epoch_done = not budget_spent
            # DDP: the sums over every rank's images
            names = list(epoch_scores)
            epoch_loss, epoch_images, *totals = self.ranks.sum(epoch_loss, epoch_images, *epoch_scores.values())
            epoch_scores = dict(zip(names, totals))
            metrics = {"train/loss": (epoch_loss / max(epoch_images, 1)).item(),
                       **{f"train/{name}": (total / max(epoch_images, 1)).item() for name, total in epoch_scores.items()}}
            self.clock.lap("train")
            metrics.update(self.evaluate(raw_model if ema is None else ema.module, data, "val", task))
            self.clock.lap("eval")
            if self.monitor not in metrics:
                raise ValueError(f"trainer.monitor={self.monitor!r} is not a logged metric: pick one of {sorted(metrics)}")
            logger.log(metrics, step=step, epoch=epoch)
            log.info("epoch %d: %s  (%.0fs)", epoch, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                           if task.is_headline(k)),  # per-class: jsonl and logger
                     time.time() - start_time)
            if self.improved(metrics[self.monitor], best_value):
                best_value, best_epoch, best_metrics = metrics[self.monitor], epoch, metrics
                checkpoint("best.pt", epoch + epoch_done, 0)
            budget.after_epoch_end(step, elapsed())  # before last.pt, which stores the plan
            if epoch_done:
                epoch += 1
                checkpoint("last.pt", epoch, 0)
            else:
                checkpoint("last.pt", epoch, batch_in_epoch)  # resume mid-epoch from here
            logger.update_summary(best_value=best_value, best_epoch=best_epoch, epochs_completed=epoch, steps=step,
                                  budget=budget.summary())
            if self.ranks.any(interrupt.requested()):  # the signal came during validation: last.pt above holds this point
                interrupt.stop(f"epoch {epoch}, step {step} (last.pt saved)")
            budget.untimed(elapsed())
            self.clock.lap("other")
            if budget.exhausted(step, elapsed()):
                budget_spent = True
        stop_reason = budget.stop_reason or "max_epochs"
        return FitResult(best_value, best_epoch, epoch, step, stop_reason == "max_time", best_metrics,
                         stop_reason=stop_reason, budget=budget.summary(),
                         train_images=train_images * self.ranks.world_size)  # DDP: every rank's images
