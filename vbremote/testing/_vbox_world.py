"""The simulated VirtualBox host: machines, sessions, progress, real files and a writing guest.

This module holds the state and behaviour; :mod:`._vbox_com` puts the
vboxapi-shaped COM surface on top. Everything that VirtualBox keeps on disk
is kept on disk here too, in VirtualBox's layout:

- ``<home>/VirtualBox.xml``: the global machine registry;
- ``<home>/VirtualBox VMs/<name>/<name>.vbox``: each machine's settings file,
  rewritten (atomically) on every change, with the media registry, the
  snapshot tree, the current snapshot and the state file;
- ``<name>.vdi`` base disks and ``Snapshots/{uuid}.vdi`` differencing disks
  (VDI 1.1, readable by ``qemu-img``), ``Snapshots/<time>.sav`` saved states,
  ``<name>.nvram`` for EFI machines, ``Logs/VBox.log``.

A new :class:`SimulatedVirtualBox` on the same home folder loads the
registered machines back, as VBoxSVC does when it starts.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import random
import shutil
import threading
import time
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from attrs import define, field, frozen

from .._errors import ConfigurationError, SettingsFileError
from .._settings import NS, Medium, SnapshotNode, _bare, parse_settings
from ._images import MIB, mixed_content
from ._vbox_constants import PROFILES, RESULT_CODES, constants_for, signed32
from ._vdi import VDI, VDI_BLOCK_SIZE

if TYPE_CHECKING:
    from ._vbox_com import VirtualBoxManager

__all__ = ["Fault", "GuestWorkload", "SimulatedVirtualBox", "SimulatedVBoxError", "Timing"]

_N = "{" + NS + "}"
_FULL_VERSIONS = {"6.1": "6.1.50", "7.0": "7.0.22", "7.1": "7.1.8", "7.2": "7.2.2"}
_SETTINGS_VERSIONS = {"6.1": "1.17", "7.0": "1.19", "7.1": "1.20", "7.2": "1.21"}
_SAV_MAGIC = b"\x7fVirtualBox SavedState V2.0\n"
_OFFLINE = ("PoweredOff", "Aborted", "AbortedSaved", "Saved", "Teleported")
_ONLINE = ("Running", "Paused")


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


@define
class _Medium:
    uuid: str
    path: Path
    parent: str | None
    size: int
    children: list[str] = field(factory=list)


@define
class _Attachment:
    controller: str
    port: int
    device: int
    type: str
    medium: str | None


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


@define(eq=False)
class _Session:
    """One ISession: unlocked, or locked on a machine as the write holder or as a shared client."""

    state: str = "Unlocked"
    type: str = "Null"
    machine: _Machine | None = None


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
    attachments: list[_Attachment] = field(factory=list)
    snapshots: dict[str, _Snapshot] = field(factory=dict)
    root: str | None = None
    current: str | None = None
    registered: bool = False
    # Sessions: the write holder ("vm" for a running VM's process, or a client
    # session), shared clients, and the end of the unlock window.
    holder: _Session | str | None = None
    shared: set[_Session] = field(factory=set)
    unlocking_until: float = 0.0
    pending_cpuid: int | None = None
    guest: _Guest | None = None
    # Guest content as the guest wrote it, per attachment slot: the model that
    # the disk images must always read back as.
    expected: dict[tuple[str, int, int], bytearray] = field(factory=dict)
    images: dict[str, VDI] = field(factory=dict)
    merging: dict[str, set[int]] = field(factory=dict)
    disk_lock: threading.RLock = field(factory=threading.RLock)

    @property
    def settings_path(self) -> Path:
        return self.folder / f"{self.name}.vbox"

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def hard_disks(self, attachments: list[_Attachment] | None = None) -> list[_Attachment]:
        return [a for a in (self.attachments if attachments is None else attachments) if a.type == "HardDisk"]


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sav_name() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H-%M-%S-") + f"{now.microsecond * 1000:09d}Z.sav"


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


class SimulatedVirtualBox:
    """A simulated VirtualBox host with real files, for tests and demos.

    Args:
        home: The VirtualBox home folder (``VirtualBox.xml`` and ``VirtualBox VMs/``).
            Machines registered there before are loaded.
        version: The version profile: ``"6.1"``, ``"7.0"``, ``"7.1"`` or ``"7.2"``.
        timing: How long operations take.
        workload: What guests write when their VM is started through the API
            (``launchVMProcess``); ``None`` for guests that do not write.

    Use :meth:`manager` for the vboxapi-shaped ``VirtualBoxManager`` that
    :meth:`vbremote.VirtualBoxHost.connect` takes, and the conveniences
    (:meth:`create_vm`, :meth:`start`, :meth:`power_off`, :meth:`guest_content`,
    :meth:`disk_content`, :meth:`read_image`) to set scenes and check results.
    Close it (or use it as a context manager) to stop the guests.

    Raises:
        ConfigurationError: An unknown profile.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        version: str = "7.1",
        timing: Timing = Timing(),
        workload: GuestWorkload | None = GuestWorkload(),
    ) -> None:
        if version not in PROFILES:
            raise ConfigurationError(f"unknown VirtualBox profile {version!r}; choose one of {', '.join(PROFILES)}")
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.profile = version
        self.version = _FULL_VERSIONS[version]
        self.timing = timing
        self.default_workload = workload
        self.constants = constants_for(version)
        self.lock = threading.RLock()
        self.machines: dict[str, _Machine] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._closed = False
        self._load_registry()

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """Stop every guest writer (the VMs stay in their states)."""
        self._closed = True
        for machine in list(self.machines.values()):
            self._stop_guest(machine)

    def __enter__(self) -> SimulatedVirtualBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def manager(self) -> VirtualBoxManager:
        """A vboxapi-shaped ``VirtualBoxManager`` for this host."""
        from ._vbox_com import VirtualBoxManager

        return VirtualBoxManager(simulator=self)

    @property
    def vms_folder(self) -> Path:
        return self.home / "VirtualBox VMs"

    # -- conveniences ---------------------------------------------------------

    def create_vm(
        self,
        name: str,
        *,
        disk_size: int = 32 * MIB,
        disks: int = 1,
        content: str = "mixed",
        seed: int = 0,
        firmware: str = "BIOS",
        memory_mb: int = 512,
        external_disk_folder: str | os.PathLike[str] | None = None,
    ) -> str:
        """Create and register a powered-off VM with VDI disks full of guest data; returns its uuid.

        Args:
            name: The VM's name (its folder and settings file are named after it).
            disk_size: Each disk's size (whole MiB).
            disks: How many disks (SATA ports 0, 1, …).
            content: ``"mixed"`` (random, text, zeros and repeats), ``"zeros"`` or ``"random"``.
            seed: Seed of the content.
            firmware: ``"BIOS"`` or ``"EFI"`` (EFI machines get an NVRAM file).
            memory_mb: RAM size (the saved-state files are a fraction of it).
            external_disk_folder: Put the second disk here, outside the VM folder.

        Raises:
            ConfigurationError: Bad arguments or a name already taken.
        """
        if not name or "/" in name or name in (".", ".."):
            raise ConfigurationError(f"invalid VM name {name!r}")
        if content not in ("mixed", "zeros", "random"):
            raise ConfigurationError(f"unknown content {content!r}")
        if firmware not in ("BIOS", "EFI"):
            raise ConfigurationError(f"unknown firmware {firmware!r}")
        if disks < 1 or disk_size <= 0 or disk_size % MIB:
            raise ConfigurationError("need at least one disk of a whole number of MiB")
        with self.lock:
            if any(m.name == name for m in self.machines.values()):
                raise ConfigurationError(f"a VM named {name!r} is already registered")
            folder = self.vms_folder / name
            if folder.exists():
                raise ConfigurationError(f"{folder} already exists")
            folder.mkdir(parents=True)
            (folder / "Snapshots").mkdir()
            machine = _Machine(uuid=str(uuid_module.uuid4()), name=name, folder=folder, memory_mb=memory_mb,
                               firmware=firmware, last_state_change=_now_iso())
            rng = random.Random(seed)
            for port in range(disks):
                where = folder
                if port == 1 and external_disk_folder is not None:
                    where = Path(external_disk_folder)
                    where.mkdir(parents=True, exist_ok=True)
                path = where / (f"{name}.vdi" if port == 0 else f"{name}-disk{port + 1}.vdi")
                image = VDI.create(path, disk_size)
                expected = bytearray(disk_size)
                for index, block in enumerate(_content(content, disk_size, rng.randrange(1 << 30))):
                    if block.count(0) != len(block):
                        image.write(index * MIB, block)
                        expected[index * MIB : (index + 1) * MIB] = block
                machine.media[image.uuid] = _Medium(image.uuid, path, None, disk_size)
                machine.attachments.append(_Attachment("SATA", port, 0, "HardDisk", image.uuid))
                machine.expected[("SATA", port, 0)] = expected
            machine.attachments.append(_Attachment("SATA", disks, 0, "DVD", None))
            if firmware == "EFI":
                machine.nvram = f"{name}.nvram"
                (folder / machine.nvram).write_bytes(rng.randbytes(128 * 1024))
            machine.registered = True
            self.machines[machine.uuid] = machine
            self.write_settings(machine)
            self._write_registry()
            return machine.uuid

    def machine(self, vm: str) -> _Machine:
        """The registered machine with this name or uuid.

        Raises:
            ConfigurationError: No such machine.
        """
        with self.lock:
            for machine in self.machines.values():
                if machine.registered and (machine.name == vm or machine.uuid == _bare(vm)):
                    return machine
        raise ConfigurationError(f"no VM {vm!r} is registered")

    def start(self, vm: str, *, workload: GuestWorkload | None = GuestWorkload(), timeout: float = 10.0) -> None:
        """Power a VM on (headless), as ``VBoxManage startvm``; its guest then writes per ``workload``."""
        machine = self.machine(vm)
        session = _Session()
        op = self.launch(machine, session, workload=workload)
        if not op.done.wait(timeout):
            raise ConfigurationError(f"{vm} did not start within {timeout} s")
        self.unlock(session)
        if op.error is not None:
            raise op.error

    def power_off(self, vm: str, *, timeout: float = 10.0) -> None:
        """Power a running VM off, as ``VBoxManage controlvm poweroff``."""
        machine = self.machine(vm)
        op = self.power_down(machine)
        if not op.done.wait(timeout):
            raise ConfigurationError(f"{vm} did not power off within {timeout} s")
        if op.error is not None:
            raise op.error

    def inject(self, vm: str, fault: Fault) -> None:
        """Make the machine's next matching operation fail this way (once)."""
        machine = self.machine(vm)
        with self.lock:
            self._faults.setdefault(machine.uuid, []).append(fault)

    def crash(self, vm: str) -> None:
        """The VM process dies: the machine is Aborted, its guest stops, the lock is released later."""
        self._crash(self.machine(vm))

    def guest_writes(self, vm: str) -> int:
        """How many writes the guest made since its VM last started."""
        machine = self.machine(vm)
        return machine.guest.writes if machine.guest else 0

    def guest_content(self, vm: str, disk: int = 0) -> bytes:
        """What the guest wrote: the content the disk must read back as (SATA port ``disk``)."""
        machine = self.machine(vm)
        with machine.disk_lock:
            return bytes(self._expected(machine, ("SATA", disk, 0)))

    def disk_content(self, vm: str, disk: int = 0) -> bytes:
        """The disk's content as the VM sees it now: read through its current differencing chain."""
        machine = self.machine(vm)
        with machine.disk_lock:
            attachment = self._slot(machine, ("SATA", disk, 0))
            assert attachment.medium is not None
            image = self._image(machine, attachment.medium)
            return image.read(0, image.size)

    def disk_matches_guest(self, vm: str, disk: int = 0) -> bool:
        """Whether the disk reads back exactly what the guest wrote, checked at one instant.

        (:meth:`guest_content` and :meth:`disk_content` each hold for their
        own instant only, while the guest writes.)
        """
        machine = self.machine(vm)
        with machine.disk_lock:
            return self.disk_content(vm, disk) == self.guest_content(vm, disk)

    def read_image(self, path: str | os.PathLike[str]) -> bytes:
        """The guest content of one image file of a registered VM, read through its parents."""
        wanted = Path(path).resolve()
        with self.lock:
            found = [(m, medium.uuid) for m in self.machines.values() for medium in m.media.values()
                     if medium.path.resolve() == wanted]
        if not found:
            raise ConfigurationError(f"{path} is no medium of a registered VM")
        # The disk lock is taken before the host lock everywhere else; never the other way round.
        machine, uuid = found[0]
        with machine.disk_lock:
            image = self._image(machine, uuid)
            return image.read(0, image.size)

    # -- faults and state -------------------------------------------------------

    def take_fault(self, machine: _Machine, *faults: Fault) -> Fault | None:
        with self.lock:
            pending = self._faults.get(machine.uuid, [])
            for fault in pending:
                if fault in faults:
                    pending.remove(fault)
                    return fault
        return None

    def state_value(self, machine: _Machine) -> int:
        return self.constants[f"MachineState_{machine.state}"]

    def set_state(self, machine: _Machine, state: str) -> None:
        with self.lock:
            machine.state = state
            if state in ("PoweredOff", "Saved", "Aborted", "AbortedSaved", "Running", "Paused"):
                machine.last_state_change = _now_iso()

    # -- sessions -----------------------------------------------------------------

    def is_locked(self, machine: _Machine) -> bool:
        return machine.holder is not None or time.monotonic() < machine.unlocking_until

    def lock_machine(self, machine: _Machine, session: _Session, lock_type: str) -> None:
        with self.lock:
            if session.state != "Unlocked":
                raise SimulatedVBoxError("VBOX_E_INVALID_SESSION_STATE", "The given session is busy")
            if not machine.registered:
                raise SimulatedVBoxError("VBOX_E_INVALID_OBJECT_STATE", f"Machine '{machine.name}' is not registered")
            if self.is_locked(machine):
                if lock_type == "Shared" and machine.holder is not None:
                    session.state, session.type, session.machine = "Locked", "Shared", machine
                    machine.shared.add(session)
                    return
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_OBJECT_STATE",
                    f"The machine '{machine.name}' is already locked by a session (or being locked or unlocked)",
                )
            # Not locked: a shared request gets the write lock, as on VirtualBox.
            session.state, session.type, session.machine = "Locked", "WriteLock", machine
            machine.holder = session

    def unlock(self, session: _Session) -> None:
        with self.lock:
            if session.state != "Locked" or session.machine is None:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_SESSION_STATE", f"The session is not locked (session state: {session.state})"
                )
            machine = session.machine
            machine.shared.discard(session)
            if machine.holder is session:
                machine.holder = None
                machine.pending_cpuid = None  # uncommitted changes are discarded, as on VirtualBox
            session.state, session.type, session.machine = "Unlocked", "Null", None

    def _vm_process_ended(self, machine: _Machine) -> None:
        with self.lock:
            if machine.holder == "vm":
                machine.holder = None
                machine.unlocking_until = time.monotonic() + self.timing.unlock_delay

    def check_session_machine(self, machine: _Machine, session: _Session) -> None:
        if session.state != "Locked" or session.machine is not machine:
            raise SimulatedVBoxError("E_ACCESSDENIED", "The session is no longer locked on this machine")

    # -- starting and stopping -------------------------------------------------

    def launch(self, machine: _Machine, session: _Session, *, workload: GuestWorkload | None) -> Operation:
        with self.lock:
            if session.state != "Unlocked":
                raise SimulatedVBoxError("VBOX_E_INVALID_SESSION_STATE", "The given session is busy")
            if self.is_locked(machine):
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_OBJECT_STATE",
                    f"The machine '{machine.name}' is already locked by a session (or being locked or unlocked)",
                )
            if machine.state not in _OFFLINE:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE", f"The machine is not powered off (state is {machine.state})"
                )
            resume = machine.state in ("Saved", "AbortedSaved")
            machine.holder = "vm"
            session.state, session.type, session.machine = "Locked", "Shared", machine
            machine.shared.add(session)
            self.set_state(machine, "Restoring" if resume else "Starting")

        def work(op: Operation) -> None:
            op.sleep(self.timing.start)
            with self.lock:
                if resume and machine.state_file:
                    if not self._state_file_in_snapshots(machine, machine.state_file):
                        machine.path(machine.state_file).unlink(missing_ok=True)
                    machine.state_file = None
                logs = machine.folder / "Logs"
                logs.mkdir(exist_ok=True)
                with open(logs / "VBox.log", "a") as log:
                    log.write(f"{_now_iso()} VirtualBox {self.version} (simulated): {machine.name} powered on\n")
                self.set_state(machine, "Running")
                self.write_settings(machine)
            if workload is not None and workload.rate > 0:
                self._start_guest(machine, workload)

        return Operation(f"Starting virtual machine '{machine.name}'", cancelable=False).start(work)

    def power_down(self, machine: _Machine) -> Operation:
        with self.lock:
            if machine.state == "Saved":
                raise SimulatedVBoxError("VBOX_E_INVALID_VM_STATE", "Cannot power down a saved virtual machine")
            if machine.state not in ("Running", "Paused", "Stuck"):
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE",
                    f"Invalid machine state: {machine.state} (must be Running, Paused or Stuck)",
                )
            self.set_state(machine, "Stopping")
        fault = self.take_fault(machine, Fault.HANG)

        def work(op: Operation) -> None:
            if fault is Fault.HANG:
                op.hang()
            op.sleep(self.timing.power_off)
            self._stop_guest(machine)
            with self.lock:
                self.set_state(machine, "PoweredOff")
                self.write_settings(machine)
            self._vm_process_ended(machine)

        return Operation(f"Powering off virtual machine '{machine.name}'", cancelable=False).start(work)

    def pause(self, machine: _Machine, paused: bool) -> None:
        with self.lock:
            wanted = "Running" if paused else "Paused"
            if machine.state != wanted:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE", f"Invalid machine state: {machine.state} (must be {wanted})"
                )
            self.set_state(machine, "Paused" if paused else "Running")

    def save_state(self, machine: _Machine) -> Operation:
        with self.lock:
            if machine.state not in _ONLINE:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE",
                    f"Cannot save the execution state as the machine is not running or paused "
                    f"(machine state: {machine.state})",
                )
            self.set_state(machine, "Saving")
        fault = self.take_fault(machine, Fault.HANG)

        def work(op: Operation) -> None:
            if fault is Fault.HANG:
                op.hang()
            op.sleep(self.timing.save_state)
            self._stop_guest(machine)
            with self.lock:
                machine.state_file = f"Snapshots/{_sav_name()}"
                self._write_sav(machine, machine.state_file)
                self.set_state(machine, "Saved")
                self.write_settings(machine)
            self._vm_process_ended(machine)

        return Operation(f"Saving the execution state of the virtual machine '{machine.name}'",
                         cancelable=False).start(work)

    def discard_saved_state(self, machine: _Machine, remove_file: bool) -> None:
        with self.lock:
            if machine.state not in ("Saved", "AbortedSaved"):
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE", f"Cannot discard the saved state as the machine is not in the Saved "
                    f"state (machine state: {machine.state})"
                )
            if remove_file and machine.state_file and not self._state_file_in_snapshots(machine, machine.state_file):
                machine.path(machine.state_file).unlink(missing_ok=True)
            machine.state_file = None
            self.set_state(machine, "PoweredOff")
            self.write_settings(machine)

    def _crash(self, machine: _Machine) -> None:
        self._stop_guest(machine)
        with self.lock:
            if machine.state in ("PoweredOff", "Saved", "Aborted", "AbortedSaved", "Teleported"):
                return
            self.set_state(machine, "Aborted")
            for session in list(machine.shared):
                session.state, session.type, session.machine = "Unlocked", "Null", None
            machine.shared.clear()
            self.write_settings(machine, aborted=True)
        self._vm_process_ended(machine)

    # -- the guest ------------------------------------------------------------------

    def _start_guest(self, machine: _Machine, workload: GuestWorkload) -> None:
        self._stop_guest(machine)
        guest = _Guest(workload)
        with machine.disk_lock:
            for attachment in machine.hard_disks():
                self._expected(machine, (attachment.controller, attachment.port, attachment.device))
        guest.thread = threading.Thread(target=self._guest_loop, args=(machine, guest), daemon=True,
                                        name=f"vbox-sim guest {machine.name}")
        machine.guest = guest
        guest.thread.start()

    def _stop_guest(self, machine: _Machine) -> None:
        guest = machine.guest
        if guest is not None and guest.thread is not None:
            guest.stop.set()
            if guest.thread is not threading.current_thread():
                guest.thread.join()

    def _guest_loop(self, machine: _Machine, guest: _Guest) -> None:
        workload = guest.workload
        rng = random.Random(workload.seed)
        interval = 1.0 / workload.rate
        while not guest.stop.wait(interval):
            if machine.state not in ("Running", "LiveSnapshotting", "DeletingSnapshotOnline"):
                continue  # a paused guest (or one held for a snapshot) does not write
            with machine.disk_lock:
                if machine.state not in ("Running", "LiveSnapshotting", "DeletingSnapshotOnline"):
                    continue
                disks = machine.hard_disks()
                if not disks:
                    continue
                attachment = rng.choice(disks)
                assert attachment.medium is not None
                image = self._image(machine, attachment.medium)
                offset = self._guest_offset(guest, rng, image.size)
                data = rng.randbytes(workload.write_size)
                image.write(offset, data)
                slot = (attachment.controller, attachment.port, attachment.device)
                self._expected(machine, slot)[offset : offset + len(data)] = data
                dirty = machine.merging.get(attachment.medium)
                if dirty is not None:
                    first, last = offset // VDI_BLOCK_SIZE, (offset + len(data) - 1) // VDI_BLOCK_SIZE
                    dirty.update(range(first, last + 1))
                guest.writes += 1

    @staticmethod
    def _guest_offset(guest: _Guest, rng: random.Random, size: int) -> int:
        step = guest.workload.write_size
        slots = size // step
        if guest.workload.pattern == "sequential":
            guest.cursor = (guest.cursor + 1) % slots
            return guest.cursor * step
        if guest.workload.pattern == "hot" and rng.random() < 0.9:
            return rng.randrange(max(1, min(slots, (4 * MIB) // step))) * step
        return rng.randrange(slots) * step

    def _expected(self, machine: _Machine, slot: tuple[str, int, int]) -> bytearray:
        if slot not in machine.expected:
            attachment = self._slot(machine, slot)
            assert attachment.medium is not None
            image = self._image(machine, attachment.medium)
            machine.expected[slot] = bytearray(image.read(0, image.size))
        return machine.expected[slot]

    @staticmethod
    def _slot(machine: _Machine, slot: tuple[str, int, int]) -> _Attachment:
        for attachment in machine.hard_disks():
            if (attachment.controller, attachment.port, attachment.device) == slot:
                return attachment
        raise ConfigurationError(f"{machine.name} has no disk at {slot[0]} port {slot[1]}")

    # -- images -------------------------------------------------------------------

    def _image(self, machine: _Machine, uuid: str) -> VDI:
        image = machine.images.get(uuid)
        if image is None:
            medium = machine.media[uuid]
            parent = self._image(machine, medium.parent) if medium.parent else None
            image = VDI.open(medium.path, parent=parent)
            machine.images[uuid] = image
        return image

    def _new_diff(self, machine: _Machine, parent_uuid: str) -> _Medium:
        new_uuid = str(uuid_module.uuid4())
        path = machine.folder / "Snapshots" / f"{{{new_uuid}}}.vdi"
        path.parent.mkdir(exist_ok=True)
        image = VDI.create_diff(path, self._image(machine, parent_uuid), image_uuid=new_uuid)
        machine.images[new_uuid] = image
        parent = machine.media[parent_uuid]
        medium = _Medium(new_uuid, path, parent_uuid, parent.size)
        machine.media[new_uuid] = medium
        parent.children.append(new_uuid)
        return medium

    def _drop_medium(self, machine: _Machine, uuid: str) -> None:
        medium = machine.media.pop(uuid)
        if medium.parent:
            machine.media[medium.parent].children.remove(uuid)
        machine.images.pop(uuid, None)
        medium.path.unlink(missing_ok=True)

    def _write_sav(self, machine: _Machine, relative: str) -> None:
        # A saved state: a header and the guest's "RAM" (a fraction of the
        # configured size, so tests stay small), derived from the guest's writes.
        path = machine.path(relative)
        path.parent.mkdir(exist_ok=True)
        seed = (machine.guest.writes if machine.guest else 0, machine.uuid)
        ram = random.Random(str(seed)).randbytes(max(64 * 1024, machine.memory_mb * 1024))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(_SAV_MAGIC + ram)
        os.replace(tmp, path)

    def _state_file_in_snapshots(self, machine: _Machine, relative: str) -> bool:
        return any(s.state_file == relative for s in machine.snapshots.values())

    # -- snapshots -------------------------------------------------------------------

    def take_snapshot(self, machine: _Machine, name: str, description: str, pause: bool) -> tuple[Operation, str]:
        with self.lock:
            before = machine.state
            if (before == "Running" and not pause) or (before == "Paused" and not pause and self.profile == "6.1"):
                transient = "LiveSnapshotting"
            elif before in _ONLINE:
                transient = "OnlineSnapshotting"
            elif before in _OFFLINE:
                transient = "Snapshotting"
            else:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE",
                    f"Cannot take a snapshot of the machine while it is changing the state (machine state: {before})",
                )
            self.set_state(machine, transient)
            snapshot_uuid = str(uuid_module.uuid4())
        fault = self.take_fault(machine, Fault.NO_SPACE, Fault.HANG, Fault.VM_CRASH_AFTER_TAKE)

        def work(op: Operation) -> None:
            previous = [(a, a.medium) for a in machine.hard_disks()]
            created: list[str] = []
            state_file: str | None = None
            try:
                if fault is Fault.HANG:
                    op.hang()
                op.sleep(self.timing.snapshot)
                if fault is Fault.NO_SPACE:
                    where = machine.folder / "Snapshots" / f"{{{uuid_module.uuid4()}}}.vdi"
                    raise SimulatedVBoxError(
                        "VBOX_E_FILE_ERROR",
                        f"Could not create the differencing medium storage unit '{where}'. (VERR_DISK_FULL)",
                    )
                with machine.disk_lock, self.lock:
                    op.check_cancel()
                    # The instant: RAM saved and disks switched while the guest is held.
                    if before in _ONLINE:
                        state_file = f"Snapshots/{_sav_name()}"
                        self._write_sav(machine, state_file)
                    elif before in ("Saved", "AbortedSaved") and machine.state_file:
                        state_file = f"Snapshots/{_sav_name()}"
                        shutil.copyfile(machine.path(machine.state_file), machine.path(state_file))
                    frozen_attachments = [_Attachment(a.controller, a.port, a.device, a.type, a.medium)
                                          for a in machine.attachments]
                    for attachment in machine.hard_disks():
                        assert attachment.medium is not None
                        diff = self._new_diff(machine, attachment.medium)
                        created.append(diff.uuid)
                        attachment.medium = diff.uuid
                    snapshot = _Snapshot(snapshot_uuid, name, description, int(time.time() * 1000), state_file,
                                         frozen_attachments, machine.current)
                    machine.snapshots[snapshot_uuid] = snapshot
                    if machine.current is None:
                        machine.root = snapshot_uuid
                    else:
                        machine.snapshots[machine.current].children.append(snapshot_uuid)
                    machine.current = snapshot_uuid
                    self.set_state(machine, before)
                    self.write_settings(machine)
            except BaseException:
                with machine.disk_lock, self.lock:
                    if snapshot_uuid not in machine.snapshots:
                        for attachment, medium in previous:
                            attachment.medium = medium
                        for uuid in created:
                            self._drop_medium(machine, uuid)
                        if state_file:
                            machine.path(state_file).unlink(missing_ok=True)
                    self.set_state(machine, before)
                raise
            if fault is Fault.VM_CRASH_AFTER_TAKE:
                self._crash(machine)

        op = Operation(f"Taking a snapshot of the virtual machine '{machine.name}'", cancelable=True).start(work)
        return op, snapshot_uuid

    def find_snapshot(self, machine: _Machine, name_or_id: str) -> _Snapshot:
        with self.lock:
            if not name_or_id:
                if machine.root is None:
                    raise SimulatedVBoxError("VBOX_E_OBJECT_NOT_FOUND", "This machine does not have any snapshots")
                return machine.snapshots[machine.root]
            wanted = _bare(name_or_id)
            if wanted in machine.snapshots:
                return machine.snapshots[wanted]
            for snapshot in machine.snapshots.values():
                if snapshot.name == name_or_id:
                    return snapshot
        raise SimulatedVBoxError("VBOX_E_OBJECT_NOT_FOUND", f"Could not find a snapshot named '{name_or_id}'")

    def delete_snapshot(self, machine: _Machine, snapshot_id: str) -> Operation:
        with self.lock:
            snapshot = machine.snapshots.get(_bare(snapshot_id))
            if snapshot is None:
                raise _snapshot_not_found(snapshot_id)
            if len(snapshot.children) > 1:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_OBJECT_STATE",
                    f"Snapshot '{snapshot.name}' of the machine '{machine.name}' has more than one child snapshot "
                    f"({len(snapshot.children)})",
                )
            before = machine.state
            transient = {"Running": "DeletingSnapshotOnline", "Paused": "DeletingSnapshotPaused"}.get(before)
            if transient is None and before in _OFFLINE:
                transient = "DeletingSnapshot"
            if transient is None:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE",
                    f"Cannot delete a snapshot of the machine '{machine.name}' while it is changing the state "
                    f"(machine state: {before})",
                )
            pairs: list[tuple[str, str]] = []
            for attachment in machine.hard_disks(snapshot.attachments):
                assert attachment.medium is not None
                children = machine.media[attachment.medium].children
                if len(children) != 1:
                    raise SimulatedVBoxError(
                        "VBOX_E_INVALID_OBJECT_STATE",
                        f"Medium '{machine.media[attachment.medium].path}' has {len(children)} children; "
                        "the simulator merges a medium with exactly one",
                    )
                pairs.append((attachment.medium, children[0]))
            self.set_state(machine, transient)
        fault = self.take_fault(machine, Fault.MERGE_FAILURE, Fault.HANG)

        def work(op: Operation) -> None:
            try:
                if fault is Fault.HANG:
                    op.hang()
                op.sleep(self.timing.snapshot)
                if fault is Fault.MERGE_FAILURE:
                    parent, child = pairs[0]
                    raise SimulatedVBoxError(
                        "VBOX_E_FILE_ERROR",
                        f"Could not merge the medium '{machine.media[child].path}' to "
                        f"'{machine.media[parent].path}' (VERR_IO_GEN_FAILURE)",
                    )
                for number, (parent, child) in enumerate(pairs):
                    self._merge(machine, parent, child, op, number, len(pairs))
                with self.lock:
                    self._remove_snapshot(machine, snapshot)
                    self.set_state(machine, before)
                    self.write_settings(machine)
            except BaseException:
                with self.lock:
                    machine.merging.clear()
                    self.set_state(machine, before)
                raise

        return Operation(f"Deleting the snapshot '{snapshot.name}'", cancelable=False).start(work)

    def _merge(self, machine: _Machine, parent: str, child: str, op: Operation, number: int, count: int) -> None:
        """Merge ``child`` into ``parent`` while the guest may keep writing to ``child``."""
        with machine.disk_lock:
            child_image = self._image(machine, child)
            parent_image = self._image(machine, parent)
            indexes = [i for i, entry in enumerate(child_image.block_map) if entry != 0xFFFFFFFF]
            machine.merging[child] = set()
        for done, index in enumerate(indexes):
            with machine.disk_lock:
                machine.merging[child].discard(index)
                parent_image.write(index * VDI_BLOCK_SIZE, child_image.read_block(index))
            op.percent = int(100 * (number + (done + 1) / max(1, len(indexes))) / count) - 1
            if self.timing.merge_block:
                time.sleep(self.timing.merge_block)
        with machine.disk_lock, self.lock:
            # Blocks the guest wrote during the copy, then the switch, in one step.
            for index in sorted(machine.merging.pop(child)):
                parent_image.write(index * VDI_BLOCK_SIZE, child_image.read_block(index))
            for attachment in [*machine.attachments, *(a for s in machine.snapshots.values() for a in s.attachments)]:
                if attachment.medium == child:
                    attachment.medium = parent
            for grandchild in machine.media[child].children:
                self._image(machine, grandchild).rebase(parent_image)
                machine.media[grandchild].parent = parent
                machine.media[parent].children.append(grandchild)
            machine.media[child].children = []
            self._drop_medium(machine, child)

    def _remove_snapshot(self, machine: _Machine, snapshot: _Snapshot) -> None:
        parent = machine.snapshots[snapshot.parent] if snapshot.parent else None
        for child in snapshot.children:
            machine.snapshots[child].parent = snapshot.parent
        if parent is not None:
            index = parent.children.index(snapshot.uuid)
            parent.children[index : index + 1] = snapshot.children
        else:
            machine.root = snapshot.children[0] if snapshot.children else None
        if machine.current == snapshot.uuid:
            machine.current = snapshot.parent
        del machine.snapshots[snapshot.uuid]
        if snapshot.state_file and snapshot.state_file != machine.state_file:
            machine.path(snapshot.state_file).unlink(missing_ok=True)

    def restore_snapshot(self, machine: _Machine, snapshot: _Snapshot) -> Operation:
        with self.lock:
            if machine.state not in _OFFLINE:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE",
                    f"Cannot delete the current state of the running machine (machine state: {machine.state})",
                )
            if snapshot.uuid not in machine.snapshots:
                raise _snapshot_not_found(snapshot.uuid)
            self.set_state(machine, "RestoringSnapshot")
        fault = self.take_fault(machine, Fault.HANG)

        def work(op: Operation) -> None:
            if fault is Fault.HANG:
                op.hang()
            op.sleep(self.timing.snapshot)
            with machine.disk_lock, self.lock:
                in_snapshots = {a.medium for s in machine.snapshots.values() for a in s.attachments}
                for attachment in machine.hard_disks():
                    medium = attachment.medium
                    if medium and medium not in in_snapshots and not machine.media[medium].children:
                        self._drop_medium(machine, medium)
                machine.attachments = [_Attachment(a.controller, a.port, a.device, a.type, a.medium)
                                       for a in snapshot.attachments]
                for attachment in machine.hard_disks():
                    assert attachment.medium is not None
                    attachment.medium = self._new_diff(machine, attachment.medium).uuid
                if machine.state_file and not self._state_file_in_snapshots(machine, machine.state_file):
                    machine.path(machine.state_file).unlink(missing_ok=True)
                machine.state_file = None
                if snapshot.state_file:
                    machine.state_file = f"Snapshots/{_sav_name()}"
                    shutil.copyfile(machine.path(snapshot.state_file), machine.path(machine.state_file))
                machine.current = snapshot.uuid
                machine.expected = {}  # the guest's disks are the snapshot's now
                self.set_state(machine, "Saved" if snapshot.state_file else "PoweredOff")
                self.write_settings(machine)

        return Operation(f"Restoring snapshot '{snapshot.name}'", cancelable=False).start(work)

    # -- settings ---------------------------------------------------------------------

    def set_cpuid_level(self, machine: _Machine, session: _Session | None, level: int) -> None:
        with self.lock:
            self._check_mutable(machine, session)
            if not 0 <= level <= 3:
                raise SimulatedVBoxError("E_INVALIDARG", f"Invalid CPUID portability level: {level} (0..3)")
            machine.pending_cpuid = level

    def save_settings(self, machine: _Machine, session: _Session | None) -> None:
        with self.lock:
            self._check_mutable(machine, session)
            if machine.pending_cpuid is not None:
                machine.cpuid_level = machine.pending_cpuid
                machine.pending_cpuid = None
            self.write_settings(machine)

    def _check_mutable(self, machine: _Machine, session: _Session | None) -> None:
        # Only the write-locked session machine of a machine that is off is
        # mutable (Saved is not: its settings must match the saved state).
        owner = session is not None and session.machine is machine and machine.holder is session
        if not owner or machine.state not in ("PoweredOff", "Aborted", "Teleported"):
            message = f"The machine is not mutable (state is {machine.state})"
            raise SimulatedVBoxError("VBOX_E_INVALID_VM_STATE", message)

    def unregister(self, machine: _Machine, mode: str) -> list[str]:
        with self.lock:
            if self.is_locked(machine):
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_OBJECT_STATE", f"Cannot unregister the machine '{machine.name}' while it is locked"
                )
            if mode == "UnregisterOnly" and machine.snapshots:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_OBJECT_STATE",
                    f"Cannot unregister the machine '{machine.name}' because it has {len(machine.snapshots)} snapshots",
                )
            machine.registered = False
            del self.machines[machine.uuid]
            self._write_registry()
            if mode == "UnregisterOnly":
                return []
            return list(machine.media)

    def open_machine(self, path: str) -> _Machine:
        settings = Path(path)
        if not settings.is_absolute():
            raise SimulatedVBoxError("E_INVALIDARG", f"Settings file path '{path}' is not absolute")
        try:
            data = settings.read_bytes()
        except FileNotFoundError as exc:
            message = f"Could not find file '{path}' (VERR_FILE_NOT_FOUND)"
            raise SimulatedVBoxError("VBOX_E_FILE_ERROR", message) from exc
        try:
            return self._machine_from_settings(settings, data)
        except (SettingsFileError, ValueError, KeyError) as exc:
            raise SimulatedVBoxError("VBOX_E_XML_ERROR", f"Error in {path}: {exc}") from exc

    def register(self, machine: _Machine) -> None:
        with self.lock:
            if machine.uuid in self.machines:
                other = self.machines[machine.uuid]
                raise SimulatedVBoxError(
                    "E_INVALIDARG", f"Registered machine with UUID {{{machine.uuid}}} ('{other.name}') already exists"
                )
            for medium in machine.media.values():
                if not medium.path.exists():
                    raise SimulatedVBoxError(
                        "VBOX_E_FILE_ERROR", f"Could not open the medium '{medium.path}' (VERR_FILE_NOT_FOUND)"
                    )
            machine.registered = True
            self.machines[machine.uuid] = machine
            self._write_registry()

    # -- files ---------------------------------------------------------------------------

    def write_settings(self, machine: _Machine, *, aborted: bool = False) -> None:
        """Rewrite the machine's ``.vbox`` (atomically, as VirtualBox does)."""
        root = ET.Element("VirtualBox", {"xmlns": NS, "version": f"{_SETTINGS_VERSIONS[self.profile]}-linux"})
        attributes = {"uuid": f"{{{machine.uuid}}}", "name": machine.name, "OSType": machine.os_type}
        if machine.current:
            attributes["currentSnapshot"] = f"{{{machine.current}}}"
        attributes["snapshotFolder"] = "Snapshots"
        attributes["lastStateChange"] = machine.last_state_change or _now_iso()
        if machine.state_file:
            attributes["stateFile"] = machine.state_file
        if aborted or machine.state == "Aborted":
            attributes["aborted"] = "true"
        element = ET.SubElement(root, "Machine", attributes)
        registry = ET.SubElement(ET.SubElement(element, "MediaRegistry"), "HardDisks")

        def add_medium(holder: ET.Element, medium: _Medium) -> None:
            disk = ET.SubElement(holder, "HardDisk", {"uuid": f"{{{medium.uuid}}}",
                                                       "location": self._location(machine, medium.path),
                                                       "format": "VDI"})
            if medium.parent is None:
                disk.set("type", "Normal")
            for child in medium.children:
                add_medium(disk, machine.media[child])

        for medium in machine.media.values():
            if medium.parent is None:
                add_medium(registry, medium)
        if machine.root:
            self._snapshot_element(machine, element, machine.snapshots[machine.root])
        element.append(self._hardware(machine, machine.attachments))
        body = ET.tostring(root, encoding="unicode")
        text = ('<?xml version="1.0"?>\n<!--\n** DO NOT EDIT THIS FILE.\n** If you make changes to this file while '
                "any VirtualBox related application\n** is running, your changes will be overwritten later, without "
                "taking effect.\n** Use VBoxManage or the VirtualBox Manager GUI to make changes.\n-->\n" + body + "\n")
        tmp = machine.settings_path.with_name(machine.settings_path.name + "-tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, machine.settings_path)

    def _snapshot_element(self, machine: _Machine, holder: ET.Element, snapshot: _Snapshot) -> None:
        stamp = dt.datetime.fromtimestamp(snapshot.time_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        attributes = {"uuid": f"{{{snapshot.uuid}}}", "name": snapshot.name, "timeStamp": stamp}
        if snapshot.state_file:
            attributes["stateFile"] = snapshot.state_file
        element = ET.SubElement(holder, "Snapshot", attributes)
        if snapshot.description:
            ET.SubElement(element, "Description").text = snapshot.description
        element.append(self._hardware(machine, snapshot.attachments))
        if snapshot.children:
            container = ET.SubElement(element, "Snapshots")
            for child in snapshot.children:
                self._snapshot_element(machine, container, machine.snapshots[child])

    def _hardware(self, machine: _Machine, attachments: list[_Attachment]) -> ET.Element:
        hardware = ET.Element("Hardware")
        cpu = ET.SubElement(hardware, "CPU", {"count": "1"})
        if machine.cpuid_level:
            cpu.set("CpuIdPortabilityLevel", str(machine.cpuid_level))
        ET.SubElement(hardware, "Memory", {"RAMSize": str(machine.memory_mb)})
        if self.profile == "6.1":
            bios = ET.SubElement(hardware, "BIOS")
            if machine.nvram:
                ET.SubElement(bios, "NVRAM", {"path": machine.nvram})
            if machine.firmware == "EFI":
                ET.SubElement(hardware, "Firmware", {"type": "EFI"})
        else:
            if machine.firmware == "EFI":
                ET.SubElement(hardware, "Firmware", {"type": "EFI"})
            if machine.nvram:
                ET.SubElement(hardware, "NVRAM", {"path": machine.nvram})
        controllers = ET.SubElement(hardware, "StorageControllers")
        controller = ET.SubElement(controllers, "StorageController", {
            "name": "SATA", "type": "AHCI", "PortCount": str(max(1, len(attachments))),
            "useHostIOCache": "false", "Bootable": "true"})
        for attachment in attachments:
            device = ET.SubElement(controller, "AttachedDevice", {
                "type": attachment.type, "hotpluggable": "false",
                "port": str(attachment.port), "device": str(attachment.device)})
            if attachment.type == "DVD":
                device.set("passthrough", "false")
            if attachment.medium:
                ET.SubElement(device, "Image", {"uuid": f"{{{attachment.medium}}}"})
        return hardware

    @staticmethod
    def _location(machine: _Machine, path: Path) -> str:
        try:
            return path.relative_to(machine.folder).as_posix()
        except ValueError:
            return str(path)

    def _machine_from_settings(self, settings: Path, data: bytes) -> _Machine:
        parsed = parse_settings(data)
        folder = settings.parent
        if settings.name != f"{parsed.name}.vbox":
            raise SettingsFileError(f"the settings file of {parsed.name!r} must be named {parsed.name}.vbox")
        root = ET.fromstring(data)
        element = root.find(_N + "Machine")
        assert element is not None
        hardware = element.find(_N + "Hardware")
        cpu = hardware.find(_N + "CPU") if hardware is not None else None
        memory = hardware.find(_N + "Memory") if hardware is not None else None
        firmware = hardware.find(_N + "Firmware") if hardware is not None else None
        machine = _Machine(
            uuid=parsed.uuid, name=parsed.name, folder=folder,
            os_type=element.get("OSType", "Other"),
            memory_mb=int(memory.get("RAMSize", "512")) if memory is not None else 512,
            cpuid_level=int(cpu.get("CpuIdPortabilityLevel", "0")) if cpu is not None else 0,
            firmware=firmware.get("type", "BIOS") if firmware is not None else "BIOS",
            nvram=parsed.nvram,
            state_file=parsed.state_file,
            last_state_change=element.get("lastStateChange", ""),
        )
        if parsed.state_file:
            machine.state = "AbortedSaved" if element.get("aborted") == "true" and self.profile != "6.1" else "Saved"
        elif element.get("aborted") == "true":
            machine.state = "Aborted"

        def add(medium: Medium, parent: str | None) -> None:
            location = Path(medium.location)
            path = location if location.is_absolute() else folder / location
            # A differencing image has its base's size; a missing base reads as size 0 (inaccessible).
            size = machine.media[parent].size if parent else (VDI.open(path).size if path.exists() else 0)
            machine.media[medium.uuid] = _Medium(medium.uuid, path, parent, size)
            if parent:
                machine.media[parent].children.append(medium.uuid)
            for child in medium.children:
                add(child, medium.uuid)

        for medium in parsed.media:
            add(medium, None)
        machine.attachments = [_Attachment(a.controller, a.port, a.device, a.type, a.medium)
                               for a in parsed.attachments]
        descriptions = {_bare(s.get("uuid", "")): (s.findtext(_N + "Description") or "")
                        for s in element.iter(_N + "Snapshot")}

        def add_snapshot(node: SnapshotNode, parent: str | None) -> None:
            stamp = dt.datetime.strptime(node.time_stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
            machine.snapshots[node.uuid] = _Snapshot(
                node.uuid, node.name, descriptions.get(node.uuid, ""), int(stamp.timestamp() * 1000),
                node.state_file, [_Attachment(a.controller, a.port, a.device, a.type, a.medium)
                                  for a in node.attachments], parent,
                [child.uuid for child in node.children])
            for child in node.children:
                add_snapshot(child, node.uuid)

        if parsed.snapshot is not None:
            machine.root = parsed.snapshot.uuid
            add_snapshot(parsed.snapshot, None)
        machine.current = parsed.current_snapshot
        return machine

    def _registry_path(self) -> Path:
        return self.home / "VirtualBox.xml"

    def _write_registry(self) -> None:
        root = ET.Element("VirtualBox", {"xmlns": NS, "version": f"{_SETTINGS_VERSIONS[self.profile]}-linux"})
        entries = ET.SubElement(ET.SubElement(root, "Global"), "MachineRegistry")
        for machine in self.machines.values():
            ET.SubElement(entries, "MachineEntry", {"uuid": f"{{{machine.uuid}}}", "src": str(machine.settings_path)})
        tmp = self._registry_path().with_name("VirtualBox.xml-tmp")
        tmp.write_text('<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n", encoding="utf-8")
        os.replace(tmp, self._registry_path())

    def _load_registry(self) -> None:
        path = self._registry_path()
        if not path.exists():
            return
        root = ET.fromstring(path.read_bytes())
        for entry in root.iter(_N + "MachineEntry"):
            settings = Path(entry.get("src", ""))
            machine = self._machine_from_settings(settings, settings.read_bytes())
            machine.registered = True
            self.machines[machine.uuid] = machine


def _snapshot_not_found(uuid: str) -> SimulatedVBoxError:
    return SimulatedVBoxError("VBOX_E_OBJECT_NOT_FOUND", f"Could not find a snapshot with UUID {{{_bare(uuid)}}}")


def _content(kind: str, size: int, seed: int) -> Iterator[bytes]:
    if kind == "mixed":
        yield from mixed_content(size, seed=seed)
    elif kind == "random":
        rng = random.Random(seed)
        for _ in range(size // MIB):
            yield rng.randbytes(MIB)
    else:
        for _ in range(size // MIB):
            yield bytes(MIB)
