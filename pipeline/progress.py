"""Progress on stderr for people and for CI: a tqdm bar on a terminal; piped (CI, `| tee`), a plain
line every EVERY_S seconds (done/total, rate, ETA) with no carriage returns; nothing when disabled.

Bottom layer: imports nothing of ours.
"""
from __future__ import annotations

import sys
import time

EVERY_S = 10.0  # piped output: one progress line this often


def progress(total: int, desc: str, enabled: bool = True, unit: str = "clip"):
    """An object with update(n) and close(): a tqdm bar, progress lines, or nothing (see the module doc)."""
    if enabled and not sys.stderr.isatty():
        return ProgressLines(total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit=unit, dynamic_ncols=True, leave=False)


class ProgressLines:
    """'<desc>: 120/13708 clips, 3.10 clips/s, ETA 1h12m' on stderr, at most once per EVERY_S."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < EVERY_S:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, {rate:.2f} {self.unit}s/s, ETA {eta}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
