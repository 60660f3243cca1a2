"""A wide CSV of every logged scalar (`<job dir>/metrics.csv`), written at the end of the run."""

from __future__ import annotations

import csv
from pathlib import Path


class CSVLogger:
    def __init__(self, filename: str = "metrics.csv"):
        self.filename, self.rows, self.path = filename, [], None

    def start(self, config: dict, job, job_dir: Path) -> None:
        self.path = Path(job_dir) / self.filename

    def log(self, metrics: dict, step: int, epoch: int) -> None:
        self.rows.append({"step": step, "epoch": epoch, **metrics})

    def finish(self, summary: dict, exit_code: int) -> None:
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
