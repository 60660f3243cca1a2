"""Budgets shape the schedule: with trainer.max_time or trainer.max_steps the lr schedule (warmup
included) spans the steps the budget allows and the last step runs at the floor, on a machine made
slow, fast or unsteady by a patched clock; a resumed budgeted run follows the uninterrupted run's lr
curve exactly."""

import itertools
from types import SimpleNamespace

import pytest
import torch

import vitsweep.trainer.loop as loop_module
from vitsweep.data import DataModule
from vitsweep.data.synthetic import load_synthetic
from vitsweep.logger.run_logger import RunLogger
from vitsweep.loss import CrossEntropy
from vitsweep.model import VisionTransformer
from vitsweep.optimizer import build_optimizer
from vitsweep.scheduler import OneCycle, cosine, step
from vitsweep.task import Classification
from vitsweep.trainer import Trainer
from vitsweep.trainer.budget import Budget

MIN_LR = 1e-5
STEPS_PER_EPOCH = 8  # 128 training images, batch 16


# the tiny model's ops are far too small to split: two threads, 15x slower on 2 shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupted(Exception):
    """Stands for a killed job: raised from inside the loop."""


class FakeClock:
    """The loop's `time` module: time passes only when a training step or a validation is charged to it.
    The tests charge binary fractions (0.25 s, 0.0625 s): float sums are exact, so two runs that are charged
    the same durations from different start times see the same elapsed times to the last bit."""

    def __init__(self, start: float = 1024.0):
        self.start = self.now = start

    def time(self) -> float:
        return self.now


def budgeted_fit(tmp_path, name, monkeypatch, step_seconds, eval_seconds: float = 0.3, resume_state=None,
                 interrupt_after_steps: int | None = None, schedule=None, **trainer_kwargs):
    """Fit the tiny ViT on synthetic images with a fake clock: each training step takes
    `step_seconds(step)` seconds, each validation `eval_seconds`. Returns (the lr each optimizer step ran
    at, in order, and the FitResult or None when interrupted)."""
    clock = FakeClock(start=1024.0 if resume_state is None else 4096.0)
    monkeypatch.setattr(loop_module, "time", SimpleNamespace(time=clock.time))
    data = DataModule(load_synthetic(image_size=8, in_channels=1, num_classes=3, num_train=128, num_val=16,
                                     num_test=16), image_size=8, in_channels=1, num_classes=3, batch_size=16)
    torch.manual_seed(0)
    model = VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=3, embed_dim=16, depth=1,
                              num_heads=2, mlp_dim=32)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    optimizer = build_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.0)
    lrs = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    trainer = Trainer(device="cpu", precision="32", compile=False, progress_bar=False, log_every_n_steps=1000,
                      **trainer_kwargs)
    make_schedule = schedule or (lambda o, **kw: cosine(o, warmup_epochs=2, warmup_lr=1e-4, min_lr=MIN_LR, **kw))
    scheduler = make_schedule(optimizer, total_steps=trainer.max_epochs * STEPS_PER_EPOCH,
                              steps_per_epoch=STEPS_PER_EPOCH)
    steps_done = [0 if resume_state is None else resume_state["step"]]

    def augment(images, targets):  # called once per training step: the step's time passes here
        if steps_done[0] == interrupt_after_steps:
            raise Interrupted
        clock.now += step_seconds(steps_done[0] + 1, clock.now - clock.start)
        steps_done[0] += 1
        return images, targets

    evaluate = trainer.validate

    def slow_evaluate(*args, **kwargs):
        clock.now += eval_seconds
        return evaluate(*args, **kwargs)

    trainer.validate = slow_evaluate
    logger = RunLogger(tmp_path / name)
    task = Classification(loss=CrossEntropy(), num_classes=3)
    task.setup(data, model)
    try:
        result = trainer.fit(model, data, augment, task, optimizer, scheduler, logger,
                             tmp_path / name / "checkpoints", seed=0, checkpoint_extra={}, resume_state=resume_state)
    except Interrupted:
        result = None
    logger.finish("completed")
    return lrs, result


