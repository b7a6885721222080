"""Monitors (`sync --watch`, `eval --watch`) are started together with the launch, so the run they follow
may not exist yet: they wait for it, saying so once, instead of failing. No heavy imports here."""

from __future__ import annotations

import threading
from collections.abc import Callable


def wait_for(
    appeared: Callable[[], bool],
    what: str,
    interval_s: float,
    out: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> bool:
    """Poll `appeared()` every `interval_s` until it is true (returns True) or Ctrl+C / `stop` (returns False).

    Prints "waiting for WHAT to appear (Ctrl+C to stop)" once, and only when it is not there at the first look.
    """
    stop = stop or threading.Event()
    try:
        if appeared():
            return True
        out(f"waiting for {what} to appear (Ctrl+C to stop)")
        while not stop.wait(interval_s):
            if appeared():
                out(f"{what} appeared")
                return True
        return False
    except KeyboardInterrupt:
        return False
