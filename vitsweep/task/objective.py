"""One objective (classification, regression, segmentation) as the task of a run: the `Task` protocol
(protocol.py) for one target, plus the auxiliary heads trained alongside it (`task.aux_heads`) and the
exits of model/early_exit. task=multi_task (multi_task.py) composes several objectives, one per head.

A subclass says what it learns from and how: its target's reader (`reader`, vitsweep/data/targets.py), its
head (`head`, or the trunk's linear one), its per-head loss (`head_loss`), batch scores, evaluator, what it
fits on the training targets (`fit`), its figures and titles. The loop-facing calls below are shared.

Missing labels never reach a loss or a metric: a class index of -1, a NaN value or multi-hot row, a mask
pixel of 255 (IGNORE_INDEX) is masked out, sample by sample.

Auxiliary heads (off by default; each trained with its weight, `task.aux.<name>.weight`):
    deep_supervision   the main objective again, from block `task.aux.deep_supervision.block`'s tokens
    region             a patch-level segmentation head on the last patch tokens, trained on the masks of
                       `task.aux.region.column` (a mask per image: csv column, or data=synthetic)
    attention          the last block's cls attention over the patches, pulled towards the region
                       mask's foreground (KL); drawn at the end of training as figures/aux_attention.png
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Sequence
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from hydra.utils import get_class
from matplotlib.figure import Figure
from torch import nn

from vitsweep.data.dataset_info import DatasetInfo
from vitsweep.data.splits import IGNORE_INDEX, Targets
from vitsweep.data.targets import Masks, TargetReader
from vitsweep.model.early_exit import exit_outputs, record_exits
from vitsweep.task.heads import AttentionMap, PatchHead, PooledLinear
from vitsweep.task.masks import MaskLabels, mask_cross_entropy
from vitsweep.task.protocol import Evaluator, Task
from vitsweep.viz.figures import heatmaps_figure

AUX_HEADS = ("deep_supervision", "region", "attention")
AUX_DEFAULTS = {
    "deep_supervision": {"block": -3, "weight": 0.3},
    "region": {"column": "region", "num_classes": 2, "weight": 0.3},
    "attention": {"block": -1, "weight": 0.1},
}


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `valid`; 0 (still in the graph) when nothing is valid."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp_min(1)


def main_output(outputs):
    """The main output of a model's forward: in training with auxiliary heads it is {"out": ..., <aux>: ...}."""
    return outputs["out"] if isinstance(outputs, dict) and "out" in outputs else outputs


