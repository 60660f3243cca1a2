"""Training options change the run: each schedule follows its lr trajectory (and resumes onto it),
every optimizer spares norms, biases, pos_embed and cls_token from weight decay, lr / weight decay /
gradient clipping / batch size / epochs act as named, and the EMA of weights follows its decay, is
what gets validated and saved, and survives a resume."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from vitsweep.data import DataModule
from vitsweep.data.synthetic import load_synthetic
from vitsweep.logger.run_logger import RunLogger
from vitsweep.loss import CrossEntropy
from vitsweep.model import VisionTransformer
from vitsweep.optimizer import build_optimizer
from vitsweep.scheduler import OneCycle, constant, cosine, step
from vitsweep.task import Classification
from vitsweep.trainer import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"


def lr_trajectory(make_scheduler, total_steps: int, steps_per_epoch: int, resume_at: int | None = None):
    """The lr each of `total_steps` optimizer steps runs at, driven as the loop drives it; with
    `resume_at`, the schedule and optimizer are rebuilt from their state dicts after that step."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    lrs = []
    for step_number in range(1, total_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step_update(num_updates=step_number)
        if step_number == resume_at:
            saved = optimizer.state_dict(), scheduler.state_dict()
            optimizer = torch.optim.SGD([param], lr=1.0)
            scheduler = make_scheduler(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
            optimizer.load_state_dict(saved[0])
            scheduler.load_state_dict(saved[1])
    return torch.tensor(lrs, dtype=torch.float64)


def test_warmup_rises_linearly_to_the_base_lr():
    lrs = lr_trajectory(lambda o, **kw: cosine(o, warmup_epochs=2, warmup_lr=0.01, min_lr=0.0, **kw), 50, 5)
    torch.testing.assert_close(lrs[:11], torch.linspace(0.01, 1.0, 11, dtype=torch.float64))
    assert (lrs[11:].diff() < 0).all()  # then cosine decay


def test_cosine_ends_at_min_lr():
    lrs = lr_trajectory(lambda o, **kw: cosine(o, warmup_epochs=0, min_lr=0.05, **kw), 40, 10)
    assert lrs[0] == 1.0 and (lrs.diff() <= 0).all()
    assert lrs[-1] == pytest.approx(0.05)
    assert lrs[20] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 20 / 39)).item()))


def test_constant_holds_the_lr_after_warmup():
    lrs = lr_trajectory(lambda o, **kw: constant(o, warmup_epochs=1, warmup_lr=0.5, **kw), 20, 4)
    torch.testing.assert_close(lrs[:5], torch.linspace(0.5, 1.0, 5, dtype=torch.float64))
    assert (lrs[4:] == 1.0).all()


def test_step_decays_at_the_right_steps():
    lrs = lr_trajectory(lambda o, **kw: step(o, decay_epochs=2, decay_rate=0.5, **kw), 30, 5)
    expected = torch.tensor([1.0] * 10 + [0.5] * 10 + [0.25] * 10, dtype=torch.float64)
    torch.testing.assert_close(lrs, expected)
    # with a 1-epoch warmup the drops come 5 steps later: decays count from the end of warmup
    lrs = lr_trajectory(lambda o, **kw: step(o, decay_epochs=2, decay_rate=0.5, warmup_epochs=1, warmup_lr=0.0,
                                             **kw), 30, 5)
    torch.testing.assert_close(lrs[:6], torch.linspace(0.0, 1.0, 6, dtype=torch.float64))
    torch.testing.assert_close(lrs[5:], torch.tensor([1.0] * 10 + [0.5] * 10 + [0.25] * 5, dtype=torch.float64))


def test_onecycle_peaks_then_anneals():
    lrs = lr_trajectory(lambda o, **kw: OneCycle(o, max_lr=2.0, pct_start=0.25, div_factor=10.0,
                                                 final_div_factor=100.0, **kw), 40, 8)
    peak = int(lrs.argmax())
    assert lrs[0] == pytest.approx(0.2)  # max_lr / div_factor
    assert lrs[peak] == pytest.approx(2.0) and peak == pytest.approx(0.25 * 40, abs=1)
    assert (lrs[:peak + 1].diff() > 0).all() and (lrs[peak:].diff() < 0).all()
    assert lrs[-1] == pytest.approx(0.2 / 100.0)  # the last step runs at the floor


@pytest.mark.parametrize("make_scheduler", [
    lambda o, **kw: cosine(o, warmup_epochs=1, **kw),
    lambda o, **kw: step(o, decay_epochs=1, decay_rate=0.5, warmup_epochs=1, **kw),
    lambda o, **kw: OneCycle(o, max_lr=1.0, **kw),
], ids=["cosine", "step", "onecycle"])
def test_a_resumed_schedule_follows_the_same_trajectory(make_scheduler):
    straight = lr_trajectory(make_scheduler, 30, 6)
    for resume_at in (3, 10, 17):
        torch.testing.assert_close(lr_trajectory(make_scheduler, 30, 6, resume_at=resume_at), straight)


