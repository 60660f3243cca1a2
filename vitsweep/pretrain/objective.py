"""The loop-facing side of a self-supervised method: the `Task` protocol (vitsweep/task/protocol.py), so
pretraining runs in the one training loop (vitsweep.trainer.loop) and the one fit (vitsweep.run.modes) like
any task.

    method = instantiate(cfg.pretrain)            # MAE or DINO: the settings, checked
    model = method.wrap(encoder)                  # the nn.Module the loop trains: encoder + decoder / heads
    method.setup(data, model)                     # which images it learns from, the monitor
    method.attach(model, optimizer, total_steps)  # per-step work outside the gradient (DINO's teacher)

The model's forward gives {"loss": scalar} in training, and {"features": (B, D), "loss": (B,)} in eval
mode: the encoder's pooled features of the whole image and each image's loss, with the method's random
draws fixed, so the val loss of one epoch compares with the next. The evaluator turns a split of those
into `<split>/loss`, `<split>/feature_std` and, when the split has class labels, `<split>/knn_acc`.
Labels are never used for training: the data reads them (`targets`: the run's task's, set by the build)
for the kNN monitor only.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from vitsweep.data.splits import Targets
from vitsweep.data.targets import TargetReader
from vitsweep.pretrain.knn import knn_accuracy
from vitsweep.task.protocol import Evaluator, Task

MONITORS = {"val/knn_acc": "max", "val/loss": "min", "train/loss": "min"}


def class_labels(targets: Targets) -> torch.Tensor | None:
    """The class indices (N,) among a split's targets (the first of a dict), or None when there are none
    (regression values, masks, multi-hot rows)."""
    candidates = targets.values() if isinstance(targets, dict) else [targets]
    for target in candidates:
        if target.dim() == 1 and not target.is_floating_point():
            return target
    return None


def feature_spread(features: torch.Tensor) -> float:
    """How spread out L2-normalized features (N, D) are: the mean over dimensions of their std over the
    samples, times sqrt(D). About 1 for features spread evenly over the sphere, 0 when every image maps
    to the same point (the collapse that DINO's centring and sharpening prevent)."""
    normalized = F.normalize(features.float(), dim=1)
    return float(normalized.std(dim=0).mean() * math.sqrt(features.shape[1]))


@contextlib.contextmanager
def fixed_randomness(device: torch.device, seed: int = 0):
    """The same random draws (masks, crops) on every call, and the caller's RNG state left as it was:
    for scoring a split, where the loop's RNG stream must not move (exact resume)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class EncoderEvaluator(Evaluator):
    """Accumulates a split's features, per-image losses and class labels; scores them whole."""

    def __init__(self, knn_k: int, knn_temperature: float):
        self.knn_k, self.knn_temperature = knn_k, knn_temperature
        self.features, self.losses, self.labels = [], [], []

    def update(self, outputs: dict, targets: Targets) -> None:
        self.features.append(outputs["features"].float())
        self.losses.append(outputs["loss"].float())
        labels = class_labels(targets)
        if labels is not None:
            self.labels.append(labels)

    def compute(self, prefix: str) -> dict[str, float]:
        features = torch.cat(self.features)
        metrics = {f"{prefix}/loss": torch.cat(self.losses).mean().item(),
                   f"{prefix}/feature_std": feature_spread(features)}
        if self.labels and len(self.labels) == len(self.features):
            labels = torch.cat(self.labels)
            if labels[labels >= 0].unique().numel() >= 2:
                metrics[f"{prefix}/knn_acc"] = knn_accuracy(features, labels, self.knn_k, self.knn_temperature)
        return metrics


class Pretraining(Task):
    """What every method shares: the images it learns from, the monitor, and the calls of the loop."""

    name = ""

    def __init__(self, use_all_splits: bool = False, monitor: str = "auto", knn_k: int = 20,
                 knn_temperature: float = 0.07):
        if monitor != "auto" and monitor not in MONITORS:
            raise ValueError(f"pretrain.monitor={monitor} is not one of: auto, {', '.join(MONITORS)}")
        if knn_k < 1:
            raise ValueError(f"pretrain.knn_k={knn_k} must be >= 1 (the neighbours that vote)")
        if knn_temperature <= 0:
            raise ValueError(f"pretrain.knn_temperature={knn_temperature} must be > 0")
        self.use_all_splits, self.knn_k, self.knn_temperature = use_all_splits, knn_k, knn_temperature
        self.monitor = monitor
        self.monitor_mode = MONITORS.get(monitor, "max")
        self.label_readers: dict[str, TargetReader] = {}  # what the data reads for the kNN monitor: the run's task's

    # ------------------------------------------------------------------------------ set-up

    def targets(self) -> dict[str, TargetReader]:
        return dict(self.label_readers)

    def model_args(self) -> dict:
        return {"num_classes": 0}  # an encoder: no head (what fine-tuning puts on it is the task's)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop trains around the encoder `model` (its `encoder` attribute is what fine-tuning
        loads)."""
        raise NotImplementedError

    def check_encoder(self, encoder: nn.Module) -> None:
        frozen = [name for name, param in encoder.named_parameters() if not param.requires_grad]
        if frozen:
            raise ValueError(f"model.trainable leaves {len(frozen)} encoder tensors frozen ({frozen[0]}, ...), but "
                             f"mode=pretrain trains the whole encoder: drop model.trainable (it is for fine-tuning)")

    def setup(self, data, model: nn.Module) -> None:
        """Before training: the images to learn from (with use_all_splits, every split's), and the monitor
        (auto: the kNN accuracy on val when val has class labels, else the val loss)."""
        if data.balanced:
            raise ValueError("data.balance_ratio balances classes, but pretraining ignores the labels: drop "
                             "data.balance_ratio")
        if self.use_all_splits:
            data.use_all_splits()  # the train, val and test images, unlabelled
        if self.monitor == "auto":
            class_counts = self.val_class_counts(data)
            has_classes = sum(count > 0 for count in class_counts) >= 2
            self.monitor = "val/knn_acc" if has_classes else "val/loss"
            self.monitor_mode = MONITORS[self.monitor]

    def val_class_counts(self, data) -> list[float]:
        """Images per class in val, of the first class-label target ([] when there is none)."""
        for name in self.targets() or [None]:  # None: the data's one target, as it reads it
            summary = data.target_summary(name, split="val")
            if len(summary["shape"]) == 0 and "class_counts" in summary:  # class indices, not multi-hot or values
                return summary["class_counts"]
        return []

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Work to do after every optimizer step, outside the gradient (none by default)."""

    # ------------------------------------------------------------------------------ the loop's calls

    def loss(self, outputs: dict, targets: Targets) -> torch.Tensor:
        return outputs["loss"]

    def batch_scores(self, outputs: dict, targets: Targets) -> dict[str, torch.Tensor]:
        return {}

    def evaluator(self) -> EncoderEvaluator:
        return EncoderEvaluator(self.knn_k, self.knn_temperature)
