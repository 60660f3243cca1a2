"""Start a VisionTransformer from pretrained weights, and choose which of its parameters train.

Three sources, one entry point, `load_pretrained(model, source)`:
- a vitsweep checkpoint `.pt` (a dict {"model": state_dict, "config": ...}, as training writes it); from a
  `mode=pretrain` run's checkpoint (it also holds {"pretrain": {"encoder_prefix": ...}}) only its encoder,
- a timm ViT state dict saved as `.pth` / `.pt` / `.safetensors`,
- `timm:NAME`: `timm.create_model(NAME, pretrained=True)` (needs the Hugging Face hub).

Loading goes in two steps, as in timm's `checkpoint_filter_fn`:
1. `convert_timm_state_dict` renames timm keys to ours (only for timm sources);
2. `adapt_state_dict` fits the tensors to the model: resamples the position embedding to a new
   patch grid, re-initialises the head for another class count, adapts the patch embedding to
   another band count, and adds or drops the cls token when the pooling differs.
Every adaptation is recorded in the returned `LoadReport`, so a run says what it changed.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"

# What each `trainable` setting leaves trainable (parameter-name prefixes; "" matches all). Exit heads
# (model/early_exit) are heads too; the time and metadata modules have no pretrained weights to keep:
# they always train.
NEW_MODULES = ("early_exit.", "temporal.", "metadata.")
TRAINABLE = {
    "all": ("",),  # full fine-tuning
    "head": ("head.", *NEW_MODULES),  # linear probe
    "head+norm": ("head.", "norm.", *NEW_MODULES),  # linear probe plus the final norm (cheap, often much better)
    "head+norm+last_block": ("head.", "norm.", "{last_block}.", *NEW_MODULES),  # also the last encoder layer
    "prompt+head": ("prompt.", "head.", *NEW_MODULES),  # Visual Prompt Tuning: the prompt tokens and the head
}

# The task's heads (vitsweep.task): new for each task, so a checkpoint's heads that do not fit are dropped and
# the model's that it lacks keep their init; any other tensor missing or misfit is an error.
HEAD_PREFIXES = ("head.", "aux_heads.")

# timm ViT keys we know how to map; anything else in a timm state dict is an error, not a silent drop.
_TIMM_BLOCK_KEY = re.compile(r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_TIMM_LAYER_SCALE_KEY = re.compile(r"blocks\.\d+\.ls[12]\.gamma")
_TIMM_TOP_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                  "norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


class PretrainedLoadError(RuntimeError):
    """The weights can't be fetched or can't be fitted to the model; the message says which and why."""


@dataclass
class LoadReport:
    """What `load_pretrained` did to each checkpoint tensor that did not load as it was."""

    source: str
    loaded: list[str] = field(default_factory=list)  # copied unchanged
    resampled: list[str] = field(default_factory=list)  # interpolated to a new patch grid / patch size
    reinitialized: list[str] = field(default_factory=list)  # model parameters left at their fresh init
    adapted_channels: list[str] = field(default_factory=list)  # patch embedding fitted to another band count
    dropped: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    notes: list[str] = field(default_factory=list)  # approximations worth knowing about

    def as_dict(self) -> dict:
        """For summary.json: every list, plus the counts."""
        missing_encoder = [entry for entry in self.reinitialized if not entry.startswith(HEAD_PREFIXES)]
        return {**asdict(self), "num_loaded": len(self.loaded), "num_missing": len(self.reinitialized),
                "num_missing_encoder": len(missing_encoder)}  # the trunk's tensors the weights did not give

    def __str__(self) -> str:
        lines = [f"pretrained {self.source}: {len(self.loaded)} tensors loaded as they were"]
        for name in ("resampled", "reinitialized", "adapted_channels", "dropped", "notes"):
            if getattr(self, name):
                lines.append(f"  {name}: " + "; ".join(getattr(self, name)))
        return "\n".join(lines)


# --------------------------------------------------------------------------- timm -> vitsweep names

def _refuse_conv_stem(model: nn.Module, source: str) -> None:
    channels = getattr(getattr(model, "patch_embed", None), "conv_stem", None)
    if channels:
        raise PretrainedLoadError(f"model.pretrained={source} holds timm ViT weights, whose patch embedding is one "
                                  f"linear projection, not model.conv_stem={channels}: set model.conv_stem=[] to "
                                  f"start from them, or train the stem from scratch (model.pretrained=null)")


def convert_timm_state_dict(timm_sd: dict, model: nn.Module,
                            report: LoadReport | None = None) -> dict[str, torch.Tensor]:
    """Rename a timm `VisionTransformer` state dict to vitsweep's names. Shapes are not touched here
    (see `adapt_state_dict`), except that a timm `no_embed_class` position embedding gets a zero row
    for the cls position, which is what "no embedding for cls" means in our layout."""
    report = report if report is not None else LoadReport("timm state dict")
    _refuse_conv_stem(model, report.source)
    timm_sd = _unwrap(timm_sd)
    unknown = [k for k in timm_sd if k not in _TIMM_TOP_KEYS
               and not _TIMM_BLOCK_KEY.fullmatch(k) and not _TIMM_LAYER_SCALE_KEY.fullmatch(k)]
    if unknown:
        raise PretrainedLoadError(
            f"cannot map timm keys {_preview(unknown)}: vitsweep's ViT has no register tokens, qk-norm, "
            "pre-norm (CLIP), attention pooling or patch-embed norm; use a plain timm ViT (e.g. vit_*_patch16_*)"
        )
    if "norm.weight" in timm_sd and "fc_norm.weight" in timm_sd:
        raise PretrainedLoadError("timm checkpoint has both norm.* and fc_norm.*: vitsweep has one final norm")

    converted = {}
    for key, value in timm_sd.items():
        if _TIMM_LAYER_SCALE_KEY.fullmatch(key):
            # LayerScale with gamma == 1 is the identity; anything else changes the function
            if not torch.allclose(value.float(), torch.ones_like(value, dtype=torch.float)):
                raise PretrainedLoadError(
                    f"timm key {key} is a LayerScale gamma that is not identity (mean {value.float().mean():.3g}): "
                    "vitsweep's Block has no LayerScale, so this checkpoint can't be loaded exactly"
                )
            report.dropped.append(f"{key} (identity LayerScale)")
        elif key == "pos_embed":
            converted["pos_embed.weight"] = value
        elif key.startswith("fc_norm."):
            converted["norm." + key[len("fc_norm."):]] = value
        else:
            converted[key] = value

    # where the final norm sits: timm's `norm` normalizes every token (cls pooling), `fc_norm` the
    # pooled vector (mean pooling), as ours does per pooling; across poolings it's a good start, not exact
    source_norm_on_tokens = "norm.weight" in timm_sd
    if "norm.weight" in converted and source_norm_on_tokens != (model.pooling == "cls"):
        report.notes.append(
            f"final norm moved from {'every token' if source_norm_on_tokens else 'the pooled vector'} to "
            f"{'every token' if model.pooling == 'cls' else 'the pooled vector'} (pooling={model.pooling})"
        )

    pos = converted.get("pos_embed.weight")
    if pos is not None and "cls_token" in converted:
        num_positions = pos.shape[1]
        if _could_be_grid(num_positions, model) and not _could_be_grid(num_positions - 1, model):
            # timm no_embed_class=True: the cls token gets no position embedding, i.e. a zero one
            converted["pos_embed.weight"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
            report.notes.append("timm no_embed_class: cls position embedding set to zero")
    return converted


def _could_be_grid(num_patches: int, model: nn.Module) -> bool:
    return num_patches == model.grid_size[0] * model.grid_size[1] or (
        num_patches > 0 and math.isqrt(num_patches) ** 2 == num_patches)


# ------------------------------------------------------------------------ fit tensors to the model

def adapt_state_dict(state_dict: dict, model: nn.Module, strict_shapes: bool = True,
                     report: LoadReport | None = None) -> dict[str, torch.Tensor]:
    """Fit a state dict in vitsweep names to `model`: resample the position embedding to the model's
    patch grid, resample the patch kernel to its patch size, adapt the input bands, add/drop the cls
    token, and leave the head at its init when the class count differs. With `strict_shapes`, any
    other mismatch (width, depth, mlp size, missing or extra tensors) is an error; without it those
    tensors are skipped and listed in the report."""
    report = report if report is not None else LoadReport("state dict")
    state_dict = dict(state_dict)
    target = model.state_dict()

    # prefix (cls) tokens: vitsweep's position embedding covers them, so they move together
    # (prompt tokens are prefix tokens too, but have no position embedding)
    source_prefix = 1 if "cls_token" in state_dict else 0
    target_prefix = 1 if "cls_token" in target else 0  # prompt and metadata tokens have no position
    if "cls_token" in state_dict and "cls_token" not in target:
        state_dict.pop("cls_token")
        report.dropped.append("cls_token (model uses mean pooling)")
    elif "cls_token" in target and "cls_token" not in state_dict:
        report.reinitialized.append("cls_token (checkpoint has none)")

    if "pos_embed.weight" in state_dict:
        pos = state_dict.pop("pos_embed.weight")  # (1, prefix + old_gh * old_gw, D)
        if "pos_embed.weight" not in target:
            report.dropped.append(f"pos_embed.weight (model uses {type(model.pos_embed).__name__})")
        else:
            prefix, patches = pos[:, :source_prefix], pos[:, source_prefix:]
            old_grid = _source_grid(patches.shape[1], model.grid_size)
            if old_grid != tuple(model.grid_size):
                # timm's bicubic resampling, on the patch part only: the prefix has no place in the grid
                patches = resample_abs_pos_embed(patches, new_size=list(model.grid_size), old_size=list(old_grid),
                                                 num_prefix_tokens=0)
                report.resampled.append(f"pos_embed.weight grid {old_grid} -> {tuple(model.grid_size)}")
            if target_prefix > source_prefix:
                prefix = target["pos_embed.weight"][:, :target_prefix]  # the model's own init
                report.reinitialized.append("pos_embed.weight[cls position]")
            elif target_prefix < source_prefix:
                prefix = prefix[:, :0]
                report.dropped.append("pos_embed.weight[cls position] (model uses mean pooling)")
            state_dict["pos_embed.weight"] = torch.cat([prefix, patches], dim=1)  # (1, N, D)

    if "patch_embed.proj.weight" in state_dict and "patch_embed.proj.weight" in target:
        kernel = state_dict["patch_embed.proj.weight"]  # (D, C_old, p_old, p_old)
        _, in_ch, kh, kw = target["patch_embed.proj.weight"].shape
        if tuple(kernel.shape[-2:]) != (kh, kw):
            # FlexiViT's pseudo-inverse resize: a resized patch times the new kernel ~ the old response
            report.resampled.append(f"patch_embed.proj.weight kernel {tuple(kernel.shape[-2:])} -> {(kh, kw)}")
            kernel = resample_patch_embed(kernel, [kh, kw])
        if kernel.shape[1] != in_ch:
            report.adapted_channels.append(f"patch_embed.proj.weight {kernel.shape[1]} -> {in_ch} bands")
            kernel = adapt_input_channels(kernel, in_ch)
        state_dict["patch_embed.proj.weight"] = kernel

    for key in [k for k in target if k.startswith("prompt.") and k not in state_dict]:
        report.reinitialized.append(f"{key} (prompt tokens start from their init)")

    for key in [k for k in target if k.startswith("early_exit.") and k not in state_dict]:
        report.reinitialized.append(f"{key} (exit heads start from their init)")

    for key in ("head.weight", "head.bias"):
        if key in target and key not in state_dict:  # a headless (feature-extractor) checkpoint
            report.reinitialized.append(f"{key} (checkpoint has no head)")
        elif key in state_dict and (key not in target or target[key].shape != state_dict[key].shape):
            old = tuple(state_dict.pop(key).shape)
            if key in target:
                report.reinitialized.append(f"{key} ({old[0]} -> {target[key].shape[0]} classes)")
            else:
                report.dropped.append(f"{key} (model has no head)")
    # a task's other heads (a segmentation decoder, multi-task heads, auxiliary heads): the same rule
    for key in [k for k in state_dict if k.startswith(HEAD_PREFIXES)]:
        if key not in target or target[key].shape != state_dict[key].shape:
            state_dict.pop(key)
            report.dropped.append(f"{key} (not a head of this model's task)")
    for key in target:
        if key.startswith(HEAD_PREFIXES) and key not in state_dict and key not in ("head.weight", "head.bias"):
            report.reinitialized.append(f"{key} (the task's head: not in the checkpoint)")

    # what's left is copied as it is, or (the width, depth, mlp size differ) can't be fitted
    adapted, mismatched, unexpected = {}, [], []
    for key, value in state_dict.items():
        if key not in target:
            unexpected.append(key)
        elif target[key].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            adapted[key] = value
    # the time and metadata modules (model/temporal, model/metadata) start from their own init when image
    # weights have none for them, as ViViT and TimeSformer start from an image model
    report.reinitialized += [f"{k} (time or metadata module: its own init)" for k in target
                             if k.startswith(NEW_MODULES) and k not in state_dict]
    explained = {entry.split(" ")[0] for entry in report.reinitialized}
    missing = [k for k in target if k not in state_dict and k not in explained]
    if strict_shapes and (mismatched or unexpected or missing):
        problems = [f"{label}: {_preview(keys)}" for label, keys in
                    (("shape mismatch", mismatched), ("not in model", unexpected), ("missing", missing)) if keys]
        raise PretrainedLoadError(
            f"pretrained {report.source} does not fit the model ({' | '.join(problems)}); match model.embed_dim/"
            "depth/num_heads/mlp_dim/norm to the checkpoint, or load with strict_shapes=False to skip these"
        )
    report.dropped += [f"{k} (not in model)" for k in unexpected] + [f"{k}: shape mismatch" for k in mismatched]
    report.reinitialized += [f"{k} (not in checkpoint)" for k in missing]
    report.loaded += [k for k in adapted if not _mentioned(k, report)]
    return adapted


def adapt_input_channels(kernel: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fit a patch kernel (D, C_old, p, p) to `in_channels` bands: every band gets the mean kernel
    over the old bands, scaled by C_old / C_new so an image whose bands are all equal gives the same
    embedding as before. timm's `adapt_input_conv` instead cycles R, G, B over the new bands, which
    assumes the first bands are RGB; multispectral band orders (Sentinel-2: coastal, blue, green...)
    don't follow that, so we use the band-agnostic mean (for 1 band both give the sum)."""
    old_channels = kernel.shape[1]
    mean_kernel = kernel.float().mean(dim=1, keepdim=True)  # (D, 1, p, p)
    return (mean_kernel.repeat(1, in_channels, 1, 1) * (old_channels / in_channels)).to(kernel.dtype)


