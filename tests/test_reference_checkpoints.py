"""Checkpoints written by main at 5462088, before the trunk was reshaped (tests/reference/checkpoints/, with
written_by.json: the overrides of the runs that wrote them and what they scored), load into the models built
by today's code under every state-dict name as they were, and score what they scored then: the train run's
best.pt its test loss, the MAE run's best.pt its validation loss; the MAE encoder (`encoder.*`) loads as
`model.pretrained` of a fine-tuning model."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vitsweep.model import create_vit

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "tests" / "reference" / "checkpoints"
WRITTEN_BY = json.loads((CHECKPOINTS / "written_by.json").read_text())


@cache
def run_config(name: str):
    """The config of the run that wrote checkpoint `name`, composed from today's conf/ with its overrides."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={ROOT}", *WRITTEN_BY[name]["overrides"]])


def split_inputs(cfg, split: str):
    """A split of the run's data=synthetic as the model saw it (floats, normalized), and its labels."""
    data = instantiate(cfg.data)
    images, labels = data.split(split).images, data.split(split).labels
    return data.normalize(data.to_float(images)), labels


def checkpoint(name: str) -> dict:
    return torch.load(CHECKPOINTS / name, weights_only=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # the runs of 5462088 scored with the summation order they had


def test_the_train_checkpoint_loads_by_name_and_scores_its_test_loss():
    cfg = run_config("train_best.pt")
    saved = checkpoint("train_best.pt")
    model = instantiate(OmegaConf.create(saved["config"]["model"]), **instantiate(cfg.task).model_args())
    model.load_state_dict(saved["model"], strict=True)  # every name of 5462088's state dict, none missing
    images, labels = split_inputs(cfg, "test")
    with torch.no_grad():
        logits = model.eval()(images)  # (16, 4)
    written = WRITTEN_BY["train_best.pt"]
    assert F.cross_entropy(logits, labels).item() == pytest.approx(written["test/loss"], abs=1e-5)  # 1.3753
    assert (logits.argmax(dim=1) == labels).float().mean().item() == written["test/acc"]


def test_the_mae_checkpoint_loads_by_name_and_scores_its_val_loss():
    cfg = run_config("mae_best.pt")
    saved = checkpoint("mae_best.pt")
    encoder = instantiate(OmegaConf.create(saved["config"]["model"]), num_classes=0)
    model = instantiate(cfg.pretrain).wrap(encoder)
    model.load_state_dict(saved["model"], strict=True)  # encoder.*, decoder_*, mask_token as they were
    images, _ = split_inputs(cfg, "val")
    with torch.no_grad():
        loss = model.eval()(images)["loss"].mean().item()  # the evaluation's fixed masks
    assert loss == pytest.approx(WRITTEN_BY["mae_best.pt"]["metrics"]["val/loss"], abs=1e-5)


@pytest.mark.parametrize("name", ["train_best.pt", "mae_best.pt"])
def test_vitsweep_load_rebuilds_both_from_their_stored_config(name):
    """vitsweep.load builds the model from the config 5462088 stored, through today's build, and loads it whole."""
    import vitsweep

    model = vitsweep.load(CHECKPOINTS / name)
    saved = checkpoint(name)["model"]
    assert not model.training and model.state_dict().keys() == saved.keys()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_the_mae_encoder_loads_as_model_pretrained():
    saved = checkpoint("mae_best.pt")
    shape = {key: saved["config"]["model"][key] for key in ("image_size", "in_channels", "patch_size", "embed_dim",
                                                             "depth", "num_heads", "mlp_dim")}
    model = create_vit(**shape, num_classes=4, pretrained=str(CHECKPOINTS / "mae_best.pt"))
    encoder = {key[len("encoder."):]: value for key, value in saved["model"].items() if key.startswith("encoder.")}
    report = model.load_report
    assert sorted(report.loaded) == sorted(encoder) and not report.dropped and not report.resampled
    assert [entry.split(" ")[0] for entry in report.reinitialized] == ["head.weight", "head.bias"]
    for name, tensor in encoder.items():
        assert torch.equal(model.state_dict()[name], tensor), name
