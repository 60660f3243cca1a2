"""Budgets that shape the schedule: `trainer.max_epochs`, `trainer.max_steps` and `trainer.max_time`.

The lr schedule is configured for `max_epochs x steps_per_epoch` optimizer steps (its *nominal*
steps: warmup, decays and floor in epochs of that run). A budget decides how many steps training
really gets, and the schedule, warmup included, is stretched or squeezed onto them: loop step s runs
at the nominal step `position(s)`, a linear map with `position(last step - 1) = nominal - 1`, so the
last step runs at the schedule's floor whichever limit binds. Every phase keeps its share: with
`max_epochs=10 warmup_epochs=0.5`, warmup takes 5% of whatever the budget allows.

- `max_epochs` alone: the map is the identity (the schedule as configured).
- `max_steps`: the schedule spans min(max_steps, nominal) steps, fixed from the start.
- `max_time` (seconds of wall clock, validations included): the step time is measured over the first
  steps (the first two, which allocate and compile, are not timed; meanwhile the schedule follows
  max_epochs and max_steps) and the schedule's length fixed to the steps that fit in the time left,
  the validations at the epoch ends that fall inside included.
  The plan is checked every `CHECK_EVERY` steps and after each validation against the step time
  measured since (an exponential average, half-life `HALF_LIFE_STEPS` steps); when the projected
  length moves by more than `TOLERANCE` of the steps left (the machine got slower or faster), the
  rest of the schedule is re-mapped from the current step: the lr stays continuous and still reaches
  the floor at the last step.

The plan (the schedule's length and where the current map starts) and the timings are saved in
every checkpoint (`budget`), so a resumed run goes on with the same schedule: with the same limits it
takes the stored plan, with other limits it re-plans from the step it resumes at. Training stops at
the plan's last step, or at `max_time` should the machine slow down faster than the plan follows.
"""

from __future__ import annotations

import math

UNTIMED_STEPS = 2  # after (re)starting and after each validation: allocation, autotuning, torch.compile, cold
#                   caches; not the step time to plan with (and a resumed run times the same steps)
PROBE_STEPS = 3  # timed steps before the first plan (until then the schedule follows the step limits)
CHECK_EVERY = 10  # steps between checks of a time plan (and after every validation)
HALF_LIFE_STEPS = 20  # the step-time average forgets half its weight over this many steps
TOLERANCE = 0.02  # re-map when the projected length moves by more than this share of the steps left
EVAL_COST = 1 / 3  # before the first validation is timed: an image's forward ~ 1/3 of a training step's cost


