"""The one build of every mode: the task, the model and the data, from the config.

    task = build_task(cfg)
    model = build_model(cfg, task)                  # the task's heads on the configured trunk
    data = build_data(cfg, task)                    # the loader asked for the task's targets
    task, model, data = build(cfg)                  # all three, in the order that fails fastest

The model comes before the data when the task knows its head sizes from the config, so that a bad model
option fails in one line before any file is read; a model sized by the data (a multi-task head whose class
count is its column's, model/metadata's columns) waits for it.
"""

from __future__ import annotations

import copy

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitsweep.model.metadata import reads_metadata


def as_pair(side) -> tuple:
    return tuple(side) if OmegaConf.is_list(side) or isinstance(side, (list, tuple)) else (side, side)


def check_input_size(cfg: DictConfig) -> None:
    """The side the data serves (the crop, then data.resize_to) is the side the model is built for."""
    served = OmegaConf.select(cfg, "data.resize_to") or OmegaConf.select(cfg, "data.crop_size")
    expected = OmegaConf.select(cfg, "model.image_size")
    if served is not None and expected is not None and as_pair(served) != as_pair(expected):
        raise ValueError(f"the data serves {served} px images (data.crop_size, then data.resize_to) but "
                         f"model.image_size={expected}: set model.image_size={served}")


def check_forward(model: torch.nn.Module, cfg: DictConfig) -> None:
    """One training-mode forward pass of a copy of the model on two blank images of the configured shape:
    values its constructors accept but its forward rejects (model.dropout=2, model.norm.eps=bogus) fail
    here, in one line, before any data is read. The copy and a forked RNG leave the run as it was. A model
    that reads metadata columns is built after the data (model_and_data) and checked by its first step."""
    if reads_metadata(cfg.model):
        return
    device = next(model.parameters()).device  # meta in tests that build every config: shapes only
    images = torch.zeros(2, cfg.model.in_channels, *as_pair(cfg.model.image_size), device=device)  # (B, C, H, W)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            copy.deepcopy(model).to(device).train()(images)
    except Exception as err:  # noqa: BLE001 -- whatever the forward raised, the model's values caused it
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"model: the configured model cannot run a forward pass ({type(err).__name__}: {reason}): "
                         f"check the model.* values for a wrong type or range") from None


def build_model(cfg: DictConfig, task, from_checkpoint: bool = False, **data_args) -> torch.nn.Module:
    """The model of cfg.model with the task's head(s). `from_checkpoint`: every weight will come from
    ckpt_path, so the factory does not load model.pretrained first (for timm:NAME that would be a download).
    `data_args`: what the model learns from the data (metadata_spec: model/metadata's columns)."""
    check_input_size(cfg)  # a mismatch would fail in the first forward pass, after the data is read
    args = {**task.model_args(), **data_args}
    model = instantiate(cfg.model, pretrained=None, **args) if from_checkpoint else instantiate(cfg.model, **args)
    check_forward(model, cfg)
    return model


def build_data(cfg: DictConfig, task, **overrides):
    """The DataModule, its loader asked for the targets the task learns from."""
    return instantiate(cfg.data, source={"targets": task.data_targets()}, **overrides)


def model_and_data(cfg: DictConfig, task, from_checkpoint: bool = False, data_overrides: dict | None = None):
    """Model and data, in that order when the task knows its head sizes from the config (a bad model
    option then fails before any file is read), else the data first (a multi-task head whose class
    count is its column's; model/metadata, whose encoder is sized by the data's metadata columns)."""
    metadata = reads_metadata(cfg.model)
    model = build_model(cfg, task, from_checkpoint) if task.heads_known() and not metadata else None
    data = build_data(cfg, task, **(data_overrides or {}))
    if model is None:
        task.count_classes(data)
        model = build_model(cfg, task, from_checkpoint, **({"metadata_spec": data.metadata_spec()} if metadata else {}))
    return model, data
