"""Figures of a pretraining run (mode=pretrain): what the encoder learnt, without labels.

    MAE    figures/reconstructions.png: per image, the input, what the encoder saw (hidden patches blanked),
           the decoder's prediction of every patch, and the prediction pasted into the hidden patches only
    DINO   figures/attention_<i>_<name>.png: the teacher encoder's attention (each head of the last layer,
           and the rollout), which the paper shows finds objects without ever seeing a label
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure
from torch import nn

from vitsweep.pretrain.objective import fixed_randomness
from vitsweep.pretrain.patches import patchify, unpatchify
from vitsweep.viz.attention import eval_mode
from vitsweep.viz.figures import PANEL_INCHES, image_to_rgb, visualize_attention


@torch.no_grad()
def reconstructions(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """For model inputs (B, C, H, W), in the same space: the masked input, the prediction of every patch
    (un-normalized with each true patch's mean and std under norm_pix_loss), and the prediction pasted
    into the hidden patches; plus each image's loss (B,). `model`: MAE's MaskedAutoencoder (mae.py draws with
    this module, so the class is not imported here)."""
    with eval_mode(model), fixed_randomness(images.device):
        loss, predicted, hidden = model.reconstruct(images)  # (B,), (B, P, C * p * p), (B, P)
    patches = patchify(images, model.patch_size, model.stride)  # (B, P, C * p * p)
    if model.norm_pix_loss:  # back to pixels: the inverse of normalize_patches, with the true patch's statistics
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True, correction=0) + 1e-6).sqrt()
        predicted = predicted.float() * std + mean
    fold = lambda p: unpatchify(p, model.patch_size, model.stride, images.shape[-2:])
    hidden_pixels = fold(hidden[..., None].float().expand_as(patches)) > 0.5  # (B, C, H, W)
    prediction = fold(predicted)
    return {"masked": torch.where(hidden_pixels, torch.zeros_like(images), images), "prediction": prediction,
            "pasted": torch.where(hidden_pixels, prediction, images), "loss": loss}


def reconstruction_figure(model: nn.Module, images: torch.Tensor, names: Sequence[str], rgb_bands=None,
                          mean=None, std=None) -> Figure:
    """A row per image: input | visible patches | prediction | prediction in the hidden patches."""
    rows = reconstructions(model, images)
    columns = [("input", images), (f"visible ({1 - model.mask_ratio:.0%})", rows["masked"]),
               ("prediction", rows["prediction"]), ("hidden patches predicted", rows["pasted"])]
    fig = Figure(figsize=(PANEL_INCHES * len(columns), PANEL_INCHES * len(images) + 0.3), layout="constrained")
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    for row in range(len(images)):
        for col, (title, batch) in enumerate(columns):
            axes[row, col].imshow(image_to_rgb(batch[row], rgb_bands, mean, std), interpolation="nearest")
            label = f"{names[row]}: loss {rows['loss'][row]:.3f}" if col == 0 else title
            axes[row, col].set_title(label, fontsize=8)
            axes[row, col].axis("off")
    fig.suptitle(f"MAE: {model.mask_ratio:.0%} of the patches hidden", fontsize=10)
    return fig


def teacher_attention_figures(encoder, images: torch.Tensor, names: Sequence[str], rgb_bands=None, mean=None,
                              std=None) -> dict[str, Figure]:
    """{attention_<i>_<name>: the teacher encoder's attention on image i}."""
    return {f"attention_{i:02d}_{name}": visualize_attention(encoder, images[i], title=f"DINO teacher, {name}",
                                                             rgb_bands=rgb_bands, mean=mean, std=std)
            for i, name in enumerate(names)}