def elapsed_at_end(result, step_seconds_each: float, eval_seconds: float) -> float:
    evals = (result.steps - 1) // STEPS_PER_EPOCH  # the validations before the last step
    return result.steps * step_seconds_each + evals * eval_seconds


@pytest.mark.slow
@pytest.mark.parametrize(("step_seconds", "max_time"), [(0.0625, 15.0), (0.5, 120.0), (4.0, 960.0)],
                         ids=["fast", "medium", "slow"])
def test_with_max_time_the_last_step_runs_at_the_floor(tmp_path, monkeypatch, step_seconds, max_time):
    eval_seconds = 2 * step_seconds
    lrs, result = budgeted_fit(tmp_path, "run", monkeypatch, lambda step, now: step_seconds, max_epochs=100,
                               max_time=max_time, eval_seconds=eval_seconds)
    assert result.stop_reason == "max_time" and result.budget["limit"] == "max_time"
    # the budget is used: the run stops within two steps of max_time (one step is the re-plan's tolerance)
    used = elapsed_at_end(result, step_seconds, eval_seconds)
    assert max_time - 2 * step_seconds - eval_seconds <= used <= max_time + step_seconds
    assert len(lrs) == result.steps == result.budget["planned_steps"] > 150  # the plan's last step is the last
    assert lrs[-1] == pytest.approx(MIN_LR, rel=1e-6)  # and it runs at the floor
    # warmup spans 2 of the configured 100 epochs: 2% of the steps, whatever the machine's speed (give or take
    # the first 5 steps, which follow the 100 epochs while the step time is measured)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert lrs[0] == 1e-4 and 0.02 * result.steps - 1 <= peak <= 0.02 * result.steps + 5
    assert all(later <= earlier for earlier, later in itertools.pairwise(lrs[peak:]))


@pytest.mark.slow
def test_a_machine_that_slows_down_midway_still_ends_at_the_floor(tmp_path, monkeypatch):
    max_time = 40.0

    def step_seconds(step, elapsed):  # 1/8 s per step, then three times slower after half the budget
        return 0.125 if elapsed < max_time / 2 else 0.375

    lrs, result = budgeted_fit(tmp_path, "run", monkeypatch, step_seconds, max_epochs=1000, max_time=max_time,
                               eval_seconds=0.0)
    assert result.stop_reason == "max_time" and result.budget["replans"] >= 1
    # the plan follows the slowdown: training ends at its last step or one before (max_time came first)
    assert result.budget["planned_steps"] - result.steps in (0, 1)
    floor_or_one_before = lrs[-1] if result.budget["planned_steps"] == result.steps else lrs[-1] - (lrs[-2] - lrs[-1])
    assert floor_or_one_before == pytest.approx(MIN_LR, rel=1e-3, abs=1e-9)
    # the schedule was re-planned, not cut: the lr falls smoothly (no step of the curve falls by more than
    # a few times the steepest fall of an unhurried cosine)
    falls = [earlier - later for earlier, later in itertools.pairwise(lrs)]
    assert max(falls) < 5 * torch.pi / 2 * 1e-2 / (0.5 * len(lrs))


def test_max_steps_squeezes_the_schedule_onto_its_steps(tmp_path, monkeypatch):
    lrs, result = budgeted_fit(tmp_path, "run", monkeypatch, lambda step, now: 0.125, max_epochs=100, max_steps=30)
    assert result.steps == 30 and result.stop_reason == "max_steps" and not result.stopped_by_time
    assert lrs[-1] == pytest.approx(MIN_LR, rel=1e-6)
    # the same cosine as a 30-step run configured in epochs: warmup 2 of 100 epochs -> 0.6 steps, then decay
    reference = []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    scheduler = Budget(100, STEPS_PER_EPOCH, max_steps=30).stretch(
        cosine(optimizer, total_steps=100 * STEPS_PER_EPOCH, steps_per_epoch=STEPS_PER_EPOCH, warmup_epochs=2, warmup_lr=1e-4,
               min_lr=MIN_LR))
    for number in range(1, 31):
        reference.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(num_updates=number)
    assert lrs == pytest.approx(reference, rel=1e-12)