def _source_grid(num_patches: int, target_grid) -> tuple[int, int]:
    """The checkpoint's patch grid: the model's own if the count matches, else a square one."""
    if num_patches == target_grid[0] * target_grid[1]:
        return tuple(target_grid)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise PretrainedLoadError(
            f"position embedding has {num_patches} patch positions: not the model's grid {tuple(target_grid)} "
            "and not a square grid, so it can't be resampled"
        )
    return side, side


def _mentioned(key: str, report: LoadReport) -> bool:
    return any(entry.startswith(key + " ") for entry in report.resampled + report.adapted_channels)


# -------------------------------------------------------------------------------------- loading

def load_pretrained(model: nn.Module, source: str, strict_shapes: bool = True) -> LoadReport:
    """Load weights from `source` into `model` in place, adapting them to its shape. `source` is a
    path to a vitsweep checkpoint or a timm state dict (.pt/.pth/.safetensors), or `timm:NAME`.
    Prints and returns a `LoadReport` of what was adapted."""
    report = LoadReport(source)
    if source.startswith(TIMM_PREFIX):
        _refuse_conv_stem(model, source)  # before the download
        state_dict = convert_timm_state_dict(_timm_hub_state_dict(source[len(TIMM_PREFIX):]), model, report)
    else:
        state_dict, is_vitsweep = _read_weights_file(source)
        if not is_vitsweep:
            state_dict = convert_timm_state_dict(state_dict, model, report)
    state_dict = adapt_state_dict(state_dict, model, strict_shapes=strict_shapes, report=report)
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)  # what's absent was checked and reported above
    log.info("%s", report)
    return report


