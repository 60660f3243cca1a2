"""Learning-rate schedules from timm, stepped per optimizer step (not per epoch), with linear warmup."""

from __future__ import annotations

from timm.scheduler import CosineLRScheduler, StepLRScheduler


def build_scheduler(optimizer, total_steps: int, steps_per_epoch: int, name: str = "cosine",
                    warmup_epochs: float = 0.0, warmup_lr: float = 1e-6, min_lr: float = 1e-6):
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    common = dict(warmup_t=warmup_steps, warmup_lr_init=warmup_lr, t_in_epochs=False)
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=min_lr, **common)
    if name == "constant":  # a step schedule that never decays
        return StepLRScheduler(optimizer, decay_t=max(1, total_steps), decay_rate=1.0, **common)
    raise ValueError(f"scheduler.name={name!r} is not one of: cosine, constant")
