"""Operations behind IProgress: a worker thread, a result, cancellation and hanging."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ._model import SimulatedVBoxError

__all__ = ["Operation"]


class _Canceled(Exception):
    pass


class Operation:
    """A running operation behind an IProgress: a thread, a result, cancellation."""

    def __init__(self, description: str, *, cancelable: bool) -> None:
        self.description = description
        self.cancelable = cancelable
        self.done = threading.Event()
        self.cancel_requested = threading.Event()
        self.canceled = False
        self.percent = 0
        self.error: SimulatedVBoxError | None = None

    def start(self, work: Callable[[Operation], None]) -> Operation:
        def run() -> None:
            try:
                work(self)
            except _Canceled:
                self.canceled = True
                self.error = SimulatedVBoxError("E_FAIL", f"{self.description}: canceled by the user")
            except SimulatedVBoxError as exc:
                self.error = exc
            except Exception as exc:  # a simulator bug must surface as a failed progress, not a hang
                self.error = SimulatedVBoxError("E_FAIL", f"simulator error: {exc!r}")
            else:
                self.percent = 100
            finally:
                self.done.set()

        threading.Thread(target=run, name=f"vbox-sim: {self.description}", daemon=True).start()
        return self

    def sleep(self, seconds: float) -> None:
        """Wait, as work takes time; a cancel request ends the wait."""
        if self.cancel_requested.wait(seconds) and self.cancelable:
            raise _Canceled

    def check_cancel(self) -> None:
        if self.cancelable and self.cancel_requested.is_set():
            raise _Canceled

    def hang(self) -> None:
        """Never finish (until canceled, if the operation can be)."""
        while True:
            self.cancel_requested.wait(3600)
            if self.cancelable and self.cancel_requested.is_set():
                raise _Canceled
