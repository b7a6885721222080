"""Pre-emption: SIGTERM / SIGINT / SIGUSR1 ask the loop to stop after the current optimizer step,
write a checkpoint and exit (143, or 130 for SIGINT). A second signal exits at once.

The handlers cover the whole run. Before the loop (loading the model and data, downloading a remote
checkpoint) no step has been taken, so a signal stops the run at once: nothing needs saving. After
the loop a signal only interrupts the wait for uploads, which the same command finishes later.

Job systems send SIGTERM (Kubernetes, cloud spot reclaim) or SIGUSR1 (SLURM's --signal) some
seconds before killing a job; that is enough to finish a step and write a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# StopFlag phase -> (what the first signal does, what a second one leaves undone)
_SAY = {
    "startup": (None, "exiting now"),  # the first signal raises Interrupted: nothing to announce
    "training": (
        "finishing this optimizer step, then writing a checkpoint (send again to exit at once)",
        "exiting now without a checkpoint",
    ),
    "finishing": (
        (
            "training is over; waiting for the checkpoint uploads to finish (send again to exit at once: "
            "running the same command again uploads what is missing)"
        ),
        "exiting now without waiting for the checkpoint uploads",
    ),
}


class Interrupted(BaseException):
    """Raised by train.run after the interruption checkpoint is written, or during startup (checkpoint None:
    no step was taken); carries the exit code. A BaseException, like KeyboardInterrupt: the `except Exception`
    around network and loading code must not turn it into another error."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.exit_code = 130 if signum == signal.SIGINT else 143
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name}; checkpoint {checkpoint}"
            if checkpoint
            else f"stopped by {name} while starting, before any optimizer step: no checkpoint needed "
            "(nothing was trained); run the same command to start again"
        )


class StopFlag:
    """Installs the handlers for the duration of a run (main thread only) and remembers the first signal.

    What a signal does depends on the phase: "startup" raises Interrupted at once, "training" lets the
    loop finish its step and checkpoint, "finishing" (after the loop) lets the uploads finish.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase = "startup"
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @contextmanager
    def training(self) -> Iterator[None]:
        """The loop: a signal finishes the optimizer step and writes a checkpoint. After it: the "finishing" phase."""
        self.phase = "training"
        try:
            yield
        finally:
            self.phase = "finishing"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first, again = _SAY[self.phase]
        if self.signum is not None:  # second signal: the user means it
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: {again}\n")
            os._exit(130 if signum == signal.SIGINT else 143)
        self.signum = signum
        if self.phase == "startup":  # no optimizer step yet: nothing to save, so stop loading now rather than after it
            raise Interrupted(signum, None)
        sys.stderr.write(f"\n{signal.Signals(signum).name}: {first}\n")

    def requested(self, accelerator) -> int | None:
        """The signal number if any process was signalled (all processes agree, so they stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch  # here, not at the top: the CLI imports Interrupted, and report / gate must not load torch

        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="max")  # signal numbers differ only if two arrive at once
        return int(flag.item()) or None
