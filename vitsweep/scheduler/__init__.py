"""Learning-rate schedules, stepped per optimizer step (not per epoch). One function per
conf/scheduler/*.yaml; each gets `optimizer`, `total_steps` and `steps_per_epoch` from the task.

Every schedule answers what the loop calls (timm's scheduler interface):
`step_update(num_updates=step)` after each optimizer step sets the lr for the next step from the
absolute step count, and `state_dict()` / `load_state_dict()` go into and out of last.pt.

Warmup (`warmup_epochs`, fractional allowed) rises linearly from `warmup_lr` to the optimizer's lr;
the schedule proper starts where warmup ends (timm's `warmup_prefix`): the first step after warmup
runs at the optimizer's lr, and step decays count from there.
"""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler


def _warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    if warmup_epochs < 0:
        raise ValueError(f"scheduler.warmup_epochs={warmup_epochs} must be >= 0")
    return round(warmup_epochs * steps_per_epoch)


def _warmup(warmup_steps: int, warmup_lr: float) -> dict:
    return {"warmup_t": warmup_steps, "warmup_lr_init": warmup_lr, "warmup_prefix": True, "t_in_epochs": False}


def cosine(optimizer, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
           warmup_lr: float = 1e-6, min_lr: float = 1e-6) -> CosineLRScheduler:
    """Linear warmup, then half a cosine from the optimizer's lr down to `min_lr` at the last step."""
    warmup_steps = _warmup_steps(warmup_epochs, steps_per_epoch)
    # step k (from 1) runs at the lr set after step k - 1, so the last step sits at t_initial: min_lr
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps - 1), lr_min=min_lr,
                             **_warmup(warmup_steps, warmup_lr))


def constant(optimizer, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
             warmup_lr: float = 1e-6) -> StepLRScheduler:
    """Linear warmup, then the optimizer's lr unchanged (a step schedule that never decays)."""
    return StepLRScheduler(optimizer, decay_t=max(1, total_steps), decay_rate=1.0,
                           **_warmup(_warmup_steps(warmup_epochs, steps_per_epoch), warmup_lr))


def step(optimizer, total_steps: int, steps_per_epoch: int, decay_epochs: float = 10.0, decay_rate: float = 0.1,
         warmup_epochs: float = 0.0, warmup_lr: float = 1e-6) -> StepLRScheduler:
    """Linear warmup, then lr * decay_rate ** (steps_after_warmup // decay_steps): a drop every
    `decay_epochs`."""
    decay_steps = round(decay_epochs * steps_per_epoch)
    if decay_steps < 1:
        raise ValueError(f"scheduler.decay_epochs={decay_epochs} is under one step ({steps_per_epoch} steps per "
                         f"epoch): raise it")
    if not 0 < decay_rate <= 1:
        raise ValueError(f"scheduler.decay_rate={decay_rate} must be in (0, 1]")
    return StepLRScheduler(optimizer, decay_t=decay_steps, decay_rate=decay_rate,
                           **_warmup(_warmup_steps(warmup_epochs, steps_per_epoch), warmup_lr))


class OneCycle:
    """torch's OneCycleLR (Smith & Topin, 2019) behind the loop's interface. The lr rises from
    max_lr / div_factor to max_lr over the first `pct_start` of training (its warmup), then anneals
    to max_lr / (div_factor * final_div_factor) at the last step. Momentum is left to the optimizer.

    OneCycleLR counts its own calls; `step_update` sets that count from the loop's absolute step, so
    a resumed run lands on the same lr as an uninterrupted one."""

    def __init__(self, optimizer, total_steps: int, steps_per_epoch: int, max_lr: float, pct_start: float = 0.3,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, anneal_strategy: str = "cos"):
        if not 0 < pct_start < 1:
            raise ValueError(f"scheduler.pct_start={pct_start} must be in (0, 1)")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"scheduler.anneal_strategy={anneal_strategy!r} is not one of: cos, linear")
        self.total_steps = max(2, total_steps)  # OneCycleLR needs a rise and a fall
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=self.total_steps, pct_start=pct_start,
            anneal_strategy=anneal_strategy, div_factor=div_factor, final_div_factor=final_div_factor,
            cycle_momentum=False)

    def step_update(self, num_updates: int, metric=None) -> None:
        # the loop steps once more after the last update; hold the final lr rather than overshoot
        self.schedule.last_epoch = min(num_updates, self.total_steps - 1) - 1
        self.schedule.step()  # last_epoch += 1, then sets the lr of every param group

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.schedule.load_state_dict(state_dict)