def test_schedule_options_fail_clearly():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="scheduler.decay_epochs=0.1 is under one step"):
        step(optimizer, total_steps=10, steps_per_epoch=5, decay_epochs=0.1)
    with pytest.raises(ValueError, match="scheduler.pct_start=1.5"):
        OneCycle(optimizer, total_steps=10, steps_per_epoch=5, max_lr=1.0, pct_start=1.5)
    with pytest.raises(ValueError, match="scheduler.warmup_epochs=-1"):
        cosine(optimizer, total_steps=10, steps_per_epoch=5, warmup_epochs=-1)


@pytest.mark.parametrize("name", ["cosine", "constant", "step", "onecycle"])
def test_every_scheduler_config_builds_a_schedule_the_loop_can_drive(name):
    cfg = OmegaConf.load(CONF / "scheduler" / f"{name}.yaml")
    if name == "onecycle":
        cfg.max_lr = 1e-3  # ${optimizer.lr} in the full config
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = instantiate(cfg, optimizer=optimizer, total_steps=100, steps_per_epoch=10)
    optimizer.step()
    scheduler.step_update(num_updates=1)
    scheduler.load_state_dict(scheduler.state_dict())


# -------------------------------------------------------------------------------------- optimizers

def tiny_model(norm=None, pooling="cls"):
    torch.manual_seed(0)
    return VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=3, embed_dim=16, depth=1,
                             num_heads=2, mlp_dim=32, norm=norm, pooling=pooling, drop_path=0.0)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_optimizers_spare_norms_biases_pos_embed_and_cls_token_from_weight_decay(name):
    model = tiny_model()
    cfg = OmegaConf.load(CONF / "optimizer" / f"{name}.yaml")
    optimizer = instantiate(cfg, model=model)
    assert type(optimizer).__name__.lower() == {"adamw": "adamw", "sgd": "sgd", "lamb": "lamb"}[name]
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decay_of) == sum(1 for _ in model.parameters())  # every parameter, once
    for param_name, param in model.named_parameters():
        spared = param.ndim <= 1 or param_name.endswith(".bias") or param_name in ("cls_token", "pos_embed.weight")
        assert decay_of[id(param)] == (0.0 if spared else cfg.weight_decay), param_name
    assert decay_of[id(model.cls_token)] == 0.0 and decay_of[id(model.pos_embed.weight)] == 0.0
    assert decay_of[id(model.head.weight)] == cfg.weight_decay > 0


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_optimizer_state_from_a_config_loads_back_with_weights_only(name, tmp_path):
    # config lists (betas) must not reach the checkpoint as omegaconf objects, or last.pt can't be read
    model = tiny_model()
    optimizer = instantiate(OmegaConf.load(CONF / "optimizer" / f"{name}.yaml"), model=model)
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))


def one_step_change(optimizer_kwargs: dict, zero_grad_loss: bool = False) -> tuple[nn.Module, dict]:
    model = tiny_model().double()  # float64: the update is not lost to rounding of the weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, **optimizer_kwargs)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 0]))
    (loss * 0 if zero_grad_loss else loss).backward()
    optimizer.step()
    return model, {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_learning_rate_scales_the_update():
    # plain SGD (timm's "momentum" without momentum): the update is exactly -lr * gradient
    _, small = one_step_change({"name": "momentum", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.0})
    _, large = one_step_change({"name": "momentum", "lr": 0.03, "weight_decay": 0.0, "momentum": 0.0})
    for name in small:
        torch.testing.assert_close(large[name], 3 * small[name])
    assert small["head.weight"].abs().max() > 0


def test_weight_decay_shrinks_decayed_weights_only():
    # zero gradients: AdamW's only move is the decoupled decay, w <- w * (1 - lr * weight_decay)
    model, change = one_step_change({"name": "adamw", "lr": 0.1, "weight_decay": 0.5}, zero_grad_loss=True)
    for name, param in model.named_parameters():
        before = param.detach() - change[name]
        spared = param.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed.weight")
        expected = before if spared else before * (1 - 0.1 * 0.5)
        torch.testing.assert_close(param.detach(), expected)


# ------------------------------------------------------------------------- the loop: EMA, clip, sizes

def fit(tmp_path: Path, name: str, max_epochs: int = 1, batch_size: int = 16, resume_state: dict | None = None,
        model: nn.Module | None = None, optimizer_hook=None, **trainer_kwargs):
    """Train the tiny model on 64 synthetic 8x8 images in-process; returns (result, job dir, model)."""
    data = DataModule(load_synthetic(image_size=8, in_channels=1, num_classes=3, num_train=64, num_val=24,
                                     num_test=24), image_size=8, in_channels=1, num_classes=3, batch_size=batch_size)
    model = model or tiny_model()
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])  # as modes.train does
    optimizer = build_optimizer(model, name="adamw", lr=3e-3, weight_decay=0.05)
    if optimizer_hook is not None:
        optimizer_hook(optimizer, model)
    scheduler = constant(optimizer, total_steps=100, steps_per_epoch=data.steps_per_epoch())
    trainer = Trainer(max_epochs=max_epochs, device="cpu", precision="32", compile=False, progress_bar=False,
                      **trainer_kwargs)
    job_dir = tmp_path / name
    logger = RunLogger(job_dir)
    task = Classification(loss=CrossEntropy(), num_classes=3)
    task.setup(data, model)
    result = trainer.fit(model, data, lambda images, targets: (images, targets), task, optimizer,
                         scheduler, logger, job_dir / "checkpoints", seed=0, checkpoint_extra={},
                         resume_state=resume_state)
    logger.finish("completed")
    return result, job_dir, model, trainer, data


