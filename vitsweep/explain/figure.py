"""One figure for a batch: each image, then one token heatmap per explanation method."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from vitsweep.explain.methods import explain
from vitsweep.viz.attention import collect_attentions
from vitsweep.viz.figures import heatmaps_figure, prediction_title


def explanation_figure(model, images: torch.Tensor, methods: Sequence[str] = ("saliency", "ig", "gradcam", "rollout"),
                       labels: torch.Tensor | Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                       targets: torch.Tensor | Sequence[int] | None = None, rgb_bands=None, mean=None,
                       std=None) -> Figure:
    """Rows: images (B, C, H, W); columns: the input (titled with predicted and true label) and one
    patch-grid heatmap per method, explaining `targets` (default: the predicted class)."""
    device = next(model.parameters()).device
    logits, _ = collect_attentions(model, images.to(device))
    if targets is None:
        targets = logits.argmax(dim=-1)
    heatmaps = explain(model, images, targets, list(methods))
    titles = [prediction_title(logits[i], None if labels is None else int(labels[i]), class_names)
              for i in range(images.shape[0])]
    return heatmaps_figure(images.cpu(), heatmaps, titles, rgb_bands=rgb_bands, mean=mean, std=std)
