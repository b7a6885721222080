"""Pre-emption: SIGTERM / SIGINT / SIGUSR1 ask the loop to stop after the current optimizer step,
write a checkpoint and exit (143, or 130 for SIGINT). A second signal exits at once.

Job systems send SIGTERM (Kubernetes, cloud spot reclaim) or SIGUSR1 (SLURM's --signal) some
seconds before killing a job; that is enough to finish a step and write a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import torch

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(Exception):
    """Raised by train.run after the interruption checkpoint is written; carries the exit code."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.exit_code = 130 if signum == signal.SIGINT else 143
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")


class StopFlag:
    """Installs the handlers for the duration of a run (main thread only) and remembers the first signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: the user means it
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now without a checkpoint\n")
            os._exit(130 if signum == signal.SIGINT else 143)
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this optimizer step, then writing a checkpoint (send again to exit at once)\n")

    def requested(self, accelerator) -> int | None:
        """The signal number if any process was signalled (all processes agree, so they stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="max")  # signal numbers differ only if two arrive at once
        return int(flag.item()) or None
