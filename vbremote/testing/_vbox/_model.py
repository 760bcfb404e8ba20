"""The simulated host's records: machines, media, attachments, snapshots, sessions, guests; public values.

The private records (``_Machine`` and the rest) are plain mutable data; the
modules next to this one own the behaviour. The public values
(:class:`Timing`, :class:`GuestWorkload`, :class:`Fault`,
:class:`SimulatedVBoxError`) are re-exported by :mod:`vbremote.testing`.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path

from attrs import define, field, frozen

from ..._errors import ConfigurationError
from .._vdi import VDI, VDI_BLOCK_SIZE
from ._constants import RESULT_CODES, signed32

__all__ = ["Fault", "GuestWorkload", "SimulatedVBoxError", "Timing"]

#: A disk's place: (controller, port, device).
Slot = tuple[str, int, int]

#: Machine states with no VM process.
OFFLINE = ("PoweredOff", "Aborted", "AbortedSaved", "Saved", "Teleported")
#: Machine states of a VM process that is up.
ONLINE = ("Running", "Paused")


class SimulatedVBoxError(Exception):
    """What the simulated VirtualBox raises: XPCOM's exception shape.

    Attributes:
        errno: The COM result code as a signed 32-bit integer (as XPCOM gives it).
        msg: VirtualBox's message.
    """

    def __init__(self, code: str | int, msg: str) -> None:
        errno = signed32(RESULT_CODES[code] if isinstance(code, str) else code)
        super().__init__(errno, msg)
        self.errno = errno
        self.msg = msg

    def __str__(self) -> str:
        return f"0x{self.errno & 0xFFFFFFFF:08X} - {self.msg}"


class Fault(enum.Enum):
    """Faults to inject into a machine's next operation (see :meth:`SimulatedVirtualBox.inject`)."""

    #: The next snapshot fails: no space for the differencing image; nothing is created.
    NO_SPACE = "no space"
    #: The next snapshot deletion fails before merging; the snapshot and all data stay.
    MERGE_FAILURE = "merge failure"
    #: The next snapshot is taken, then the VM process crashes (Aborted), leaving the snapshot.
    VM_CRASH_AFTER_TAKE = "vm crash after take"
    #: The next operation's progress never completes (a cancelable one ends when canceled).
    HANG = "hang"


@frozen
class Timing:
    """How long simulated operations take, in seconds.

    Attributes:
        start: Powering on (or resuming from a saved state).
        snapshot: Saving RAM and creating differencing images.
        save_state: Saving the state of a running VM.
        power_off: Powering off.
        merge_block: Merging one 1 MiB block when a snapshot is deleted.
        unlock_delay: After the VM process ends (power off, save state, crash)
            the machine stays "being unlocked" this long: a ``lockMachine`` in
            that window fails, as it does on real VirtualBox.
    """

    start: float = 0.05
    snapshot: float = 0.05
    save_state: float = 0.05
    power_off: float = 0.02
    merge_block: float = 0.0
    unlock_delay: float = 0.3


@frozen
class GuestWorkload:
    """What the simulated guest writes while its VM runs.

    Attributes:
        rate: Writes per second (0 for a guest that does not write).
        write_size: Bytes per write (a multiple of 512, at most 1 MiB).
        pattern: ``"random"`` (anywhere on the disk), ``"sequential"`` (a
            moving cursor) or ``"hot"`` (mostly the first 4 MiB).
        seed: Seed of the guest's random choices and data.
    """

    rate: float = 200.0
    write_size: int = 64 * 1024
    pattern: str = "random"
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.pattern not in ("random", "sequential", "hot"):
            raise ConfigurationError(f"unknown guest write pattern {self.pattern!r}")
        if self.write_size <= 0 or self.write_size % 512 or self.write_size > VDI_BLOCK_SIZE:
            raise ConfigurationError("write_size must be a positive multiple of 512, at most 1 MiB")
        if self.rate < 0:
            raise ConfigurationError("rate must not be negative")


