"""The test helper `run_cli` runs `python run.py` in this process (tests/conftest.py): it answers as a fresh
process does, and leaves this process as it found it."""

from __future__ import annotations

import logging
import os
import random
import signal
import sys

import pytest
import torch
from conftest import TINY_RUN, read_summary, run_cli
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig


def lines(text: str, tmp_path) -> list[str]:
    return [line.replace(str(tmp_path), "TMP") for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_a_failing_run_answers_in_process_as_in_a_fresh_process(tmp_path):
    args = [*TINY_RUN, "logger=none", "model.patch_size=5"]  # 16 px images: refused before anything is built
    fresh = run_cli(args, tmp_path / "fresh", check=False, fresh_process=True)
    here = run_cli(args, tmp_path / "here", check=False)
    assert here.returncode == fresh.returncode == 2
    assert lines(here.stderr, tmp_path / "here") == lines(fresh.stderr, tmp_path / "fresh"), (here.stderr, fresh.stderr)
    assert lines(here.stdout, tmp_path / "here") == lines(fresh.stdout, tmp_path / "fresh"), (here.stdout, fresh.stdout)
    here_summary, fresh_summary = read_summary(tmp_path / "here" / "run"), read_summary(tmp_path / "fresh" / "run")
    assert (here_summary["status"], here_summary["error"]) == (fresh_summary["status"], fresh_summary["error"])


def state() -> dict:
    root = logging.getLogger()
    return {"cwd": os.getcwd(), "environ": dict(os.environ), "argv": list(sys.argv),
            "threads": torch.get_num_threads(), "torch_rng": torch.get_rng_state(), "rng": random.getstate(),
            "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)},
            "root_handlers": list(root.handlers), "root_level": root.level,
            "hydra": (GlobalHydra.instance().is_initialized(), HydraConfig.initialized()),
            "streams": (sys.stdout, sys.stderr)}


def test_an_in_process_run_leaves_no_state_behind(tmp_path):
    before = state()
    # threads=2 and a seed: the job sets torch's threads and seeds every RNG
    proc = run_cli([*TINY_RUN, "logger=none", "data.source.num_train=64", "threads=2", "seed=3"], tmp_path)
    assert "best checkpoint:" in proc.stdout and read_summary(tmp_path / "run")["threads"] == 2
    after = state()
    assert after.pop("torch_rng").equal(before.pop("torch_rng"))
    assert after == before
    logging.getLogger("vitsweep").info("after the run")  # no handler of the job's left writing to its run.log
    assert "after the run" not in (tmp_path / "run" / "run.log").read_text()
