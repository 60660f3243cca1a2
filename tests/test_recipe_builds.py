"""Every shipped recipe, every cell of every ablation grid and every corner of every Optuna search builds its
model (and its optimizer): composed as Hydra composes the job, built by the project's build with its parameters
on the meta device (no memory, no data read; the build's one-forward check runs on meta too). A recipe that
moves under an ablation (cls to mean pooling under EViT) fails here in seconds, not in the first job of a
sweep. The EViT and ToMe ablations also train one job each through the CLI (slow)."""

from __future__ import annotations

import contextlib
import functools
import itertools

import pytest
import torch
from conftest import ROOT, TINY_RUN, read_summary, run_cli
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vitsweep.model.metadata import reads_metadata
from vitsweep.run.build import build_data, build_model
from vitsweep.sweep_files import find_sources, swept_overrides

CONF = ROOT / "conf"
EXPERIMENTS = sorted(path.relative_to(CONF / "experiment").with_suffix("").as_posix()
                     for path in (CONF / "experiment").rglob("*.yaml"))
ABLATIONS = [name for name in EXPERIMENTS if name.startswith("ablation/")]
SEARCHES = sorted(path.stem for path in (CONF / "hparams_search").glob("*.yaml"))
PARSER = OverridesParser.create()
# what the model, its task and optimizer are built from (model, task: their interpolations, e.g. ${data.num_classes})
BUILT_FROM = ["model", "task", "data", "optimizer", "loss", "metrics", "multi_label"]
TINY_SOURCE = {"num_train": 16, "num_val": 8, "num_test": 8}  # a model sized by the data sees this much of it


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter moves to the meta device as its module registers it (accelerate's init_empty_weights):
    `with torch.device("meta")` cannot build the ViT, whose constructor computes real tensors (the drop-path
    rates, the window masks), so buffers stay real and only the weights cost nothing."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_on_meta(cfg):
    """The job's model as the project builds it (the one place this file calls the build), model.pretrained
    skipped. A model sized by the data (multi-task heads without num_classes, model/metadata's columns) is
    sized by a tiny synthetic source of the recipe's shape."""
    task = instantiate(cfg.task)
    data_args = {}
    if sized_by_data(cfg):
        assert "synthetic" in cfg.data.source._target_, "a model sized by the data needs a synthetic stand-in here"
        data = build_data(OmegaConf.merge(cfg, {"data": {"source": TINY_SOURCE}}), task)
        task.count_classes(data)
        if reads_metadata(cfg.model):
            data_args["metadata_spec"] = data.metadata_spec()
    with parameters_on_meta():
        model = build_model(cfg, task, from_checkpoint=True, **data_args)
    assert all(param.is_meta for param in model.parameters())
    return model


def sized_by_data(cfg) -> bool:
    return reads_metadata(cfg.model) or not heads_known(OmegaConf.to_yaml(cfg.task, resolve=True))


@functools.cache
def heads_known(task: str) -> bool:
    """Whether the task (its resolved config as YAML: the cache's key) knows its head sizes from the config."""
    return instantiate(OmegaConf.create(task)).heads_known()


# ----------------------------------------------------------------------------- the cells


def grid_cells(ablation: str) -> list[list[str]]:
    """The jobs of `python run.py -m experiment=<ablation>`: Hydra's BasicSweeper's own expansion."""
    (cells,) = BasicSweeper.split_arguments(swept_overrides(compose_cached(f"experiment={ablation}")), None)
    return cells


def search_cells(search: str) -> tuple[str, list[list[str]]]:
    """The corners of an Optuna search, on the recipe its W&B sweep names (wandb_sweep.experiment)."""
    source = next(source for source in find_sources(CONF) if source.kind == "search" and source.name == search)
    base = f"experiment={source.options['experiment']} hparams_search={search}"
    return base, corners(swept_overrides(compose_cached(base)))


def corners(overrides) -> list[list[str]]:
    """Every choice, and both bounds of every interval, crossed."""
    axes = []
    for override in overrides:
        key = override.get_key_element()
        if override.is_interval_sweep():
            axes.append([f"{key}={override.value().start}", f"{key}={override.value().end}"])
        elif override.is_sweep_override():
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(cell) for cell in itertools.product(*axes)]


