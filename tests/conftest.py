"""Shared test helpers: run `python run.py` fully offline inside tmp dirs, in this process (the default:
no interpreter, torch and W&B start-up per run) or in a fresh one (where the process boundary is what a
test checks: signals, exit codes of the real entry point, torchrun, launchers, a fresh interpreter)."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One torch thread per test process and per process a test starts (unless the caller set OMP_NUM_THREADS):
# the tests' tensors are tiny, and two threads on two busy cores wait on each other (the regression
# experiment measured 87 s with 2 threads, 23 s with 1, on this 2-core machine under load). pytest-xdist
# runs one test process per core. A test about thread counts sets its own (tests/test_launchers.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (a plugin): too late for the variable
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Files whose end-to-end runs take longest go first: pytest-xdist (--dist loadfile, no reordering) hands
# each file whole to one worker in this order, so the long ones overlap instead of ending the run alone.
# Measured (seconds of test time per file, whole suite 860 s): reliability 190, option_smoke 80, distributed 70,
# run 70, sweeps 65, pretrain_runs 40, pretrain 35, config 30, launchers 30, task_runs 30, wandb_sweeps 30.
LONGEST_FIRST = ["test_reliability.py", "test_option_smoke.py", "test_distributed.py", "test_run.py", "test_sweeps.py",
                 "test_pretrain_runs.py", "test_pretrain.py", "test_config.py", "test_launchers.py",
                 "test_task_runs.py", "test_wandb_sweeps.py"]


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept

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
            timeout: float = 900, env: dict[str, str | None] | None = None,
            fresh_process: bool = False) -> subprocess.CompletedProcess:
    """`python run.py [-m] args` with its outputs under tmp_path/run (or tmp_path/sweep for -m), cwd tmp_path;
    `env`: variables to set on top of the offline environment (None removes one). It runs in this process
    (`run_in_process`) unless `fresh_process`: the tests of signals, torchrun, launchers and anything else
    that needs a process of its own say so. `timeout` bounds a fresh process only."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    where = f"hydra.sweep.dir={tmp_path / 'sweep'}" if multirun else f"hydra.run.dir={tmp_path / 'run'}"
    argv = [*(["-m"] if multirun else []), *args, where]
    environment = offline_env(tmp_path)
    if not fresh_process:  # one W&B home for the session's in-process runs: one W&B service serves them all
        environment.update(wandb_offline_vars(session_wandb_home()))
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    if fresh_process:
        cmd = [sys.executable, str(ROOT / "run.py"), *argv]
        proc = subprocess.run(cmd, cwd=tmp_path, env=environment, capture_output=True, text=True,
                              timeout=timeout, check=False)  # `check` is ours: it prints the output on failure
    else:
        proc = run_in_process(argv, tmp_path, environment,
                              own_wandb=any(name.startswith("WANDB_") for name in env or {}))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


# ---------------------------------------------------------------------------------- run.py in this process
# What a fresh `python run.py` would not inherit from the previous run in this process, put back after each:
# the environment, cwd, sys.argv, the console (fds 1 and 2 and sys.stdout/err), logging's handlers and
# levels (Hydra reconfigures logging per job), warnings (printed, once per place, as a fresh process
# does), torch threads, the RNGs, signal handlers, Hydra's singletons, the job's interrupt state, and
# process groups. W&B keeps one service for the session (its settings are read once per service, so a
# run whose WANDB_* variables differ starts a new one).

_WANDB_HOME: list[Path] = []


def session_wandb_home() -> Path:
    """W&B's config, cache and data folders of the in-process runs (each run's own files stay in its job dir)."""
    if not _WANDB_HOME:
        _WANDB_HOME.append(Path(tempfile.mkdtemp(prefix="vitsweep-tests-wandb-")))
        atexit.register(shutil.rmtree, _WANDB_HOME[0], ignore_errors=True)  # after W&B's own teardown (LIFO)
    return _WANDB_HOME[0]


SAVED_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]


