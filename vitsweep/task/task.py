"""The loop-facing side of a task: one objective (classification, regression, segmentation) plus the
auxiliary heads trained alongside it (`task.aux_heads`). task=multi_task (multi_task.py) answers the
same calls for several objectives.

What the data must give is the task's `data_targets()`: {name: {"type", "column" | "columns"}}, passed
to the data loader (`data.source.targets`); one entry gives a tensor of targets, several a dict keyed
by these names (vitsweep.data.splits).

Auxiliary heads (off by default; each trained with its weight, `task.aux.<name>.weight`):
    deep_supervision   the main objective again, from block `task.aux.deep_supervision.block`'s tokens
    region             a patch-level segmentation head on the last patch tokens, trained on the masks of
                       `task.aux.region.column` (a mask per image: csv column, or data=synthetic)
    attention          the last block's cls attention over the patches, pulled towards the region
                       mask's foreground (KL); drawn at the end of training as figures/aux_attention.png
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F

from vitsweep.data.splits import IGNORE_INDEX
from vitsweep.task.base import Evaluator, Objective, main_output
from vitsweep.task.heads import AttentionMap, PatchHead, PooledLinear
from vitsweep.task.masks import MaskLabels, mask_cross_entropy

AUX_HEADS = ("deep_supervision", "region", "attention")
AUX_DEFAULTS = {
    "deep_supervision": {"block": -3, "weight": 0.3},
    "region": {"column": "region", "num_classes": 2, "weight": 0.3},
    "attention": {"block": -1, "weight": 0.1},
}
MAIN_TARGET = {"classification": "label", "regression": "target", "segmentation": "mask"}


class Task(Objective):
    """An objective as the whole task of a run (see the module docstring)."""

    def configure(self, aux_heads: Sequence[str] = (), aux: dict | None = None, granularity: str = "auto") -> None:
        if self.kind in ("classification", "regression") and granularity not in ("auto", "image"):
            raise ValueError(f"data.label_granularity={granularity}: task={self.kind} learns one label per image; "
                             f"patch and pixel labels go with task=segmentation")
        unknown = [name for name in aux_heads if name not in AUX_HEADS]
        if unknown:
            raise ValueError(f"task.aux_heads has unknown {', '.join(map(str, unknown))}: pick from "
                             f"{', '.join(AUX_HEADS)}")
        self.aux_heads = list(aux_heads)
        self.aux = {name: {**AUX_DEFAULTS[name], **dict((aux or {}).get(name) or {})} for name in self.aux_heads}
        if "deep_supervision" in self.aux and self.kind not in ("classification", "regression"):
            raise ValueError(f"task.aux_heads=[deep_supervision] repeats a pooled head from an earlier block: "
                             f"task={self.kind} has none; drop it")
        if "attention" in self.aux and "region" not in self.aux and self.kind != "segmentation":
            raise ValueError("task.aux_heads=[attention] learns from region masks: add region to task.aux_heads "
                             "(task.aux.region.column names the masks)")
        # the region head's labels: each patch's majority class of the region mask
        self.region = (MaskLabels(self.aux.get("region", AUX_DEFAULTS["region"])["num_classes"], "patch")
                       if "region" in self.aux or "attention" in self.aux else None)

    # ----------------------------------------------------------------------------- what it needs

    @property
    def main_target(self) -> str:
        return MAIN_TARGET[self.kind]

    def data_targets(self) -> dict[str, dict]:
        spec = {self.main_target: self.target_spec()}
        if self.region is not None and self.kind != "segmentation":
            spec["region"] = {"type": "segmentation", "column": self.aux.get("region", AUX_DEFAULTS["region"])["column"]}
        return spec

    def target_spec(self) -> dict:
        return {"type": self.kind, "column": self.column}

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

    def heads_known(self) -> bool:
        """Whether the head sizes are known from the config (else the model is built after the data)."""
        return True

    def count_classes(self, data) -> None:
        """Take head sizes the config left open from the data (task=multi_task)."""

    def head_args(self) -> dict:
        """The model factory's arguments for the main head (the default: the trunk's linear head)."""
        return {}

    def deep_supervision_head(self, dim, block, pooling, num_prefix_tokens, **geometry):
        return PooledLinear(dim, self.num_outputs, block=block, pooling=pooling,
                            num_prefix_tokens=num_prefix_tokens)

    # ------------------------------------------------------------------------------ set-up

    def setup_task(self, data, model) -> None:
        """Check the data's targets against the task and fit its statistics, before any training."""
        train = data.split("train")
        targets = train.labels
        main = targets[self.main_target] if isinstance(targets, dict) else targets
        class_names = data.class_names
        if isinstance(class_names, dict):
            class_names = class_names.get(self.main_target, [])
        self.setup(main, class_names, model, data)
        if self.region is not None:
            self.region.fit_to(model)
            region = targets.get("region") if isinstance(targets, dict) else None
            labelled = region[region != IGNORE_INDEX] if region is not None else None
            if labelled is not None and labelled.numel() and int(labelled.max()) >= self.region.num_classes:
                raise ValueError(f"task.aux.region.num_classes={self.region.num_classes} but the region masks hold "
                                 f"class {int(labelled.max())}: set task.aux.region.num_classes={int(labelled.max()) + 1}")
        self.check_early_exit(model)

    def check_early_exit(self, model) -> None:
        """model/early_exit scores class logits at every exit: single-label classification only. Keeps the
        blocks run at each exit (`exit_layers`, the final head's last) to name the exit metrics, and the
        weight of each exit's loss (`exit_loss_weight`)."""
        early_exit = getattr(model, "early_exit", None)
        self.exit_layers = list(early_exit.layers) if early_exit is not None and early_exit.name != "none" else None
        self.exit_loss_weight = early_exit.loss_weight if self.exit_layers else 0.0
        if self.exit_layers and (self.kind != "classification" or getattr(self, "multi_label", False)):
            raise ValueError(f"model/early_exit={early_exit.name} leaves at a confident class prediction, but this "
                             f"run is task={self.kind}{' with multi_label=true' if self.kind == 'classification' else ''}:"
                             f" use model/early_exit=none, or single-label task=classification")

    def split_targets(self, targets):
        """(main targets, region masks or None) of a batch."""
        if isinstance(targets, dict):
            return targets[self.main_target], targets.get("region")
        return targets, (targets if self.region is not None else None)

    # ------------------------------------------------------------------------------ the loop's calls

    def training_loss(self, outputs, targets) -> torch.Tensor:
        main, region = self.split_targets(targets)
        loss = self.loss(main_output(outputs), main)
        if not isinstance(outputs, dict) or "out" not in outputs:
            return loss
        for exit_logits in outputs.get("early_exits", ()):  # model/early_exit: (E, B, K), each exit learns the labels
            loss = loss + self.exit_loss_weight * self.loss(exit_logits, main)
        for name in self.aux_heads:
            weight = self.aux[name]["weight"]
            if name == "deep_supervision":
                loss = loss + weight * self.loss(outputs[name], main)
            elif name == "region":
                loss = loss + weight * mask_cross_entropy(outputs[name], self.region(region))
            else:
                loss = loss + weight * attention_loss(outputs[name], self.region(region))
        return loss

    def training_scores(self, outputs, targets) -> dict[str, torch.Tensor]:
        return self.batch_scores(main_output(outputs), self.split_targets(targets)[0])

    def task_evaluator(self) -> Evaluator:
        return MainEvaluator(self.evaluator(), self, getattr(self, "exit_layers", None))

    def is_headline(self, key: str) -> bool:
        """`<split>/<metric>` is a headline; `<split>/<metric>/<class or target>` is not."""
        return key.count("/") < 2

    def task_state(self) -> dict:
        return {"kind": self.kind, **self.state_dict()}

    def load_task_state(self, state: dict) -> None:
        self.load_state_dict(state)


