"""Matplotlib figures: attention maps and attributions laid over the input image, and the confusion
matrix of a split.

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: no GUI backend, no global
figure registry to leak from, safe in headless training jobs. `wandb.Image(fig)` logs them as they
are; `save_figure` writes a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from vitsweep.data.splits import IGNORE_INDEX
from vitsweep.viz.attention import (
    attention_rollout,
    collect_attentions,
    patch_attention_maps,
    rollout_patch_map,
)
from vitsweep.viz.explain import explain

PANEL_INCHES = 2.2


def panel_grid(nrows: int, ncols: int, title_inches: float = 0.0):
    """A Figure of nrows x ncols square panels of PANEL_INCHES, with fixed margins in inches (room for
    each panel's title, and `title_inches` above for a suptitle). Fixed, not layout="constrained": the
    panels are all alike, and the solver's passes made each attention figure cost ~1.25x as much
    (4.4-5.6 s vs 3.8-4.0 s, interleaved, on the shared 2-core machine with 1 thread)."""
    panel_title, gap = 0.3, 0.1  # inches
    width = ncols * (PANEL_INCHES + gap) + gap
    height = nrows * (PANEL_INCHES + panel_title) + title_inches + gap
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={
        "left": gap / width, "right": 1 - gap / width, "bottom": gap / height,
        "top": 1 - (title_inches + panel_title) / height,
        "wspace": gap / PANEL_INCHES, "hspace": panel_title / PANEL_INCHES})
    return fig, axes


def image_to_rgb(image: torch.Tensor, rgb_bands: Sequence[int] | None = None,
                 mean: Sequence[float] | float | None = None,
                 std: Sequence[float] | float | None = None) -> np.ndarray:
    """A displayable (H, W, 3) float array in [0, 1] from an image tensor (C, H, W).

    `mean`/`std` undo the dataset normalization. `rgb_bands` picks the three bands shown as R, G, B
    (default: the first three; a 1- or 2-band image shows band 0 in grey). Values already within
    [0, 1] are shown as they are; otherwise each shown band is min-max stretched on its own, the only
    view that works without knowing a sensor's range (multispectral reflectances, normalized data).
    """
    image = image.detach().float().cpu()
    if image.dim() != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {tuple(image.shape)}")
    channels = image.shape[0]
    if mean is not None and std is not None:
        mean_t = torch.as_tensor(mean, dtype=torch.float).reshape(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float).reshape(-1, 1, 1)
        image = image * std_t + mean_t
    if rgb_bands is None:
        rgb_bands = (0, 1, 2) if channels >= 3 else (0, 0, 0)
    rgb_bands = tuple(int(b) for b in rgb_bands)
    if len(rgb_bands) == 1:
        rgb_bands = rgb_bands * 3
    if len(rgb_bands) != 3 or not all(0 <= b < channels for b in rgb_bands):
        raise ValueError(f"viz.rgb_bands={list(rgb_bands)} must be 3 band indices in 0..{channels - 1}")
    rgb = image[list(rgb_bands)]  # (3, H, W)
    if rgb.min() < 0 or rgb.max() > 1:
        low = rgb.amin(dim=(1, 2), keepdim=True)
        high = rgb.amax(dim=(1, 2), keepdim=True)
        rgb = (rgb - low) / (high - low).clamp_min(1e-12)
    return rgb.permute(1, 2, 0).clamp(0, 1).numpy()  # (H, W, 3)


def upsample(heatmap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map (patch grid or pixels) resized bilinearly to `size` (H, W)."""
    heatmap = heatmap.detach().float().cpu()
    if tuple(heatmap.shape) != tuple(size):
        heatmap = F.interpolate(heatmap[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return heatmap.numpy()


def draw_overlay(ax, rgb: np.ndarray, heatmap: torch.Tensor | None, title: str = "", alpha: float = 0.55):
    """The image with `heatmap` (upsampled to it) on top. A map with negative values (signed
    attributions) gets a diverging colormap centred on 0; a non-negative one a sequential map,
    stretched to its own range so weak heads stay readable."""
    ax.imshow(rgb, interpolation="nearest")
    if heatmap is not None:
        values = upsample(heatmap, rgb.shape[:2])
        if values.min() < 0:
            bound = max(float(np.abs(values).max()), 1e-12)
            ax.imshow(values, cmap="bwr", vmin=-bound, vmax=bound, alpha=alpha)
        else:
            ax.imshow(values, cmap="inferno", vmin=float(values.min()), vmax=float(values.max()) + 1e-12, alpha=alpha)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def prediction_title(logits: torch.Tensor, label: int | None = None,
                     class_names: Sequence[str] | None = None) -> str:
    """'pred: cat (0.91) | true: dog' from one image's logits (num_classes,)."""
    probs = logits.detach().float().softmax(dim=-1)
    pred = int(probs.argmax())

    def name(i: int) -> str:
        return str(class_names[i]) if class_names is not None else str(i)

    title = f"pred: {name(pred)} ({probs[pred]:.2f})"
    if label is not None:
        title += f" | true: {name(int(label))}"
    return title


def attention_figure(image: torch.Tensor, head_maps: torch.Tensor, rollout_map: torch.Tensor, title: str = "",
                     layer_name: str = "", rgb_bands=None, mean=None, std=None) -> Figure:
    """One image (C, H, W), its rollout map (gh, gw), the mean over heads and every head (nh, gh, gw)
    of one layer, each overlaid on the image."""
    rgb = image_to_rgb(image, rgb_bands, mean, std)
    panels = [("input", None), ("rollout", rollout_map), (f"{layer_name} mean of heads", head_maps.mean(dim=0))]
    panels += [(f"{layer_name} head {h}", head_maps[h]) for h in range(head_maps.shape[0])]
    ncols = min(len(panels), 5)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = panel_grid(nrows, ncols, title_inches=0.35)
    axes = axes.ravel()
    for ax, (panel_title, heatmap) in zip(axes, panels):
        draw_overlay(ax, rgb, heatmap, panel_title)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / fig.get_figheight(), va="top")
    return fig


def visualize_attention(model, image_tensor: torch.Tensor, label: int | None = None,
                        class_names: Sequence[str] | None = None, layer: int = -1,
                        rgb_bands: Sequence[int] | None = None, mean=None, std=None,
                        title: str | None = None) -> Figure:
    """What the ViT attends to for one image (C, H, W): every head of `layer` and the rollout
    through all layers, over the image, with the predicted (and true) label in the title."""
    if image_tensor.dim() == 4:
        if image_tensor.shape[0] != 1:
            raise ValueError(f"visualize_attention takes one image (C, H, W), got a batch {tuple(image_tensor.shape)}")
        image_tensor = image_tensor[0]
    device = next(model.parameters()).device
    logits, attentions = collect_attentions(model, image_tensor[None].to(device))
    depth = len(attentions)
    layer_index = layer % depth
    has_cls = model.cls_token is not None
    head_maps = patch_attention_maps([attentions[layer_index]], model.num_prefix_tokens, model.grid_size, has_cls)
    rollout = rollout_patch_map(attention_rollout(attentions), model.num_prefix_tokens, model.grid_size, has_cls)
    title = title if title is not None else prediction_title(logits[0], label, class_names)
    return attention_figure(image_tensor, head_maps[0, 0], rollout[0], title=title,
                            layer_name=f"layer {layer_index + 1}/{depth}", rgb_bands=rgb_bands, mean=mean, std=std)


def heatmaps_figure(images: torch.Tensor, heatmaps: dict[str, torch.Tensor], titles: Sequence[str] | None = None,
                    rgb_bands=None, mean=None, std=None) -> Figure:
    """A row per image (B, C, H, W): the input, then one overlay per method in `heatmaps`
    (name -> (B, h, w), on the patch grid or in pixels). `titles` label the rows."""
    names = list(heatmaps)
    num_images = images.shape[0]
    ncols = 1 + len(names)
    fig, axes = panel_grid(num_images, ncols)
    for row in range(num_images):
        rgb = image_to_rgb(images[row], rgb_bands, mean, std)
        draw_overlay(axes[row, 0], rgb, None, titles[row] if titles is not None else "input")
        for col, name in enumerate(names, start=1):
            draw_overlay(axes[row, col], rgb, heatmaps[name][row], name)
    return fig


def explanation_figure(model, images: torch.Tensor, methods: Sequence[str] = ("saliency", "ig", "gradcam", "rollout"),
                       labels: torch.Tensor | Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                       targets: torch.Tensor | Sequence[int] | None = None, rgb_bands=None, mean=None,
                       std=None, titles: Sequence[str] | None = None) -> Figure:
    """Rows: images (B, C, H, W); columns: the input (titled with predicted and true label) and one
    patch-grid heatmap per method (vitsweep.viz.explain), explaining `targets` (default: the
    predicted class; for a regression model, the index of the output to explain). `titles` label the
    rows (default: predicted and true class)."""
    device = next(model.parameters()).device
    logits, _ = collect_attentions(model, images.to(device))
    if targets is None:
        targets = logits.argmax(dim=-1)
    heatmaps = explain(model, images, targets, list(methods))
    if titles is None:
        titles = [prediction_title(logits[i], None if labels is None else int(labels[i]), class_names)
                  for i in range(images.shape[0])]
    return heatmaps_figure(images.cpu(), heatmaps, titles, rgb_bands=rgb_bands, mean=mean, std=std)


def confusion_matrix_figure(logits: torch.Tensor, labels: torch.Tensor,
                            class_names: Sequence[str] | None = None) -> Figure:
    """The single-label confusion matrix of (N, K) logits against (N,) class indices: rows the true
    class, columns the predicted one (torchmetrics' matrix and its plot)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix
    from torchmetrics.utilities.plot import plot_confusion_matrix

    if labels.dim() != 1:
        raise ValueError("a confusion matrix needs one class per image; multi-hot labels have none")
    num_classes = logits.shape[1]
    confmat = multiclass_confusion_matrix(logits.float(), labels, num_classes=num_classes)  # (K, K)
    side = max(4.0, 0.5 * num_classes + 2)
    fig = Figure(figsize=(side, side), layout="constrained")
    plot_confusion_matrix(confmat.cpu(), ax=fig.subplots(), labels=list(class_names) if class_names else None)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` as a PNG at `path` (parent folders made), then free its artists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    fig.clear()  # a pyplot-free Figure has no window to close; clearing releases its memory
    return path


def regression_scatter(predictions: torch.Tensor, targets: torch.Tensor, names: Sequence[str]) -> Figure:
    """One panel per target: predicted (y) against true (x) values, with the identity line and R²."""
    fig = Figure(figsize=(3.2 * len(names), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for j, (ax, name) in enumerate(zip(axes, names)):
        true, pred = targets[:, j].float().cpu(), predictions[:, j].float().cpu()
        valid = ~true.isnan()
        true, pred = true[valid].numpy(), pred[valid].numpy()
        ax.scatter(true, pred, s=6, alpha=0.5)
        if len(true):
            low, high = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
            ax.plot([low, high], [low, high], color="black", linewidth=0.8)
            residual = ((pred - true) ** 2).sum()
            total = ((true - true.mean()) ** 2).sum()
            ax.set_title(f"{name}: R² {1 - residual / max(total, 1e-12):.3f} (n={len(true)})", fontsize=9)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
    return fig


def mask_to_rgb(mask: torch.Tensor, num_classes: int) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) colours from the tab20 palette; ignored pixels grey."""
    from matplotlib import colormaps

    palette = colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    mask = mask.cpu().long().numpy()
    rgb = palette[np.clip(mask, 0, None) % 20]
    rgb[mask == IGNORE_INDEX] = 0.5
    return rgb


def segmentation_figure(images: torch.Tensor, true_masks: torch.Tensor | None, predicted: torch.Tensor,
                        num_classes: int, titles: Sequence[str], rgb_bands=None, mean=None, std=None) -> Figure:
    """A row per image: the image, the true mask (when known) and the predicted mask over the image."""
    columns = 3 if true_masks is not None else 2
    fig = Figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * len(images) + 0.2), layout="constrained")
    axes = fig.subplots(len(images), columns, squeeze=False)
    for row in range(len(images)):
        rgb = image_to_rgb(images[row], rgb_bands, mean, std)
        panels = [(rgb, titles[row])]
        if true_masks is not None:
            panels.append((0.25 * rgb + 0.75 * resize_nearest(mask_to_rgb(true_masks[row], num_classes), rgb), "true"))
        panels.append((0.25 * rgb + 0.75 * resize_nearest(mask_to_rgb(predicted[row], num_classes), rgb), "predicted"))
        for ax, (picture, title) in zip(axes[row], panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return fig


def resize_nearest(picture: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A (h, w, 3) picture (a patch-level mask) blown up to `like`'s (H, W) by repetition."""
    if picture.shape[:2] == like.shape[:2]:
        return picture
    rows = np.arange(like.shape[0]) * picture.shape[0] // like.shape[0]
    cols = np.arange(like.shape[1]) * picture.shape[1] // like.shape[1]
    return picture[rows][:, cols]
