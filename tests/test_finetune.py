"""Start from pretrained weights through `python run.py`: fine-tune a run's checkpoint on another
class count, train the head only, fail clearly offline; and the ViT-S/16 CIFAR-10 experiment at 224 px."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN, read_summary, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vitsweep.data import DataModule
from vitsweep.data.synthetic import load_synthetic
from vitsweep.model import create_vit
from vitsweep.model.pretrained import TRAINABLE
from vitsweep.model.prompt import ShallowPrompt
from vitsweep.optimizer import build_optimizer

EXPERIMENT = "finetune_vit_s16_cifar10"


def last_weights(job_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(job_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny run on 4 classes (its best.pt is the pretrained model), then two runs starting from it:
    a full fine-tune on 3 classes, and a head-only one on the same 4 classes."""
    tmp = tmp_path_factory.mktemp("finetune")
    run_cli([*TINY_RUN, "logger=none"], tmp / "source")
    ckpt = tmp / "source" / "run" / "checkpoints" / "best.pt"
    start = [*TINY_RUN, "logger=none", f"model.pretrained={ckpt}"]
    new_classes = run_cli([*start, "data.num_classes=3"], tmp / "classes")
    head_only = run_cli([*start, "model.trainable=head"], tmp / "head")
    return {"ckpt": ckpt, "weights": torch.load(ckpt, weights_only=True)["model"],
            "classes": (tmp / "classes" / "run", new_classes), "head": (tmp / "head" / "run", head_only)}


@pytest.mark.slow
def test_finetune_on_another_class_count_reports_the_new_head(pretrained):
    job_dir, proc = pretrained["classes"]
    assert f"pretrained {pretrained['ckpt']}" in proc.stdout  # the load report
    assert "reinitialized: head.weight (4 -> 3 classes); head.bias (4 -> 3 classes)" in proc.stdout
    assert read_summary(job_dir)["status"] == "completed"
    weights, start = last_weights(job_dir), pretrained["weights"]
    assert weights["head.weight"].shape == (3, 32) and start["head.weight"].shape == (4, 32)
    trunk = [name for name in start if not name.startswith("head.")]
    assert any(not torch.equal(weights[name], start[name]) for name in trunk)  # trainable=all: the trunk trained


@pytest.mark.slow
def test_the_load_report_is_kept_in_the_summary(pretrained):
    job_dir, _ = pretrained["classes"]
    report = read_summary(job_dir)["pretrained"]
    assert report["source"] == str(pretrained["ckpt"])
    assert report["reinitialized"] == ["head.weight (4 -> 3 classes)", "head.bias (4 -> 3 classes)"]
    assert report["num_loaded"] == len(pretrained["weights"]) - 2 and report["dropped"] == []


@pytest.mark.slow
def test_trainable_head_leaves_every_other_weight_as_pretrained(pretrained):
    job_dir, _ = pretrained["head"]
    weights, start = last_weights(job_dir), pretrained["weights"]
    assert weights.keys() == start.keys()
    for name in start:
        if name.startswith("head."):
            assert not torch.equal(weights[name], start[name]), f"{name} did not train"
        else:
            torch.testing.assert_close(weights[name], start[name], rtol=0, atol=0, msg=name)
    assert read_summary(job_dir)["status"] == "completed"


@pytest.mark.slow
def test_timm_weights_offline_fail_with_one_line_naming_the_key(tmp_path):
    proc = run_cli([*TINY_RUN, "logger=none", "model.pretrained=timm:vit_tiny_patch16_224"], tmp_path, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.pretrained=timm:vit_tiny_patch16_224" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and "model.pretrained" in summary["error"]


@pytest.mark.parametrize("trainable", list(TRAINABLE))
@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_optimizer_gets_exactly_the_trainable_parameters(trainable, weight_decay):
    prompt = partial(ShallowPrompt, length=2) if trainable == "prompt+head" else None  # it trains prompt tokens
    model = create_vit(image_size=16, patch_size=4, in_channels=3, num_classes=4, embed_dim=32, depth=2,
                       num_heads=2, mlp_dim=64, trainable=trainable, prompt=prompt)
    optimizer = build_optimizer(model, name="adamw", weight_decay=weight_decay)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    if trainable == "head":
        assert in_optimizer == {id(model.head.weight), id(model.head.bias)}


# ---------------------------------------------------------------------------- the GPU experiment

def experiment_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={EXPERIMENT}", f"paths.root_dir={ROOT}",
                                          "paths.output_dir=/tmp/vitsweep-test-finetune", *overrides],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in a real run
        return cfg


def test_experiment_composes_as_a_vit_s16_finetune_at_224():
    cfg = experiment_config()
    assert cfg.model.pretrained.startswith("timm:vit_small_patch16_224")
    assert cfg.model.image_size == cfg.data.resize_to == 224 and cfg.data.image_size == 32
    assert list(cfg.data.mean) == list(cfg.data.std) == [0.5, 0.5, 0.5]  # the AugReg weights' normalization
    assert cfg.trainer.precision == "bf16" and cfg.trainer.compile == "auto"
    assert cfg.optimizer.name == "sgd" and 1e-4 <= cfg.optimizer.lr <= 3e-2
    assert cfg.loss.label_smoothing > 0 and cfg.data.batch_size == 128
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def test_experiment_model_builds_at_224_without_weights():
    cfg = experiment_config("model.pretrained=null")
    model = instantiate(cfg.model)
    assert model.grid_size == (14, 14) and model.num_classes == 10 and len(model.blocks) == 12
    assert model.embed_dim == 384 and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 10)


def test_resize_to_gives_224_px_batches_on_both_paths():
    cfg = experiment_config("model.pretrained=null")
    options = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in ("_target_", "source")}
    options.update(batch_size=4, eval_batch_size=6)
    source = load_synthetic(image_size=32, in_channels=3, num_classes=10, num_train=8, num_val=6, num_test=6)
    data = DataModule(source=source, **options)
    images, labels = next(iter(data.train_batches(epoch=0, seed=0)))
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32 and labels.shape == (4,)
    eval_images, _ = next(iter(data.eval_batches("val")))
    assert eval_images.shape == (6, 3, 224, 224)
    # an upsampled image keeps its content: each band's mean, and the pixel values at the stored pixels' centres
    stored = data.to_float(source.val.images)  # (6, 3, 32, 32)
    torch.testing.assert_close(eval_images.mean(dim=(2, 3)), stored.mean(dim=(2, 3)), atol=0.02, rtol=0)
    centres = eval_images[..., 3::7, 3::7]  # 224 / 32 = 7 px per stored pixel; pixel 3 of each run is its centre
    assert (centres - stored).abs().mean() < 0.05

    unresized = DataModule(source=source, **{**options, "resize_to": None})
    assert next(iter(unresized.eval_batches("val")))[0].shape == (6, 3, 32, 32)
    with pytest.raises(ValueError, match=r"data\.resize_to=0"):
        DataModule(source=source, **{**options, "resize_to": 0})
