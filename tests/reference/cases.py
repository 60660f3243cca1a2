"""The cases of the trunk reference (make_trunk_reference.py writes them, tests/test_trunk_reference.py checks
them): which models, which inputs, and what of each model is recorded. Everything here goes through the
public surface: configs composed from conf/, `instantiate`, the model's forward, the task's model
arguments, the pretraining methods, and the trunk's calls for MAE (visible patches) and DINO (crops of
another size)."""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vitsweep.data.inputs import Inputs

CONF = Path(__file__).resolve().parents[2] / "conf"
IMAGE, PATCH, CHANNELS, CLASSES, FRAMES = 16, 4, 3, 5, 3
BASE = ["data=synthetic", f"data.image_size={IMAGE}", f"data.in_channels={CHANNELS}", f"data.num_classes={CLASSES}",
        "model=vit", f"model.patch_size={PATCH}", "model.embed_dim=16", "model.depth=3", "model.num_heads=2",
        "model.mlp_dim=32", "model.drop_path=0.0", "model.dropout=0.0", "model.pretrained=null"]
METADATA_SPEC = {"numeric": ["events"], "mean": [500.0], "std": [100.0], "categorical": {"region": 4}}

# the research options, one group each: a case takes at most one option of a group
OPTIONS = {
    "prompt": {"shallow": ["model/prompt=shallow", "model.prompt.length=2"],
               "deep": ["model/prompt=deep", "model.prompt.length=2"]},
    "temporal": {"frames": ["model/temporal=none"],  # a bag of frames: time series through the image model
                 "factorised": ["model/temporal=factorised"],
                 "divided": ["model/temporal=divided"]},
    "metadata": {"token": ["model/metadata=token"], "film": ["model/metadata=film"], "late": ["model/metadata=late"]},
    "token_pruning": {"evit": ["model/token_pruning=evit"],
                      "tome": ["model/token_pruning=tome", "model.token_pruning.r=2"]},
    "early_exit": {"confidence": ["model/early_exit=confidence", "model.early_exit.threshold=0.3"]},
    "attention": {"local": ["model/attention=local"],
                  "windowed": ["model/attention=windowed", "model.attention.window_size=2"],
                  "sparse": ["model/attention=sparse"]},
    "sharing": {"all": ["model/sharing=all"], "cycle": ["model/sharing=cycle"]},
    "pos_embed": {"sincos": ["model/pos_embed=sincos"], "none": ["model/pos_embed=none"]},
    "norm": {"batchnorm": ["model/norm=batchnorm"], "rmsnorm": ["model/norm=rmsnorm"]},
    "stem": {"conv": ["model.conv_stem=[8,8]"]},
    "placement": {"post": ["model.norm_placement=post"]},
}
POOLINGS = ("cls", "mean")
# the heads tasks put on the trunk (read through its features), each on a trunk with one option or none
TASK_HEADS = {
    "segmentation_patch": ["task=segmentation", "data.label_granularity=patch"],
    "segmentation_pixel": ["task=segmentation", "data.label_granularity=pixel", "task.decoder=pup",
                           "task.decoder_channels=8"],
    "aux_heads": ["task.aux_heads=[deep_supervision,region,attention]", "+task.aux.deep_supervision.block=-2"],
}
METHODS = {"mae": ["pretrain=mae", "pretrain.decoder_dim=16", "pretrain.decoder_num_heads=2"],
           "dino": ["pretrain=dino", "pretrain.out_dim=32", "pretrain.hidden_dim=16", "pretrain.bottleneck_dim=8",
                    "pretrain.num_local_crops=2", "pretrain.local_crop_size=8"]}
# the options a pretraining method takes (the others are for fine-tuning: refused)
PLAIN_ENCODER_GROUPS = ("attention", "sharing", "pos_embed", "norm", "stem", "placement")


def _cases() -> dict[str, dict]:
    cases = {}
    singles = [(group, name, overrides) for group, options in OPTIONS.items() for name, overrides in options.items()]
    for pooling in POOLINGS:
        pool = [f"model.pooling={pooling}"]
        cases[f"plain/{pooling}"] = {"overrides": pool, "groups": {}}
        for group, name, overrides in singles:
            cases[f"{group}={name}/{pooling}"] = {"overrides": pool + overrides, "groups": {group: name}}
        for (g1, n1, o1), (g2, n2, o2) in itertools.combinations(singles, 2):
            if g1 != g2:
                cases[f"{g1}={n1}+{g2}={n2}/{pooling}"] = {"overrides": pool + o1 + o2, "groups": {g1: n1, g2: n2}}
        for head, head_overrides in TASK_HEADS.items():
            cases[f"head={head}/{pooling}"] = {"overrides": pool + head_overrides, "groups": {}, "head": head}
            for group, name, overrides in singles:
                cases[f"head={head}+{group}={name}/{pooling}"] = {"overrides": pool + head_overrides + overrides,
                                                                  "groups": {group: name}, "head": head}
        for method, method_overrides in METHODS.items():
            cases[f"method={method}/{pooling}"] = {"overrides": pool + method_overrides, "groups": {}, "method": method}
            for group, name, overrides in singles:
                if group in PLAIN_ENCODER_GROUPS:
                    cases[f"method={method}+{group}={name}/{pooling}"] = {
                        "overrides": pool + method_overrides + overrides, "groups": {group: name}, "method": method}
    return cases


