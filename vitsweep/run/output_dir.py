"""Output dirs that two launches never share (a Hydra callback, conf/hydra/default.yaml).

The default dirs are timestamps (`outputs/runs/<date>/<time>`, `outputs/multirun/<date>/<time>`), so two
launches in the same second, from one shell or two, resolve to the same folder, and Hydra's
`mkdir(exist_ok=True)` lets both write into it. Before Hydra creates anything, this callback claims the
dir with `os.mkdir`, which succeeds for exactly one process; the loser takes `<time>_1`, `<time>_2`, ...

A dir set on the command line without `${now:...}` (`hydra.sweep.dir=outputs/attn`, the resume command)
is used as given: it names a place on purpose, for instance an earlier sweep to resume.

In a multirun every job recomposes its config from the master config's overrides (in this process with
the basic launcher, in worker processes with joblib and submitit), so the claimed dir is also appended to
`hydra.overrides.hydra`: each job of the sweep lands in the one claimed dir, whatever the launcher.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

log = logging.getLogger(__name__)

PLAIN_VALUE = re.compile(r"[\w/.\-:+@~]+")  # characters an override value may hold unquoted


def claim_dir(path: str | Path) -> Path:
    """Create `path`, or the first free `path_1`, `path_2`, ... when another process owns it. os.mkdir is
    atomic: of two processes asking for the same name, one gets it and the other moves on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while True:
        candidate = path if suffix == 0 else path.with_name(f"{path.name}_{suffix}")
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            suffix += 1


def is_timestamped(node: DictConfig, key: str) -> bool:
    """Whether `node.key` is built from ${now:...} (the defaults), rather than a fixed place."""
    raw = OmegaConf.to_container(node, resolve=False).get(key)
    return isinstance(raw, str) and "${now:" in raw


def override_value(text: str) -> str:
    """`text` as a Hydra override value: quoted when it holds characters the grammar reads otherwise."""
    if PLAIN_VALUE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ClaimOutputDir(Callback):
    """Claims the run dir (on_run_start) or the sweep dir (on_multirun_start) before Hydra writes there."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if is_timestamped(config.hydra.run, "dir"):
            claimed = claim_dir(config.hydra.run.dir)
            with read_write(config.hydra):
                config.hydra.run.dir = str(claimed)  # run_job reads it after this callback

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if is_timestamped(config.hydra.sweep, "dir"):
            claimed = claim_dir(config.hydra.sweep.dir)
            with read_write(config.hydra):
                config.hydra.sweep.dir = str(claimed)  # the sweeper, launcher and Optuna's storage read this
                overrides = [o for o in config.hydra.overrides.hydra if not o.startswith("hydra.sweep.dir=")]
                config.hydra.overrides.hydra = [*overrides, f"hydra.sweep.dir={override_value(str(claimed))}"]