class Objective(Task):
    """One objective as a run's task (see the module docstring). Every subclass that names itself (`name`)
    is a head type of task=multi_task (`Objective.named`)."""

    registry: ClassVar[dict[str, type[Objective]]] = {}  # name -> class, filled as objective modules are imported
    name = ""
    image_level = True  # one target per image from the pooled vector (not per pixel or patch): deep supervision
    #                     repeats its head from an earlier block, and patch or pixel labels are refused
    class_logits = False  # its head gives single-label class logits: model/early_exit may leave at a confident one
    target_name = "label"  # its target among a batch's targets: the main target, or a multi-task head's name
    monitor, monitor_mode = "val/loss", "min"
    weight = 1.0  # its share of a multi-task loss

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:  # a new objective, not a variant of one (forecasting's)
            Objective.registry[cls.name] = cls

    @staticmethod
    def named(name: str | None, key: str) -> type[Objective]:
        """The objective class called `name` (or at the dotted class path `name`); `key`: where it was asked for,
        for the one-line refusal."""
        if isinstance(name, str) and name.isidentifier() and name not in Objective.registry:
            with contextlib.suppress(ImportError):  # an objective of vitsweep/task/ not imported yet: its module
                importlib.import_module(f"vitsweep.task.{name}")
        if name in Objective.registry:
            return Objective.registry[name]
        if isinstance(name, str) and "." in name:
            found = get_class(name)
            if isinstance(found, type) and issubclass(found, Objective):
                return found
        raise ValueError(f"{key}={name} is not one of: {', '.join(sorted(Objective.registry))} (or the dotted path "
                         f"of an Objective subclass)")

    @classmethod
    def as_head(cls, name: str, settings: dict, run: dict) -> Objective:
        """This objective as head `name` of a multi-task run, from its keys (`column`, `weight`, and its own);
        `run`: what the run gives every head (the metrics group, the data's label granularity)."""
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "aux_heads", "aux"}
        unknown = sorted(set(settings) - accepted)
        if unknown:
            raise ValueError(f"task.heads.{name} has unknown key(s) {', '.join(unknown)}: a {cls.name} head takes "
                             f"type, {', '.join(sorted(accepted))}")
        return cls(**settings)

    def configure(self, aux_heads: Sequence[str] = (), aux: dict | None = None, granularity: str = "auto",
                  column: str | None = None, weight: float = 1.0) -> None:
        """The settings every objective shares: what it reads (`column`), its weight as a multi-task head, and
        its auxiliary heads."""
        if self.image_level and granularity not in ("auto", "image"):
            raise ValueError(f"data.label_granularity={granularity}: task={self.name} learns one label per image; "
                             f"patch and pixel labels go with task=segmentation")
        unknown = [name for name in aux_heads if name not in AUX_HEADS]
        if unknown:
            raise ValueError(f"task.aux_heads has unknown {', '.join(map(str, unknown))}: pick from "
                             f"{', '.join(AUX_HEADS)}")
        self.column, self.weight = column, weight
        self.aux_heads = list(aux_heads)
        self.aux = {name: {**AUX_DEFAULTS[name], **dict((aux or {}).get(name) or {})} for name in self.aux_heads}
        if "deep_supervision" in self.aux and not self.image_level:
            raise ValueError(f"task.aux_heads=[deep_supervision] repeats a pooled head from an earlier block: "
                             f"task={self.name} has none; drop it")
        if "attention" in self.aux and "region" not in self.aux and not self.reads_masks:
            raise ValueError("task.aux_heads=[attention] learns from region masks: add region to task.aux_heads "
                             "(task.aux.region.column names the masks)")
        # the region head's labels: each patch's majority class of the region mask
        self.region = (MaskLabels(self.aux.get("region", AUX_DEFAULTS["region"])["num_classes"], "patch")
                       if "region" in self.aux or "attention" in self.aux else None)
        self.exit_layers, self.exit_loss_weight = None, 0.0  # model/early_exit, once set up

    # ------------------------------------------------------------------- what a subclass says

    def reader(self) -> TargetReader:
        """How the loaders read this objective's target."""
        raise NotImplementedError

    def head(self, dim: int, **geometry) -> nn.Module:
        """Its head module (reads the trunk's `Features`): as a multi-task head, or for deep supervision."""
        raise NotImplementedError

    def head_args(self) -> dict:
        """The model factory's arguments for its head as the model's only one (default: the trunk's linear head)."""
        return {}

    def fit(self, summary: dict, class_names: list[str], model: nn.Module, data: DatasetInfo) -> None:
        """Check the training targets (their `summary`, by the reader) fit, and fit statistics on them."""

    def head_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of its head's outputs against its targets, missing labels left out."""
        raise NotImplementedError

    def head_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Figures of a training batch of its head (acc, mae, pixel_acc), on the device."""
        return {}

    def head_evaluator(self) -> Evaluator:
        """The evaluator of its head alone."""
        raise NotImplementedError

    def head_figures(self, evaluator: Evaluator) -> dict[str, Figure]:
        """Figures of a split its head's evaluator scored (a confusion matrix, a scatter of predictions)."""
        return {}

    def head_title(self, output: torch.Tensor, target: torch.Tensor | None, class_names: list[str] | None) -> str:
        """One image's prediction of its head (and the truth, when known) in a line."""
        return ""

    def head_sample_figures(self, images: torch.Tensor, outputs, targets, titles: list[str],
                            style: dict) -> dict[str, Figure]:
        """Figures of a few images of its head (segmentation: the true and predicted masks)."""
        return {}

    # ------------------------------------------------------------------- what the data gives

    def targets(self) -> dict[str, TargetReader]:
        readers = {self.target_name: self.reader()}
        if self.region is not None and not self.reads_masks:  # the region masks: a target of their own
            column = self.aux.get("region", AUX_DEFAULTS["region"])["column"]
            readers["region"] = Masks("region", [column])
        return readers

    @property
    def reads_masks(self) -> bool:
        """Whether its own targets are masks (then the region and attention heads learn from them)."""
        return isinstance(self.reader(), Masks)

    def split_targets(self, targets: Targets):
        """(its own targets, the region masks or None) of a batch."""
        if isinstance(targets, dict):
            return targets[self.target_name], targets.get("region")
        return targets, (targets if self.region is not None else None)

    # ------------------------------------------------------------------- the model

    def model_args(self) -> dict:
        args = self.head_args()
        factories = {
            "deep_supervision": lambda: partial(self.deep_supervision_head, block=self.aux["deep_supervision"]["block"]),
            "region": lambda: partial(PatchHead, num_classes=self.region.num_classes),
            "attention": lambda: partial(AttentionMap, block=self.aux["attention"]["block"]),
        }
        if self.aux_heads:
            args["aux_heads"] = {name: factories[name]() for name in self.aux_heads}
        return args

    def deep_supervision_head(self, dim, block, pooling, num_prefix_tokens, **geometry):
        return PooledLinear(dim, self.num_outputs, block=block, pooling=pooling, num_prefix_tokens=num_prefix_tokens)

    # ------------------------------------------------------------------- set-up

    def setup(self, data: DatasetInfo, model: nn.Module) -> None:
        """Check the data's targets against the objective and fit its statistics, before any training."""
        self.fit(data.target_summary(self.target_name), data.class_names(self.target_name), model, data)
        if self.region is not None:
            self.region.fit_to(model)
            if not self.reads_masks:
                top = data.target_summary("region").get("max_class", -1)
                if top >= self.region.num_classes:
                    raise ValueError(f"task.aux.region.num_classes={self.region.num_classes} but the region masks "
                                     f"hold class {top}: set task.aux.region.num_classes={top + 1}")
        self.check_early_exit(model)

    def check_early_exit(self, model: nn.Module) -> None:
        """model/early_exit scores class logits at every exit: single-label classification only. Keeps the
        blocks run at each exit (`exit_layers`, the final head's last) to name the exit metrics, and the
        weight of each exit's loss (`exit_loss_weight`)."""
        early_exit = getattr(model, "early_exit", None)
        self.exit_layers = list(early_exit.layers) if early_exit is not None and early_exit.name != "none" else None
        self.exit_loss_weight = early_exit.loss_weight if self.exit_layers else 0.0
        if self.exit_layers and not self.class_logits:
            multi_label = " with multi_label=true" if getattr(self, "multi_label", False) else ""
            raise ValueError(f"model/early_exit={early_exit.name} leaves at a confident class prediction, but this "
                             f"run is task={self.name}{multi_label}: use model/early_exit=none, or single-label "
                             f"task=classification")

    # ------------------------------------------------------------------- the loop's calls

    def loss(self, outputs, targets) -> torch.Tensor:
        main, region = self.split_targets(targets)
        loss = self.head_loss(main_output(outputs), main)
        if not isinstance(outputs, dict) or "out" not in outputs:
            return loss
        for exit_logits in outputs.get("early_exits", ()):  # model/early_exit: (E, B, K), each exit learns the labels
            loss = loss + self.exit_loss_weight * self.head_loss(exit_logits, main)
        for name in self.aux_heads:
            weight = self.aux[name]["weight"]
            if name == "deep_supervision":
                loss = loss + weight * self.head_loss(outputs[name], main)
            elif name == "region":
                loss = loss + weight * mask_cross_entropy(outputs[name], self.region(region))
            else:
                loss = loss + weight * attention_loss(outputs[name], self.region(region))
        return loss

    def batch_scores(self, outputs, targets) -> dict[str, torch.Tensor]:
        return self.head_scores(main_output(outputs), self.split_targets(targets)[0])

    def evaluator(self) -> Evaluator:
        if self.exit_layers:
            return ExitEvaluator(self.head_evaluator(), self, self.exit_layers)
        return MainEvaluator(self.head_evaluator(), self)

    def is_headline(self, key: str) -> bool:
        """`<split>/<metric>` is a headline; `<split>/<metric>/<class or target>` is not."""
        return key.count("/") < 2

    def figures(self, evaluator: MainEvaluator, data: DatasetInfo) -> dict[str, Figure]:
        return self.head_figures(evaluator.evaluator)

    def title(self, output, target, class_names) -> str:
        return self.head_title(main_output(output), None if target is None else self.split_targets(target)[0],
                               class_names)

    def sample_figures(self, model, images, outputs, targets, titles, style) -> dict[str, Figure]:
        main = None if targets is None else self.split_targets(targets)[0]
        figures = self.head_sample_figures(images, main_output(outputs), main, titles, style)
        if "attention" in self.aux_heads and targets is not None:  # the auxiliary attention head beside its target
            figures["aux_attention"] = aux_attention_figure(model, self.region(self.split_targets(targets)[1]), images,
                                                            style)
        return figures