CASES = _cases()


def compose_case(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={CONF.parent}", *BASE, *overrides])


def fill_weights(module: torch.nn.Module) -> None:
    """Every floating-point tensor of the state dict filled from a generator seeded by its name: weights that
    depend on the names and shapes alone (what a checkpoint keys on), not on the order of construction."""
    state = module.state_dict()
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        if name.endswith(("running_var", ".std")):
            values = values.abs() + 0.5  # variances and stds are positive
        elif tensor.dim() == 1 and "norm" in name and name.endswith("weight"):
            values = 1 + 0.2 * values  # norm scales near one
        else:
            values = 0.3 * values
        state[name] = values.to(tensor.dtype)
    module.load_state_dict(state)


def inputs_for(groups: dict[str, str]):
    """Images (2, C, H, W); frames (2, T, C, H, W) with dates for the temporal options; an Inputs with a
    numeric and a categorical column (one cell missing each) for the metadata ones."""
    generator = torch.Generator().manual_seed(7)
    temporal, metadata = "temporal" in groups, "metadata" in groups
    shape = (2, FRAMES, CHANNELS, IMAGE, IMAGE) if temporal else (2, CHANNELS, IMAGE, IMAGE)
    images = torch.randn(shape, generator=generator)
    if not temporal and not metadata:
        return images
    dates = torch.tensor([[18300.0, 18330.0, float("nan")], [18400.0, 18410.0, 18450.0]]) if temporal else None
    numeric = torch.tensor([[520.0], [float("nan")]]) if metadata else None
    categories = torch.tensor([[2], [-1]]) if metadata else None
    return Inputs(images, numeric, categories, dates)


def build_case(case: dict, cfg=None):
    """The model of a case (weights filled), and for a method case the method's module around it; `cfg`: the
    case's config when composed already (tests/test_trunk_reference.py composes the cases faster)."""
    cfg = compose_case(case["overrides"]) if cfg is None else cfg
    extra = {"metadata_spec": METADATA_SPEC} if "metadata" in case["groups"] else {}
    if "method" in case:
        encoder = instantiate(cfg.model, num_classes=0, **extra)
        model = instantiate(cfg.pretrain).wrap(encoder)
    else:
        task = instantiate(cfg.task)
        model = instantiate(cfg.model, **task.model_args(), **extra)
    torch.manual_seed(0)
    fill_weights(model)
    return model


def refusal(err: BaseException) -> str:
    """The one-line message of a refused case: the ValueError behind Hydra's InstantiationException."""
    while err.__cause__ is not None and not isinstance(err, ValueError):
        err = err.__cause__
    if not isinstance(err, ValueError):
        raise err
    return str(err).splitlines()[0]


def _plain(outputs):
    if isinstance(outputs, dict):
        return {name: _plain(value) for name, value in outputs.items()}
    return outputs.detach().clone()


@torch.no_grad()
def run_case(model, case: dict) -> dict:
    """What is recorded of a built case: eval-mode outputs (with every early exit's logits and where each
    sample left), then training-mode outputs; for a method, its eval outputs (features and per-image loss),
    the encoder's tokens on visible patches only (MAE) and its pooled features of smaller crops (DINO)."""
    from vitsweep.model.early_exit import record_exits

    inputs = inputs_for(case["groups"])
    out = {}
    if "method" in case:
        model.eval()
        out["eval"] = _plain(model(inputs))
        encoder = model.encoder
        visible = torch.tensor([[0, 3, 5, 6], [15, 1, 2, 9]])
        # the trunk's own loop on the visible patches only, and on crops of another size (a 2 x 2 grid); at
        # 5462088 these were vitsweep.pretrain.encoder's encode(encoder, inputs, visible) and pooled_features
        out["visible_tokens"] = _plain(encoder.forward_features(inputs, visible=visible))
        out["small_crops"] = _plain(encoder.forward_head(encoder.forward_features(inputs[..., :8, :8]), pre_logits=True))
        return out
    model.eval()
    out["eval"] = _plain(model(inputs))
    with record_exits(model) as exits:
        model(inputs)
    if exits is not None:
        out["exit_logits"], out["exit_index"] = _plain(exits.logits), _plain(exits.index)
    model.train()
    out["train"] = _plain(model(inputs))
    return out
