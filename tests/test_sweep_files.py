"""`vitsweep sweeps`: the W&B sweep files of sweeps/ are generated from conf/, the committed ones are in sync,
and `--check` names what is not. tests/test_wandb_sweeps.py checks what the files say (valid sweeps, keys
that exist) and runs one the way `wandb agent` does."""

from __future__ import annotations

import shutil
import textwrap

import pytest
import yaml
from conftest import ROOT

from vitsweep import cli
from vitsweep.sweep_files import MARK


def sweeps(*args: str) -> int:
    return cli.main(["sweeps", *args])


@pytest.fixture
def repo(tmp_path):
    """A copy of conf/ with one ablation (seeds) and one search (vit_optuna), and an empty sweeps/: each
    generation composes only those two."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    for path in (conf / "experiment" / "ablation").glob("*.yaml"):
        if path.stem != "seeds":
            path.unlink()
    for path in (conf / "hparams_search").glob("*.yaml"):
        if path.stem != "vit_optuna":
            path.unlink()
    (tmp_path / "sweeps").mkdir()
    return tmp_path


def in_repo(repo, *args: str) -> int:
    return sweeps(*args, "--conf", str(repo / "conf"), "--out", str(repo / "sweeps"))


def load(repo, name: str) -> dict:
    return yaml.safe_load((repo / "sweeps" / name).read_text())


def add_ablation(repo, name: str, body: str) -> None:
    (repo / "conf" / "experiment" / "ablation" / f"{name}.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/digits_quickstart@_here_\n\n" + textwrap.dedent(body))


def test_committed_sweep_files_are_in_sync_with_conf(capsys):
    """Fails after a grid or search in conf/ changed without `vitsweep sweeps`."""
    assert sweeps("--check", "--conf", str(ROOT / "conf"), "--out", str(ROOT / "sweeps")) == 0, \
        capsys.readouterr().err
    for path in (ROOT / "sweeps").glob("*.yaml"):
        assert path.read_text().startswith(MARK), path  # nothing written by hand


def test_check_names_the_stale_file_and_generation_fixes_it(repo, capsys):
    assert in_repo(repo) == 0
    assert sorted(path.name for path in (repo / "sweeps").iterdir()) == [
        "ablation_seeds.yaml", "search_vit_optuna.yaml"]
    assert in_repo(repo, "--check") == 0
    seeds = repo / "conf" / "experiment" / "ablation" / "seeds.yaml"
    seeds.write_text(seeds.read_text().replace("seed: 0,1,2,3,4", "seed: 0,1,2"))
    capsys.readouterr()
    assert in_repo(repo, "--check") == 1
    err = capsys.readouterr().err
    assert "stale" in err and "ablation_seeds.yaml" in err and "search_vit_optuna" not in err
    assert load(repo, "ablation_seeds.yaml")["parameters"]["seed"]["values"] == [0, 1, 2, 3, 4]  # --check wrote nothing
    assert in_repo(repo) == 0
    assert load(repo, "ablation_seeds.yaml")["parameters"]["seed"]["values"] == [0, 1, 2]
    assert in_repo(repo, "--check") == 0


def test_a_new_ablation_gets_its_sweep_file_and_a_removed_one_loses_it(repo, capsys):
    assert in_repo(repo) == 0
    add_ablation(repo, "heads", """\
        task_name: ablation_heads
        trainer:
          monitor: val/loss
          monitor_mode: min
        hydra:
          sweeper:
            params:
              model.num_heads: 2,4
              model/pos_embed: learned,sincos
              model.drop_path: range(0,3)
        """)
    capsys.readouterr()
    assert in_repo(repo, "--check") == 1
    assert "missing" in capsys.readouterr().err
    assert in_repo(repo) == 0
    text = (repo / "sweeps" / "ablation_heads.yaml").read_text()
    assert text.startswith(f"{MARK} from conf/experiment/ablation/heads.yaml")
    sweep = yaml.safe_load(text)
    assert sweep["method"] == "grid"
    assert sweep["metric"] == {"name": "val/loss_best", "goal": "minimize"}  # the ablation's own monitor
    assert sweep["parameters"] == {"experiment": {"value": "ablation/heads"},
                                   "model.num_heads": {"values": [2, 4]},
                                   "model/pos_embed": {"values": ["learned", "sincos"]},
                                   "model.drop_path": {"values": [0, 1, 2]}}  # range() as Hydra expands it
    assert sweep["command"][:4] == ["${env}", "python", "${program}", "${args_no_hyphens}"]

    (repo / "conf" / "experiment" / "ablation" / "heads.yaml").unlink()
    assert in_repo(repo, "--check") == 1
    assert "orphaned" in capsys.readouterr().err
    assert in_repo(repo) == 0
    assert not (repo / "sweeps" / "ablation_heads.yaml").exists()


def test_hand_written_sweep_files_fail_the_check(repo, capsys):
    assert in_repo(repo) == 0
    (repo / "sweeps" / "mine.yaml").write_text("program: run.py\n")
    capsys.readouterr()
    assert in_repo(repo, "--check") == 1
    assert "mine.yaml is not generated" in capsys.readouterr().err
    assert in_repo(repo) == 0 and (repo / "sweeps" / "mine.yaml").exists()  # never deleted


def test_an_ablation_may_opt_out_or_terminate_early(repo):
    add_ablation(repo, "local_only", """\
        wandb_sweep: false
        hydra: {sweeper: {params: {seed: '0,1'}}}
        """)
    add_ablation(repo, "hyperband", """\
        wandb_sweep:
          early_terminate: {type: hyperband, min_iter: 2}
        hydra: {sweeper: {params: {seed: '0,1'}}}
        """)
    assert in_repo(repo) == 0
    assert not (repo / "sweeps" / "ablation_local_only.yaml").exists()
    sweep = load(repo, "ablation_hyperband.yaml")
    assert sweep["early_terminate"] == {"type": "hyperband", "min_iter": 2}
    # hyperband reads the run's history: the monitor logged at every validation, not its _best at the end
    assert sweep["metric"] == {"name": "val/acc", "goal": "maximize"}


def test_optuna_distributions_become_wandb_distributions(repo):
    (repo / "conf" / "hparams_search" / "kinds.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /hydra/sweeper: optuna
        wandb_sweep: {experiment: digits_quickstart}
        hydra:
          sweeper:
            params:
              optimizer.lr: tag(log, interval(1e-4, 1e-2))
              model.drop_path: interval(0.0, 0.3)
              model.depth: int(interval(2, 6))
              model.mlp_dim: range(64, 256, 64)
              model.pooling: choice(cls, mean)
              model.num_heads: 2
        """))
    assert in_repo(repo) == 0
    sweep = load(repo, "search_kinds.yaml")
    assert sweep["method"] == "bayes"
    assert sweep["parameters"] == {
        "experiment": {"value": "digits_quickstart"}, "hparams_search": {"value": "kinds"},
        "optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "model.drop_path": {"distribution": "uniform", "min": 0.0, "max": 0.3},
        "model.depth": {"distribution": "int_uniform", "min": 2, "max": 6},
        "model.mlp_dim": {"values": [64, 128, 192, 256]},  # Optuna's sweeper includes range()'s end
        "model.pooling": {"values": ["cls", "mean"]},
        "model.num_heads": {"value": 2},
    }


@pytest.mark.parametrize(("body", "message"), [
    ("hydra: {sweeper: {params: {seed: 'interval(0, 1)'}}}", "a grid takes lists"),
    ("wandb_sweep: {early_stop: true}\nhydra: {sweeper: {params: {seed: '0,1'}}}", "wandb_sweep="),
    ("task_name: empty", "sets no hydra.sweeper.params"),
])
def test_an_ablation_it_cannot_write_is_refused_in_one_line(repo, capsys, body, message):
    add_ablation(repo, "bad", body + "\n")
    assert in_repo(repo) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "conf/experiment/ablation/bad.yaml" in err and message in err
    assert not (repo / "sweeps" / "ablation_bad.yaml").exists()


def test_a_search_must_name_its_recipe(repo, capsys):
    path = repo / "conf" / "hparams_search" / "vit_optuna.yaml"
    path.write_text(path.read_text().replace("wandb_sweep:\n  experiment: cifar10_cpu\n", ""))
    assert in_repo(repo) == 2
    assert "wandb_sweep.experiment is not set" in capsys.readouterr().err


def test_outside_the_repository_it_says_where_to_run_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweeps("--check") == 2
    assert "run it from the repository root" in capsys.readouterr().err