#: ``Medium::initOne``'s text for a medium read from settings and not opened yet.
NOT_CHECKED = "Accessibility check was not yet performed"


@define
class _Medium:
    uuid: str
    path: Path
    parent: str | None
    size: int
    children: list[str] = field(factory=list)
    # VirtualBox opens a medium read from a settings file only when something
    # needs it (IMedium::refreshState, a lock); until then it reads as
    # Inaccessible with size 0 (Medium::initOne, MediumImpl.cpp).
    access_error: str = ""
    # "HardDisk", or "DVD" / "Floppy" for an image of the registry's DVDImages / FloppyImages.
    kind: str = "HardDisk"

    @property
    def accessible(self) -> bool:
        return not self.access_error


@define
class _Attachment:
    controller: str
    port: int
    device: int
    type: str
    medium: str | None

    def copy(self) -> _Attachment:
        return _Attachment(self.controller, self.port, self.device, self.type, self.medium)


@define
class _Snapshot:
    uuid: str
    name: str
    description: str
    time_ms: int
    state_file: str | None
    attachments: list[_Attachment]
    parent: str | None
    children: list[str] = field(factory=list)
    # The snapshot's copy of the NVRAM store (relative to the machine folder), if the machine had one.
    nvram: str | None = None


@define(eq=False)
class _Session:
    """One ISession: unlocked, or locked on a machine as the write holder or as a shared client.

    ``lock_type`` is the write holder's ``LockType`` (``"Write"``, ``"Shared"`` or
    ``"VM"``); ``console`` whether the session has a console: its own (a
    ``VM`` lock) or the VM process's (``Machine::lockMachine`` shares it only
    when the holder locked as ``VM``).
    """

    state: str = "Unlocked"
    type: str = "Null"
    machine: _Machine | None = None
    lock_type: str = "Null"
    console: bool = False


#: The unit of the instants' copy-on-write: a guest write keeps the old content of the granules it touches.
GRANULE = 64 * 1024


class _Content:
    """A disk's content as the guest wrote it, kept in an unlinked temporary file, not in memory.

    Starts as zeros (a sparse file); closed when the object goes.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        fd, name = tempfile.mkstemp(prefix="vbox-sim-guest-")
        os.unlink(name)
        os.ftruncate(fd, size)
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return self.size

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)``."""
        pieces = []
        while length > 0:
            piece = os.pread(self._fd, min(length, 1 << 30), offset)
            if not piece:
                raise EOFError(f"guest content ends at {offset}")
            pieces.append(piece)
            offset += len(piece)
            length -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def write(self, offset: int, data: bytes) -> None:
        """Overwrite bytes from ``offset`` on."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            offset += written
            view = view[written:]

    def close(self) -> None:
        """Close the file (reads and writes then fail)."""
        self._closer()
        self._fd = -1


class _OldGranules:
    """Old granules that snapshot instants still need, in an unlinked temporary file, not in memory.

    Each kept granule has a slot in the file and a count of the instants that
    use it; a slot nobody uses any more is reused.
    """

    def __init__(self) -> None:
        self._file: _Content | None = None
        self._users: dict[int, int] = {}
        self._free: list[int] = []
        self._slots = 0

    @property
    def live(self) -> int:
        """How many slots instants use."""
        return len(self._users)

    def keep(self, data: bytes, users: int) -> int:
        """Keep one granule's old content for ``users`` instants; returns its slot."""
        if self._file is None:
            self._file = _Content(0)
        if self._free:
            slot = self._free.pop()
        else:
            slot, self._slots = self._slots, self._slots + 1
        self._file.write(slot * GRANULE, data)
        self._users[slot] = users
        return slot

    def read(self, slot: int) -> bytes:
        """The granule kept in ``slot``."""
        assert self._file is not None
        return self._file.read(slot * GRANULE, GRANULE)

    def release(self, slot: int) -> None:
        """One instant no longer needs ``slot``."""
        self._users[slot] -= 1
        if not self._users[slot]:
            del self._users[slot]
            self._free.append(slot)