class Budget:
    """The plan of one fit: how many optimizer steps the schedule spans, which limit set that, and the
    map from loop steps to the schedule's nominal steps. The loop reports each step and each epoch end
    (elapsed seconds since the run started, resumed time included) and asks `exhausted`."""

    def __init__(self, max_epochs: int, steps_per_epoch: int, max_steps: int | None = None,
                 max_time: float | None = None, eval_images: int = 0, batch_size: int = 1):
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"trainer.max_steps={max_steps} must be >= 1 (optimizer steps), or null for no limit")
        if max_time is not None and max_time < 0:
            raise ValueError(f"trainer.max_time={max_time} must be >= 0 (seconds), or null for no limit")
        self.steps_per_epoch, self.max_steps, self.max_time = steps_per_epoch, max_steps, max_time
        self.nominal_steps = max(1, max_epochs * steps_per_epoch)  # what the scheduler was built for
        if max_steps is not None and max_steps < self.nominal_steps:
            self.step_cap, self.cap_limit = max_steps, "max_steps"
        else:
            self.step_cap, self.cap_limit = self.nominal_steps, "max_epochs"
        # the plan: steps >= anchor_step map linearly from anchor_position to nominal - 1 at total_steps - 1
        self.total_steps, self.limit = self.step_cap, self.cap_limit
        self.anchor_step, self.anchor_position = 0, 0.0
        self.planned, self.replans = False, 0
        # timings: an average step time and the mean time of an epoch end (validation + checkpoints)
        self.step_s: float | None = None
        self.epoch_end_s: float | None = None
        self.epoch_ends_timed = 0
        self.first_epoch_end_guess = eval_images * EVAL_COST / max(1, batch_size)  # in steps, until timed
        self.stop_reason: str | None = None
        self._mark = 0.0  # elapsed at the end of the last step or epoch end
        self._window_s, self._window_steps, self._untimed = 0.0, 0, UNTIMED_STEPS

    # ------------------------------------------------------------------ the map the scheduler follows

    def position(self, step: int) -> float:
        """The nominal schedule step that loop step `step` (>= the anchor) maps to, fractional: the scheduler
        sets the lr for step + 1 from it, so the last planned step runs at position(total_steps - 1) = nominal - 1."""
        return linear_map(step, self.anchor_step, self.anchor_position, self.total_steps, self.nominal_steps)

    def stretch(self, scheduler) -> StretchedSchedule:
        return StretchedSchedule(scheduler, self)

    # ------------------------------------------------------------------ what the loop reports

    def start(self, elapsed: float) -> None:
        """Training (re)starts at `elapsed` seconds: time steps from here, the first ones untimed."""
        self._mark = elapsed
        self._window_s, self._window_steps, self._untimed = 0.0, 0, UNTIMED_STEPS

    def after_step(self, step: int, elapsed: float) -> None:
        """Optimizer step `step` ended at `elapsed`; called before the scheduler sets the next lr."""
        step_time, self._mark = elapsed - self._mark, elapsed
        if self._untimed > 0:
            self._untimed -= 1
        else:
            self._window_s += step_time
            self._window_steps += 1
        if self.max_time is None or self._window_steps == 0:
            return
        if self.planned:
            due = step % CHECK_EVERY == 0
        else:  # the first plan: after PROBE_STEPS timed steps, sooner in a tiny budget
            due = self._window_steps >= PROBE_STEPS or elapsed >= 0.05 * self.max_time
        if due:
            self._average_window()
            # the lr of this step came from position(step - 1): the re-map starts there
            self._plan(step, elapsed, anchor_step=step - 1)

    def after_epoch_end(self, step: int, elapsed: float) -> None:
        """The validation (and best.pt) after the epoch that ended at step `step` took until `elapsed`. Called
        before last.pt is written, so that last.pt holds the plan this epoch end made."""
        seconds, self._mark = elapsed - self._mark, elapsed
        self.epoch_ends_timed += 1
        # the mean over every epoch end so far (the first is the slowest: it warms up the eval path)
        previous = self.epoch_end_s or 0.0
        self.epoch_end_s = previous + (seconds - previous) / self.epoch_ends_timed
        if self.max_time is not None and self.step_s is not None:
            self._average_window()
            self._plan(step, elapsed, anchor_step=step)  # the lr of step + 1 is already set from position(step)

    def untimed(self, elapsed: float) -> None:
        """The time since the last report (writing last.pt) belongs to no step, and the first steps of the next
        epoch are not timed either: a run resumed from this last.pt times exactly the steps this one does."""
        self._mark = elapsed
        self._untimed = UNTIMED_STEPS

    def exhausted(self, step: int, elapsed: float) -> bool:
        """True when training must stop now: the plan's steps are done or max_time has passed."""
        if step >= self.total_steps:
            self.stop_reason = self.limit
        elif self.max_time is not None and elapsed > self.max_time:
            self.stop_reason = "max_time"
        return self.stop_reason is not None

    # ------------------------------------------------------------------ planning

    def _average_window(self) -> None:
        if self._window_steps == 0:
            return
        window_mean = self._window_s / self._window_steps
        if self.step_s is None:
            self.step_s = window_mean
        else:
            keep = 0.5 ** (self._window_steps / HALF_LIFE_STEPS)
            self.step_s = keep * self.step_s + (1 - keep) * window_mean
        self._window_s, self._window_steps = 0.0, 0

    def fitting_steps(self, step: int, elapsed: float) -> int:
        """The last step that ends within max_time: the steps left at step_s each, plus the epoch ends
        (validation, best.pt) that fall before it; at least one more step."""
        left = self.max_time - elapsed
        epoch_end_s = self.epoch_end_s if self.epoch_end_s is not None else self.first_epoch_end_guess * self.step_s

        def seconds_until(last: int) -> float:  # the epoch ends at multiples of steps_per_epoch in [step, last - 1]
            epoch_ends = (last - 1) // self.steps_per_epoch - (step - 1) // self.steps_per_epoch
            return (last - step) * self.step_s + epoch_ends * epoch_end_s

        low, high = step + 1, step + max(1, math.floor(left / self.step_s))  # low: at least one more step
        while low < high:  # the largest `last` in [low, high] whose seconds fit (they grow with `last`)
            middle = (low + high + 1) // 2
            low, high = (middle, high) if seconds_until(middle) <= left else (low, middle - 1)
        return low

    def _plan(self, step: int, elapsed: float, anchor_step: int) -> None:
        fitting = self.fitting_steps(step, elapsed)
        total, limit = (fitting, "max_time") if fitting < self.step_cap else (self.step_cap, self.cap_limit)
        moved = abs(total - self.total_steps)
        if self.planned and (moved <= max(1, TOLERANCE * (self.total_steps - step)) or total == self.total_steps):
            return
        self.replans += self.planned
        self._remap(anchor_step, total)
        self.limit, self.planned = limit, True

    def _remap(self, anchor_step: int, total_steps: int) -> None:
        self.anchor_position = self.position(anchor_step)  # continuity: the lr goes on from where it is
        self.anchor_step, self.total_steps = anchor_step, total_steps

    # ------------------------------------------------------------------ checkpoints and summary

    def state_dict(self) -> dict:
        return {"nominal_steps": self.nominal_steps, "max_steps": self.max_steps, "max_time": self.max_time,
                "total_steps": self.total_steps, "limit": self.limit, "anchor_step": self.anchor_step,
                "anchor_position": self.anchor_position, "planned": self.planned, "replans": self.replans,
                "step_s": self.step_s, "epoch_end_s": self.epoch_end_s, "epoch_ends_timed": self.epoch_ends_timed}

    def load_state_dict(self, state: dict | None, step: int) -> None:
        """Continue the plan of the run that saved `state` (at `step`). Same limits: its plan and timings
        as they were. Other limits: a new plan from this step on, starting at the same point of the schedule."""
        if state is None:  # written before budgets shaped the schedule: it followed the identity map
            self._remap(step, self.total_steps)
            return
        self.step_s, self.epoch_end_s = state["step_s"], state["epoch_end_s"]
        self.epoch_ends_timed = state["epoch_ends_timed"]
        if (state["nominal_steps"], state["max_steps"], state["max_time"]) == (
                self.nominal_steps, self.max_steps, self.max_time):
            self.anchor_step, self.anchor_position = state["anchor_step"], state["anchor_position"]
            self.total_steps, self.limit = state["total_steps"], state["limit"]
            self.planned, self.replans = state["planned"], state["replans"]
            return
        # where the saved plan had the schedule at this step, as a share of its nominal steps
        saved_position = linear_map(step, state["anchor_step"], state["anchor_position"], state["total_steps"],
                                    state["nominal_steps"])
        self.anchor_step = step
        self.anchor_position = saved_position * (self.nominal_steps - 1) / max(1, state["nominal_steps"] - 1)

    def summary(self) -> dict:
        return {"limit": self.limit, "planned_steps": self.total_steps, "replans": self.replans,
                "step_s": self.step_s, "stop_reason": self.stop_reason}


def linear_map(step: int, anchor_step: int, anchor_position: float, total_steps: int, nominal_steps: int) -> float:
    """From (anchor_step, anchor_position) to (total_steps - 1, nominal_steps - 1) on a straight line."""
    span = total_steps - 1 - anchor_step
    if step <= anchor_step or span <= 0:  # span <= 0: the plan ended at the anchor; hold the floor
        return anchor_position if step <= anchor_step else float(nominal_steps - 1)
    return anchor_position + (step - anchor_step) * (nominal_steps - 1 - anchor_position) / span


class StretchedSchedule:
    """A schedule of `vitsweep.scheduler` (timm's interface) driven through `budget.position`: the loop
    calls `step_update(num_updates=step)` as before; the checkpoint keeps the inner schedule's state."""

    def __init__(self, scheduler, budget: Budget):
        self.scheduler, self.budget = scheduler, budget

    def step_update(self, num_updates: int, metric=None) -> None:
        self.scheduler.step_update(num_updates=self.budget.position(num_updates))

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.scheduler.load_state_dict(state_dict)
