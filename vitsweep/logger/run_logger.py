"""The record every job keeps, whatever backend is chosen: `metrics.jsonl` and `summary.json`
(format in docs/outputs.md), plus an optional backend (W&B, TensorBoard, CSV) fed the same scalars."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from vitsweep.logger.atomic_file import OutputWriteError, write_atomic

log = logging.getLogger(__name__)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str)  # before the temp file: a bad value leaves nothing behind
    write_atomic(path, lambda f: f.write(text.encode()))


class RunLogger:
    def __init__(self, job_dir: Path, backend=None, summary: dict | None = None):
        self.job_dir = Path(job_dir)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.start_time = time.time()
        # open for the whole job, line-buffered so a killed job keeps every line; closed in finish()
        self.metrics_file = open(self.job_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self.summary = {"status": "running", "error": None, "metrics": {}, **(summary or {})}
        self.run_id: str | None = None  # the backend's id of this run (W&B), stored in checkpoints to resume it
        self.write_summary()

    def start_backend(self, config: dict, job) -> None:
        """Open the backend's run for `job` (a vitsweep.run.job.JobRecord: its name, group, tags, and the
        run id to resume); a backend that has run ids returns this one's."""
        if self.backend is not None:
            self.run_id = self.backend.start(config=config, job=job, job_dir=self.job_dir)

    def log(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        record = {"step": step, "epoch": epoch, "time_s": round(time.time() - self.start_time, 3)}
        record.update({k: _json_safe(float(v)) for k, v in metrics.items()})
        try:
            self.metrics_file.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: one line naming the file, not a traceback
            raise OutputWriteError(f"cannot write {self.job_dir / 'metrics.jsonl'}: {err.strerror or err} "
                                   f"(errno {err.errno}): free space or fix the folder's permissions") from None
        if self.backend is not None:
            self.backend.log(metrics, step=step, epoch=epoch)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if self.backend is not None and hasattr(self.backend, "log_images"):
            self.backend.log_images(images, step=step)

    def update_summary(self, **fields) -> None:
        self.summary.update(fields)
        self.write_summary()

    def write_summary(self) -> None:
        self.summary["wall_time_s"] = round(time.time() - self.start_time, 3)
        data = {k: _json_safe(v) for k, v in self.summary.items()}
        data["metrics"] = {k: _json_safe(v) for k, v in self.summary.get("metrics", {}).items()}
        write_json_atomic(self.job_dir / "summary.json", data)

    def finish(self, status: str, error: str | None = None) -> None:
        """Close the job's record; the backend run ends with exit code 0 or 1 accordingly, so a
        multirun never merges two jobs into one run and failed jobs show as failed."""
        try:
            self.update_summary(status=status, error=error)
        except OutputWriteError as err:  # e.g. the disk is still full: say so once, and close what is open
            log.error("summary.json keeps its last state: %s", err)
        try:
            self.metrics_file.close()
        except OSError:
            pass  # its buffered last line could not be flushed: the disk is full, reported above
        if self.backend is not None:
            self.backend.finish(summary=self.summary, exit_code=0 if status == "completed" else 1)
