"""The simulated host's two locks and the one order they are taken in.

- The **host lock** (one per :class:`SimulatedVirtualBox`) guards the machine
  registry, machine states, sessions, faults and the settings files.
- A machine's **disk lock** guards its images, the guest's expected content
  and the merge bookkeeping; the guest thread holds it for each write.

The order is: a disk lock first, then the host lock; never a disk lock while
holding the host lock. :class:`Locks` is the only way the simulator takes a
disk lock, and it refuses the wrong order with :class:`LockOrderError`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["HostLock", "LockOrderError", "Locks"]


class LockOrderError(RuntimeError):
    """A simulator bug: a disk lock was requested while the host lock was held."""


class _HasDiskLock(Protocol):
    name: str
    disk_lock: threading.RLock


class HostLock:
    """The host lock: a reentrant lock that knows whether the current thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()

    @property
    def held(self) -> bool:
        """Whether the current thread holds this lock."""
        return bool(getattr(self._local, "depth", 0))

    def __enter__(self) -> None:
        self._lock.acquire()
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1
        self._lock.release()


class Locks:
    """Takes the host lock and machines' disk locks, always in the one order."""

    def __init__(self) -> None:
        self.host = HostLock()

    @contextmanager
    def disk(self, machine: _HasDiskLock) -> Iterator[None]:
        """Hold ``machine``'s disk lock (not allowed while holding the host lock).

        Raises:
            LockOrderError: The current thread holds the host lock.
        """
        if self.host.held:
            raise LockOrderError(f"disk lock of {machine.name!r} requested while holding the host lock")
        with machine.disk_lock:
            yield

    @contextmanager
    def disk_then_host(self, machine: _HasDiskLock) -> Iterator[None]:
        """Hold ``machine``'s disk lock, then the host lock."""
        with self.disk(machine), self.host:
            yield
