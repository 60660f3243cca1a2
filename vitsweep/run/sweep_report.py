"""The end of a multirun: one table of its jobs (status, best value, dir) and an exit code that says
whether any failed (a Hydra callback, conf/hydra/default.yaml).

A failed job does not stop a sweep (vitsweep.run.job records it and goes on), so without this a sweep whose
every job failed would exit 0 with nothing to show for it. The table is read back from the jobs'
summary.json files, so it is the same whatever launcher ran them (basic, joblib, submitit, SLURM):

    sweep outputs/multirun/2025-01-01/12-00-00: 4 jobs, 2 completed, 2 failed
    job  status     val/acc  dir                                          error
    0    completed  0.9312   outputs/multirun/2025-01-01/12-00-00/0
    1    failed     -        outputs/multirun/2025-01-01/12-00-00/1       ValueError: model.embed_dim=32 ...

The exit code is `failed_exit_code` (1) when any job did not complete, else 0; set
`hydra.callbacks.sweep_report.failed_exit_code=0` to exit 0 regardless.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

ERROR_WIDTH = 100  # the table shows the start of each error; summary.json has all of it


def read_jobs(sweep_dir: Path) -> list[tuple[Path, dict]]:
    """(job dir, summary) of every job under the sweep dir, in job-number order."""
    jobs = []
    for path in sweep_dir.glob("*/summary.json"):
        try:
            jobs.append((path.parent, json.loads(path.read_text())))
        except (OSError, ValueError):  # unreadable: the job never wrote a whole record
            jobs.append((path.parent, {"status": "unreadable", "error": f"{path} is not readable JSON"}))
    return sorted(jobs, key=lambda job: (not job[0].name.isdigit(), int(job[0].name) if job[0].name.isdigit()
                                         else 0, job[0].name))


def format_table(sweep_dir: Path, jobs: list[tuple[Path, dict]]) -> str:
    counts = {}
    for _, summary in jobs:
        counts[summary.get("status")] = counts.get(summary.get("status"), 0) + 1
    monitor = next((s["monitor"] for _, s in jobs if s.get("monitor")), "best")
    rows = [("job", "status", monitor, "dir", "error")]
    for job_dir, summary in jobs:
        best = summary.get("best_value")
        error = (summary.get("error") or "").splitlines()[0] if summary.get("error") else ""
        rows.append((job_dir.name, str(summary.get("status")), "-" if best is None else f"{best:.4f}",
                     str(job_dir), error[:ERROR_WIDTH] + ("..." if len(error) > ERROR_WIDTH else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4] for row in rows]
    totals = ", ".join(f"{count} {status}" for status, count in counts.items())
    return "\n".join([f"sweep {sweep_dir}: {len(jobs)} jobs, {totals}", *(line.rstrip() for line in lines)])


class SweepReport(Callback):
    def __init__(self, failed_exit_code: int = 1):
        self.failed_exit_code = int(failed_exit_code)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = read_jobs(sweep_dir)
        print(format_table(sweep_dir, jobs), flush=True)
        failed = [job_dir.name for job_dir, summary in jobs if summary.get("status") != "completed"]
        if failed and self.failed_exit_code:
            print(f"error: {len(failed)} of {len(jobs)} jobs did not complete (job {', '.join(failed)}): "
                  f"exit code {self.failed_exit_code}; hydra.callbacks.sweep_report.failed_exit_code=0 exits 0",
                  file=sys.stderr, flush=True)
            raise SystemExit(self.failed_exit_code)  # not an Exception: Hydra's callback runner lets it through
