"""The simulated VirtualBox host's world: machines, sessions, operations and snapshots over real files.

:class:`World` composes the concerns kept in the modules next to it (settings
persistence, sessions and the state table, media and merges, the guest,
operations, the locks) into VirtualBox's operations: launching, powering
off, pausing, saving state, and taking, deleting and restoring snapshots.
The COM surface (:mod:`._com`) sits on top and is not imported here.
Everything that VirtualBox keeps on disk is kept on disk here too, in
VirtualBox's layout:

- ``<home>/VirtualBox.xml``: the global machine registry;
- ``<home>/VirtualBox VMs/<name>/<name>.vbox``: each machine's settings file,
  rewritten (atomically) on every change, with the media registry, the
  snapshot tree, the current snapshot and the state file;
- ``<name>.vdi`` base disks and ``Snapshots/{uuid}.vdi`` differencing disks
  (VDI 1.1, readable by ``qemu-img``), ``Snapshots/<time>.sav`` saved states,
  ``<name>.nvram`` for EFI machines, ``Logs/VBox.log``.

A new host on the same home folder loads the registered machines back, as
VBoxSVC does when it starts.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import time
import uuid as uuid_module
from pathlib import Path
from typing import Self

from ..._errors import ConfigurationError, SettingsFileError
from ..._settings import _bare
from .._images import MIB
from .._vdi import VDI
from . import _guest, _media, _persistence, _releases, _sessions
from ._constants import PROFILES, constants_for
from ._locks import Locks
from ._model import (
    OFFLINE,
    ONLINE,
    Fault,
    GuestWorkload,
    SimulatedVBoxError,
    Timing,
    _Attachment,
    _Content,
    _Machine,
    _Medium,
    _Session,
    _Snapshot,
    now_iso,
    nvram_name,
    sav_name,
)
from ._operations import Operation

__all__ = ["World"]

_TIMING = Timing()
_WORKLOAD = GuestWorkload()


class World:
    """The host's state and operations, without the COM surface (see :class:`SimulatedVirtualBox`).

    Raises:
        ConfigurationError: An unknown profile.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        version: str = "7.1",
        timing: Timing = _TIMING,
        workload: GuestWorkload | None = _WORKLOAD,
    ) -> None:
        selected = _releases.resolve(version)
        if selected is None:
            choices = ", ".join([*PROFILES, *_releases.EARLIER_RELEASES])
            raise ConfigurationError(f"unknown VirtualBox profile {version!r}; choose one of {choices}")
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        #: The release line ("7.0") and the patch release it models ("7.0.18"), see _releases.
        self.profile, self.version = selected
        self.timing = timing
        self.default_workload = workload
        self.constants = constants_for(self.profile)
        self.locks = Locks()
        # The host lock (see _locks); the COM layer takes it to read the registry.
        self.lock = self.locks.host
        self.machines: dict[str, _Machine] = {m.uuid: m for m in _persistence.load_registry(self.home, self.profile)}
        self._faults: dict[str, list[Fault]] = {}
        self._closed = False

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """Stop every guest writer (the VMs stay in their states)."""
        self._closed = True
        for machine in list(self.machines.values()):
            _guest.stop_guest(machine)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
                               firmware=firmware, last_state_change=now_iso())
            rng = random.Random(seed)
            for port in range(disks):
                where = folder
                if port == 1 and external_disk_folder is not None:
                    where = Path(external_disk_folder)
                    where.mkdir(parents=True, exist_ok=True)
                path = where / (f"{name}.vdi" if port == 0 else f"{name}-disk{port + 1}.vdi")
                image = VDI.create(path, disk_size)
                expected = _Content(disk_size)
                for index, block in enumerate(_media.content(content, disk_size, rng.randrange(1 << 30))):
                    if block.count(0) != len(block):
                        image.write(index * MIB, block)
                        expected.write(index * MIB, block)
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

    def insert_image(self, vm: str, path: str | os.PathLike[str], *, kind: str = "DVD") -> str:
        """Insert a DVD image into the VM's DVD drive (as ``VBoxManage storageattach --medium``); returns its uuid.

        The image joins the machine's media registry (``DVDImages``) at its
        absolute path; the file need not exist (VirtualBox refuses to open a
        missing one, so this sets the scene of an image deleted later).

        Args:
            vm: The VM's name or uuid (powered off or saved).
            path: The image file.
            kind: ``"DVD"`` (the simulator's VMs have one DVD drive and no floppy controller).

        Raises:
            ConfigurationError: No such VM, a VM that is not off, or another kind.
        """
        if kind != "DVD":
            raise ConfigurationError("the simulated VMs have a DVD drive only")
        machine = self.machine(vm)
        with self.lock:
            if machine.state not in OFFLINE or self.is_locked(machine):
                raise ConfigurationError(f"{machine.name} is {machine.state} or locked")
            drive = next(a for a in machine.attachments if a.type == "DVD")
            where = Path(os.path.abspath(path))
            # IVirtualBox::openMedium gives back the image it knows at that path (i_findDVDOrFloppyImage).
            known = [m for other in self.machines.values() for m in other.removable.values() if m.path == where]
            image = _Medium(known[0].uuid if known else str(uuid_module.uuid4()), where, None, 0, kind=kind)
            _media.check_medium(image)
            machine.removable[image.uuid] = image
            drive.medium = image.uuid
            self.write_settings(machine)
            return image.uuid

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

    def start(self, vm: str, *, workload: GuestWorkload | None = _WORKLOAD, timeout: float = 10.0) -> None:
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
        with self.locks.disk(machine):
            model = _media.expected(machine, ("SATA", disk, 0))
            return model.read(0, model.size)

    def disk_content(self, vm: str, disk: int = 0) -> bytes:
        """The disk's content as the VM sees it now: read through its current differencing chain."""
        machine = self.machine(vm)
        with self.locks.disk(machine):
            attachment = _media.slot(machine, ("SATA", disk, 0))
            assert attachment.medium is not None
            image = _media.image(machine, attachment.medium)
            return image.read(0, image.size)

    def disk_matches_guest(self, vm: str, disk: int = 0) -> bool:
        """Whether the disk reads back exactly what the guest wrote, checked at one instant.

        (:meth:`guest_content` and :meth:`disk_content` each hold for their
        own instant only, while the guest writes.)
        """
        machine = self.machine(vm)
        with self.locks.disk(machine):
            return self.disk_content(vm, disk) == self.guest_content(vm, disk)

    def read_image(self, path: str | os.PathLike[str]) -> bytes:
        """The guest content of one image file of a registered VM, read through its parents."""
        wanted = Path(path).resolve()
        with self.lock:
            found = [(m, medium.uuid) for m in self.machines.values() for medium in m.media.values()
                     if medium.path.resolve() == wanted]
        if not found:
            raise ConfigurationError(f"{path} is no medium of a registered VM")
        machine, uuid = found[0]
        with self.locks.disk(machine):
            image = _media.image(machine, uuid)
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
        # Checked against _sessions.TRANSITIONS.
        _sessions.set_state(self.lock, machine, state)

    # -- sessions (see _sessions) ---------------------------------------------------

    def is_locked(self, machine: _Machine) -> bool:
        return _sessions.is_locked(machine)

    def lock_machine(self, machine: _Machine, session: _Session, lock_type: str) -> None:
        _sessions.lock_machine(self.lock, machine, session, lock_type)

    def unlock(self, session: _Session) -> None:
        _sessions.unlock(self.lock, session)

    def check_session_machine(self, machine: _Machine, session: _Session) -> None:
        _sessions.check_session_machine(machine, session)

    # -- starting and stopping -------------------------------------------------

    def launch(self, machine: _Machine, session: _Session, *, workload: GuestWorkload | None) -> Operation:
        with self.lock:
            _sessions.check_lockable(machine, session)
            if self.is_locked(machine):
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_OBJECT_STATE",
                    f"The machine '{machine.name}' is already locked by a session (or being locked or unlocked)",
                )
            if machine.state not in OFFLINE:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE", f"The machine is not powered off (state is {machine.state})"
                )
            resume = machine.state in ("Saved", "AbortedSaved")
            _media.check_media(machine)  # the VM process opens (locks) its media
            # Console::i_configMedium (ConsoleImpl2.cpp of 6.1.38, ConsoleImplConfigCommon.cpp of 7.1.12):
            # an attached DVD or floppy image is refreshed and, when inaccessible, "ignored" with a
            # runtime warning; the VM starts with that drive empty (i_lockMedia locks only hard disks
            # as vital, MachineImpl.cpp). The settings keep the image.
            for image in machine.removable.values():
                _media.check_medium(image)
            unusable = _media.inaccessible_disk(machine)
            machine.holder = "vm"
            # The launching session becomes a Remote one with the VM process's console
            # (Session::assignMachine with no machine, then assignRemoteMachine; SessionImpl.cpp).
            session.state, session.type, session.machine = "Locked", "Remote", machine
            session.console = True
            machine.shared.add(session)
            self.set_state(machine, "Restoring" if resume else "Starting")

        def work(op: Operation) -> None:
            op.sleep(self.timing.start)
            if unusable is not None:
                # Console::i_powerUpThreadTask: LockMedia fails on an inaccessible hard disk with
                # E_FAIL and the medium's last access error (Medium::i_createMediumLockList);
                # Console::i_powerDown then sets Starting back to PoweredOff and Restoring to
                # AbortedSaved (7.x) or Saved (6.1), keeping the state file (ConsoleImpl.cpp).
                with self.lock:
                    back = "PoweredOff" if not resume else ("Saved" if self.profile == "6.1" else "AbortedSaved")
                    self.set_state(machine, back)
                    self.write_settings(machine)
                _sessions.vm_process_ended(self.lock, machine, self.timing.unlock_delay)
                raise SimulatedVBoxError("E_FAIL", unusable.access_error)
            with self.lock:
                if resume and machine.state_file:
                    if not _media.state_file_in_snapshots(machine, machine.state_file):
                        machine.path(machine.state_file).unlink(missing_ok=True)
                    machine.state_file = None
                logs = machine.folder / "Logs"
                logs.mkdir(exist_ok=True)
                with open(logs / "VBox.log", "a") as log:
                    log.write(f"{now_iso()} VirtualBox {self.version} (simulated): {machine.name} powered on\n")
                self.set_state(machine, "Running")
                self.write_settings(machine)
            if workload is not None and workload.rate > 0:
                _guest.start_guest(self.locks, machine, workload)

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
            _guest.stop_guest(machine)
            with self.lock:
                self.set_state(machine, "PoweredOff")
                self.write_settings(machine)
            _sessions.vm_process_ended(self.lock, machine, self.timing.unlock_delay)

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
            if machine.state not in ONLINE:
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
            _guest.stop_guest(machine)
            with self.lock:
                machine.state_file = f"Snapshots/{sav_name()}"
                _media.write_sav(machine, machine.state_file)
                self.set_state(machine, "Saved")
                self.write_settings(machine)
            _sessions.vm_process_ended(self.lock, machine, self.timing.unlock_delay)

        return Operation(f"Saving the execution state of the virtual machine '{machine.name}'",
                         cancelable=False).start(work)

    def discard_saved_state(self, machine: _Machine, remove_file: bool) -> None:
        with self.lock:
            if machine.state not in ("Saved", "AbortedSaved"):
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE", f"Cannot discard the saved state as the machine is not in the Saved "
                    f"state (machine state: {machine.state})"
                )
            if remove_file and machine.state_file and not _media.state_file_in_snapshots(machine, machine.state_file):
                machine.path(machine.state_file).unlink(missing_ok=True)
            machine.state_file = None
            self.set_state(machine, "PoweredOff")
            self.write_settings(machine)

    def _crash(self, machine: _Machine) -> None:
        _guest.stop_guest(machine)
        with self.lock:
            if machine.state in ("PoweredOff", "Saved", "Aborted", "AbortedSaved", "Teleported"):
                return
            self.set_state(machine, "Aborted")
            _sessions.release_clients(machine)
            self.write_settings(machine, aborted=True)
        _sessions.vm_process_ended(self.lock, machine, self.timing.unlock_delay)


    # -- snapshots -------------------------------------------------------------------
    #
    # Each behaviour follows src/VBox/Main/src-server/SnapshotImpl.cpp of the
    # release the profile models (see _releases): SessionMachine::takeSnapshot
    # and i_takeSnapshotHandler, i_deleteSnapshot, i_deleteSnapshotHandler and
    # i_prepareDeleteSnapshotMedium, restoreSnapshot and i_restoreSnapshotHandler.

    def nvram_file(self, machine: _Machine) -> str | None:
        """The machine's NVRAM file, relative to its folder, or ``None`` (``NvramStore::getNonVolatileStorageFile``).

        An unset path means the default, ``<settings file stem>.nvram``
        (``Machine::i_getDefaultNVRAMFilename``), which 6.1 gives only to
        EFI machines and 7.x to every machine.
        """
        if machine.nvram:
            return machine.nvram
        if self.profile == "6.1" and machine.firmware == "BIOS":
            return None
        return f"{machine.settings_path.stem}.nvram"

    def guest_content_at(self, vm: str, snapshot: str, disk: int = 0) -> bytes:
        """What the guest had written to a disk (SATA port ``disk``) at a snapshot's instant.

        Recorded when this host took the snapshot: what the snapshot's frozen
        images must read back as. The record is copy-on-write: taking the
        snapshot copies nothing, and the guest's later writes keep the old
        content of what they overwrite, until the snapshot is deleted.

        Raises:
            ConfigurationError: No such VM or disk, or a snapshot this host did not
                take or has deleted since.
        """
        machine = self.machine(vm)
        with self.locks.disk(machine):
            disks = machine.instants.get(_bare(snapshot))
            if disks is None:
                raise ConfigurationError(f"{vm} has no snapshot {snapshot!r} taken by this host")
            where = ("SATA", disk, 0)
            if where not in disks:
                raise ConfigurationError(f"{vm} had no disk at SATA port {disk} at snapshot {snapshot!r}")
            return _media.content_at(machine, disks[where], where)

    def take_snapshot(self, machine: _Machine, name: str, description: str, pause: bool) -> tuple[Operation, str]:
        with self.lock:
            before = machine.state
            if before not in ONLINE and before not in OFFLINE:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE",
                    "Cannot take a snapshot of the virtual machine while it is changing state "
                    f"(machine state: {before})",
                )
            if not pause and before != "Running" and _releases.live_snapshot_needs_running(self.version):
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE", "Cannot take a live snapshot of a virtual machine unless it is running."
                )
            online = before in ONLINE
            # A Paused machine is never live-snapshotted: its guest stays still (all releases).
            if online:
                transient = "LiveSnapshotting" if before == "Running" and not pause else "OnlineSnapshotting"
            else:
                transient = "Snapshotting"
            self.set_state(machine, transient)
            snapshot_uuid = str(uuid_module.uuid4())
        fault = self.take_fault(machine, Fault.NO_SPACE, Fault.HANG, Fault.VM_CRASH_AFTER_TAKE)

        def work(op: Operation) -> None:
            previous = [(a, a.medium) for a in machine.hard_disks()]
            created: list[str] = []
            state_file: str | None = None
            nvram: str | None = None
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
                with self.locks.disk_then_host(machine):
                    op.check_cancel()
                    # The instant: RAM saved and disks switched while the guest is held.
                    if online:
                        state_file = f"Snapshots/{sav_name()}"
                        _media.write_sav(machine, state_file)
                    elif before in ("Saved", "AbortedSaved"):
                        # An offline snapshot of a saved machine uses its state file, no copy.
                        state_file = machine.state_file
                    # The guest's content at the instant: a marker; the guest's overwrites save the old content.
                    _media.record_instant(machine, snapshot_uuid)
                    frozen_attachments = [a.copy() for a in machine.attachments]
                    for attachment in machine.hard_disks():
                        assert attachment.medium is not None
                        diff = _media.new_diff(machine, attachment.medium)
                        created.append(diff.uuid)
                        attachment.medium = diff.uuid
                    # Online and offline: the NVRAM store is copied for the snapshot (from 7.1 not for BIOS).
                    source = self.nvram_file(machine)
                    skip = machine.firmware == "BIOS" and _releases.nvram_copy_skips_bios(self.version)
                    if source and machine.path(source).is_file() and not skip:
                        nvram = f"Snapshots/{nvram_name()}"
                        shutil.copyfile(machine.path(source), machine.path(nvram))
                    snapshot = _Snapshot(snapshot_uuid, name, description, int(time.time() * 1000), state_file,
                                         frozen_attachments, machine.current, nvram=nvram)
                    machine.snapshots[snapshot_uuid] = snapshot
                    if machine.current is None:
                        machine.root = snapshot_uuid
                    else:
                        machine.snapshots[machine.current].children.append(snapshot_uuid)
                    machine.current = snapshot_uuid
                    self.set_state(machine, before)
                    self.write_settings(machine)
            except BaseException:
                with self.locks.disk_then_host(machine):
                    if snapshot_uuid not in machine.snapshots:
                        _media.forget_instant(machine, snapshot_uuid)
                        for attachment, medium in previous:
                            attachment.medium = medium
                        for uuid in created:
                            _media.drop_medium(machine, uuid)
                        if state_file and online:
                            machine.path(state_file).unlink(missing_ok=True)
                        if nvram:
                            machine.path(nvram).unlink(missing_ok=True)
                    self.set_state(machine, before)
                raise
            if fault is Fault.VM_CRASH_AFTER_TAKE:
                self._crash(machine)

        # Only an online snapshot can be canceled (the progress is made with aCancelable = online).
        op = Operation(f"Taking a snapshot of the virtual machine '{machine.name}'", cancelable=online).start(work)
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
            before = machine.state
            if before not in ONLINE and before not in OFFLINE:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_VM_STATE",
                    "Cannot delete a snapshot of the machine while it is changing the state "
                    f"(machine state: {before})",
                )
            snapshot = machine.snapshots.get(_bare(snapshot_id))
            if snapshot is None:
                raise _snapshot_not_found(snapshot_id)
            count = len(snapshot.children)
            if count > 1:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_OBJECT_STATE",
                    f"Snapshot '{snapshot.name}' of the machine '{machine.name}' cannot be deleted, because it has "
                    f"{count} child snapshots, which is more than the one snapshot allowed for deletion",
                )
            if machine.current == snapshot.uuid and count == 1:
                raise SimulatedVBoxError(
                    "VBOX_E_INVALID_OBJECT_STATE",
                    f"Snapshot '{snapshot.name}' of the machine '{machine.name}' cannot be deleted, because it is "
                    "the current snapshot and has one child snapshot",
                )
            transient = {"Running": "DeletingSnapshotOnline", "Paused": "DeletingSnapshotPaused"}.get(
                before, "DeletingSnapshot")
            self.set_state(machine, transient)
        fault = self.take_fault(machine, Fault.MERGE_FAILURE, Fault.HANG)

        def work(op: Operation) -> None:
            try:
                if fault is Fault.HANG:
                    op.hang()
                op.sleep(self.timing.snapshot)
                with self.lock:
                    plan = self._merge_plan(machine, snapshot)
                if fault is Fault.MERGE_FAILURE and plan:
                    _, source, target = plan[0]
                    raise SimulatedVBoxError(
                        "VBOX_E_FILE_ERROR",
                        f"Could not merge the medium '{machine.media[source].path}' to "
                        f"'{machine.media[target].path}' (VERR_IO_GEN_FAILURE)",
                    )
                with self.lock:
                    self._release_state_file(machine, snapshot)
                for number, (kind, source, target) in enumerate(plan):
                    if kind == "backward":
                        _media.merge(self.locks, machine, target, source, op, number, len(plan),
                                     self.timing.merge_block)
                    elif kind == "forward":
                        _media.merge_forward(self.locks, machine, source, target, op, number, len(plan),
                                             self.timing.merge_block)
                    else:
                        with self.locks.disk_then_host(machine):
                            _media.drop_medium(machine, source)
                with self.locks.disk_then_host(machine):
                    if snapshot.nvram:
                        machine.path(snapshot.nvram).unlink(missing_ok=True)
                    self._remove_snapshot(machine, snapshot)
                    self.set_state(machine, before)
                    self.write_settings(machine)
            except BaseException:
                with self.lock:
                    machine.merging.clear()
                    self.set_state(machine, before)
                raise

        # A deletion is never cancelable (i_deleteSnapshot makes its progress with aCancelable = FALSE).
        return Operation(f"Deleting the snapshot '{snapshot.name}'", cancelable=False).start(work)

    def _merge_plan(self, machine: _Machine, snapshot: _Snapshot) -> list[tuple[str, str, str]]:
        """Per disk of the snapshot: ("backward" | "forward", source, target) or ("delete", medium, medium).

        ``i_prepareDeleteSnapshotMedium``: a medium without children is
        deleted if differencing (kept if a base); one with more than one
        child fails the deletion (E_FAIL, through the progress); a base is
        merged backward (its child into it); a differencing medium in the
        direction ``Medium::i_queryPreferredMergeDirection`` (MediumImpl.cpp)
        prefers: into the larger file (the child on a tie).
        """
        plan: list[tuple[str, str, str]] = []
        for attachment in machine.hard_disks(snapshot.attachments):
            assert attachment.medium is not None
            medium = machine.media[attachment.medium]
            if not medium.children:
                if medium.parent is not None:
                    plan.append(("delete", medium.uuid, medium.uuid))
                continue
            if len(medium.children) > 1:
                raise SimulatedVBoxError(
                    "E_FAIL", f"Hard disk '{medium.path}' has more than one child hard disk ({len(medium.children)})"
                )
            child = machine.media[medium.children[0]]
            if medium.parent is None or medium.path.stat().st_size > child.path.stat().st_size:
                plan.append(("backward", child.uuid, medium.uuid))
            else:
                plan.append(("forward", medium.uuid, child.uuid))
        return plan

    def _release_state_file(self, machine: _Machine, snapshot: _Snapshot) -> None:
        """``SessionMachine::i_releaseSavedStateFile`` for a deleted snapshot's state file (see _releases)."""
        path = snapshot.state_file
        if not path or path == machine.state_file or machine.root is None:
            return
        check = _releases.state_file_check(self.version)
        if check == "first":
            # 7.0.x: the snapshot to skip is compared with the first snapshot, not with each one.
            shared = machine.root != snapshot.uuid and any(s.state_file == path for s in machine.snapshots.values())
        elif check == "subtree":
            shared = self._shares_below(machine, machine.snapshots[machine.root], path, snapshot)
        else:
            shared = any(s.state_file == path for s in machine.snapshots.values() if s is not snapshot)
        if not shared:
            machine.path(path).unlink(missing_ok=True)

    def _shares_below(self, machine: _Machine, node: _Snapshot, path: str, skip: _Snapshot) -> bool:
        # 6.1.38's recursion: a node is checked unless it is the skipped one, and
        # the skipped one's children are never visited (unless it is the first).
        if node is not skip and node.state_file == path:
            return True
        return any(self._shares_below(machine, child, path, skip)
                   for child in (machine.snapshots[c] for c in node.children) if child is not skip)

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
        # Nobody can ask for a deleted snapshot's instant: the old granules only it needed go.
        _media.forget_instant(machine, snapshot.uuid)

    def restore_snapshot(self, machine: _Machine, snapshot: _Snapshot) -> Operation:
        with self.lock:
            if machine.state not in OFFLINE:
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
            with self.locks.disk_then_host(machine):
                # The saved state of a Saved machine goes, unless a snapshot shares it.
                if machine.state_file and not _media.state_file_in_snapshots(machine, machine.state_file):
                    machine.path(machine.state_file).unlink(missing_ok=True)
                machine.state_file = None
                in_snapshots = {a.medium for s in machine.snapshots.values() for a in s.attachments}
                for attachment in machine.hard_disks():
                    medium = attachment.medium
                    if medium and medium not in in_snapshots and not machine.media[medium].children:
                        _media.drop_medium(machine, medium)
                machine.attachments = [a.copy() for a in snapshot.attachments]
                for attachment in machine.hard_disks():
                    assert attachment.medium is not None
                    attachment.medium = _media.new_diff(machine, attachment.medium).uuid
                # An online snapshot's state file is shared with the machine, not copied.
                machine.state_file = snapshot.state_file
                # The NVRAM path falls back to the default, which gets the snapshot's copy.
                machine.nvram = None
                target = self.nvram_file(machine)
                if target:
                    machine.path(target).unlink(missing_ok=True)
                    if snapshot.nvram and machine.path(snapshot.nvram).is_file():
                        shutil.copyfile(machine.path(snapshot.nvram), machine.path(target))
                    if machine.firmware == "EFI" or machine.path(target).is_file():
                        machine.nvram = target
                machine.current = snapshot.uuid
                _media.detach_instants(machine)  # the instants no longer rest on the expected content
                for model in machine.expected.values():
                    model.close()
                machine.expected = {}  # the guest's disks are the snapshot's now
                self.set_state(machine, "Saved" if snapshot.state_file else "PoweredOff")
                stamp = dt.datetime.fromtimestamp(snapshot.time_ms / 1000, dt.UTC)
                machine.last_state_change = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
                self.write_settings(machine)

        return Operation(f"Restoring snapshot '{snapshot.name}'", cancelable=False).start(work)


    # -- settings ---------------------------------------------------------------------

    def set_cpuid_level(self, machine: _Machine, session: _Session | None, level: int) -> None:
        with self.lock:
            _sessions.check_mutable(machine, session)
            if not 0 <= level <= 3:
                raise SimulatedVBoxError("E_INVALIDARG", f"Invalid CPUID portability level: {level} (0..3)")
            machine.pending_cpuid = level

    def save_settings(self, machine: _Machine, session: _Session | None) -> None:
        with self.lock:
            _sessions.check_mutable(machine, session)
            if machine.pending_cpuid is not None:
                machine.cpuid_level = machine.pending_cpuid
                machine.pending_cpuid = None
            self.write_settings(machine)

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
            machine = _persistence.machine_from_settings(settings, data, self.profile)
        except (SettingsFileError, ValueError, KeyError) as exc:
            raise SimulatedVBoxError("VBOX_E_XML_ERROR", f"Error in {path}: {exc}") from exc
        with self.lock:
            # Machine::initFromSettings (MachineImpl.cpp): a VM uuid the host knows is refused here.
            if machine.uuid in self.machines:
                raise SimulatedVBoxError(
                    "E_FAIL",
                    f"Trying to open a VM config '{settings}' which has the same UUID as an existing virtual machine",
                )
            self._check_media_conflicts(machine)
        return machine

    def _check_media_conflicts(self, machine: _Machine) -> None:
        """``VirtualBox::i_checkMediaForConflicts`` (``VirtualBoxImpl.cpp``) for the media of an opened machine.

        A medium whose uuid, or whose location, the host knows already is
        refused with ``E_INVALIDARG``, unless both match (VirtualBox then shares
        the known medium between the machines; the simulator does not model
        shared media and refuses that with ``E_NOTIMPL``).
        """
        # DVD and floppy images (the same uuid at the same path) are shared between machines:
        # VirtualBox::i_registerMedium keeps the medium it knows (i_checkMediaForConflicts returns it as the
        # duplicate; VirtualBoxImpl.cpp, 6.1.38 and 7.1.12); one uuid at another path conflicts like a hard disk.
        images = {m.uuid: m for other in self.machines.values() for m in other.removable.values()}
        image_at = {m.path: m for m in images.values()}
        for image in machine.removable.values():
            found = images.get(image.uuid) or image_at.get(image.path)
            if found is not None and (found.path, found.uuid) != (image.path, image.uuid):
                raise SimulatedVBoxError(
                    "E_INVALIDARG", f"Cannot register the {image.kind} image '{image.path}' {{{image.uuid}}} "
                    f"because an image '{found.path}' with UUID {{{found.uuid}}} already exists")
        known = {medium.uuid: medium for other in self.machines.values() for medium in other.media.values()}
        at = {medium.path: medium for medium in known.values()}
        for medium in machine.media.values():
            found = known.get(medium.uuid) or at.get(medium.path)
            if found is None:
                continue
            if found.uuid == medium.uuid and found.path == medium.path:
                raise SimulatedVBoxError(
                    "E_NOTIMPL", f"The hard disk '{medium.path}' {{{medium.uuid}}} is registered with another "
                    "machine: media shared between machines are not simulated")
            raise SimulatedVBoxError(
                "E_INVALIDARG",
                f"Cannot register the hard disk '{medium.path}' {{{medium.uuid}}} because a hard disk "
                f"'{found.path}' with UUID {{{found.uuid}}} already exists",
            )

    def register(self, machine: _Machine) -> None:
        """``IVirtualBox::registerMachine``: the media and the state file are not checked (``i_registerMachine``)."""
        with self.lock:
            if machine.uuid in self.machines:
                other = self.machines[machine.uuid]
                raise SimulatedVBoxError(
                    "E_INVALIDARG", f"Registered machine with UUID {{{machine.uuid}}} ('{other.settings_path}') "
                    "already exists"
                )
            self._check_media_conflicts(machine)
            machine.registered = True
            self.machines[machine.uuid] = machine
            self._write_registry()


    def write_settings(self, machine: _Machine, *, aborted: bool = False) -> None:
        """Rewrite the machine's ``.vbox`` (atomically, as VirtualBox does)."""
        _persistence.write_settings(machine, self.profile, aborted=aborted)

    def _write_registry(self) -> None:
        _persistence.write_registry(self.home, self.profile, self.machines.values())


def _snapshot_not_found(uuid: str) -> SimulatedVBoxError:
    return SimulatedVBoxError("VBOX_E_OBJECT_NOT_FOUND", f"Could not find a snapshot with UUID {{{_bare(uuid)}}}")


