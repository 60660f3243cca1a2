"""Progress within an epoch: a tqdm bar on a terminal, periodic log lines elsewhere.

Under SLURM, CI or `nohup` the console is a file, and a bar redrawn ten times a second fills it with
carriage returns (a 4-minute CPU run wrote 40 KB of them). There, and with `trainer.progress_bar=false`,
one line goes to the log at most every `trainer.progress_interval_s` seconds instead:

    epoch 3 [120/351] loss 1.234 acc 0.452 img/s 190 lr 1.00e-03 eta 1m21s
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


def use_bar(progress_bar: bool | str) -> bool:
    """`auto`: a bar when stderr (where tqdm draws) is a terminal."""
    if progress_bar == "auto":
        return sys.stderr.isatty()
    if isinstance(progress_bar, bool):
        return progress_bar
    raise ValueError(f"trainer.progress_bar={progress_bar!r} is not one of: auto, true, false")


class Progress:
    def __init__(self, total: int, initial: int, desc: str, bar: bool, interval_s: float | None):
        self.total, self.done, self.desc = total, initial, desc
        self.interval_s, self.values = interval_s, {}
        self.start, self.start_done = time.time(), initial
        self.last_line = self.start
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True) if bar else None

    def set_values(self, **values: str) -> None:
        """The figures shown beside the count (loss, acc, img/s, lr), as formatted strings."""
        self.values = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if self.interval_s is not None and now - self.last_line >= self.interval_s:
            self.last_line = now
            rate = (self.done - self.start_done) / max(now - self.start, 1e-9)  # steps per second
            eta = int((self.total - self.done) / rate) if rate > 0 else 0
            figures = " ".join(f"{key} {value}" for key, value in self.values.items())
            log.info("%s [%d/%d] %s eta %dm%02ds", self.desc, self.done, self.total, figures, eta // 60, eta % 60)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