@functools.cache
def compose_cached(overrides: str):
    """Composed once per set of group choices, the slow part (~0.3 s each); value overrides are laid on
    a copy afterwards, as Hydra lays them on the composed config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides.split(), return_hydra_config=True)


def compose_cell(base: str, cell: list[str]):
    """The part of one job's config the build reads: `base` plus the cell's overrides, group choices composed,
    values laid on top (a key the job config lacks fails, as Hydra fails it)."""
    parsed = PARSER.parse_overrides(cell)
    choices = compose_cached(base).hydra.runtime.choices
    groups = sorted(o.input_line for o in parsed if o.get_key_element() in choices)
    job = compose_cached(" ".join([base, *groups]))
    for override in parsed:
        if override.get_key_element() in choices:  # the option exists and was taken
            assert job.hydra.runtime.choices[override.get_key_element()] == override.value(), override.input_line
    cfg = OmegaConf.masked_copy(job, BUILT_FROM)  # the rest (hydra, paths, trainer) would only cost copying
    for override in parsed:
        key = override.get_key_element()
        if key not in choices:
            assert OmegaConf.select(job, key, default=KeyError) is not KeyError, f"{key} is not a config key"
            if key.split(".")[0] in BUILT_FROM:
                OmegaConf.update(cfg, key, override.value(), merge=True)
    cfg.model.pretrained = None
    return cfg


def cells() -> list[tuple[str, list[str]]]:
    found = [(f"experiment={name}", []) for name in EXPERIMENTS]
    found += [(f"experiment={name}", cell) for name in ABLATIONS for cell in grid_cells(name)]
    for search in SEARCHES:
        base, search_cells_ = search_cells(search)
        found += [(base, cell) for cell in search_cells_]
    return found


# ----------------------------------------------------------------------------- the tests


def test_every_recipe_ablation_cell_and_search_corner_builds_its_model_on_meta():
    """One test over every cell (a few hundred), each failure named by its overrides: a parametrized test
    would compose every cell at collection time, whatever was selected. Cells that differ outside what the
    model is built from (seed, lr, batch size) share one model; each optimizer is built on it."""
    models, optimizers, failures = {}, set(), []
    for base, cell in cells():
        cfg = compose_cell(base, cell)
        model_key = repr([OmegaConf.to_container(cfg[name], resolve=True)
                          for name in ("model", "task", *(["data"] if sized_by_data(cfg) else []))])
        optimizer_key = model_key + repr(OmegaConf.to_container(cfg.optimizer, resolve=True))
        if optimizer_key in optimizers:
            continue
        optimizers.add(optimizer_key)
        try:
            if model_key not in models:
                models[model_key] = None  # a model that failed fails once
                models[model_key] = build_on_meta(cfg)
            if models[model_key] is not None:
                instantiate(cfg.optimizer, model=models[model_key])
        except Exception as err:  # noqa: BLE001 -- collected, so one run names every broken cell
            failures.append(f"{base} {' '.join(cell)}: {type(err).__name__}: {' '.join(str(err).split())[:400]}")
    assert not failures, "\n".join(failures)
    assert len(models) > len(EXPERIMENTS) + len(SEARCHES)


def test_every_ablation_is_a_grid_and_every_search_has_corners():
    assert ABLATIONS and SEARCHES
    assert all(len(grid_cells(name)) >= 2 for name in ABLATIONS)
    assert all(len(search_cells(name)[1]) >= 2 for name in SEARCHES)


def test_cells_are_the_sweepers_points():
    grid = PARSER.parse_overrides(["a=1,2", "b=range(0,3)", "c=choice(x,y)", "d=5"])
    (cells,) = BasicSweeper.split_arguments(grid, None)
    assert len(cells) == 2 * 3 * 2 and cells[0] == ["a=1", "b=0", "c=x", "d=5"] and cells[-1][:3] == ["a=2", "b=2", "c=y"]
    search = PARSER.parse_overrides(["lr=tag(log, interval(1e-3, 8e-3))", "w=choice(64, 96)", "d=int(interval(1, 4))"])
    assert corners(search) == [[f"lr={lr}", f"w={w}", f"d={d}"] for lr in (0.001, 0.008) for w in (64, 96) for d in (1, 4)]


def test_a_cell_that_cannot_build_fails_the_build():
    """The meta build refuses what the real one refuses: EViT under mean pooling (the drift this file
    catches), a width no head count divides, and, in the forward check on meta, a norm eps of the wrong type."""
    with pytest.raises(Exception, match="model.pooling=cls"):
        build_on_meta(compose_cell("experiment=ablation/token_pruning_evit", ["model.pooling=mean"]))
    with pytest.raises(Exception, match="num_heads"):
        build_on_meta(compose_cell("experiment=ablation/depth_width", ["model.embed_dim=66"]))
    with pytest.raises(ValueError, match="cannot run a forward pass"):
        build_on_meta(compose_cell("experiment=cifar10_cpu", ["model.norm.eps=bogus"]))
    build_on_meta(compose_cell("experiment=ablation/token_pruning_evit", []))  # as written: builds


def test_token_pruning_ablations_pin_what_they_need():
    for ablation in ("token_pruning_evit", "token_pruning_tome"):
        cfg = compose_cached(f"experiment=ablation/{ablation}")
        assert cfg.model.pooling == "cls" and cfg.hydra.runtime.choices["model/attention"] == "full"


# ------------------------------------------------------------------- EViT and ToMe, one job each


@pytest.mark.slow
@pytest.mark.parametrize(("ablation", "setting", "tokens"), [
    ("token_pruning_evit", "model.token_pruning.keep_rate=0.5", [17, 1 + 8 + 1, 1 + 4 + 1 + 1]),  # kept + fused
    ("token_pruning_tome", "model.token_pruning.r=4", [17, 17 - 4, 17 - 8]),
])
def test_token_pruning_ablation_trains_a_job_that_prunes(ablation, setting, tokens, tmp_path):
    """`python run.py experiment=ablation/<it>` trains one job (each refused to start once the recipe pooled
    the mean), and its 2 blocks see fewer tokens: on 16 px synthetic images in 4 px patches, 16 patches and
    the cls token enter. The ablation's depth and pooling stay; the width is tiny."""
    small = [arg for arg in TINY_RUN if not arg.startswith("model.depth=")]
    run_cli([f"experiment=ablation/{ablation}", setting, *small, "trainer.max_time=null", "logger=none"], tmp_path)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["best_value"] is not None
    assert summary["tokens_per_layer"] == tokens