def _read_weights_file(source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict in the file, and whether it is in vitsweep's names: a training checkpoint
    ({"model", "config"}) or a state dict with our `pos_embed.weight` (timm says `pos_embed`)."""
    from hydra.utils import to_absolute_path  # Hydra jobs may run in their own dir; paths are the user's

    path = Path(to_absolute_path(str(Path(source).expanduser())))
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained={source}: no such file ({path})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path), device="cpu")
        return state_dict, "pos_embed.weight" in state_dict
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused (e.g. an OmegaConf object inside), or not a torch file
        raise PretrainedLoadError(
            f"model.pretrained={source}: torch.load(weights_only=True) failed ({type(e).__name__}); "
            "save plain tensors and dicts (OmegaConf.to_container for configs)"
        ) from e
    is_training_checkpoint = isinstance(checkpoint, dict) and "model" in checkpoint and "config" in checkpoint
    state_dict = _unwrap(checkpoint)
    if is_training_checkpoint and isinstance(checkpoint.get("pretrain"), dict):
        # mode=pretrain: the encoder, without the decoder, the projection heads or DINO's student
        prefix = checkpoint["pretrain"]["encoder_prefix"]
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        log.info("model.pretrained=%s: the encoder of a pretrain=%s run", source, checkpoint["pretrain"].get("method"))
    return state_dict, is_training_checkpoint or "pos_embed.weight" in state_dict


def _unwrap(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: vitsweep's {"model": ...}, or timm/DeiT {"state_dict": ...},
    without the prefixes that DDP ("module.") and torch.compile ("_orig_mod.") add."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    for prefix in ("module.", "_orig_mod."):
        if checkpoint and all(k.startswith(prefix) for k in checkpoint):
            checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items()}
    return checkpoint


def _timm_hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    import timm

    if not timm.is_model(name):
        raise PretrainedLoadError(
            f"model.pretrained=timm:{name}: timm has no model named {name!r} (timm.list_models('vit_*') lists them)"
        )
    try:
        timm_model = timm.create_model(name, pretrained=True)
    except _hub_errors() as e:
        raise PretrainedLoadError(
            f"model.pretrained=timm:{name}: cannot download the weights, the Hugging Face hub is unreachable "
            f"({type(e).__name__}); on a machine with network run python -c \"import timm, torch; "
            f"torch.save(timm.create_model('{name}', pretrained=True).state_dict(), '{name}.pth')\" "
            f"and pass the file: model.pretrained=/path/to/{name}.pth"
        ) from None  # the hub's own traceback is pages of retries; the line above says what to do
    return timm_model.state_dict()


def _hub_errors() -> tuple[type[Exception], ...]:
    """What a failed download raises: huggingface_hub's errors are OSErrors (connection, offline mode,
    not cached, HTTP status); a raw httpx error can escape its retries."""
    try:
        import httpx
    except ImportError:
        return (OSError,)
    return (OSError, httpx.HTTPError)


def _preview(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------- freezing

def freeze(model: nn.Module, trainable: str = "all") -> list[str]:
    """Set requires_grad so that only the parameters named by `trainable` train (see TRAINABLE):
    `all`, `head`, `head+norm` (head and final norm), `head+norm+last_block` or `prompt+head`.
    Returns the names of the trainable parameters. The optimizer should get only `p.requires_grad`
    parameters. A model names its last block with `last_block_name` (default `blocks.<last>`)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"model.trainable={trainable!r} is not one of: {', '.join(TRAINABLE)}")
    if trainable == "prompt+head" and not any(name.startswith("prompt.") for name, _ in model.named_parameters()):
        raise ValueError("model.trainable=prompt+head but the model has no prompt tokens: "
                         "add model/prompt=shallow or model/prompt=deep")
    last_block = model.last_block_name() if hasattr(model, "last_block_name") else f"blocks.{len(model.blocks) - 1}"
    prefixes = tuple(p.format(last_block=last_block) for p in TRAINABLE[trainable])
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            names.append(name)
    return names