class MainEvaluator(Evaluator):
    """The head's evaluator, fed its own targets of each batch (a dict of targets holds the region masks too)."""

    def __init__(self, evaluator: Evaluator, objective: Objective):
        self.evaluator, self.objective = evaluator, objective

    def update(self, outputs, targets) -> None:
        self.evaluator.update(outputs, self.objective.split_targets(targets)[0])

    def compute(self, prefix: str) -> dict[str, float]:
        return self.evaluator.compute(prefix)


class ExitEvaluator(MainEvaluator):
    """With model/early_exit: each forward runs every block and keeps every exit's logits
    (`record_exits`); `out`, the early-exited predictions, gives the headline metrics, and the exits add
    `exit_acc/<layer>` (that exit's accuracy on every sample), `exit_share/<layer>` (the share of samples
    leaving there) and `mean_depth` (blocks run per sample). `exit_layers`: blocks run at each exit, the
    final head's last."""

    def __init__(self, evaluator: Evaluator, objective: Objective, exit_layers: list[int]):
        super().__init__(evaluator, objective)
        self.exit_layers = exit_layers
        self.exit_logits, self.exit_taken, self.exit_labels = [], [], []

    def forward(self, model, inputs):
        with record_exits(model) as exits:
            logits = model(inputs)
        return exit_outputs(logits, exits)  # {"out", "exit_logits" (B, E+1, K), "exit_taken" (B, E+1)}

    def update(self, outputs, targets) -> None:
        main = self.objective.split_targets(targets)[0]
        self.exit_logits.append(outputs["exit_logits"].float())
        self.exit_taken.append(outputs["exit_taken"].float())
        self.exit_labels.append(main)
        self.evaluator.update(outputs["out"], main)

    def compute(self, prefix: str) -> dict[str, float]:
        metrics = self.evaluator.compute(prefix)
        logits, taken, labels = torch.cat(self.exit_logits), torch.cat(self.exit_taken), torch.cat(self.exit_labels)
        layers = torch.tensor(self.exit_layers, dtype=torch.float32, device=taken.device)  # (E+1,)
        labelled = labels >= 0  # missing labels (-1) count in no accuracy
        correct = (logits.argmax(dim=-1) == labels[:, None])[labelled].float()  # (B', E+1)
        metrics[f"{prefix}/mean_depth"] = (taken @ layers).mean().item()
        for e, layer in enumerate(self.exit_layers):
            metrics[f"{prefix}/exit_share/{layer}"] = taken[:, e].mean().item()
            if len(correct):
                metrics[f"{prefix}/exit_acc/{layer}"] = correct[:, e].mean().item()
        return metrics