class _ProcessExit(BaseException):
    """os._exit called in this process (interrupt.exit_for on a signal): ends the run, not pytest."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _logging_state() -> dict:
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    return {logger: (logger.level, list(logger.handlers), logger.propagate, logger.disabled) for logger in loggers}


def _restore_logging(saved: dict) -> None:
    kept = {id(handler) for _, handlers, _, _ in saved.values() for handler in handlers}
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if not isinstance(logger, logging.Logger):
            continue
        for handler in logger.handlers:
            if id(handler) not in kept:  # the job's: run.log's file, the console's streams
                handler.close()
        level, handlers, propagate, disabled = saved.get(logger, (logging.NOTSET, [], True, False))
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate, logger.disabled = propagate, disabled


def _reset_wandb_if_settings_differ(environment: dict[str, str]) -> None:
    """W&B reads its WANDB_* variables once, when its service starts: a run that asks for others gets a new
    service, as a fresh process would (and W&B prints no warning about ignored variables)."""
    if "wandb" not in sys.modules:
        return
    from wandb.sdk import wandb_setup

    singleton = getattr(wandb_setup, "_singleton", None)
    if singleton is None or not getattr(singleton, "_settings_environ", None):
        return
    wanted = {k: v for k, v in environment.items() if k.startswith("WANDB_") and k != "WANDB_SERVICE"}
    current = {k: v for k, v in singleton._settings_environ.items() if k.startswith("WANDB_") and k != "WANDB_SERVICE"}
    if wanted != current:
        import wandb

        wandb.teardown()


def run_in_process(argv: list[str], cwd: Path, environment: dict[str, str],
                   own_wandb: bool = False) -> subprocess.CompletedProcess:
    """run.py's `main` with sys.argv = argv, as `python run.py *argv` in `cwd` with `environment`; returns what
    the subprocess would: exit code, stdout, stderr. `own_wandb`: the run has W&B settings of its own; its W&B
    service is ended with it, as at the exit of a process (which writes out everything the service holds)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobRuntime

    from vitsweep.trainer import interrupt

    saved_environ, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_streams, saved_fds = (sys.stdout, sys.stderr), None
    saved_logging, saved_threads = _logging_state(), torch.get_num_threads()
    saved_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    saved_signals = {signum: signal.getsignal(signum) for signum in SAVED_SIGNALS}
    saved_hydra = HydraConfig.instance().cfg, JobRuntime.instance().conf
    saved_exit = os._exit

    def exit_here(code: int):
        raise _ProcessExit(code)

    _reset_wandb_if_settings_differ(environment)
    GlobalHydra.instance().clear()
    # huggingface_hub reads HF_HUB_OFFLINE once, at its import: this process may have imported it already
    hub = sys.modules.get("huggingface_hub.constants")
    saved_hub_offline = getattr(hub, "HF_HUB_OFFLINE", None)
    if hub is not None:
        hub.HF_HUB_OFFLINE = environment.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    returncode = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
        warnings.resetwarnings()  # a fresh interpreter's filters, and each warning shown once per place
        for action, category in (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                                  ("ignore", ImportWarning), ("ignore", ResourceWarning)):
            warnings.simplefilter(action, category)
        warnings.showwarning = _print_warning
        try:
            for stream in saved_streams:
                stream.flush()
            saved_fds = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                          errors="backslashreplace", write_through=True)
            os.environ.clear()
            os.environ.update(environment)
            os.chdir(cwd)
            sys.argv = [str(ROOT / "run.py"), *argv]
            os._exit = exit_here
            runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
        except SystemExit as ended:
            code = ended.code
            returncode = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
        except _ProcessExit as ended:  # a signal's exit code: 128 + signal
            returncode = ended.code
        except BaseException:  # noqa: BLE001 -- an uncaught error: the interpreter's traceback and exit 1
            traceback.print_exc(file=sys.stderr)
            returncode = 1
        finally:
            if own_wandb and "wandb" in sys.modules:  # what the process's exit would do, with its console still on
                with contextlib.suppress(SystemExit):  # at exit, an atexit handler's SystemExit changes nothing
                    sys.modules["wandb"].teardown()
            os._exit = saved_exit
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            sys.stdout, sys.stderr = saved_streams
            if saved_fds is not None:
                os.dup2(saved_fds[0], 1)
                os.dup2(saved_fds[1], 2)
                os.close(saved_fds[0])
                os.close(saved_fds[1])
            _restore_logging(saved_logging)
            os.environ.clear()
            os.environ.update(saved_environ)
            os.chdir(saved_cwd)
            sys.argv = saved_argv
            torch.set_num_threads(saved_threads)
            random.setstate(saved_rng[0])
            np.random.set_state(saved_rng[1])
            torch.set_rng_state(saved_rng[2])
            for signum, handler in saved_signals.items():
                signal.signal(signum, handler)
            interrupt._state.__init__()
            if dist.is_initialized():
                dist.destroy_process_group()
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg, JobRuntime.instance().conf = saved_hydra
            if hub is not None:
                hub.HF_HUB_OFFLINE = saved_hub_offline
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode("utf-8", errors="replace") for f in (out, err))
    if returncode == 128 + signal.SIGINT:  # Ctrl-C on pytest while a run was in this process: stop pytest too
        raise KeyboardInterrupt(f"run.py {' '.join(argv)} was interrupted\n{stderr[-2000:]}")
    return subprocess.CompletedProcess([sys.executable, "run.py", *argv], returncode, stdout, stderr)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


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


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny ops gain nothing from two (on a busy machine two threads wait on each
    other), and a reference written with one thread sums in the same order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
