"""Where a job's log lines go (conf/hydra/default.yaml, `job_logging`): everything into the job dir's
`run.log` with timestamps; on the console, information on stdout and warnings and errors on stderr,
as bare messages, so an error is one `error: ...` line on stderr."""

from __future__ import annotations

import logging


class BelowLevel(logging.Filter):
    """Pass records under `level` only (the stdout handler leaves warnings and errors to stderr)."""

    def __init__(self, level: str | int = "WARNING"):
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class RunLogFile(logging.FileHandler):
    """run.log. When the file cannot be written (a full disk), logging's default prints a 'Logging error'
    traceback to stderr for every later line; this handler stops writing instead, once, silently: the
    job's own error line names what could not be written."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.setLevel(logging.CRITICAL + 1)  # nothing more goes to this file