@define(eq=False)
class _Instant:
    """What the guest had written to one disk at a snapshot's instant, kept copy-on-write.

    Taking the snapshot copies nothing. Until the guest overwrites a granule
    (``GRANULE`` bytes), the granule's content at the instant is the
    machine's ``expected`` content; before the first overwrite its old
    content is kept (``saved``: granule -> slot in the machine's
    ``old_granules``). ``detached``: every granule is kept, the current
    content is no longer this instant's base (after a restore).
    """

    size: int
    saved: dict[int, int] = field(factory=dict)
    detached: bool = False


@define(eq=False)
class _Guest:
    workload: GuestWorkload
    thread: threading.Thread | None = None
    stop: threading.Event = field(factory=threading.Event)
    writes: int = 0
    cursor: int = 0


@define(eq=False)
class _Machine:
    uuid: str
    name: str
    folder: Path
    os_type: str = "Debian_64"
    memory_mb: int = 1024
    cpuid_level: int = 0
    firmware: str = "BIOS"
    nvram: str | None = None
    state: str = "PoweredOff"
    state_file: str | None = None
    last_state_change: str = ""
    media: dict[str, _Medium] = field(factory=dict)
    # The DVD and floppy images of the machine's media registry (read-only, never VDI).
    removable: dict[str, _Medium] = field(factory=dict)
    attachments: list[_Attachment] = field(factory=list)
    snapshots: dict[str, _Snapshot] = field(factory=dict)
    root: str | None = None
    current: str | None = None
    registered: bool = False
    # The settings file the machine was opened from (its name need not be
    # the VM's); None: <folder>/<name>.vbox.
    settings_file: Path | None = None
    # Sessions: the write holder ("vm" for a running VM's process, or a client
    # session), shared clients, and the end of the unlock window.
    holder: _Session | str | None = None
    shared: set[_Session] = field(factory=set)
    unlocking_until: float = 0.0
    pending_cpuid: int | None = None
    guest: _Guest | None = None
    # Guest content as the guest wrote it, per attachment slot: the model that
    # the disk images must always read back as.
    expected: dict[Slot, _Content] = field(factory=dict)
    images: dict[str, VDI] = field(factory=dict)
    merging: dict[str, set[int]] = field(factory=dict)
    # The guest's content per disk at each snapshot's instant (snapshots taken by this host
    # and not deleted), copy-on-write over ``expected``.
    instants: dict[str, dict[Slot, _Instant]] = field(factory=dict)
    old_granules: _OldGranules = field(factory=_OldGranules)
    # Guards images, expected, instants and merging; taken only as _locks.Locks says.
    disk_lock: threading.RLock = field(factory=threading.RLock)

    @property
    def settings_path(self) -> Path:
        return self.settings_file if self.settings_file is not None else self.folder / f"{self.name}.vbox"

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def hard_disks(self, attachments: list[_Attachment] | None = None) -> list[_Attachment]:
        return [a for a in (self.attachments if attachments is None else attachments) if a.type == "HardDisk"]


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sav_name() -> str:
    """A saved-state file name: ``Machine::i_composeSavedStateFilename`` (MachineImpl.cpp), UTC to the ns."""
    return _time_name() + ".sav"


def nvram_name() -> str:
    """A snapshot's NVRAM file name: ``Machine::i_getSnapshotNVRAMFilename`` (MachineImpl.cpp), as sav_name."""
    return _time_name() + ".nvram"


def _time_name() -> str:
    now = time.time_ns()
    stamp = dt.datetime.fromtimestamp(now // 1_000_000_000, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H-%M-%S-") + f"{now % 1_000_000_000:09d}Z"