def test_when_max_epochs_binds_first_the_schedule_is_the_configured_one(tmp_path, monkeypatch):
    budgeted, result = budgeted_fit(tmp_path, "budget", monkeypatch, lambda step, now: 0.125, max_epochs=5,
                                    max_time=1e6, max_steps=10_000)
    plain, _ = budgeted_fit(tmp_path, "plain", monkeypatch, lambda step, now: 0.125, max_epochs=5)
    assert result.stop_reason == "max_epochs" and result.steps == 5 * STEPS_PER_EPOCH
    assert budgeted == plain and plain[-1] == pytest.approx(MIN_LR)  # exactly the configured schedule


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [
    None,
    lambda o, **kw: step(o, decay_epochs=100, decay_rate=0.5, warmup_epochs=20, warmup_lr=1e-4, **kw),
    lambda o, **kw: OneCycle(o, max_lr=1e-2, **kw),
], ids=["cosine", "step", "onecycle"])
def test_a_resumed_budgeted_run_follows_the_uninterrupted_lr_curve_exactly(tmp_path, monkeypatch, schedule):
    def step_seconds(step, elapsed):  # uneven on purpose: the plan moves during the run
        return 0.25 if step < 40 else 0.5

    kwargs = {"max_epochs": 1000, "max_time": 60.0, "eval_seconds": 0.75, "schedule": schedule}
    straight, result = budgeted_fit(tmp_path, "straight", monkeypatch, step_seconds, **kwargs)
    assert result.stop_reason == "max_time" and result.budget["replans"] >= 1
    # killed during epoch 6; last.pt is from the end of epoch 5 (step 48, after the slowdown was planned for)
    _, interrupted = budgeted_fit(tmp_path, "interrupted", monkeypatch, step_seconds, interrupt_after_steps=50,
                                  **kwargs)
    assert interrupted is None
    state = torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 48 and state["budget"]["planned"]
    resumed, resumed_result = budgeted_fit(tmp_path, "resumed", monkeypatch, step_seconds, resume_state=state,
                                           **kwargs)
    assert resumed == straight[48:]  # exactly, step by step
    assert resumed_result.steps == result.steps and resumed_result.budget == result.budget


@pytest.mark.slow
def test_resuming_with_other_limits_re_plans_from_where_the_schedule_was(tmp_path, monkeypatch):
    kwargs = {"max_epochs": 100, "max_steps": 40}
    _, _ = budgeted_fit(tmp_path, "first", monkeypatch, lambda step, now: 0.125, interrupt_after_steps=22, **kwargs)
    state = torch.load(tmp_path / "first" / "checkpoints" / "last.pt", weights_only=True)
    first, _ = budgeted_fit(tmp_path, "ref", monkeypatch, lambda step, now: 0.125, **kwargs)
    longer, result = budgeted_fit(tmp_path, "longer", monkeypatch, lambda step, now: 0.125, resume_state=state,
                                  max_epochs=100, max_steps=80)
    assert result.steps == 80 and longer[-1] == pytest.approx(MIN_LR)
    assert longer[0] == pytest.approx(first[state["step"]])  # the lr goes on from where it was
    assert all(later <= earlier for earlier, later in itertools.pairwise(longer))


@pytest.mark.parametrize(("key", "value"), [("max_steps", 0), ("max_time", -1)])
def test_bad_limits_fail_clearly(key, value):
    with pytest.raises(ValueError, match=f"trainer.{key}={value} must be"):
        Trainer(device="cpu", **{key: value})
