"""The one build of every mode (train, eval, visualize, pretrain) and of `vitsweep.load`: the task, the
model and the data, from the config.

    task = build_task(cfg)                          # cfg.task, or mode=pretrain's method (cfg.pretrain)
    model = build_model(cfg, task)                  # the trunk with the task's heads, wrapped by the task
    data = build_data(cfg, task)                    # the loader asked for the task's targets
    built = build(cfg)                              # all three (Built), in the order that fails fastest

The model comes before the data when the task knows its head sizes from the config, so that a bad model
option fails in one line before any file is read; a model sized by the data (a multi-task head whose class
count is its column's, model/metadata's columns) waits for it. With a checkpoint (eval, visualize, resume)
the factory skips `model.pretrained` (every weight comes from the checkpoint) and the data normalizes with
the statistics the checkpoint's run used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vitsweep.data.datamodule import trained_normalization
from vitsweep.model.metadata import reads_metadata
from vitsweep.task.protocol import Task


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


def build_task(cfg: DictConfig) -> Task:
    """What the run learns: cfg.task; for mode=pretrain, the method of cfg.pretrain, which learns without
    labels but reads cfg.task's targets for its kNN monitor."""
    task = instantiate(cfg.task)
    if cfg.mode != "pretrain":
        return task
    if not cfg.get("pretrain"):
        raise ValueError("mode=pretrain needs a method: add pretrain=mae or pretrain=dino")
    method = instantiate(cfg.pretrain)
    method.label_readers = task.targets()
    return method


def build_model(cfg: DictConfig, task: Task, from_checkpoint: bool = False, **data_args) -> torch.nn.Module:
    """The trunk of cfg.model with the task's head(s), wrapped by the task (a pretraining method's module
    around the encoder). `from_checkpoint`: every weight will come from a checkpoint, so the factory does not
    load model.pretrained first (for timm:NAME that would be a download). `data_args`: what the model learns
    from the data (metadata_spec: model/metadata's columns)."""
    check_input_size(cfg)  # a mismatch would fail in the first forward pass, after the data is read
    args = {**task.model_args(), **data_args}
    trunk = instantiate(cfg.model, pretrained=None, **args) if from_checkpoint else instantiate(cfg.model, **args)
    model = task.wrap(trunk)
    check_forward(model, cfg)
    return model


def build_data(cfg: DictConfig, task: Task, **overrides):
    """The DataModule, its loader asked for the targets the task learns from (the task's readers)."""
    readers = task.targets()
    return instantiate(cfg.data, source={"targets": readers}, targets=readers, **overrides)


@dataclass
class Built:
    task: Task
    model: torch.nn.Module  # what the loop trains: the ViT with its heads, or a pretraining method's module
    data: object  # the DataModule (vitsweep/data/datamodule.py)

    @property
    def backbone(self) -> torch.nn.Module:
        """The ViT inside `model` (a pretraining method's `encoder`): what the figures and summaries read."""
        return getattr(self.model, "encoder", self.model)


def build(cfg: DictConfig, checkpoint: dict | None = None, data: bool = True) -> Built:
    """Task, model and data, in the order that fails fastest (module docstring). `checkpoint`: a checkpoint
    whose weights the model will take (its normalization, when computed, is the data's too). `data=False`:
    no data is read (the model must not be sized by it)."""
    task = build_task(cfg)
    metadata = reads_metadata(cfg.model)
    from_checkpoint = checkpoint is not None
    model = build_model(cfg, task, from_checkpoint) if task.heads_known() and not metadata else None
    if not data:
        if model is None:
            raise ValueError("this model is sized by its data (model/metadata columns, or a multi-task head's "
                             "classes): build it with its data (vitsweep.load(path, data=True))")
        return Built(task, model, None)
    datamodule = build_data(cfg, task, **(trained_normalization(checkpoint) if from_checkpoint else {}))
    if model is None:
        task.count_classes(datamodule)
        model = build_model(cfg, task, from_checkpoint,
                            **({"metadata_spec": datamodule.metadata_spec()} if metadata else {}))
    return Built(task, model, datamodule)


def load(ckpt_path: str | Path, data: bool = False, device: str | torch.device = "cpu"):
    """The trained model of a checkpoint written by run.py, rebuilt from the config it stores (as
    Lightning's `load_from_checkpoint`), in eval mode:

        model = vitsweep.load("outputs/runs/.../checkpoints/best.pt")
        model, data = vitsweep.load(path, data=True)       # and its DataModule (data.normalize, data.mean/std)

    With `data=True` the data module is built too (reading the data the run used, from the stored config:
    paths relative to where the run started may need the same working directory) and the task fitted to it
    (regression's target statistics come from the checkpoint). Returns the model, or (model, data)."""
    from vitsweep.trainer.checkpoint import load_checkpoint, restore

    checkpoint = load_checkpoint(ckpt_path)
    stored = checkpoint.get("config")
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise ValueError(f"ckpt_path={ckpt_path} stores no config (not written by run.py): build the model "  # noqa: TRY004
                         f"yourself and load its 'model' state dict")
    cfg = OmegaConf.create(stored)
    built = build(cfg, checkpoint=checkpoint, data=data)
    restore(built.model, ckpt_path, checkpoint=checkpoint)
    built.model.to(device).eval()
    if not data:
        return built.model
    built.task.setup(built.data, built.model)
    if checkpoint.get("task"):
        built.task.load_state_dict(checkpoint["task"])
    return built.model, built.data.to(torch.device(device))
