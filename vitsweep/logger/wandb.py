"""Weights & Biases: one run per Hydra job. Offline automatically when no API key is set (the run
then lives in `<job dir>/wandb/offline-run-*`; `wandb sync` uploads it later).

Online, a server that cannot be reached (no route, a proxy, an outage, a wrong key) must not cost the
training: wandb.init gets `init_timeout_s` (logger key) to connect, and when it fails or runs out of time
the job logs offline instead, with one warning line, and trains."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def override_values(overrides: list[str], config: dict) -> dict:
    """A job's overrides as flat config keys, typed as in the composed config: "model.depth=4" ->
    {"model.depth": 4}, "model/attention=windowed" -> {"model/attention": "windowed"}. These are the
    names a W&B sweep gives its parameters, so Hydra sweeps and W&B sweeps fill the same columns. A
    group choice named like a config section ("data=cifar10") is left out: the section is in the config."""
    flat = {}
    for override in overrides:
        key, _, text = override.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra.") or isinstance(config.get(key), dict):
            continue
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        flat[key] = value if isinstance(value, (bool, int, float, str)) else text
    return flat


class WandbLogger:
    def __init__(self, project: str = "vitsweep", entity: str | None = None, group: str | None = None,
                 name: str | None = None, tags: list[str] | None = None, mode: str = "auto",
                 notes: str | None = None, init_timeout_s: float = 60.0):
        if mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"logger.mode={mode!r} is not one of: auto, online, offline, disabled")
        self.project, self.entity, self.group, self.name = project, entity, group, name
        self.tags, self.notes = list(tags or []), notes
        self.mode = mode if mode != "auto" else (os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline"))
        if not init_timeout_s or init_timeout_s <= 0:
            raise ValueError(f"logger.init_timeout_s={init_timeout_s} must be a number of seconds > 0 (e.g. 60)")
        self.init_timeout_s = float(init_timeout_s)
        self.run = None

    def start(self, config: dict, job, job_dir: Path) -> str:
        """Open the W&B run of `job` (a vitsweep.run.job.JobRecord) and return its id."""
        import wandb

        run_args = {
            "project": self.project, "entity": self.entity, "dir": str(job_dir),
            "group": self.group or job.group, "name": self.name or job.name,
            "tags": self.tags + job.tags, "notes": self.notes,
            "config": {**config, **override_values(job.overrides, config)},
            "id": job.resume_run_id, "resume": "allow" if job.resume_run_id else None,
            "reinit": "finish_previous",  # a multirun job never writes into the previous job's run
        }
        if self.mode != "online":
            self.run = wandb.init(mode=self.mode, **run_args)
            return self.run.id
        earlier = set(Path(job_dir).glob("wandb/run-*"))
        try:
            self.run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=self.init_timeout_s), **run_args)
        except Exception as err:  # noqa: BLE001 -- unreachable, timed out, refused: whatever it was, train offline
            for attempt in set(Path(job_dir).glob("wandb/run-*")) - earlier:  # the failed attempt holds no data:
                shutil.rmtree(attempt, ignore_errors=True)                  # only the offline run is this job's
            reason = (str(err).strip().splitlines() or [""])[0]
            log.warning("W&B online init failed within logger.init_timeout_s=%gs (%s: %s): logging offline in %s; "
                        "`wandb sync` uploads it later", self.init_timeout_s, type(err).__name__, reason,
                        Path(job_dir) / "wandb")
            self.run = wandb.init(mode="offline", **run_args)
        return self.run.id

    def log(self, metrics: dict, step: int, epoch: int) -> None:
        self.run.log({**metrics, "epoch": epoch, "trainer/step": step})

    def log_images(self, images: dict[str, Path], step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path)) for name, path in images.items()})

    def finish(self, summary: dict, exit_code: int) -> None:
        if self.run is None:
            return
        for key in ("status", "best_value", "best_epoch", "num_params", "wall_time_s", "error"):
            if summary.get(key) is not None:
                self.run.summary[key] = summary[key]
        monitor = summary.get("monitor")
        if monitor and summary.get("best_value") is not None:
            self.run.summary[f"{monitor}_best"] = summary["best_value"]
        for key, value in summary.get("metrics", {}).items():
            self.run.summary[key] = value
        for key, value in (summary.get("cost") or {}).items():  # cost/params, cost/gflops_per_image, ...
            self.run.summary[f"cost/{key}"] = value
        if summary.get("stop_reason"):
            self.run.summary["stop_reason"] = summary["stop_reason"]
        self.run.finish(exit_code=exit_code)
        self.run = None
