"""The config a checkpoint was trained with, and what eval, visualize and resume take from it.

Every checkpoint stores the run's resolved config (`checkpoint["config"]`, normalization statistics
included). A job that restores a checkpoint (mode=eval, mode=visualize, or training with ckpt_path)
rebuilds the same model from it instead of from the command line's defaults: a checkpoint trained with
`model.norm_placement=post model/attention=local` has the shapes of the default model, so the
architecture check cannot tell them apart, and scoring it with the defaults would silently report the
accuracy of a different network. Taken from the checkpoint:

- the whole `model` section, and the whole `task` section (heads, targets, loss: what the weights mean);
- the data shape: data.image_size, in_channels, num_classes, crop_size, resize_to;
- the normalization: the mean and std the run normalized with (also when it computed them, `auto`).

What the data is (data=..., data.root, batch sizes, eval_crop) still comes from the command line, so a
checkpoint can be scored on other images of the same shape. A command-line override that contradicts
the checkpoint is refused in one line naming the key and both values, before any work.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

DATA_SHAPE_KEYS = ("image_size", "in_channels", "num_classes", "crop_size", "resize_to")
NORMALIZATION_KEYS = ("normalization", "mean", "std")
NOT_COMPARED = {"model.pretrained"}  # the checkpoint holds every weight: where they first came from is moot
MISSING = object()
ADOPTED_GROUPS = ("model", "task")  # taken whole from the checkpoint; a group choice for them is compared


def flatten(tree, prefix: str) -> dict[str, object]:
    """{"model.depth": 6, "model.attention.kernel_size": 3, ...}: the leaves of a nested dict."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    leaves = {}
    for key, value in tree.items():
        leaves.update(flatten(value, f"{prefix}.{key}"))
    return leaves


def current_value(cfg: DictConfig, key: str):
    """The composed value of `key`, interpolations resolved; MISSING when absent or ??? (not set)."""
    try:
        value = OmegaConf.select(cfg, key, default=MISSING, throw_on_missing=True)
    except Exception:  # noqa: BLE001 -- ???, or an interpolation to a key without a value: not set
        return MISSING
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def overridden_keys(cfg: DictConfig, overrides: list[str]) -> dict[str, str]:
    """{dotted key: the override that sets it} for the command line's overrides. A group choice counts
    for the model (`model=vit_tiny`, `model/attention=local` choose the architecture) but not for the
    data (`data=imagefolder` picks images; their shape still comes from the checkpoint)."""
    keys = {}
    for override in overrides:
        if "=" not in override:
            continue
        key = override.split("=", 1)[0].lstrip("+~").replace("/", ".")
        if key.startswith("hydra.") or not key:
            continue
        is_group_choice = "/" in override.split("=", 1)[0] or OmegaConf.is_dict(OmegaConf.select(cfg, key, default=None))
        if is_group_choice and not any(key == group or key.startswith(f"{group}.") for group in ADOPTED_GROUPS):
            continue
        keys[key] = override
    return keys


def stored_at(stored: dict, key: str):
    """The stored config's value (or section) at a dotted key; MISSING when it has none."""
    node = stored
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def setting_override(key: str, overridden: dict[str, str]) -> str | None:
    """The override that sets `key` itself or a section above it."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in overridden:
            return overridden[".".join(parts[:end])]
    return None


def format_value(value) -> str:
    return "null" if value is None else str(value)


def taken_values(stored: dict) -> dict[str, object]:
    """{dotted key: stored value} of what a restoring job takes from the checkpoint's config."""
    data = stored.get("data") or {}
    taken = flatten(stored["model"], "model")
    if isinstance(stored.get("task"), dict):  # runs from before the task group have none: the default's
        taken.update(flatten(stored["task"], "task"))
    taken.update({f"data.{k}": data[k] for k in DATA_SHAPE_KEYS if k in data})
    if "mean" in data and "std" in data:  # the statistics the run normalized with, computed or fixed
        taken.update({"data.normalization": "fixed", "data.mean": data["mean"], "data.std": data["std"]})
    return taken


def adopt_trained_config(cfg: DictConfig, overrides: list[str], checkpoint: dict | None) -> None:
    """mode=eval / visualize, or training from ckpt_path: set cfg's model, data shape and normalization to
    those stored in the checkpoint; refuse an override that contradicts them. A checkpoint without a
    stored config (not written by run.py) is left to the architecture check."""
    restoring = cfg.get("ckpt_path") and cfg.mode in ("eval", "visualize", "train", "pretrain")
    if not restoring:
        return
    stored = ((checkpoint or {}).get("config") or {})
    if not isinstance(stored.get("model"), dict):
        return
    taken = taken_values(stored)
    overridden = overridden_keys(cfg, overrides)
    stored_normalization = (stored.get("data") or {}).get("normalization")
    composed_keys = {}
    for group in ADOPTED_GROUPS:
        if group in stored and group in cfg:
            composed_keys.update(flatten(OmegaConf.to_container(cfg[group], resolve=False), group))
    for key in sorted(set(taken) | set(composed_keys)):
        override = setting_override(key, overridden)
        if override is None or key in NOT_COMPARED:
            continue
        # a key the composed config holds as one value (an interpolation: task.metrics=${metrics}) is a
        # whole section in the stored, resolved config: compared as such
        stored_value = (stored_normalization if key == "data.normalization"
                        else taken.get(key, stored_at(stored, key)))
        value = current_value(cfg, key)
        if value is not MISSING and value != stored_value:
            shown = "(not set)" if stored_value is MISSING else format_value(stored_value)
            through = "" if override.lstrip("+~").startswith(f"{key}=") else f" (through {override})"
            raise ValueError(f"ckpt_path={cfg.ckpt_path} was trained with {key}={shown}, but the command line sets "
                             f"{key}={format_value(value)}{through}: drop {override}; eval, visualize and resume "
                             f"take the model, task, data shape and normalization from the checkpoint")
    changed = [f"{key}={format_value(value)}" for key, value in taken.items()
               if key not in NOT_COMPARED and current_value(cfg, key) != value and key != "data.normalization"]
    with open_dict(cfg):
        cfg.model = stored["model"]
        if isinstance(stored.get("task"), dict):
            cfg.task = stored["task"]
        for key, value in taken.items():
            if key.startswith("data."):
                cfg.data[key.removeprefix("data.")] = value
    if changed:
        log.info("from the checkpoint's config: %s%s", ", ".join(changed[:8]),
                 f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
