"""Every option of every config group composes, resolves, and builds its component."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
SKIP_GROUPS = {"hydra", "paths"}  # hydra's own settings; paths has one option
# options that ask for values on the command line (`???`), and values that satisfy them
REQUIRED = {
    ("data", "imagefolder"): ["data.root=/nonexistent"],  # never read by composition
    ("data", "csv"): ["data.root=/nonexistent"],
    ("data", "maskfolder"): ["data.root=/nonexistent"],
    ("task", "multi_task"): ["task.heads={riot:{type:classification,column:riot},crowd:{type:regression,column:n}}"],
    ("data", "datamodule"): ["data.source={_target_:vitsweep.data.synthetic.load_synthetic}", "data.image_size=16",
                             "data.in_channels=3", "data.num_classes=4"],
    ("model", "vit"): ["model.patch_size=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                       "model.mlp_dim=64"],
    # model/metadata sizes its encoder by the data's columns (modes.py passes DataModule.metadata_spec())
    **{("model/metadata", fusion): [("+model.metadata_spec={numeric: [events], mean: [500.0], std: [100.0], "
                                     "categorical: {region: 4}}")] for fusion in ("token", "film", "late")},
}


def group_options():
    """(group path, option) for every yaml under conf/<group>/..., nested groups included."""
    for yaml in sorted(CONF.rglob("*.yaml")):
        rel = yaml.relative_to(CONF)
        if len(rel.parts) < 2 or rel.parts[0] in SKIP_GROUPS:
            continue
        group = "/".join(rel.parts[:-1])
        if rel.parts[0] == "experiment":  # experiment/ablation/x.yaml is option "ablation/x" of "experiment"
            yield "experiment", "/".join(rel.parts[1:])[: -len(".yaml")]
        else:
            yield group, rel.stem


def composed(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # the paths a real run takes from ${hydra:runtime...}
        paths = [f"paths.root_dir={CONF.parent}", "paths.output_dir=/tmp/vitsweep-test-config"]
        cfg = compose("train", overrides=paths + overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # lets other ${hydra:...} resolve as in a real run
        return cfg


def test_default_config_composes_and_lists_groups():
    cfg = composed([])
    for group in ("model", "data", "augment", "optimizer", "scheduler", "loss", "trainer", "logger", "paths"):
        assert group in cfg, group
    assert cfg.model.image_size == cfg.data.image_size and cfg.model.num_classes == cfg.data.num_classes


@pytest.mark.parametrize("group,option", sorted(set(group_options())))
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    cfg = composed(overrides)
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    if group.startswith("model"):
        model = instantiate(cfg.model)
        assert model.num_classes == cfg.data.num_classes
    elif group in ("optimizer",):
        import torch
        optimizer = instantiate(cfg.optimizer, model=torch.nn.Linear(2, 2))
        assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    elif group in ("loss", "augment", "trainer", "task", "pretrain") or (group == "logger" and cfg.get("logger")):
        assert instantiate(cfg[group]) is not None


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_pretrain_mode_composes_and_builds_each_method_around_the_model(method):
    import torch

    cfg = composed(["mode=pretrain", f"pretrain={method}"])
    assert cfg.mode == "pretrain" and cfg.pretrain._target_ == f"vitsweep.pretrain.{method.upper()}"
    encoder = instantiate(cfg.model, num_classes=0)
    model = instantiate(cfg.pretrain).wrap(encoder)
    assert model.encoder is encoder or method == "dino"  # DINO: `encoder` is the teacher, a copy of the student
    outputs = model.eval()(torch.randn(2, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size))
    assert outputs["features"].shape == (2, cfg.model.embed_dim) and outputs["loss"].shape == (2,)


def test_help_lists_the_groups():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(CONF.parent / "run.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for group in ("model", "data", "augment", "optimizer", "scheduler", "loss", "trainer", "logger"):
        assert f"{group}:" in out
