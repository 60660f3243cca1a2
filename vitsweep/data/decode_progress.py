"""Progress of the first decode of an image folder or CSV, through logging.

Decoding happens once per dataset (then the disk cache is read), but that once can be long: the 60,000
CIFAR-10 JPEGs take about 9 s on two cores, a 100k-tile multispectral set minutes. Without a word the
job looks hung, so this logs a line when decoding starts, one every `interval_s` seconds (files done,
files/s, ETA), and one at the end:

    decoding 60000 files of imagefolder-cifar10-jpeg (once; later runs read the cache)
    decoding imagefolder-cifar10-jpeg: 14336/60000 files, 2861 files/s, eta 16s
    decoded 60000 files of imagefolder-cifar10-jpeg in 21s (2857 files/s)
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

INTERVAL_S = 5.0  # seconds between progress lines


class DecodeProgress:
    def __init__(self, total: int, what: str, cached: bool, interval_s: float | None = None):
        self.total, self.what, self.done = total, what, 0
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.start = self.last_line = time.time()
        later = "later runs read the cache" if cached else "no cache_dir: every run decodes again"
        log.info("decoding %d files of %s (once; %s)", total, what, later)

    def rate(self) -> float:
        return self.done / max(time.time() - self.start, 1e-9)  # files per second

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if now - self.last_line >= self.interval_s and self.done < self.total:
            self.last_line = now
            rate = self.rate()
            eta = int((self.total - self.done) / rate) if rate > 0 else 0
            log.info("decoding %s: %d/%d files, %.0f files/s, eta %dm%02ds", self.what, self.done, self.total, rate,
                     eta // 60, eta % 60)

    def close(self, skipped: int = 0) -> None:
        elapsed = time.time() - self.start
        left_out = f", {skipped} unreadable files skipped (data.on_bad_file=skip)" if skipped else ""
        log.info("decoded %d files of %s in %.0fs (%.0f files/s)%s", self.done - skipped, self.what, elapsed,
                 self.rate(), left_out)