@torch.no_grad()
def aux_attention_figure(model: nn.Module, regions: torch.Tensor, images: torch.Tensor, style: dict) -> Figure:
    """The auxiliary attention head's output (task.aux_heads=[attention]) beside its target, the region
    mask's foreground (`regions`: patch labels (B, gh, gw)), per image."""
    head = model.aux_heads["attention"]
    was_training = model.training
    model.eval()
    try:
        maps = head(model.features(images, [head]))  # (B, gh, gw)
    finally:
        model.train(was_training)
    foreground = ((regions > 0) & (regions != IGNORE_INDEX)).float()
    return heatmaps_figure(images.cpu(), {"aux attention": maps.cpu(), "region foreground": foreground.cpu()}, **style)


def attention_loss(attention: torch.Tensor, patch_labels: torch.Tensor) -> torch.Tensor:
    """KL(target || attention) between the region mask's foreground over the patches (labelled patches
    with a class > 0, normalized to sum to 1) and the cls attention over the patches (B, gh, gw),
    renormalized; images without foreground are left out."""
    foreground = ((patch_labels > 0) & (patch_labels != IGNORE_INDEX)).flatten(1).float()  # (B, P)
    has_foreground = foreground.sum(dim=1) > 0
    target = foreground / foreground.sum(dim=1, keepdim=True).clamp_min(1)
    attention = attention.flatten(1)
    log_q = (attention / attention.sum(dim=1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12).log()
    per_image = F.kl_div(log_q, target, reduction="none").sum(dim=1)  # sum_p t log(t / q)
    return (per_image * has_foreground).sum() / has_foreground.sum().clamp_min(1)