def test_batch_size_and_epochs_set_the_number_of_steps(tmp_path):
    result, *_ = fit(tmp_path, "a", max_epochs=2, batch_size=16)
    assert (result.steps, result.epochs_completed) == (2 * 64 // 16, 2)
    result, *_ = fit(tmp_path, "b", max_epochs=1, batch_size=8)
    assert (result.steps, result.epochs_completed) == (64 // 8, 1)


def record_grad_norms(norms: list):
    def hook(optimizer, model):
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: norms.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
            .item()))
    return hook


def test_gradient_clipping_caps_the_gradient_norm(tmp_path):
    clipped, free = [], []
    fit(tmp_path, "clipped", gradient_clip_val=0.01, optimizer_hook=record_grad_norms(clipped))
    fit(tmp_path, "free", gradient_clip_val=None, optimizer_hook=record_grad_norms(free))
    assert len(clipped) == len(free) == 4
    assert max(clipped) <= 0.01 + 1e-6
    assert max(free) > 0.01


def test_ema_follows_its_decay_and_is_what_gets_validated_and_saved(tmp_path):
    decay = 0.8
    model = tiny_model()
    weights_after_each_step = [{n: p.detach().clone() for n, p in model.named_parameters()}]  # step 0: the init

    def record_weights(optimizer, model):
        optimizer.register_step_post_hook(lambda *_: weights_after_each_step.append(
            {n: p.detach().clone() for n, p in model.named_parameters()}))

    result, job_dir, model, trainer, data = fit(tmp_path, "ema", max_epochs=2, model=model, ema_decay=decay,
                                                optimizer_hook=record_weights)
    assert len(weights_after_each_step) == 1 + result.steps
    expected = dict(weights_after_each_step[0])  # the EMA starts as a copy of the initial weights
    for weights in weights_after_each_step[1:]:
        expected = {n: decay * expected[n] + (1 - decay) * weights[n] for n in expected}

    last = torch.load(job_dir / "checkpoints" / "last.pt", weights_only=True)
    for name, value in expected.items():
        torch.testing.assert_close(last["model"][name], value, rtol=1e-5, atol=1e-6)  # "model" is the EMA
        torch.testing.assert_close(last["raw_model"][name], weights_after_each_step[-1][name])
    assert not torch.allclose(last["model"]["head.weight"], last["raw_model"]["head.weight"])

    # the val metrics logged at the last epoch are those of the EMA weights, not the raw ones
    ema_model, raw_model = tiny_model(), tiny_model()
    ema_model.load_state_dict(last["model"])
    raw_model.load_state_dict(last["raw_model"])
    logged = [line for line in (job_dir / "metrics.jsonl").read_text().splitlines() if "val/loss" in line][-1]
    logged_loss = float(logged.split('"val/loss": ')[1].split(",")[0])
    task = Classification(loss=CrossEntropy(), num_classes=3)
    task.setup(data, model)
    ema_loss = trainer.validate(ema_model, data, "val", task)["val/loss"]
    raw_loss = trainer.validate(raw_model, data, "val", task)["val/loss"]
    assert logged_loss == pytest.approx(ema_loss, rel=1e-5) and ema_loss != pytest.approx(raw_loss, rel=1e-5)


def test_ema_survives_a_resume(tmp_path):
    fit(tmp_path, "straight", max_epochs=2, ema_decay=0.9)
    fit(tmp_path, "interrupted", max_epochs=1, ema_decay=0.9)
    state = torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=True)
    fit(tmp_path, "resumed", max_epochs=2, ema_decay=0.9, resume_state=state)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "raw_model"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=1e-5, atol=1e-6)


def test_without_ema_the_checkpoint_holds_the_raw_weights(tmp_path):
    _, job_dir, model, *_ = fit(tmp_path, "plain")
    last = torch.load(job_dir / "checkpoints" / "last.pt", weights_only=True)
    assert "raw_model" not in last
    for name, value in model.state_dict().items():
        torch.testing.assert_close(last["model"][name], value)


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_ema_decay_out_of_range_fails_clearly(decay):
    with pytest.raises(ValueError, match=f"trainer.ema_decay={decay} must be in \\(0, 1\\)"):
        Trainer(device="cpu", ema_decay=decay)
