"""Hierarchical attention: the Swin Transformer (Liu et al., 2021), timm's `SwinTransformer`.

Stages of shifted-window attention with patch merging between them (each stage halves the grid and
doubles the width), so attention stays local and the model sees coarser grids deeper in. timm's
implementation is used as it is (library before hand-written code); this module adds what the
harness reads from a model (`grid_size`, `summary()`, `last_block_name()`), the `_target_` of
conf/model/swin.yaml (`create_swin`: build, then load weights, then freeze, as `create_vit`), and
the weight loading: timm:NAME, a timm .pth/.safetensors, or a run's checkpoint, fitted to this
model with timm's own filter (relative position bias tables resized to the window size, patch
kernel resampled) plus the band adaptation and head re-initialisation of `pretrained.py`.

Any image size works (timm pads a grid that the window or the merging does not divide); a window
larger than a stage's grid shrinks to the grid. For 32 px inputs, patch 2 and window 4 give stages
of 16x16 (4x4 windows), 8x8 (2x2 windows) and 4x4 (one window).

Swin has no flat token sequence and no cls token: attention rollout, Grad-CAM on the patch grid and
the per-head attention figures of `vitsweep.viz` are refused for it, and token pruning, weight
sharing and prompts are ViT options (conf/model/swin.yaml has no such groups).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from timm.models import swin_transformer as timm_swin

from vitsweep.model.pretrained import (
    TIMM_PREFIX,
    LoadReport,
    PretrainedLoadError,
    _preview,
    _read_weights_file,
    _timm_hub_state_dict,
    _unwrap,
    adapt_input_channels,
    freeze,
)

log = logging.getLogger(__name__)


class SwinTransformer(timm_swin.SwinTransformer):
    """timm's Swin with vitsweep's argument names. Builds modules only, reads no file."""

    keeps_token_grid = False  # patch merging: no flat sequence of patch tokens through the layers

    def __init__(self, image_size=224, patch_size: int = 4, in_channels: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, dropout: float = 0.0, attention_dropout: float = 0.0,
                 drop_path: float = 0.1, qkv_bias: bool = True):
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"model.depths={list(depths)} and model.num_heads={list(num_heads)} need one entry per "
                             f"stage each")
        for stage, heads in enumerate(num_heads):
            width = embed_dim * 2**stage
            if width % heads:
                raise ValueError(f"model.num_heads[{stage}]={heads} does not divide stage {stage}'s width {width} "
                                 f"(model.embed_dim={embed_dim} x 2^{stage})")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if min(size) < patch_size:
            raise ValueError(f"model.patch_size={patch_size} is larger than the image {size}")
        super().__init__(img_size=size, patch_size=patch_size, in_chans=in_channels, num_classes=num_classes,
                         embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=dropout, proj_drop_rate=dropout,
                         attn_drop_rate=attention_dropout, drop_path_rate=drop_path)
        self.grid_size = tuple(self.patch_embed.grid_size)  # the patch grid of the first stage
        self.depth = sum(depths)
        self.in_channels = in_channels

    def last_block_name(self) -> str:
        return f"layers.{len(self.layers) - 1}.blocks.{len(self.layers[-1].blocks) - 1}"

    def summary(self) -> str:
        num_params = sum(p.numel() for p in self.parameters())
        stages = " -> ".join(f"{block.input_resolution[0]}x{block.input_resolution[1]} (window "
                             f"{block.window_size[0]}, {len(stage.blocks)} blocks, {stage.blocks[0].attn.num_heads} heads)"
                             for stage in self.layers for block in stage.blocks[:1])
        return (f"SwinTransformer: {num_params / 1e6:.2f}M parameters | patch {self.patch_embed.patch_size[0]} | "
                f"embed_dim {self.embed_dim} | stages {stages}")


def create_swin(pretrained: str | None = None, trainable: str = "all", **architecture) -> SwinTransformer:
    """A `SwinTransformer(**architecture)`, its weights loaded from `pretrained` (timm:NAME, a timm
    .pth/.safetensors, or a run's best.pt) and only the `trainable` parameters left trainable."""
    task_heads = [key for key in ("head", "aux_heads") if architecture.get(key)]
    if task_heads:  # timm's Swin has its own pooled linear head, and no flat token sequence for a decoder
        raise ValueError(f"model=swin has one linear head on the pooled features, but the task adds "
                         f"{' and '.join(task_heads)} (segmentation, multi-task or task.aux_heads): use a ViT "
                         f"(model=vit, vit_cpu, ...) for this task, or task=classification|regression without aux heads")
    architecture = {key: value for key, value in architecture.items() if key not in ("head", "aux_heads")}
    model = SwinTransformer(**architecture)
    model.load_report = load_swin_weights(model, pretrained) if pretrained else None
    freeze(model, trainable)
    return model


def load_swin_weights(model: SwinTransformer, source: str) -> LoadReport:
    """Load Swin weights from `source` into `model`, fitted to its window size, bands and classes."""
    report = LoadReport(source)
    if source.startswith(TIMM_PREFIX):
        state_dict = _timm_hub_state_dict(source[len(TIMM_PREFIX):])
    else:
        state_dict, _ = _read_weights_file(source)  # a run's checkpoint and timm's files share the names
    state_dict = _unwrap(state_dict)
    if not any(key.startswith("layers.") for key in state_dict):
        raise PretrainedLoadError(f"model.pretrained={source} holds no Swin weights (no layers.* keys): pass a timm "
                                  f"Swin (timm:swin_tiny_patch4_window7_224) or a model=swin checkpoint")
    target = model.state_dict()
    shapes_before = {k: tuple(v.shape) for k, v in state_dict.items()}
    try:
        # timm's filter: drops buffers, resizes relative position bias tables and the patch kernel
        state_dict = timm_swin.checkpoint_filter_fn(state_dict, model)
    except (AttributeError, RuntimeError) as err:  # a stage or block the model does not have
        raise PretrainedLoadError(f"model.pretrained={source} does not fit model=swin ({err}): match model.depths, "
                                  f"num_heads and embed_dim to the checkpoint") from None
    report.resampled += [f"{k} {shapes_before[k]} -> {tuple(v.shape)}" for k, v in state_dict.items()
                         if k in shapes_before and tuple(v.shape) != shapes_before[k]]
    kernel = state_dict.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape[1] != target["patch_embed.proj.weight"].shape[1]:
        state_dict["patch_embed.proj.weight"] = adapt_input_channels(kernel, target["patch_embed.proj.weight"].shape[1])
        report.adapted_channels.append(f"patch_embed.proj.weight {kernel.shape[1]} -> {state_dict['patch_embed.proj.weight'].shape[1]} bands")
    for key in ("head.fc.weight", "head.fc.bias"):
        if key in state_dict and state_dict[key].shape != target[key].shape:
            report.reinitialized.append(f"{key} ({state_dict.pop(key).shape[0]} -> {target[key].shape[0]} classes)")
        elif key not in state_dict:
            report.reinitialized.append(f"{key} (checkpoint has no head)")
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in state_dict.items()
                  if k in target and v.shape != target[k].shape]
    unexpected = [k for k in state_dict if k not in target]
    missing = [k for k in target if k not in state_dict and not k.startswith("head.fc.")]
    if mismatched or unexpected or missing:
        problems = [f"{label}: {_preview(keys)}" for label, keys in
                    (("shape mismatch", mismatched), ("not in model", unexpected), ("missing", missing)) if keys]
        raise PretrainedLoadError(f"pretrained {source} does not fit model=swin ({' | '.join(problems)}): match "
                                  f"model.embed_dim, depths and num_heads to the checkpoint")
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)  # the head, when re-initialised, keeps its init
    changed = {entry.split(" ")[0] for entry in report.resampled + report.adapted_channels}
    report.loaded += [k for k in state_dict if k not in changed]
    log.info("%s", report)
    return report
