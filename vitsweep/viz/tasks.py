"""Figures that depend on what the run learns (vitsweep.task):

    classification   the confusion matrix of a split (single-label)
    regression       predicted against true values of a split, one panel per target, in original units
    segmentation     each image with its true and predicted mask
    multi_task       the figures of each head, prefixed with its name
and the one-line titles of the per-image figures (prediction and truth, per task).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from vitsweep.data.splits import IGNORE_INDEX
from vitsweep.viz.figures import PANEL_INCHES, confusion_matrix_figure, image_to_rgb, prediction_title


def split_figures(task, evaluator, data) -> dict[str, Figure]:
    """{name: figure} of a scored split, from the task's evaluator (what it accumulated)."""
    if task.kind == "multi_task":
        figures = {}
        for name, head_evaluator in evaluator.evaluators.items():
            objective = task.objectives[name]
            names = data.class_names.get(name, []) if isinstance(data.class_names, dict) else []
            figures.update({f"{name}_{key}": fig for key, fig in objective_figures(objective, head_evaluator, names).items()})
        return figures
    names = data.class_names if isinstance(data.class_names, list) else []
    return objective_figures(task, evaluator.evaluator, names)


def objective_figures(objective, evaluator, class_names) -> dict[str, Figure]:
    if objective.kind == "classification":
        labels = torch.cat(evaluator.labels)
        if labels.dim() != 1:
            return {}  # multi-label: no confusion matrix
        logits, valid = torch.cat(evaluator.logits), labels >= 0
        return {"confusion_matrix": confusion_matrix_figure(logits[valid], labels[valid], class_names)}
    if objective.kind == "regression":
        predictions = objective.predict(torch.cat(evaluator.outputs))
        return {"regression_scatter": regression_scatter(predictions, torch.cat(evaluator.targets), objective.names)}
    return {}


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


def sample_title(task, output, target, class_names) -> str:
    """One image's prediction and truth in a line, for the task that produced `output`."""
    if task.kind == "classification":
        label = None if target is None or target.dim() != 0 else int(target)
        return prediction_title(output, label, class_names if isinstance(class_names, list) else None)
    if task.kind == "regression":
        pred = task.predict(output[None])[0]
        text = "pred " + ", ".join(f"{v:.3g}" for v in pred.tolist())
        if target is not None:
            text += " | true " + ", ".join(f"{v:.3g}" for v in target.float().view(-1).tolist())
        return text
    if task.kind == "segmentation":
        if target is None:
            return ""
        labels = task.labels_at_output(target[None])[0]
        labelled = labels != IGNORE_INDEX
        right = (output.argmax(dim=0) == labels) & labelled
        return f"pixel acc {right.sum().item() / max(labelled.sum().item(), 1):.2f}"
    parts = []
    for name, objective in task.objectives.items():
        head_target = None if target is None else target[name]
        parts.append(f"{name}: {sample_title(objective, output[name], head_target, None)}")
    return " | ".join(parts)
