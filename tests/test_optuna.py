"""Optuna searches (conf/hparams_search/): a real 3-trial TPE search on synthetic data, one trial of
which fails; its study in SQLite in the sweep dir; and the config wiring (direction from the monitor)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, TINY_RUN, run_cli
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from vitsweep.run.job import PrepareSweepDir

SEARCHES = sorted(path.stem for path in (ROOT / "conf" / "hparams_search").glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("mode", ["max", "min"])
def test_direction_follows_the_monitor_mode(search, mode):
    cfg = compose_train([f"hparams_search={search}", f"trainer.monitor_mode={mode}"])
    assert cfg.hydra.sweeper.direction == f"{mode}imize"


@pytest.mark.parametrize("search", SEARCHES)
def test_search_keys_exist_and_study_lives_in_the_sweep_dir(search):
    cfg = compose_train([f"hparams_search={search}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"
    assert sweeper.sampler.seed is not None  # resume=true replays the same trials
    for key in sweeper.params:
        compose_train([f"hparams_search={search}", f"{key}=1"])  # raises if the key is not in the config


def test_prepare_sweep_dir_creates_the_dir_and_sets_a_study_aside_on_resume(tmp_path):
    sweep_dir = tmp_path / "a" / "b"
    config = compose_train(["hparams_search=vit_optuna", f"hydra.sweep.dir={sweep_dir}"])
    PrepareSweepDir().on_multirun_start(config=config)
    assert sweep_dir.is_dir()
    (sweep_dir / "optuna.db").write_text("an earlier study")
    PrepareSweepDir().on_multirun_start(config=config)  # resume=false: the study is continued, kept in place
    assert (sweep_dir / "optuna.db").read_text() == "an earlier study"
    resumed = compose_train(["hparams_search=vit_optuna", f"hydra.sweep.dir={sweep_dir}", "resume=true"])
    PrepareSweepDir().on_multirun_start(config=resumed)
    assert not (sweep_dir / "optuna.db").exists()
    (kept,) = sweep_dir.glob("optuna.*.db")
    assert kept.read_text() == "an earlier study"


# the search of vit_optuna with a tiny model; num_heads 3 cannot split embed_dim 32, so those trials fail.
# The config's sampler seed (0) asks for both values of num_heads among the first three trials.
SEARCH = ["hparams_search=vit_optuna", "hydra.sweeper.n_trials=3",
          "model.num_heads=choice(2,3)", *[a for a in TINY_RUN if not a.startswith("model.num_heads")],
          "logger=none"]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optuna")
    proc = run_cli(SEARCH, tmp, multirun=True, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the num_heads=3 trials failed (docs/sweeps.md)
    return tmp / "sweep", proc


def load_study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="vitsweep", storage=f"sqlite:///{sweep_dir}/optuna.db")


@pytest.mark.slow
def test_search_runs_its_trials_and_writes_the_best(search):
    sweep_dir, _ = search
    study = load_study(sweep_dir)  # the study file exists and holds the search
    assert len(study.trials) == 3
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    completed = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    assert results["best_value"] == pytest.approx(max(trial.value for trial in completed))
    assert set(results["best_params"]) >= {"optimizer.lr", "optimizer.weight_decay", "model.drop_path"}
    assert "model.depth" not in results["best_params"]  # fixed on the command line: not searched
    for trial in completed:  # each trial's value is what its job's summary says
        summary = json.loads((sweep_dir / str(trial.number) / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["best_value"] == pytest.approx(trial.value)


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_search_goes_on(search):
    sweep_dir, proc = search
    study = load_study(sweep_dir)
    states = {trial.number: trial.state for trial in study.trials}
    assert TrialState.FAIL in states.values() and TrialState.COMPLETE in states.values()
    for trial in study.trials:
        summary = json.loads((sweep_dir / str(trial.number) / "summary.json").read_text())
        if trial.params["model.num_heads"] == 3:
            assert trial.state == TrialState.FAIL and trial.value is None
            assert summary["status"] == "failed" and "num_heads" in summary["error"]
        else:
            assert trial.state == TrialState.COMPLETE
    assert "Failed experiment" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_resume_replays_the_search_without_retraining(search, tmp_path):
    """resume=true in the same sweep dir: the seeded sampler asks the same trials, completed ones come
    back from their summary.json, and the rebuilt study matches the first one."""
    sweep_dir, _ = search
    first = load_study(sweep_dir)
    metrics_before = {n: (sweep_dir / str(n) / "metrics.jsonl").read_text() for n in range(3)}
    proc = run_cli([*SEARCH, "resume=true"], sweep_dir.parent, multirun=True, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the failed trials are failed again
    replayed = load_study(sweep_dir)
    assert [t.params for t in replayed.trials] == [t.params for t in first.trials]
    assert [t.state for t in replayed.trials] == [t.state for t in first.trials]
    assert [t.value for t in replayed.trials] == [t.value for t in first.trials]
    for trial in first.trials:
        if trial.state == TrialState.COMPLETE:
            assert "completed before: skipped" in proc.stdout
            metrics = (sweep_dir / str(trial.number) / "metrics.jsonl").read_text()
            assert metrics == metrics_before[trial.number]
    assert len(list(sweep_dir.glob("optuna.*.db"))) == 1  # the first study, set aside
