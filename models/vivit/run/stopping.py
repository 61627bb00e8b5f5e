"""Stopping a run at a step boundary: SIGTERM and SIGUSR1 (what a cluster sends before it ends a
job) are noted while the run trains, and the loop checkpoints and stops after the step they
arrived in (trainer.py, where every process agrees on the step)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """A context in which SIGTERM and SIGUSR1 set `received` (the first one's name) instead of
    ending the process; the handlers in place before are restored on exit.

    A signal arriving while a checkpoint is written, a second one included, is noted and changes
    nothing. Outside the main thread (where Python cannot install handlers) nothing is installed.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
