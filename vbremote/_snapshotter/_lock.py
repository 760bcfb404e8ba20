"""The per-VM, host-local lock of snapshot runs and restores: an ``flock`` on a file in vbremote's state folder.

Two snapshot runs on one VM must never overlap: a second run would see the
first run's transient snapshot as a leftover and delete it under it. Nor may a
restore overlap a snapshot run of the same VM (it would rewrite the disks the
run reads) or another restore (they would share the journal). The lock
is an advisory ``fcntl.flock`` on ``<state folder>/locks/<vm uuid>.lock``,
held for the whole run. The kernel releases it when the process ends, however
it ends, so a crashed run never leaves a stale lock; the lock file itself
stays (removing it would race with a run that just opened it).

The state folder is ``$XDG_STATE_HOME/vbremote``, or ``~/.local/state/vbremote``
when ``XDG_STATE_HOME`` is not set (the XDG base directory specification),
unless the caller names one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .._errors import ConfigurationError, SnapshotInProgress

__all__ = ["check_lock_wait", "default_state_dir", "state_dir_or_default", "vm_lock"]

_POLL = 0.05


def default_state_dir() -> Path:
    """vbremote's state folder: ``$XDG_STATE_HOME/vbremote`` or ``~/.local/state/vbremote``."""
    base = os.environ.get("XDG_STATE_HOME", "")
    # The specification says relative values are invalid and must be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "vbremote"


def state_dir_or_default(value: str | os.PathLike[str] | None) -> Path:
    """The ``state_dir`` argument as a path; ``None`` is :func:`default_state_dir`."""
    return default_state_dir() if value is None else Path(value)


def check_lock_wait(value: float) -> None:
    """Refuse a negative ``lock_wait``.

    Raises:
        ConfigurationError: ``value`` is below zero.
    """
    if value < 0:
        raise ConfigurationError("lock_wait must be >= 0 seconds")


@contextlib.contextmanager
def vm_lock(state_dir: Path, vm_uuid: str, *, wait: float = 0.0, vm: str = "") -> Iterator[Path]:
    """Hold the lock of one VM (or another key, such as a restore's target folder) for the block.

    Args:
        state_dir: The state folder (created if missing, private to the user).
        vm_uuid: The VM's uuid (the lock's key: names can change).
        wait: Seconds to wait for a held lock before giving up.
        vm: The VM's name, for the error.

    Yields:
        The lock file's path.

    Raises:
        SnapshotInProgress: Another run still holds the lock after ``wait`` seconds.
        ConfigurationError: The state folder cannot be created or written.
    """
    folder = state_dir / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(folder / f"{vm_uuid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot use the state folder {state_dir}: {exc.strerror}") from exc
    path = folder / f"{vm_uuid}.lock"
    try:
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigurationError(f"cannot lock {path}: {exc.strerror}") from exc
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    raise SnapshotInProgress(
                        f"another snapshot run or restore{holder} holds the lock of {vm or vm_uuid} ({path});"
                        f" waited {wait:g} s",
                        vm=vm or vm_uuid, lock_file=str(path),
                    ) from None
                time.sleep(_POLL)
        # Who holds it, for the next run's message; advisory only.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (process {text})" if text.isdigit() else ""
