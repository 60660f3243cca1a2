"""task=segmentation: a class per pixel (`data.label_granularity=pixel`) or per patch token (`patch`).

The data gives masks (N, H, W): a class index per pixel, IGNORE_INDEX (255) where there is no label.
- pixel: a decoder from the patch tokens back to pixels (`task.decoder`: linear = SETR-Naive, pup =
  SETR's progressive upsampling), logits (B, K, H, W).
- patch: one label per patch token, logits (B, K, gh, gw); each patch's label is the majority class of
  its pixels (ignored pixels left out; a patch with no labelled pixel is ignored), taken after
  augmentation so labels and patches stay aligned.
Loss: cross entropy over labelled pixels (patches), optional class weights. Metrics: mIoU (the mean
IoU over the classes present in the target or the prediction), IoU per class (`iou/<class>`), pixel
accuracy, from one confusion matrix accumulated over the split (torchmetrics). Its figures of a few images:
each with its true and predicted mask; its title: the image's pixel accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_confusion_matrix

from vitsweep.data.splits import IGNORE_INDEX
from vitsweep.data.targets import Masks
from vitsweep.task.heads import PatchHead, SegmentationDecoder
from vitsweep.task.masks import MaskLabels, mask_cross_entropy
from vitsweep.task.objective import Objective
from vitsweep.task.protocol import Evaluator
from vitsweep.viz.figures import segmentation_figure

GRANULARITIES = ("pixel", "patch")


class SegmentationEvaluator(Evaluator):
    def __init__(self, objective: Segmentation):
        self.objective = objective
        self.confusion = None
        self.loss_sum, self.count = 0.0, 0

    def update(self, outputs, targets) -> None:
        labels = self.objective.labels_at_output(targets)
        weights = self.objective.class_weights_on(outputs.device)
        self.loss_sum += mask_cross_entropy(outputs, labels, weights, reduction="sum").item()
        self.count += int((labels != IGNORE_INDEX).sum())
        confusion = multiclass_confusion_matrix(outputs.argmax(dim=1), labels, self.objective.num_classes,
                                                ignore_index=IGNORE_INDEX)
        self.confusion = confusion if self.confusion is None else self.confusion + confusion

    def compute(self, prefix: str) -> dict[str, float]:
        if self.confusion is None or self.count == 0:
            return {}
        confusion = self.confusion.double()  # rows: true class, columns: predicted
        true_positive = confusion.diag()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
        iou = true_positive / union.clamp_min(1)
        present = union > 0
        out = {f"{prefix}/loss": self.loss_sum / self.count,
               f"{prefix}/miou": iou[present].mean().item(),
               f"{prefix}/pixel_acc": (true_positive.sum() / confusion.sum()).item()}
        names = self.objective.class_names or [str(k) for k in range(self.objective.num_classes)]
        for k, name in enumerate(names):
            if present[k]:
                out[f"{prefix}/iou/{name}"] = iou[k].item()
        return out


class Segmentation(Objective):
    name = "segmentation"
    target_name = "mask"
    image_level = False  # a class per pixel or per patch

    def __init__(self, num_classes: int | None = None, granularity: str = "pixel", decoder: str = "linear",
                 decoder_channels: int = 64, class_weights: Sequence[float] | None = None,
                 monitor: str = "val/miou", monitor_mode: str = "max", column: str | None = None,
                 weight: float = 1.0, aux_heads: Sequence[str] = (), aux: dict | None = None):
        granularity = "pixel" if granularity == "auto" else granularity
        if granularity not in GRANULARITIES:
            raise ValueError(f"data.label_granularity={granularity} does not fit task=segmentation: use one of "
                             f"{', '.join(GRANULARITIES)} (image-level labels go with task=classification)")
        self.num_classes, self.granularity = num_classes, granularity
        self.decoder, self.decoder_channels = decoder, decoder_channels
        self.class_weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float)
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.class_names, self.labels_at_output = None, MaskLabels(num_classes, granularity)
        self.configure(aux_heads, aux, column=column, weight=weight)

    @classmethod
    def as_head(cls, name, settings, run):
        settings.setdefault("granularity", run["granularity"])  # the data's, unless the head sets its own
        return super().as_head(name, settings, run)

    def reader(self) -> Masks:
        return Masks(self.target_name, [self.column] if self.column else [])

    def head_args(self) -> dict:
        return {"head": self.head}

    def head(self, dim: int, **geometry) -> nn.Module:
        if self.granularity == "patch":
            return PatchHead(dim, self.num_classes)
        return SegmentationDecoder(dim, self.num_classes, decoder=self.decoder, channels=self.decoder_channels,
                                   **geometry)

    def fit(self, summary, class_names, model, data) -> None:
        side = data.image_size  # the stored images' side (or (H, W)), as decoded
        side = (side, side) if isinstance(side, int) else tuple(side)
        if len(summary["shape"]) != 2 or tuple(summary["shape"]) != side or "max_class" not in summary:
            raise ValueError(f"task=segmentation needs a mask (H, W) per image, but the data gives targets of shape "
                             f"{tuple(summary['shape'])} for images {side}: use data=maskfolder, a mask "
                             f"column with data=csv, or data=synthetic")
        if data.eval_views > 1:
            raise ValueError("data.eval_crop=tiled averages the outputs of several windows, which a per-pixel "
                             "output cannot do: set data.eval_crop=center for task=segmentation")
        top = summary["max_class"]
        if self.num_classes is None:
            self.num_classes = len(class_names) if class_names else top + 1
        if top >= self.num_classes:
            raise ValueError(f"the masks hold class {top} but the task has {self.num_classes} classes "
                             f"(0..{self.num_classes - 1}, 255 = ignore): set data.num_classes={top + 1}")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"task.class_weights has {len(self.class_weights)} values for {self.num_classes} classes")
        self.class_names = list(class_names) if class_names else None
        self.labels_at_output.num_classes = self.num_classes
        self.labels_at_output.fit_to(model)

    def class_weights_on(self, device):
        return None if self.class_weights is None else self.class_weights.to(device)

    def head_loss(self, outputs, targets):
        return mask_cross_entropy(outputs, self.labels_at_output(targets), self.class_weights_on(outputs.device))

    def head_scores(self, outputs, targets):
        labels = self.labels_at_output(targets)
        labelled = labels != IGNORE_INDEX
        right = (outputs.argmax(dim=1) == labels) & labelled
        return {"pixel_acc": right.sum() / labelled.sum().clamp_min(1)}

    def head_evaluator(self) -> Evaluator:
        return SegmentationEvaluator(self)

    def head_title(self, output, target, class_names):
        if target is None:
            return ""
        labels = self.labels_at_output(target[None])[0]
        labelled = labels != IGNORE_INDEX
        right = (output.argmax(dim=0) == labels) & labelled
        return f"pixel acc {right.sum().item() / max(labelled.sum().item(), 1):.2f}"

    def head_sample_figures(self, images, outputs, targets, titles, style):
        true_masks = None if targets is None else self.labels_at_output(targets)
        figure = segmentation_figure(images.cpu(), None if true_masks is None else true_masks.cpu(),
                                     outputs.argmax(dim=1).cpu(), self.num_classes, titles, **style)
        return {"segmentation": figure}
