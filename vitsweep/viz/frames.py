"""Attention over frames: what a model of image time series (model/temporal) or of metadata
(model/metadata) looks at, for a few samples.

For each sample, a row: every frame with the cls attention of one spatial layer (mean of heads) over it,
titled with the frame's weight, then a bar chart of the weights over frames: how much the sample's vector
draws on each frame. The weights come from the temporal component (vitsweep.model.temporal.frame_weights):
factorised, the temporal cls token's attention in the last temporal block; divided, the last block's
attention across frames averaged over tokens, heads and query frames; none, the uniform mean.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from vitsweep.data.inputs import Inputs
from vitsweep.model.attention import record_attention
from vitsweep.viz.attention import eval_mode, patch_attention_maps
from vitsweep.viz.figures import PANEL_INCHES, draw_overlay, image_to_rgb


@torch.no_grad()
def frame_attention(model, batch, layer: int = -1):
    """For a batch (frames (B, T, C, H, W), images, or Inputs): the model's outputs, each frame's spatial
    attention map of `layer` (mean of heads) (B, T, gh, gw), and the weights over frames (B, T)."""
    with eval_mode(model), record_attention(model.blocks) as spatial, record_attention(model.temporal) as temporal:
        outputs = model(batch)
        _, clip = model.read_inputs(batch)
    maps = patch_attention_maps([spatial[layer % len(spatial)]], model.num_prefix_tokens, model.grid_size)
    maps = clip.by_sample(maps[:, 0].mean(dim=1))  # (B * T, nh, gh, gw) -> (B, T, gh, gw)
    weights = model.temporal.frame_weights(temporal, clip, maps.shape[0])
    k = model.temporal.tubelet_size  # a tubelet's map and weight stand for each of its frames
    if k > 1:
        images = batch.images if isinstance(batch, Inputs) else batch
        frames = images.shape[1] if images.dim() == 5 else 1
        maps = maps.repeat_interleave(k, dim=1)[:, :frames]
        weights = weights.repeat_interleave(k, dim=1)[:, :frames]
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return outputs, maps, weights.to(maps.device)


def frames_figure(batch, maps: torch.Tensor, weights: torch.Tensor, titles: Sequence[str], rgb_bands=None,
                  mean=None, std=None) -> Figure:
    """A row per sample: each frame with its attention map and weight (and date, when known), then the
    weights as bars. `batch` holds the normalized model inputs that `frame_attention` read."""
    inputs = batch if isinstance(batch, Inputs) else Inputs(batch)
    frames = inputs.images if inputs.images.dim() == 5 else inputs.images[:, None]  # (B, T, C, H, W)
    B, T = frames.shape[:2]
    fig = Figure(figsize=(PANEL_INCHES * (T + 1), PANEL_INCHES * B + 0.3), layout="constrained")
    axes = fig.subplots(B, T + 1, squeeze=False)
    for row in range(B):
        for t in range(T):
            label = f"t{t} w={weights[row, t]:.2f}"
            if inputs.dates is not None and not torch.isnan(inputs.dates[row, t]):
                label += f" {datetime.date(1970, 1, 1) + datetime.timedelta(days=int(inputs.dates[row, t]))}"
            rgb = image_to_rgb(frames[row, t], rgb_bands, mean, std)
            draw_overlay(axes[row, t], rgb, maps[row, t].cpu(), label)
        bars = axes[row, T]
        bars.bar(np.arange(T), weights[row].cpu().numpy())
        bars.set_ylim(0, 1)
        bars.set_xticks(np.arange(T))
        bars.set_title(titles[row], fontsize=8)
    return fig
