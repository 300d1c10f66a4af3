"""Graceful stops for the training loops (student, teacher finetuning, alignment).

Between ``stop = StopSignals().install()`` and ``stop.restore()``, SIGINT and SIGTERM no longer kill
the process: they set ``stop.signum`` (``bool(stop)`` turns true), the loop finishes the step it is in,
writes a checkpoint and ends (:class:`distill_dag.training.loop.TrainLoop` installs it for the run and
raises ``TrainingInterrupted``). Handlers can only be installed from the main thread; elsewhere (some
executors) the signals keep their default meaning.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        """Take over SIGINT/SIGTERM until :meth:`restore`."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __bool__(self) -> bool:
        """True once a stop was requested."""
        return self.signum is not None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
