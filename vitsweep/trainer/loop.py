"""The one training loop, for every task and every pretraining method (both answer the Task protocol,
vitsweep/task/protocol.py). Reads top to bottom, in timm's shape:

    fit               set-up and resume, then epochs until a limit binds: train_one_epoch, validate,
                      best.pt when the monitor improves, last.pt always
    train_one_epoch   batches -> augment -> forward -> loss -> backward -> step (-> EMA, budget, lr)
    validate          a split scored by the task's evaluator

Where a fit stands (epoch, step, best, EMA, loss scaler, budget) is one `TrainState`, saved in every
checkpoint with the weights, optimizer and scheduler.

Reproducibility: every RNG is reseeded from (seed, epoch) at the start of each epoch and the batch order
is a function of (seed, epoch), so a run resumed from `last.pt` follows the same path as an uninterrupted
one. A mid-epoch stop (a signal, trainer.max_time) saves the RNG states and the position in the epoch,
and resumes from exactly there.

Data-parallel (trainer.strategy=ddp): each rank trains on its share of every global batch, its own RNG
stream seeded from (seed, epoch, rank); the lines marked `DDP:` are the hooks, and what they do is
vitsweep.trainer.distributed. With one process they change nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3

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
class TrainState:
    """Where a fit stands: what last.pt holds besides the weights, the optimizer and the scheduler."""

    budget: Budget  # which limit ends training, and the plan of the lr schedule (trainer/budget.py)
    scaler: torch.amp.GradScaler  # fp16's loss scale (disabled otherwise)
    ema: ModelEmaV3 | None = None  # the weights' moving average (trainer.ema_decay): what is validated and saved
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # optimizer steps taken in the current epoch (a mid-epoch checkpoint resumes there)
    best_value: float | None = None  # of the monitor
    best_epoch: int | None = None
    best_metrics: dict | None = None  # every metric of the best epoch (val/*, train/*)
    elapsed_s: float = 0.0  # wall time before this process took over (a resumed run's earlier attempts)
    train_images: int = 0  # training images this process has seen (for images/s)
    resume_rng: dict | None = field(default=None, repr=False)  # this rank's RNG state to resume mid-epoch from

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "best_value": self.best_value, "best_epoch": self.best_epoch, "best_metrics": self.best_metrics,
                "elapsed_s": self.elapsed_s, "budget": self.budget.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best_value, self.best_epoch = state.get("best_value"), state.get("best_epoch")
        self.best_metrics = state.get("best_metrics")
        self.elapsed_s = state.get("elapsed_s", 0.0)
        self.budget.load_state_dict(state.get("budget"), self.step)  # the same schedule as before the stop
        self.scaler.load_state_dict(state["scaler"])


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
        self.clock = WallClock()  # where the time goes (summary "cost"); the fit charges data loading and test to it
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

    # ------------------------------------------------------------------------------------- validate

    @torch.inference_mode()
    def validate(self, model, data, split: str, task, return_evaluator: bool = False):
        """Loss and metrics of `model` on a split, as the task scores them; with `return_evaluator`, also
        the task's evaluator, which holds what it scored (for figures: confusion matrix, scatter)."""
        model.eval()
        evaluator = task.evaluator()
        kept_outputs, kept_targets = [], []  # DDP: this rank's share, gathered below
        for inputs, targets in data.eval_batches(split, all_views=True, rank=self.ranks.rank,
                                                 world_size=self.ranks.world_size):  # DDP: this rank's share
            with self.autocast():
                outputs = evaluator.forward(model, data.normalize(inputs))  # (B * views, ...): eval_crop=tiled
            outputs = data.average_views(outputs)  # each image's views averaged
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

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, model, data, augment, task, optimizer, scheduler, logger, ckpt_dir: Path, seed: int,
            checkpoint_extra: dict, resume_state: dict | None = None) -> FitResult:
        raw_model = model  # the un-compiled module: its state_dict has the plain parameter names
        model = self.ranks.wrap(model)  # DDP: DistributedDataParallel; before compile, as torch advises
        if self.compile:
            model = torch.compile(model)
        steps_per_epoch = data.steps_per_epoch() // self.accumulate
        if steps_per_epoch < 1:
            raise ValueError(f"data.batch_size={data.batch_size} x trainer.accumulate_grad_batches={self.accumulate} "
                             f"exceeds the {len(data.split('train'))} training images: lower data.batch_size")
        self.ranks.check_batch_size(data.batch_size)
        # which limit ends training, and the lr schedule (warmup included) stretched onto the steps it allows
        budget = Budget(self.max_epochs, steps_per_epoch, self.max_steps, self.max_time,
                        eval_images=len(data.split("val")) * data.eval_views, batch_size=data.batch_size * self.accumulate)
        scheduler = budget.stretch(scheduler)
        state = TrainState(budget, torch.amp.GradScaler(self.device.type, enabled=self.precision == "16"))
        if resume_state is not None:  # continue the run that wrote last.pt
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            state.load_state_dict(resume_state)
            state.resume_rng = self.ranks.stored_rng_state(resume_state)  # DDP: this rank's (None: reseed)
            if "raw_model" in resume_state:  # written with EMA on: "model" holds the average
                raw_model.load_state_dict(resume_state["raw_model"])
        if self.ema_decay:  # EMA of the weights: what is validated, tested and saved as "model"
            state.ema = ModelEmaV3(raw_model, decay=self.ema_decay)
            if resume_state is not None and "raw_model" in resume_state:
                state.ema.module.load_state_dict(resume_state["model"])
        start_time = time.time() - state.elapsed_s  # max_time counts the time before a resume too

        def elapsed() -> float:  # DDP: rank 0's clock on every rank, so that every rank plans the same lr and stop
            return self.ranks.agree(time.time() - start_time)

        def checkpoint(name: str, epoch: int, batch_in_epoch: int) -> None:
            rng_by_rank = self.ranks.rng_states(capture_rng_state())  # DDP: every rank's, to resume mid-epoch
            if self.ranks.is_main:  # DDP: rank 0 writes, the other ranks hold the same weights
                weights = ({"model": raw_model.state_dict()} if state.ema is None
                           else {"model": state.ema.module.state_dict(), "raw_model": raw_model.state_dict()})
                save_checkpoint(ckpt_dir / name, {
                    **weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **state.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                    "elapsed_s": time.time() - start_time,
                    "rng": rng_by_rank[0], **({"rng_by_rank": rng_by_rank} if len(rng_by_rank) > 1 else {}),
                    **checkpoint_extra,
                })
            self.ranks.barrier()  # DDP: the other ranks read what rank 0 wrote (best.pt, after fit)

        budget.start(elapsed())
        self.clock.lap("other")
        while state.epoch < self.max_epochs:
            epoch = state.epoch
            metrics = self.train_one_epoch(model, raw_model, data, augment, task, optimizer, scheduler, state,
                                           logger, seed, elapsed, checkpoint)
            epoch_done = state.batch_in_epoch == steps_per_epoch  # else the budget ended it mid-epoch
            metrics.update(self.validate(raw_model if state.ema is None else state.ema.module, data, "val", task))
            self.clock.lap("eval")
            if self.monitor not in metrics:
                raise ValueError(f"trainer.monitor={self.monitor!r} is not a logged metric: pick one of {sorted(metrics)}")
            logger.log(metrics, step=state.step, epoch=epoch)
            log.info("epoch %d: %s  (%.0fs)", epoch, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                           if task.is_headline(k)),  # per-class: jsonl and logger
                     time.time() - start_time)
            if self.improved(metrics[self.monitor], state.best_value):
                state.best_value, state.best_epoch, state.best_metrics = metrics[self.monitor], epoch, metrics
                checkpoint("best.pt", epoch + epoch_done, 0)
            budget.after_epoch_end(state.step, elapsed())  # before last.pt, which stores the plan
            if epoch_done:
                state.epoch, state.batch_in_epoch = epoch + 1, 0
            checkpoint("last.pt", state.epoch, state.batch_in_epoch)  # mid-epoch: resume from this batch
            logger.update_summary(best_value=state.best_value, best_epoch=state.best_epoch,
                                  epochs_completed=state.epoch, steps=state.step, budget=budget.summary())
            if self.ranks.any(interrupt.requested()):  # the signal came during validation: last.pt holds this point
                interrupt.stop(f"epoch {state.epoch}, step {state.step} (last.pt saved)")
            budget.untimed(elapsed())
            self.clock.lap("other")
            if not epoch_done or budget.exhausted(state.step, elapsed()):
                break
        stop_reason = budget.stop_reason or "max_epochs"
        return FitResult(state.best_value, state.best_epoch, state.epoch, state.step, stop_reason == "max_time",
                         state.best_metrics, stop_reason=stop_reason, budget=budget.summary(),
                         train_images=state.train_images * self.ranks.world_size)  # DDP: every rank's images

    def train_one_epoch(self, model, raw_model, data, augment, task, optimizer, scheduler, state: TrainState,
                        logger, seed: int, elapsed, checkpoint) -> dict[str, float]:
        """Optimizer steps from `state.batch_in_epoch` to the epoch's end or the budget's; `state` follows
        every step. Returns the epoch's train/* metrics (over every rank's images)."""
        model.train()
        steps_per_epoch = data.steps_per_epoch() // self.accumulate
        if state.batch_in_epoch == 0 or state.resume_rng is None:
            # DDP: each rank its own stream, seeded from (seed, epoch, rank); rank 0's is single-process
            seed_everything(self.ranks.seed(seed * 1000 + state.epoch))
        else:  # mid-epoch resume: the exact RNG position
            restore_rng_state(state.resume_rng)
        state.resume_rng = None  # used once
        batches = data.train_batches(state.epoch, seed, skip=state.batch_in_epoch * self.accumulate,
                                     rank=self.ranks.rank, world_size=self.ranks.world_size)  # DDP: a share
        epoch_loss, epoch_images = torch.zeros((), device=self.device), 0
        epoch_scores = {}  # the task's batch scores (acc, mae, pixel_acc...), summed over images on the device
        window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.time()
        progress = Progress(steps_per_epoch, state.batch_in_epoch, f"epoch {state.epoch}", self.progress_bar,
                            self.progress_interval_s)
        for micro_step, (inputs, targets) in enumerate(batches):
            self.ranks.sync_gradients((micro_step + 1) % self.accumulate == 0)  # DDP: on the last micro-batch
            inputs, targets = augment(inputs, targets)
            self.clock.lap("data")
            batch_size = inputs.shape[0]
            state.train_images += batch_size
            with self.autocast():
                outputs = model(data.normalize(inputs))  # logits (B, K), or what the task's heads return
                loss = task.loss(outputs, targets)
            state.scaler.scale(loss / self.accumulate).backward()
            if (micro_step + 1) % self.accumulate:
                self.clock.lap("train")
                continue  # accumulate gradients over more micro-batches
            if self.gradient_clip_val:
                state.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.gradient_clip_val)
            state.scaler.step(optimizer)
            state.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if state.ema is not None:
                state.ema.update(raw_model)  # ema = decay * ema + (1 - decay) * weights
            state.step += 1
            state.batch_in_epoch += 1
            state.budget.after_step(state.step, elapsed())  # may re-plan the schedule's length (max_time)
            scheduler.step_update(num_updates=state.step)

            # bookkeeping stays on the device; one sync per log window, not per step
            loss_detached = loss.detach()
            epoch_loss += loss_detached * batch_size
            for name, value in task.batch_scores(detach(outputs), targets).items():
                epoch_scores[name] = epoch_scores.get(name, 0) + value.detach() * batch_size
            epoch_images += batch_size
            window_loss += loss_detached
            window_steps += 1
            if state.step % self.log_every_n_steps == 0 or state.batch_in_epoch == steps_per_epoch:
                mean_loss = self.ranks.mean(window_loss / window_steps).item()  # DDP: of the global batch
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss is {mean_loss} at step {state.step}: lower optimizer.lr "
                                             f"or set trainer.gradient_clip_val")
                images_per_s = (window_steps * batch_size * self.accumulate * self.ranks.world_size
                                / (time.time() - window_start))
                lr = optimizer.param_groups[0]["lr"]
                logger.log({"train/loss_step": mean_loss, "lr": lr, "train/images_per_s": images_per_s},
                           step=state.step, epoch=state.epoch)
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
                checkpoint("last.pt", state.epoch, state.batch_in_epoch)
                interrupt.stop(f"epoch {state.epoch}, step {state.step} (last.pt saved mid-epoch)")
            if state.budget.exhausted(state.step, elapsed()):
                break
        progress.close()
        # DDP: the sums over every rank's images
        names = list(epoch_scores)
        epoch_loss, epoch_images, *totals = self.ranks.sum(epoch_loss, epoch_images, *epoch_scores.values())
        metrics = {"train/loss": (epoch_loss / max(epoch_images, 1)).item(),
                   **{f"train/{name}": (total / max(epoch_images, 1)).item() for name, total in zip(names, totals)}}
        self.clock.lap("train")
        return metrics