class MainEvaluator(Evaluator):
    """The objective's evaluator, fed the main targets of each batch. With model/early_exit (`exit_layers`:
    blocks run at each exit, the final head's last) the outputs are {"out", "exit_logits", "exit_taken"}
    (vitsweep.model.early_exit.exit_outputs); `out`, the early-exited predictions, gives the headline
    metrics, and the exits add `exit_acc/<layer>` (that exit's accuracy on every sample),
    `exit_share/<layer>` (the share of samples leaving there) and `mean_depth` (blocks run per sample)."""

    def __init__(self, evaluator: Evaluator, task: Task, exit_layers: list[int] | None = None):
        self.evaluator, self.task, self.exit_layers = evaluator, task, exit_layers
        self.exit_logits, self.exit_taken, self.exit_labels = [], [], []

    def update(self, outputs, targets) -> None:
        main = self.task.split_targets(targets)[0]
        if isinstance(outputs, dict) and "exit_logits" in outputs:
            self.exit_logits.append(outputs["exit_logits"].float())  # (B, E+1, K)
            self.exit_taken.append(outputs["exit_taken"].float())  # (B, E+1)
            self.exit_labels.append(main)
            outputs = outputs["out"]
        self.evaluator.update(outputs, main)

    def compute(self, prefix: str) -> dict[str, float]:
        metrics = self.evaluator.compute(prefix)
        if self.exit_logits:
            metrics.update(self.exit_metrics(prefix))
        return metrics

    def exit_metrics(self, prefix: str) -> dict[str, float]:
        logits, taken, labels = torch.cat(self.exit_logits), torch.cat(self.exit_taken), torch.cat(self.exit_labels)
        layers = torch.tensor(self.exit_layers, dtype=torch.float32, device=taken.device)  # (E+1,)
        labelled = labels >= 0  # missing labels (-1) count in no accuracy
        correct = (logits.argmax(dim=-1) == labels[:, None])[labelled].float()  # (B', E+1)
        metrics = {f"{prefix}/mean_depth": (taken @ layers).mean().item()}
        for e, layer in enumerate(self.exit_layers):
            metrics[f"{prefix}/exit_share/{layer}"] = taken[:, e].mean().item()
            if len(correct):
                metrics[f"{prefix}/exit_acc/{layer}"] = correct[:, e].mean().item()
        return metrics


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
