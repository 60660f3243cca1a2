"""W&B sweeps (sweeps/*.yaml, written by `vitsweep sweeps`: tests/test_sweep_files.py): each file is a valid
sweep whose parameters are keys and options of the composed config, mirrors the Hydra search or ablation it
names, and its command, run the way `wandb agent` runs it, trains one job that reports the sweep's metric."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_RUN, offline_env, read_summary
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from vitsweep.logger.wandb import override_values
from vitsweep.logger.wandb_offline import find_offline_runs, read_offline_run
from vitsweep.sweep_files import find_sources

SWEEPS = sorted(path.name for path in (ROOT / "sweeps").glob("*.yaml"))
AGENT_COMMAND = ["${env}", "python", "${program}", "${args_no_hyphens}"]
DISTRIBUTIONS = {"uniform", "log_uniform_values", "int_uniform", "q_uniform", "q_log_uniform_values",
                 "normal"}


def load_sweep(name: str) -> dict:
    return yaml.safe_load((ROOT / "sweeps" / name).read_text())


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def candidate_values(spec: dict) -> list:
    """The values a parameter can take that a test can compose: all of a list, the ends of a range."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def test_there_is_a_sweep_per_search_and_per_ablation():
    """Each ablation and search has its sweep file (`vitsweep sweeps` writes them), unless its config says
    why not (ablation/pretraining: its MAE and DINO starts are files on this machine)."""
    expected = {source.file_name for source in find_sources(ROOT / "conf")}
    assert set(SWEEPS) == expected
    configs = [*(ROOT / "conf" / "experiment" / "ablation").glob("*.yaml"), *(ROOT / "conf" / "hparams_search").glob("*.yaml")]
    opted_out = {path.stem for path in configs if yaml.safe_load(path.read_text()).get("wandb_sweep") is False}
    assert opted_out == {"pretraining"} and len(SWEEPS) == len(configs) - len(opted_out)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_is_a_wandb_sweep_that_passes_hydra_overrides(name):
    sweep = load_sweep(name)
    assert sweep["program"] == "run.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["command"][:4] == AGENT_COMMAND  # the values reach run.py as key=value overrides
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("maximize", "minimize")
    # <trainer.monitor>_best, in every run's summary; with early_terminate, the monitor W&B's hyperband reads
    assert sweep["metric"]["name"].endswith("_best") != ("early_terminate" in sweep)
    for key, spec in sweep["parameters"].items():
        assert ("value" in spec) + ("values" in spec) + ("distribution" in spec) == 1, key
        if "distribution" in spec:
            assert spec["distribution"] in DISTRIBUTIONS and spec["min"] < spec["max"], key
        if sweep["method"] == "grid":
            assert "distribution" not in spec, f"{key}: a grid needs values"


@pytest.mark.parametrize("name", SWEEPS)
def test_every_swept_key_exists_in_the_composed_config(name):
    sweep = load_sweep(name)
    parameters = sweep["parameters"]
    fixed = [f"{key}={spec['value']}" for key, spec in parameters.items() if "value" in spec]
    cfg = compose_train(fixed)
    monitor = cfg.trainer.monitor
    assert sweep["metric"]["name"] == (monitor if "early_terminate" in sweep else f"{monitor}_best")
    assert sweep["metric"]["goal"] == f"{cfg.trainer.monitor_mode}imize"
    for key, spec in parameters.items():
        if "value" in spec:
            continue  # composed above
        for value in candidate_values(spec):
            composed = compose_train([*fixed, f"{key}={value}"])  # an unknown key or option raises here
            if "/" in key or key in composed.hydra.runtime.choices:
                assert composed.hydra.runtime.choices[key] == str(value)
            else:
                assert OmegaConf.select(composed, key) == pytest.approx(value)


@pytest.mark.parametrize("name", [name for name in SWEEPS if name.startswith("search_")])
def test_search_sweep_mirrors_the_optuna_search(name):
    parameters = load_sweep(name)["parameters"]
    search = parameters.pop("hparams_search")["value"]
    recipe = parameters.pop("experiment")["value"]
    optuna_params = compose_train([f"experiment={recipe}", f"hparams_search={search}"]).hydra.sweeper.params
    assert set(parameters) == set(optuna_params) and name == f"search_{search}.yaml"


@pytest.mark.parametrize("name", [name for name in SWEEPS if name.startswith("ablation_")])
def test_ablation_sweep_mirrors_its_ablation_file(name):
    parameters = load_sweep(name)["parameters"]
    ablation = parameters.pop("experiment")["value"]
    grid = compose_train([f"experiment={ablation}"]).hydra.sweeper.params
    assert set(parameters) == set(grid)
    for key, spec in parameters.items():
        # a value that interpolates (model.pretrained=${starts.mae}) is passed on as written
        hydra_values = [v if "${" in v else OmegaConf.create({"v": v}).v for v in str(grid[key]).split(",")]
        assert [str(v) for v in spec["values"]] == [str(v) for v in hydra_values] or \
            spec["values"] == pytest.approx([float(v) for v in hydra_values])


@pytest.mark.slow
def test_agent_command_trains_one_job_in_its_run_dir(tmp_path):
    """Run the sweep's command as `wandb agent` builds it (its macros, its environment) for the first
    point of the seeds grid, on a tiny model: the job lands in outputs/wandb_sweeps/<sweep>/<run>,
    its W&B run has the agent's run id and reports the sweep's metric."""
    sweep = load_sweep("ablation_seeds.yaml")
    point = {key: {"value": candidate_values(spec)[0]} for key, spec in sweep["parameters"].items()}
    sweep_vars = create_sweep_command_args({"args": point})
    sweep_vars.update(env=["/usr/bin/env"], program=[str(ROOT / sweep["program"])])
    command = []
    for chunk in create_sweep_command(sweep["command"]):
        command += sweep_vars[chunk[2:-1]] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    command += [*TINY_RUN]  # after the sweep's values, as extra command items would be
    env = offline_env(tmp_path) | {"WANDB_SWEEP_ID": "sweep123", "WANDB_RUN_ID": "run456"}
    proc = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    job_dir = tmp_path / "outputs" / "wandb_sweeps" / "sweep123" / "run456"
    summary = read_summary(job_dir)
    assert summary["status"] == "completed"
    assert "seed=0" in summary["overrides"] and "experiment=ablation/seeds" in summary["overrides"]
    (run_file,) = find_offline_runs(job_dir)
    run = read_offline_run(run_file)
    assert run.run_id == "run456" and run.exit_code == 0
    assert run.summary[sweep["metric"]["name"]] == pytest.approx(summary["best_value"])
    assert run.config["seed"] == 0 and run.config["task_name"] == "ablation_seeds"


def test_sweep_files_are_listed_in_the_docs():
    docs = Path(ROOT / "docs" / "sweeps.md").read_text()
    for name in SWEEPS:
        assert f"sweeps/{name}" in docs


def test_overrides_become_typed_flat_config_keys():
    config = {"data": {"image_size": 32}, "model": {"depth": 4, "drop_path": 0.1}, "seed": 3}
    overrides = ["data=cifar10", "model.depth=4", "model/attention=windowed", "seed=3", "+model.drop_path=0.1",
                 "hydra.launcher.n_jobs=2"]
    assert override_values(overrides, config) == {
        "model.depth": 4, "model/attention": "windowed", "seed": 3, "model.drop_path": 0.1}
