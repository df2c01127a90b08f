"""Stop signals of a training run: SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to
stop after the iteration in progress, which is checkpointed (``StopSignals``), and end the run
with ``RunInterrupted``, which the entry points turn into exit code 128 + the signal's number.
"""

import signal
import threading

from absl import logging


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a checkpoint of its last iteration."""

    def __init__(self, signum: int, step: int):
        self.exit_code = 128 + signum
        super().__init__(f"Stopped by {signal.Signals(signum).name} after iteration {step}: "
                         f"checkpoint ckpt-{step} is saved; run the same command again to resume.")


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the iteration in
    progress, which is then checkpointed; a second signal stops at once, and so does the
    first during the final evaluation (``at_once``). Handlers can only be installed in the
    main thread; elsewhere signals keep their usual effect."""

    def __enter__(self) -> "StopSignals":
        self.requested: int | None = None
        self._at_once: int | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        if self._at_once is not None:   # nothing left to checkpoint: stop now
            self.requested = signum
            raise RunInterrupted(signum, self._at_once)
        self.requested = signum
        logging.warning("%s received: stopping after this iteration (send it again to stop at "
                        "once, without a checkpoint).", signal.Signals(signum).name)

    def reinstall(self) -> None:
        """Takes SIGTERM and SIGINT back (TensorFlow's multi-worker coordination agent
        installs its own SIGTERM handler as it starts, which only logs the signal)."""
        if self._previous:
            for sig in self._previous:
                signal.signal(sig, self._handle)

    def at_once(self, step: int) -> None:
        """From now on (the final evaluation: training ended with checkpoint ``ckpt-step``), a
        stop signal stops at once, and the same command evaluates again."""
        self._at_once = step

    def check(self) -> None:
        """Raises ``RunInterrupted`` if a stop signal came after ``at_once``. The handler
        raises it at once, but from whatever code runs at that moment, which can lose it:
        code that swallows exceptions (a ``__del__`` does) drops it, and autograph, tracing,
        wraps it in a ``StagingError``. Seen: a SIGTERM during the final evaluation ended a
        CI run with exit 0 and its results written (where the exception went is not known),
        and a run here with exit 1 and a ``StagingError`` traceback."""
        if self._at_once is not None and self.requested is not None:
            raise RunInterrupted(self.requested, self._at_once)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
