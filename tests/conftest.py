"""Shared test helpers: run `python run.py` in a subprocess, fully offline, inside tmp dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a model that trains a step in well under a second
TINY_MODEL = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.mlp_dim=64"]
# viz.enabled_at_end=false: the end-of-training figures would add ~10-20 s to every run on 2 cores
# (tests/test_visualize.py turns them on)
TINY_RUN = ["data=synthetic", *TINY_MODEL, "trainer.max_epochs=1", "trainer.progress_bar=false",
            "viz.enabled_at_end=false"]


def wandb_offline_vars(root: Path) -> dict[str, str]:
    """W&B offline, quiet, and every folder it writes inside root: no network, nothing in ~/.config."""
    return {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DIR": str(root),
        **{var: str(root / name) for var, name in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                                                   ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts"))},
    }


def offline_wandb_env(monkeypatch, root: Path) -> None:
    """The same, for W&B runs made inside the test process."""
    for name, value in wandb_offline_vars(Path(root)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def offline_env(tmp_path: Path) -> dict:
    """Environment for a subprocess: W&B offline with every W&B folder inside tmp_path."""
    env = {**os.environ, **wandb_offline_vars(tmp_path / "wandb_home"), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_API_KEY", None)  # never reach the W&B server from a test
    return env


def run_cli(args: list[str], tmp_path: Path, multirun: bool = False, check: bool = True,
            timeout: float = 900, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`python run.py [-m] args` with its outputs under tmp_path/run (or tmp_path/sweep for -m); `env`:
    variables to set on top of the offline environment (None removes one)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    where = f"hydra.sweep.dir={tmp_path / 'sweep'}" if multirun else f"hydra.run.dir={tmp_path / 'run'}"
    cmd = [sys.executable, str(ROOT / "run.py"), *(["-m"] if multirun else []), *args, where]
    environment = offline_env(tmp_path)
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    proc = subprocess.run(cmd, cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=timeout, check=False)  # `check` is ours: it prints the output on failure
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_summary(job_dir: Path) -> dict:
    return json.loads((Path(job_dir) / "summary.json").read_text())


def read_metrics(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(job_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def cli(tmp_path):
    """run_cli bound to this test's tmp_path."""
    return lambda args, **kw: run_cli(args, tmp_path, **kw)


def fit_in_process(model, data, epochs: int, lr: float = 3e-3) -> float:
    """Train `model` on `data`'s training batches (AdamW, cross-entropy, no augmentation) and return its test
    accuracy: the learning tests of model options that are cheaper in-process than through `run_cli`."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for epoch in range(epochs):
        for inputs, labels in data.train_batches(0, epoch):
            loss = F.cross_entropy(model(data.normalize(inputs)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(data.normalize(inputs)).argmax(1) == labels).sum())
                      for inputs, labels in data.eval_batches("test"))
    return correct / len(data.split("test"))
