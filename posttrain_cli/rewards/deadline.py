"""A time limit on one verifier call, raised inside the call as VerifierTimeout.

On the main thread a SIGALRM timer (signal.setitimer; an earlier timer is restored, with what
it had left, afterwards); off the main thread a watchdog thread raises the timeout in the
scoring thread (PyThreadState_SetAsyncExc). Both interrupt Python code between bytecodes: a
single long C call (one huge integer power) is interrupted only when it returns.

    deadline = Deadline(10.0)
    try:
        try:
            deadline.start()
            value = verifier(...)
        finally:
            deadline.stop()
    except VerifierTimeout:
        deadline.stop()  # it may have landed inside stop() itself
"""

from __future__ import annotations

import signal
import threading


class VerifierTimeout(BaseException):
    """Raised inside a verifier that overran. A BaseException so that `except Exception` in the
    verifier (math-verify has several) does not swallow it."""


class Deadline:
    """Raises VerifierTimeout in the calling thread `seconds` after start() unless stop() came
    first. stop() may be called again after a VerifierTimeout that interrupted it; the timer is
    one-shot, so the second call completes."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.on_main = threading.current_thread() is threading.main_thread()
        self.stopped, self.disarmed, self.left = True, False, 0.0  # start() arms it

    def start(self) -> None:
        self.stopped = False
        if self.on_main:
            self.old_handler = signal.signal(signal.SIGALRM, _on_alarm)
            self.old_timer = signal.setitimer(signal.ITIMER_REAL, self.seconds)
        else:
            self.lock, self.fired, self.done = threading.Lock(), False, False
            self.thread_id = threading.get_ident()
            self.watchdog = threading.Timer(self.seconds, self._fire)
            self.watchdog.daemon = True
            self.watchdog.start()

    def _fire(self) -> None:
        with self.lock:
            if not self.done:
                self.fired = True
                _async_raise(self.thread_id, VerifierTimeout)

    def stop(self) -> None:
        if self.stopped:
            return
        if self.on_main:
            if not self.disarmed:
                self.left = signal.setitimer(signal.ITIMER_REAL, 0)[0]
                self.disarmed = True
            signal.signal(signal.SIGALRM, self.old_handler)
            outer, interval = self.old_timer
            if outer:  # someone else's timer was running: re-arm it with what it has left
                signal.setitimer(signal.ITIMER_REAL, max(outer - (self.seconds - self.left), 1e-3), interval)
        else:
            self.watchdog.cancel()
            with self.lock:
                self.done = True
                if self.fired:  # raised but maybe not delivered yet: drop it rather than later
                    _async_raise(self.thread_id, None)
        self.stopped = True


def _on_alarm(signum, frame):
    raise VerifierTimeout()


def _async_raise(thread_id: int, exc) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)
