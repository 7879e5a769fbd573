"""Ctrl-C during training: the first SIGINT asks the loop to stop after the current step."""

import contextlib
import signal
import threading


class StopRequest:
    """Set by the first SIGINT inside :meth:`guard` (or by anyone: ``request()``)."""

    def __init__(self):
        self.requested = False

    def request(self):
        self.requested = True

    @contextlib.contextmanager
    def guard(self):
        """In the main thread, a first SIGINT only sets :attr:`requested` (so the loop can finish
        its step and write a consistent checkpoint); a second one interrupts at once. The
        previous handler is restored on exit. Elsewhere (other threads) nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        try:
            previous = signal.getsignal(signal.SIGINT)
        except (ValueError, TypeError):  # pragma: no cover
            yield
            return

        def handler(signum, frame):
            if self.requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.requested = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # pragma: no cover - not the main interpreter
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
