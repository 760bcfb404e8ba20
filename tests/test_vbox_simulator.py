"""The simulated VirtualBox: its vboxapi surface, its files, its guest, and injected faults."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

import vbremote
from vbremote._settings import freeze_instant, parse_settings
from vbremote.testing import (
    MIB,
    VIRTUALBOX_PROFILES,
    Fault,
    GuestWorkload,
    SimulatedVBoxError,
    SimulatedVirtualBox,
    Timing,
    mixed_content,
)

qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (qemu-utils)")


@pytest.fixture(params=VIRTUALBOX_PROFILES)
def sim(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimulatedVirtualBox]:
    with SimulatedVirtualBox(tmp_path / "vbox", version=request.param, timing=Timing(unlock_delay=0.1)) as simulator:
        simulator.create_vm("dev", disk_size=8 * MIB)
        yield simulator


@pytest.fixture
def sim71(tmp_path: Path) -> Iterator[SimulatedVirtualBox]:
    with SimulatedVirtualBox(tmp_path / "vbox", timing=Timing(unlock_delay=0.1)) as simulator:
        simulator.create_vm("dev", disk_size=8 * MIB)
        yield simulator


E_UNEXPECTED = 0x8000FFFF

#: ``enum MachineState`` of ``src/VBox/Main/idl/VirtualBox.xidl``, VirtualBox 6.1.38.
MACHINE_STATES_61 = {
    "Null": 0, "PoweredOff": 1, "Saved": 2, "Teleported": 3, "Aborted": 4, "Running": 5, "Paused": 6,
    "Stuck": 7, "Teleporting": 8, "LiveSnapshotting": 9, "Starting": 10, "Stopping": 11, "Saving": 12,
    "Restoring": 13, "TeleportingPausedVM": 14, "TeleportingIn": 15, "DeletingSnapshotOnline": 16,
    "DeletingSnapshotPaused": 17, "OnlineSnapshotting": 18, "RestoringSnapshot": 19, "DeletingSnapshot": 20,
    "SettingUp": 21, "Snapshotting": 22,
    "FirstOnline": 5, "LastOnline": 18, "FirstTransient": 8, "LastTransient": 22,
}
#: The same enum in 7.0.2, 7.0.18, 7.1.12 and the 7.2 tree (identical).
MACHINE_STATES_7X = {
    "Null": 0, "PoweredOff": 1, "Saved": 2, "Teleported": 3, "Aborted": 4, "AbortedSaved": 5, "Running": 6,
    "Paused": 7, "Stuck": 8, "Teleporting": 9, "LiveSnapshotting": 10, "Starting": 11, "Stopping": 12,
    "Saving": 13, "Restoring": 14, "TeleportingPausedVM": 15, "TeleportingIn": 16, "DeletingSnapshotOnline": 17,
    "DeletingSnapshotPaused": 18, "OnlineSnapshotting": 19, "RestoringSnapshot": 20, "DeletingSnapshot": 21,
    "SettingUp": 22, "Snapshotting": 23,
    "FirstOnline": 6, "LastOnline": 19, "FirstTransient": 9, "LastTransient": 23,
}


def host_of(sim: SimulatedVirtualBox) -> vbremote.VirtualBoxHost:
    return vbremote.VirtualBoxHost.connect(manager=sim.manager())


class TestSurface:
    def test_machine_state_values_per_profile(self, sim: SimulatedVirtualBox):
        """Every MachineState value, range markers included, is the xidl's of the profile's release.

        ``enum MachineState`` of ``src/VBox/Main/idl/VirtualBox.xidl``: 6.1.38 has no
        ``FaultTolerantSyncing`` and no ``AbortedSaved``; 7.0.2, 7.0.18, 7.1.12 and the 7.2 tree
        add ``AbortedSaved`` = 5, moving every later state up by one.
        """
        table = sim.manager().constants.all_values("MachineState")
        assert table == (MACHINE_STATES_61 if sim.profile == "6.1" else MACHINE_STATES_7X)
        assert sim.manager().constants.all_values("LockType") == {"Null": 0, "Shared": 1, "Write": 2, "VM": 3}

    def test_adapter_knows_exactly_the_states(self, sim: SimulatedVirtualBox):
        """vbremote.MachineState names every state of the profile (7.x's include 6.1's), and no other."""
        names = {m.value for m in vbremote.MachineState} - {"Unknown"}
        assert names == set(MACHINE_STATES_7X) - {"FirstOnline", "LastOnline", "FirstTransient", "LastTransient"}
        for name in sim.manager().constants.all_values("MachineState"):
            assert name in MACHINE_STATES_7X

    def test_machine_states_61_match_pyvbox(self, tmp_path: Path):
        """pyvbox, generated from a 6.1 xidl, has the same MachineState table as the 6.1 profile."""
        library = pytest.importorskip("virtualbox.library")
        pyvbox = {name: int(value) for name, value, _ in library.MachineState._enums}
        with SimulatedVirtualBox(tmp_path / "vbox", version="6.1") as sim:
            assert sim.manager().constants.all_values("MachineState") == pyvbox == MACHINE_STATES_61

    def test_cleanup_modes(self, sim: SimulatedVirtualBox):
        """CleanupMode_DetachAllReturnHardDisksAndVMRemovable (5) exists from 7.0.6, not in 6.1.

        ``enum CleanupMode``, ``src/VBox/Main/idl/VirtualBox.xidl``: absent in 6.1.38, 7.0.2 and
        7.0.4; present in 7.0.6, 7.0.18, 7.1.12 and the 7.2 tree.
        """
        modes = sim.manager().constants.all_values("CleanupMode")
        expected = {"UnregisterOnly": 1, "DetachAllReturnNone": 2, "DetachAllReturnHardDisksOnly": 3, "Full": 4}
        if sim.profile != "6.1":
            expected["DetachAllReturnHardDisksAndVMRemovable"] = 5
        assert modes == expected

    def test_firmware_surface(self, tmp_path: Path):
        """The firmware type and NVRAM file sit where each release's IMachine has them.

        ``src/VBox/Main/idl/VirtualBox.xidl``: 6.1.38 ``IMachine::firmwareType`` and
        ``IBIOSSettings::nonVolatileStorageFile``; 7.0.2 ``firmwareType`` and
        ``IMachine::nonVolatileStore`` (``IBIOSSettings`` without the NVRAM file); 7.1.12 and 7.2
        ``IMachine::firmwareSettings`` (``IFirmwareSettings::firmwareType``), no ``firmwareType`` or
        ``BIOSSettings`` on ``IMachine``, ``nonVolatileStore`` kept.
        """
        for profile in VIRTUALBOX_PROFILES:
            with SimulatedVirtualBox(tmp_path / profile, version=profile) as sim:
                sim.create_vm("efi", disk_size=4 * MIB, firmware="EFI")
                mgr = sim.manager()
                machine = mgr.getVirtualBox().findMachine("efi")
                efi = mgr.constants.FirmwareType_EFI
                nvram = str(sim.vms_folder / "efi" / "efi.nvram")
                if profile == "6.1":
                    assert machine.firmwareType == efi
                    assert machine.BIOSSettings.nonVolatileStorageFile == nvram
                    for missing in ("nonVolatileStore", "firmwareSettings"):
                        assert not hasattr(machine, missing)
                elif profile == "7.0":
                    assert machine.firmwareType == efi
                    assert machine.nonVolatileStore.nonVolatileStorageFile == nvram
                    assert not hasattr(machine.BIOSSettings, "nonVolatileStorageFile")
                    assert not hasattr(machine, "firmwareSettings")
                else:
                    assert machine.firmwareSettings.firmwareType == efi
                    assert machine.nonVolatileStore.nonVolatileStorageFile == nvram
                    for missing in ("firmwareType", "BIOSSettings"):
                        assert not hasattr(machine, missing)

    def test_attribute_and_getter_access(self, sim71: SimulatedVirtualBox):
        """Attributes read as obj.name and obj.getName(); arrays through mgr.getArray."""
        mgr = sim71.manager()
        machine = mgr.getVirtualBox().findMachine("dev")
        assert machine.getName() == machine.name == "dev"
        assert machine.getCPUIDPortabilityLevel() == 0
        assert len(mgr.getArray(machine, "mediumAttachments")) == 2

    def test_errors_carry_signed_result_codes(self, sim71: SimulatedVirtualBox):
        """A COM error's errno is the signed 32-bit code; xcptIsEqual matches the unsigned one."""
        mgr = sim71.manager()
        with pytest.raises(SimulatedVBoxError) as info:
            mgr.getVirtualBox().findMachine("nope")
        assert info.value.errno == 0x80BB0001 - (1 << 32)
        assert mgr.xcptIsOurXcptKind(info.value)
        assert mgr.xcptIsEqual(info.value, 0x80BB0001)
        assert mgr.xcptToString(info.value) == "VBOX_E_OBJECT_NOT_FOUND"

    def test_read_only_machine_refuses_changes(self, sim71: SimulatedVirtualBox):
        """The machine from findMachine refuses snapshots (E_NOTIMPL) and setters (not mutable)."""
        mgr = sim71.manager()
        machine = mgr.getVirtualBox().findMachine("dev")
        with pytest.raises(SimulatedVBoxError) as info:
            machine.takeSnapshot("x", "", False)
        assert mgr.xcptIsEqual(info.value, 0x80004001)
        with pytest.raises(SimulatedVBoxError) as info:
            machine.CPUIDPortabilityLevel = 2
        assert mgr.xcptIsEqual(info.value, 0x80BB0002)

    def test_session_lock_types(self, sim71: SimulatedVirtualBox):
        """Shared on an unlocked VM gets the write lock; a second write lock is refused; unlock twice is refused."""
        mgr = sim71.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("dev")
        first, second = mgr.getSessionObject(vbox), mgr.getSessionObject(vbox)
        machine.lockMachine(first, mgr.constants.LockType_Shared)
        assert first.type == mgr.constants.SessionType_WriteLock
        with pytest.raises(SimulatedVBoxError) as info:
            machine.lockMachine(second, mgr.constants.LockType_Write)
        assert mgr.xcptIsEqual(info.value, 0x80BB0007)
        first.unlockMachine()
        with pytest.raises(SimulatedVBoxError) as info:
            first.unlockMachine()
        assert mgr.xcptIsEqual(info.value, E_UNEXPECTED)

    def test_unsaved_changes_are_discarded_on_unlock(self, sim71: SimulatedVirtualBox):
        """A setting changed without saveSettings is gone after unlockMachine, as on VirtualBox."""
        mgr = sim71.manager()
        vbox = mgr.getVirtualBox()
        session = mgr.getSessionObject(vbox)
        vbox.findMachine("dev").lockMachine(session, mgr.constants.LockType_Write)
        session.machine.CPUIDPortabilityLevel = 3
        assert session.machine.CPUIDPortabilityLevel == 3
        session.unlockMachine()
        assert vbox.findMachine("dev").CPUIDPortabilityLevel == 0

    def test_open_machine_arity(self, sim: SimulatedVirtualBox):
        """openMachine takes a password argument from 7.0 on; the adapter handles both."""
        vbox = sim.manager().getVirtualBox()
        path = vbox.findMachine("dev").settingsFilePath
        if sim.profile == "6.1":
            with pytest.raises(TypeError):
                vbox.openMachine(path, "")
        else:
            with pytest.raises(TypeError):
                vbox.openMachine(path)

    def test_progress_wait_slices(self, sim71: SimulatedVirtualBox):
        """waitForCompletion returns at its timeout while the work goes on; a merge cannot be canceled."""
        host = host_of(sim71)
        snapshot = host.take_snapshot("dev", "s")
        mgr = sim71.manager()
        vbox = mgr.getVirtualBox()
        session = mgr.getSessionObject(vbox)
        vbox.findMachine("dev").lockMachine(session, mgr.constants.LockType_Shared)
        try:
            sim71.inject("dev", Fault.HANG)
            progress = session.machine.deleteSnapshot(snapshot.uuid)
            started = time.monotonic()
            progress.waitForCompletion(100)
            assert 0.05 < time.monotonic() - started < 2
            assert not progress.completed
            with pytest.raises(SimulatedVBoxError):
                progress.cancel()
            with pytest.raises(SimulatedVBoxError):
                progress.getResultCode()
        finally:
            session.unlockMachine()


class TestSessions:
    """Locks and sessions as ``Machine::lockMachine`` (``src/VBox/Main/src-server/MachineImpl.cpp``) and
    ``Session`` (``src/VBox/Main/src-client/SessionImpl.cpp``) have them, 6.1.38 to 7.1.12."""

    def test_shared_lock_gets_a_console_only_from_a_vm_holder(self, sim: SimulatedVirtualBox):
        """A shared lock on a locked machine gets the holder's console only if the holder locked as VM.

        ``Machine::lockMachine`` asks the write-locking session for its remote console only when
        ``mSession.mLockType == LockType_VM``; ``Session::assignMachine`` creates a console for
        ``LockType_VM`` only.
        """
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("dev")
        c = mgr.constants
        for holder_type, console_expected in ((c.LockType_Write, False), (c.LockType_Shared, False),
                                              (c.LockType_VM, True)):
            holder, shared = mgr.getSessionObject(vbox), mgr.getSessionObject(vbox)
            machine.lockMachine(holder, holder_type)
            try:
                assert holder.type == c.SessionType_WriteLock
                assert (holder.console is not None) is console_expected
                machine.lockMachine(shared, c.LockType_Shared)
                assert shared.type == c.SessionType_Shared
                assert (shared.console is not None) is console_expected
                assert shared.machine.id == machine.id
                shared.unlockMachine()
            finally:
                holder.unlockMachine()
        sim.start("dev", workload=None)
        shared = mgr.getSessionObject(vbox)
        machine.lockMachine(shared, c.LockType_Shared)
        try:
            assert shared.type == c.SessionType_Shared
            assert shared.console is not None
            assert shared.console.state == c.MachineState_Running
        finally:
            shared.unlockMachine()

    def test_shared_sessions_end_with_the_holder(self, sim: SimulatedVirtualBox):
        """When the write holder unlocks, or the VM process ends, the shared sessions on it are unlocked.

        ``SessionMachine::uninit`` (``MachineImpl.cpp``) uninitializes every remote control.
        """
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("dev")
        c = mgr.constants
        holder, shared = mgr.getSessionObject(vbox), mgr.getSessionObject(vbox)
        machine.lockMachine(holder, c.LockType_Write)
        machine.lockMachine(shared, c.LockType_Shared)
        holder.unlockMachine()
        assert shared.state == c.SessionState_Unlocked
        sim.start("dev", workload=None)
        machine.lockMachine(shared, c.LockType_Shared)
        assert shared.state == c.SessionState_Locked
        sim.power_off("dev")
        assert shared.state == c.SessionState_Unlocked

    def test_launching_session_is_remote(self, sim: SimulatedVirtualBox):
        """The session given to launchVMProcess becomes a Remote session with the VM's console.

        ``Session::assignMachine`` with no machine sets ``SessionType_Remote``, which
        ``Session::assignRemoteMachine`` keeps.
        """
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        session = mgr.getSessionObject(vbox)
        progress = vbox.findMachine("dev").launchVMProcess(session, "headless", [])
        progress.waitForCompletion(5000)
        try:
            assert session.type == mgr.constants.SessionType_Remote
            assert session.console is not None
        finally:
            session.unlockMachine()

    def test_unregistered_machine_cannot_be_locked(self, sim: SimulatedVirtualBox):
        """Locking a machine that is not registered fails with E_UNEXPECTED.

        ``Machine::lockMachine``: ``!mData->mRegistered`` gives ``E_UNEXPECTED`` ("The machine '%s'
        is not registered").
        """
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("dev")
        settings = machine.settingsFilePath
        machine.unregister(mgr.constants.CleanupMode_DetachAllReturnHardDisksOnly)
        opened = vbox.openMachine(settings) if sim.profile == "6.1" else vbox.openMachine(settings, "")
        for target in (machine, opened):
            session = mgr.getSessionObject(vbox)
            with pytest.raises(SimulatedVBoxError) as info:
                target.lockMachine(session, mgr.constants.LockType_Shared)
            assert mgr.xcptIsEqual(info.value, E_UNEXPECTED)
            assert "not registered" in info.value.msg
            assert session.state == mgr.constants.SessionState_Unlocked

    def test_unlocked_session_getters(self, sim: SimulatedVirtualBox):
        """An unlocked session answers only its state: type, machine, console and unlockMachine give E_UNEXPECTED.

        ``CHECK_OPEN`` in ``Session::getType``, ``getMachine``, ``getConsole`` and ``unlockMachine``
        (``src/VBox/Main/src-client/SessionImpl.cpp``); ``getState`` has no check.
        """
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        session = mgr.getSessionObject(vbox)
        for attempt in range(2):
            assert session.state == mgr.constants.SessionState_Unlocked
            for getter in (lambda: session.type, lambda: session.machine, lambda: session.console,
                           session.unlockMachine):
                with pytest.raises(SimulatedVBoxError) as info:
                    getter()
                assert mgr.xcptIsEqual(info.value, E_UNEXPECTED)
                assert "not locked" in info.value.msg
            if attempt == 0:  # and again after a lock and an unlock
                vbox.findMachine("dev").lockMachine(session, mgr.constants.LockType_Write)
                session.unlockMachine()

    def test_busy_session_cannot_lock_again(self, sim: SimulatedVirtualBox):
        """A session that is locked already cannot lock: VBOX_E_INVALID_OBJECT_STATE ("The given session is busy").

        ``Machine::lockMachine`` and ``Machine::launchVMProcess`` check the session state first.
        """
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("dev")
        session = mgr.getSessionObject(vbox)
        machine.lockMachine(session, mgr.constants.LockType_Write)
        try:
            for again in (lambda: machine.lockMachine(session, mgr.constants.LockType_Shared),
                          lambda: machine.launchVMProcess(session, "headless", [])):
                with pytest.raises(SimulatedVBoxError) as info:
                    again()
                assert mgr.xcptIsEqual(info.value, 0x80BB0007)
                assert "busy" in info.value.msg
        finally:
            session.unlockMachine()

    def test_read_only_machine_refuses_state_changes(self, sim: SimulatedVirtualBox):
        """saveState and discardSavedState on the read-only machine: VBOX_E_INVALID_VM_STATE; takeSnapshot: E_NOTIMPL.

        ``Machine::saveState`` checks ``MutableStateDep`` and ``Machine::discardSavedState``
        ``MutableOrSavedStateDep`` (``i_checkStateDependency``, ``MachineImpl.cpp``), which a
        registered machine that is not the session machine never passes; ``Machine::takeSnapshot``
        is ``ReturnComNotImplemented`` (``SnapshotImpl.cpp``).
        """
        mgr = sim.manager()
        machine = mgr.getVirtualBox().findMachine("dev")
        for call, code in ((machine.saveState, 0x80BB0002), (lambda: machine.discardSavedState(True), 0x80BB0002),
                           (lambda: machine.takeSnapshot("x", "", True), 0x80004001)):
            with pytest.raises(SimulatedVBoxError) as info:
                call()
            assert mgr.xcptIsEqual(info.value, code)
        sim.start("dev", workload=None)
        with pytest.raises(SimulatedVBoxError) as info:
            machine.saveState()
        assert mgr.xcptIsEqual(info.value, 0x80BB0002)
        assert "not mutable" in info.value.msg
        assert sim.manager().getVirtualBox().findMachine("dev").state == mgr.constants.MachineState_Running


class TestOpening:
    """``VirtualBox::openMachine`` and ``registerMachine`` (``src/VBox/Main/src-server/VirtualBoxImpl.cpp``,
    ``Machine::initFromSettings`` in ``MachineImpl.cpp``), 6.1.38 to 7.2."""

    def test_open_refuses_a_known_vm_uuid(self, sim: SimulatedVirtualBox):
        """Opening the settings file of a registered VM fails at once with E_FAIL.

        ``Machine::initFromSettings`` rejects a uuid ``i_findMachine`` knows ("Trying to open a VM
        config '%s' which has the same UUID as an existing virtual machine").
        """
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        settings = vbox.findMachine("dev").settingsFilePath
        with pytest.raises(SimulatedVBoxError) as info:
            vbox.openMachine(settings) if sim.profile == "6.1" else vbox.openMachine(settings, "")
        assert mgr.xcptIsEqual(info.value, 0x80004005)
        assert "same UUID" in info.value.msg

    def test_opened_media_are_unchecked_until_refreshed(self, sim: SimulatedVirtualBox):
        """Media read from a settings file are Inaccessible with size 0 until refreshState opens them.

        ``Medium::initOne`` sets ``MediumState_Inaccessible`` ("Accessibility check was not yet
        performed"); ``Medium::refreshState`` runs ``i_queryInfo``, which sets the state and sizes
        (``src/VBox/Main/src-server/MediumImpl.cpp``).
        """
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("dev")
        settings = machine.settingsFilePath
        machine.unregister(mgr.constants.CleanupMode_DetachAllReturnHardDisksOnly)
        opened = vbox.openMachine(settings) if sim.profile == "6.1" else vbox.openMachine(settings, "")
        vbox.registerMachine(opened)
        medium = mgr.getArray(vbox.findMachine("dev"), "mediumAttachments")[0].medium
        assert medium.state == mgr.constants.MediumState_Inaccessible
        assert medium.logicalSize == 0
        assert "not yet performed" in medium.lastAccessError
        assert medium.refreshState() == mgr.constants.MediumState_Created
        assert medium.state == mgr.constants.MediumState_Created
        assert medium.logicalSize == 8 * MIB
        assert medium.lastAccessError == ""


    def test_failed_restore_keeps_the_saved_state(self, sim: SimulatedVirtualBox):
        """Resuming a Saved VM whose disk is missing fails; it is AbortedSaved on 7.x, Saved on 6.1, its .sav kept.

        ``Console::i_powerDown`` (``src/VBox/Main/src-client/ConsoleImpl.cpp``): a failed Restoring
        goes to ``AbortedSaved`` in 7.1.12 and back to ``Saved`` in 6.1.38, keeping the state file.
        """
        host = host_of(sim)
        sim.start("dev", workload=None)
        host.save_state("dev")
        vm = host.vm("dev")
        assert vm.state_file is not None
        disk = vm.disks[0].chain[-1].location
        settings = host.unregister("dev")
        disk.rename(disk.with_name("aside.vdi"))
        host.register(settings)
        with pytest.raises(vbremote.VirtualBoxOperationFailed, match="Could not open the medium"):
            host.start("dev")
        after = host.vm("dev")
        expected = vbremote.MachineState.SAVED if sim.profile == "6.1" else vbremote.MachineState.ABORTED_SAVED
        assert after.state is expected
        assert after.state_file == vm.state_file
        assert vm.state_file.is_file()
        assert parse_settings(after.settings_file.read_bytes()).state_file is not None

    def test_missing_dvd_image_registers_and_is_ignored_at_start(self, sim: SimulatedVirtualBox, tmp_path: Path):
        """A machine whose DVD image is gone opens and registers; the image is Inaccessible with
        VERR_FILE_NOT_FOUND once refreshed, and the VM still starts (the drive ignored).

        ``VirtualBox::initMedia`` (``Medium::init`` on 6.1.38, ``Medium::initFromSettings`` on 7.1.12) loads
        ``DVDImages`` unopened (``VirtualBoxImpl.cpp``, ``MediumImpl.cpp``), ``registerMachine`` checks no media, and
        ``Console::i_configMedium`` ignores an inaccessible DVD or floppy image with a runtime warning
        (``ConsoleImpl2.cpp`` of 6.1.38, ``ConsoleImplConfigCommon.cpp`` of 7.1.12).
        """
        iso = tmp_path / "isos" / "install.iso"
        iso.parent.mkdir()
        iso.write_bytes(b"\1" * 4096)
        uuid = sim.insert_image("dev", iso)
        registry = parse_settings(sim.machine("dev").settings_path.read_bytes())
        assert [(i.uuid, i.location, i.kind) for i in registry.images] == [(uuid, str(iso), "DVD")]
        mgr = sim.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("dev")
        settings = machine.settingsFilePath
        machine.unregister(mgr.constants.CleanupMode_DetachAllReturnHardDisksOnly)
        iso.unlink()
        opened = vbox.openMachine(settings) if sim.profile == "6.1" else vbox.openMachine(settings, "")
        vbox.registerMachine(opened)
        (drive,) = [a for a in mgr.getArray(vbox.findMachine("dev"), "mediumAttachments")
                    if a.type == mgr.constants.DeviceType_DVD]
        image = drive.medium
        assert image.id == uuid
        assert image.deviceType == mgr.constants.DeviceType_DVD
        assert image.format == "RAW"
        assert image.state == mgr.constants.MediumState_Inaccessible
        assert "not yet performed" in image.lastAccessError
        assert image.refreshState() == mgr.constants.MediumState_Inaccessible
        assert "VERR_FILE_NOT_FOUND" in image.lastAccessError
        host = host_of(sim)
        host.start("dev")
        assert host.state("dev") is vbremote.MachineState.RUNNING
        # The settings keep the image: the drive is only ignored for this run.
        assert parse_settings(sim.machine("dev").settings_path.read_bytes()).images[0].uuid == uuid

    def test_dvd_image_shared_between_machines(self, sim71: SimulatedVirtualBox, tmp_path: Path):
        """One image in two VMs is one medium (one uuid); registering it under its uuid at another path fails.

        ``VirtualBox::i_registerMedium`` keeps a known medium of the same uuid and location, and refuses one
        whose uuid or location alone is known, ``E_INVALIDARG`` (``i_checkMediaForConflicts``,
        ``VirtualBoxImpl.cpp`` of 6.1.38 and 7.1.12).
        """
        iso = tmp_path / "tools.iso"
        iso.write_bytes(b"\2" * 2048)
        sim71.create_vm("other", disk_size=4 * MIB)
        uuid = sim71.insert_image("dev", iso)
        assert sim71.insert_image("other", iso) == uuid
        mgr = sim71.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("other")
        settings = Path(machine.settingsFilePath)
        machine.unregister(mgr.constants.CleanupMode_DetachAllReturnHardDisksOnly)
        vbox.registerMachine(vbox.openMachine(str(settings), ""))
        machine = vbox.findMachine("other")
        machine.unregister(mgr.constants.CleanupMode_DetachAllReturnHardDisksOnly)
        settings.write_text(settings.read_text().replace(f'location="{iso}"', f'location="{tmp_path}/moved.iso"'))
        with pytest.raises(SimulatedVBoxError) as info:
            vbox.openMachine(str(settings), "")
        assert mgr.xcptIsEqual(info.value, 0x80070057)
        assert "Cannot register the DVD image" in info.value.msg

    def test_image_unknown_to_the_registry_is_an_empty_drive(self, sim71: SimulatedVirtualBox):
        """A DVD attachment naming an image that no registry lists loads as an empty drive, not an error.

        ``Machine::i_loadStorageDevices`` (``MachineImpl.cpp``, 6.1.38 and 7.1.12): VBOX_E_OBJECT_NOT_FOUND
        from ``i_findRemoveableMedium`` "is not an error ... go ahead without this removeable medium attachment".
        """
        mgr = sim71.manager()
        vbox = mgr.getVirtualBox()
        machine = vbox.findMachine("dev")
        settings = Path(machine.settingsFilePath)
        machine.unregister(mgr.constants.CleanupMode_DetachAllReturnHardDisksOnly)
        text = settings.read_text()
        text, count = re.subn(r'(<AttachedDevice type="DVD"[^>]*?)\s*/>',
                              r'\1><Image uuid="{0badbeef-0000-4000-8000-000000000000}" /></AttachedDevice>', text)
        assert count == 1
        settings.write_text(text)
        vbox.registerMachine(vbox.openMachine(str(settings), ""))
        (drive,) = [a for a in mgr.getArray(vbox.findMachine("dev"), "mediumAttachments")
                    if a.type == mgr.constants.DeviceType_DVD]
        assert drive.medium is None


class TestFilesAndGuest:
    def test_settings_file_kept_current(self, sim: SimulatedVirtualBox):
        """After each operation the .vbox file on disk says what the API says."""
        host = host_of(sim)
        sim.start("dev")
        first = host.take_snapshot("dev", "one")
        host.take_snapshot("dev", "two")
        host.save_state("dev")
        vm = host.vm("dev")
        parsed = parse_settings(vm.settings_file.read_bytes())
        assert parsed.uuid == vm.uuid
        assert parsed.current_snapshot == vm.current_snapshot
        assert [s.uuid for s in parsed.snapshots()] == [s.uuid for s in vm.snapshots()]
        assert vm.state_file is not None
        assert parsed.state_file == vm.state_file.relative_to(vm.folder).as_posix()
        disk = vm.disks[0]
        assert [m.uuid for m in parsed.chain(disk.chain[-1].uuid)] == [m.uuid for m in disk.chain]
        assert parsed.snapshot is not None
        assert parsed.snapshot.uuid == first.uuid

    def test_live_snapshot_freezes_while_the_guest_writes(self, tmp_path: Path):
        """During and after a live snapshot the frozen image does not change; the merge keeps every write."""
        timing = Timing(snapshot=0.2, merge_block=0.01, unlock_delay=0.1)
        with SimulatedVirtualBox(tmp_path / "vbox", timing=timing) as sim:
            sim.create_vm("dev", disk_size=16 * MIB)
            sim.start("dev", workload=GuestWorkload(rate=500, pattern="hot", seed=3))
            host = host_of(sim)
            snapshot = host.take_snapshot("dev", "live")
            frozen_path = snapshot.attachments[0].chain[-1].location
            frozen = sim.read_image(frozen_path)
            writes = sim.guest_writes("dev")
            time.sleep(0.3)
            assert sim.guest_writes("dev") > writes
            assert sim.read_image(frozen_path) == frozen
            writes = sim.guest_writes("dev")
            host.delete_snapshot("dev", snapshot.uuid)
            assert sim.guest_writes("dev") > writes + 5  # the guest wrote during the merge
            assert sim.disk_matches_guest("dev")
            assert host.vm("dev").disks[0].chain[0].location == frozen_path
            assert len(host.vm("dev").disks[0].chain) == 1
            assert not list((frozen_path.parent / "Snapshots").glob("*.vdi"))

    @qemu
    def test_qemu_reads_the_base_image(self, sim71: SimulatedVirtualBox, tmp_path: Path):
        """qemu-img converts the base image to exactly the content the guest sees."""
        host = host_of(sim71)
        sim71.start("dev", workload=GuestWorkload(rate=300))
        time.sleep(0.2)
        host.power_off("dev")
        base = host.vm("dev").disks[0].base
        assert base is not None
        out = tmp_path / "raw"
        subprocess.run(["qemu-img", "convert", "-f", "vdi", "-O", "raw", str(base.location), str(out)], check=True)
        assert out.read_bytes() == sim71.guest_content("dev")
        check = subprocess.run(["qemu-img", "check", "-f", "vdi", str(base.location)], capture_output=True)
        assert check.returncode == 0

    def test_restore_discards_the_current_image(self, sim71: SimulatedVirtualBox):
        """Restoring removes the current differencing image and starts a fresh one from the snapshot."""
        host = host_of(sim71)
        snapshot = host.take_snapshot("dev", "s")
        sim71.start("dev", workload=GuestWorkload(rate=300))
        time.sleep(0.2)
        host.power_off("dev")
        current = host.vm("dev").disks[0].chain[-1].location
        before = sim71.read_image(snapshot.attachments[0].chain[-1].location)
        host.restore_snapshot("dev", snapshot.uuid)
        assert not current.exists()
        assert sim71.disk_content("dev") == before

    def test_a_new_host_loads_the_registry(self, sim: SimulatedVirtualBox):
        """A simulator started on the same home finds the VMs, snapshots and an Aborted VM as they were."""
        host = host_of(sim)
        snapshot = host.take_snapshot("dev", "kept")
        sim.start("dev", workload=None)
        sim.crash("dev")
        assert host.state("dev") is vbremote.MachineState.ABORTED
        with SimulatedVirtualBox(sim.home, version=sim.profile) as again:
            vm = host_of(again).vm("dev")
            assert vm.state is vbremote.MachineState.ABORTED
            assert vm.current_snapshot == snapshot.uuid
            assert vm.disks == host.vm("dev").disks

    def test_mixed_content_is_fixed_per_seed_and_small_in_memory(self):
        """mixed_content gives the same blocks for a seed as ever, repeats included, holding no earlier blocks."""
        digest = hashlib.sha256()
        blocks = set()
        tracemalloc.start()
        try:
            for block in mixed_content(12 * MIB, seed=15):
                digest.update(block)
                blocks.add(hashlib.sha256(block).digest())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert digest.hexdigest() == "0291d9fe67611019f287bf3d6d52fbdf0f385ee6d00f923c40a683e52823d0f4"
        assert len(blocks) == 9  # zeros, and 11 non-zero blocks of which 8 differ: repeats
        assert peak < 5 * MIB  # the 8 MiB of earlier blocks are not kept

    def test_frozen_instant_of_a_live_transient_snapshot(self, sim71: SimulatedVirtualBox):
        """freeze_instant on the simulator's file after a live snapshot: Saved, at the frozen media."""
        host = host_of(sim71)
        sim71.start("dev")
        snapshot = host.take_snapshot("dev", "vbremote-transient")
        vm = host.vm("dev")
        frozen = parse_settings(freeze_instant(vm.settings_file.read_bytes(), snapshot.uuid))
        assert frozen.snapshot is None
        assert frozen.current_snapshot is None
        assert snapshot.state_file is not None
        assert frozen.state_file == snapshot.state_file.relative_to(vm.folder).as_posix()
        assert [a.medium for a in frozen.attachments if a.type == "HardDisk"] == [
            a.chain[-1].uuid for a in snapshot.attachments if a.type == "HardDisk"
        ]
        assert {m.uuid for m in frozen.all_media()} == {vm.disks[0].base.uuid}  # type: ignore[union-attr]



#: Every release the simulator models: the profiles' and the pre-7.0.10 7.0 one.
RELEASES = {"6.1": "6.1.38", "7.0.6": "7.0.6", "7.0": "7.0.18", "7.1": "7.1.12", "7.2": "7.2.18"}
LIVE_NEEDS_RUNNING = {"6.1": False, "7.0.6": False, "7.0": True, "7.1": True, "7.2": True}


@pytest.fixture(params=list(RELEASES))
def release(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimulatedVirtualBox]:
    with SimulatedVirtualBox(tmp_path / "vbox", version=request.param, timing=Timing(unlock_delay=0.1)) as simulator:
        simulator.create_vm("dev", disk_size=8 * MIB)
        yield simulator


class Session:
    """A shared session on a VM, for calls the adapter does not make."""

    def __init__(self, sim: SimulatedVirtualBox, vm: str = "dev") -> None:
        self.mgr = sim.manager()
        vbox = self.mgr.getVirtualBox()
        self.session = self.mgr.getSessionObject(vbox)
        vbox.findMachine(vm).lockMachine(self.session, self.mgr.constants.LockType_Shared)
        self.machine = self.session.machine

    def state(self) -> str:
        names = {v: k for k, v in self.mgr.constants.all_values("MachineState").items()
                 if k not in ("FirstOnline", "LastOnline", "FirstTransient", "LastTransient")}
        return names[self.machine.state]

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.unlockMachine()


def wait(progress: object, seconds: float = 10.0) -> None:
    progress.waitForCompletion(int(seconds * 1000))  # type: ignore[attr-defined]
    assert progress.completed  # type: ignore[attr-defined]


class TestReleases:
    """Patch-release behaviour (vbremote.testing._vbox._releases; src/VBox/Main/src-server/SnapshotImpl.cpp)."""

    def test_version_is_the_modelled_patch_release(self, release: SimulatedVirtualBox):
        """IVirtualBox.version is the patch release the profile models, and the adapter reads it."""
        expected = RELEASES[next(k for k, v in RELEASES.items() if v == release.version)]
        assert release.manager().getVirtualBox().version == expected
        assert host_of(release).version == expected

    def test_live_request_for_a_powered_off_vm(self, release: SimulatedVirtualBox):
        """takeSnapshot(fPause=false) of a PoweredOff VM: refused from 7.0.10 (takeSnapshot), offline before."""
        live_needs_running = LIVE_NEEDS_RUNNING[next(k for k, v in RELEASES.items() if v == release.version)]
        with Session(release) as s:
            if live_needs_running:
                with pytest.raises(SimulatedVBoxError) as info:
                    s.machine.takeSnapshot("x", "", False)
                assert s.mgr.xcptIsEqual(info.value, 0x80BB0002)
                assert info.value.msg == "Cannot take a live snapshot of a virtual machine unless it is running."
                assert s.state() == "PoweredOff"
                assert s.machine.snapshotCount == 0
            else:
                progress, _ = s.machine.takeSnapshot("x", "", False)
                assert s.state() == "Snapshotting"
                wait(progress)
                assert progress.resultCode == 0
                assert s.machine.snapshotCount == 1

    def test_paused_vm_without_pause(self, release: SimulatedVirtualBox):
        """A Paused VM with fPause=false: refused from 7.0.10; before, OnlineSnapshotting and the guest stays still."""
        live_needs_running = LIVE_NEEDS_RUNNING[next(k for k, v in RELEASES.items() if v == release.version)]
        release.start("dev", workload=GuestWorkload(rate=500))
        with Session(release) as s:
            s.session.console.pause()
            if live_needs_running:
                with pytest.raises(SimulatedVBoxError) as info:
                    s.machine.takeSnapshot("p", "", False)
                assert s.mgr.xcptIsEqual(info.value, 0x80BB0002)
                assert s.state() == "Paused"
                return
            release.inject("dev", Fault.HANG)
            time.sleep(0.1)  # a write under way when the VM paused has landed
            writes = release.guest_writes("dev")
            progress, _ = s.machine.takeSnapshot("p", "", False)
            assert s.state() == "OnlineSnapshotting"
            time.sleep(0.2)
            assert release.guest_writes("dev") == writes
            progress.cancel()
            wait(progress)
            assert progress.canceled
            assert s.state() == "Paused"
            assert s.machine.snapshotCount == 0

    def test_first_snapshot_deletion_and_a_shared_state_file(self, release: SimulatedVirtualBox):
        """Deleting the first of two snapshots sharing a state file: kept (6.1, 7.1.12, 7.2), deleted on 7.0.x."""
        host = host_of(release)
        release.start("dev", workload=None)
        host.save_state("dev")
        first = host.take_snapshot("dev", "one")
        second = host.take_snapshot("dev", "two")
        assert first.state_file is not None
        assert first.state_file == second.state_file == host.vm("dev").state_file
        discard_saved_state(release)
        assert first.state_file.is_file()  # both snapshots still use it
        host.delete_snapshot("dev", first.uuid)
        buggy = release.profile == "7.0"
        assert first.state_file.exists() is not buggy
        host.delete_snapshot("dev", second.uuid)
        assert not first.state_file.exists()


def discard_saved_state(sim: SimulatedVirtualBox) -> None:
    mgr = sim.manager()
    vbox = mgr.getVirtualBox()
    session = mgr.getSessionObject(vbox)
    vbox.findMachine("dev").lockMachine(session, mgr.constants.LockType_Write)
    try:
        session.machine.discardSavedState(True)
    finally:
        session.unlockMachine()


class TestSharedStateFiles:
    """Whether deleting a snapshot deletes a state file another shares (Snapshot::i_sharesSavedStateFile)."""

    def test_deleting_a_middle_snapshot_whose_child_shares_it(self, release: SimulatedVirtualBox):
        """Kept on 7.0.x (the snapshot itself matches) and 7.1.12+, deleted on 6.1.38 (its subtree is skipped)."""
        host = host_of(release)
        host.take_snapshot("dev", "root")
        release.start("dev", workload=None)
        host.save_state("dev")
        middle = host.take_snapshot("dev", "middle")
        below = host.take_snapshot("dev", "below")
        assert middle.state_file is not None
        assert middle.state_file == below.state_file
        discard_saved_state(release)
        host.delete_snapshot("dev", middle.uuid)
        assert middle.state_file.exists() is (release.profile != "6.1")


class TestSnapshotFiles:
    """State files, NVRAM copies and guest content per snapshot (SnapshotImpl.cpp, MachineImpl.cpp)."""

    def test_only_online_snapshots_are_cancelable(self, sim: SimulatedVirtualBox):
        """An offline snapshot's progress is not cancelable, an online one's is (takeSnapshot's aCancelable)."""
        with Session(sim) as s:
            progress, _ = s.machine.takeSnapshot("off", "", True)
            assert not progress.cancelable
            wait(progress)
        sim.start("dev", workload=None)
        with Session(sim) as s:
            progress, _ = s.machine.takeSnapshot("on", "", False)
            assert progress.cancelable
            wait(progress)

    def test_offline_snapshot_timeout_goes_on(self, tmp_path: Path):
        """An offline snapshot that times out is not canceled: the error names it, and it completes later."""
        with SimulatedVirtualBox(tmp_path / "vbox", timing=Timing(snapshot=0.8, unlock_delay=0.1)) as sim:
            sim.create_vm("dev", disk_size=4 * MIB)
            host = host_of(sim)
            with pytest.raises(vbremote.VirtualBoxTimeout, match="cannot cancel") as info:
                host.take_snapshot("dev", "slow", timeout=0.1)
            assert info.value.snapshot_id is not None
            deadline = time.monotonic() + 10
            while host.vm("dev").current_snapshot is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert host.vm("dev").current_snapshot == info.value.snapshot_id

    def test_nvram_of_a_bios_vm(self, sim: SimulatedVirtualBox):
        """A BIOS VM: no NVRAM file on 6.1, the default name on 7.x; copied per snapshot when it exists on 7.0 only.

        MachineImpl.cpp, i_getDefaultNVRAMFilename (6.1: EFI only); SnapshotImpl.cpp, i_takeSnapshotHandler
        (7.1.4 on: not for FirmwareType_BIOS).
        """
        host = host_of(sim)
        vm = host.vm("dev")
        if sim.profile == "6.1":
            assert vm.nvram_file is None
            assert host.take_snapshot("dev", "bios").nvram_file is None
            return
        assert vm.nvram_file == vm.folder / "dev.nvram"
        assert not vm.nvram_file.exists()
        assert host.take_snapshot("dev", "none yet").nvram_file is None
        vm.nvram_file.write_bytes(b"vTPM state")  # e.g. an emulated TPM's
        copied = host.take_snapshot("dev", "bios").nvram_file
        if sim.profile == "7.0":
            assert copied is not None
            assert copied.read_bytes() == b"vTPM state"
        else:
            assert copied is None

    def test_snapshot_nvram_kept_in_the_settings_file(self, sim: SimulatedVirtualBox):
        """The snapshot's hardware names its NVRAM copy in the .vbox, and a new host reads it back."""
        sim.create_vm("efi", disk_size=4 * MIB, firmware="EFI")
        host = host_of(sim)
        snapshot = host.take_snapshot("efi", "s")
        assert snapshot.nvram_file is not None
        relative = snapshot.nvram_file.relative_to(host.vm("efi").folder).as_posix()
        assert relative.encode() in host.vm("efi").settings_file.read_bytes()
        with SimulatedVirtualBox(sim.home, version=sim.profile) as again:
            assert host_of(again).vm("efi").snapshot(snapshot.uuid).nvram_file == snapshot.nvram_file

    def test_guest_content_at_each_snapshot(self, sim: SimulatedVirtualBox):
        """guest_content_at gives what the guest had written at a snapshot's instant: the frozen image's content."""
        host = host_of(sim)
        sim.start("dev", workload=GuestWorkload(rate=500, pattern="hot"))
        first = host.take_snapshot("dev", "one")
        time.sleep(0.1)
        second = host.take_snapshot("dev", "two")
        for snapshot in (first, second):
            frozen = snapshot.attachments[0].chain[-1].location
            assert sim.guest_content_at("dev", snapshot.uuid) == sim.read_image(frozen)
        assert sim.guest_content_at("dev", first.uuid) != sim.guest_content_at("dev", second.uuid)
        with pytest.raises(vbremote.ConfigurationError):
            sim.guest_content_at("dev", "no-such-snapshot")


class TestInstants:
    """guest_content_at: the guest's content at each snapshot instant, kept copy-on-write by the simulator."""

    @staticmethod
    def frozen(host: vbremote.VirtualBoxHost, vm: str, snapshot: str, port: int) -> Path:
        disk = next(a for a in host.vm(vm).snapshot(snapshot).attachments if a.port == port)
        return disk.chain[-1].location

    def test_taking_a_snapshot_copies_nothing(self, sim71: SimulatedVirtualBox):
        """An instant starts with nothing saved; only granules the guest overwrites are saved, and it stays exact."""
        from vbremote.testing._vbox import _media

        host = host_of(sim71)
        snapshot = host.take_snapshot("dev", "s")
        instant = sim71.machine("dev").instants[snapshot.uuid][("SATA", 0, 0)]
        assert instant.saved == {}
        before = sim71.guest_content("dev")
        # Sequential 64 KiB writes from the disk's second 64 KiB on.
        sim71.start("dev", workload=GuestWorkload(rate=1000, write_size=64 * 1024, pattern="sequential"))
        deadline = time.monotonic() + 10
        while sim71.guest_writes("dev") < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        host.power_off("dev")
        written = sim71.guest_writes("dev")
        assert 8 <= written < 8 * MIB // (64 * 1024)
        assert set(instant.saved) == {k * 64 * 1024 // _media.GRANULE for k in range(1, written + 1)}
        assert sim71.guest_content_at("dev", snapshot.uuid) == before

    def test_nested_instants_stay_exact_while_the_guest_overwrites(self, sim71: SimulatedVirtualBox):
        """Three nested instants, the guest overwriting the same granules between and after them: each stays exact."""
        sim71.create_vm("two", disk_size=8 * MIB, disks=2)
        host = host_of(sim71)
        sim71.start("two", workload=GuestWorkload(rate=1000, pattern="hot", seed=5))
        taken = []
        for name in ("one", "two", "three"):
            taken.append(host.take_snapshot("two", name).uuid)
            time.sleep(0.25)
        machine = sim71.machine("two")
        with sim71.locks.disk(machine):
            saved = [set(machine.instants[uuid][("SATA", 0, 0)].saved) for uuid in taken]
        assert saved[0] & saved[1] & saved[2]  # the same granules overwritten after each instant
        for port in (0, 1):
            contents = [sim71.guest_content_at("two", uuid, port) for uuid in taken]
            for uuid, content in zip(taken, contents, strict=True):
                assert content == sim71.read_image(self.frozen(host, "two", uuid, port))
            assert len(set(contents)) == 3

    def test_a_deleted_snapshot_frees_its_instant(self, sim71: SimulatedVirtualBox):
        """Deleting a snapshot drops its instant and the old granules only it kept; the other instants stay exact."""
        host = host_of(sim71)
        sim71.start("dev", workload=GuestWorkload(rate=1000, pattern="hot", seed=6))
        first = host.take_snapshot("dev", "one")
        time.sleep(0.2)
        second = host.take_snapshot("dev", "two")
        time.sleep(0.2)
        machine = sim71.machine("dev")
        with sim71.locks.disk(machine):
            only_first = set(machine.instants[first.uuid][("SATA", 0, 0)].saved.values()) - set(
                machine.instants[second.uuid][("SATA", 0, 0)].saved.values())
        assert only_first  # granules the guest overwrote between the two snapshots
        host.delete_snapshot("dev", first.uuid)
        with pytest.raises(vbremote.ConfigurationError, match="no snapshot"):
            sim71.guest_content_at("dev", first.uuid)
        assert list(machine.instants) == [second.uuid]
        time.sleep(0.1)
        with sim71.locks.disk(machine):
            assert machine.old_granules.live == len(set(machine.instants[second.uuid][("SATA", 0, 0)].saved.values()))
        assert sim71.guest_content_at("dev", second.uuid) == sim71.read_image(self.frozen(host, "dev", second.uuid, 0))
        host.delete_snapshot("dev", second.uuid)
        assert machine.instants == {}
        assert machine.old_granules.live == 0

    def test_instants_survive_a_restore(self, sim71: SimulatedVirtualBox):
        """After restores and new guest writes, every instant still reads as its frozen image."""
        host = host_of(sim71)
        sim71.start("dev", workload=GuestWorkload(rate=1000, pattern="hot", seed=7))
        first = host.take_snapshot("dev", "one")
        time.sleep(0.2)
        second = host.take_snapshot("dev", "two")
        time.sleep(0.2)
        host.power_off("dev")
        host.restore_snapshot("dev", first.uuid)
        sim71.start("dev", workload=GuestWorkload(rate=1000, pattern="hot", seed=8))
        time.sleep(0.2)
        assert sim71.guest_writes("dev") > 0
        for snapshot in (first, second):
            frozen = self.frozen(host, "dev", snapshot.uuid, 0)
            assert sim71.guest_content_at("dev", snapshot.uuid) == sim71.read_image(frozen)
        host.power_off("dev")
        host.restore_snapshot("dev", second.uuid)
        host.restore_snapshot("dev", first.uuid)  # nothing read or written between the two restores
        assert sim71.guest_content("dev") == sim71.guest_content_at("dev", first.uuid)
        host.restore_snapshot("dev", second.uuid)
        assert sim71.guest_content("dev") == sim71.guest_content_at("dev", second.uuid)


class TestDeleting:
    """Deleting a snapshot (SnapshotImpl.cpp: i_deleteSnapshot, i_deleteSnapshotHandler and its merge preparation)."""

    @pytest.mark.parametrize("before", ["Running", "Paused", "PoweredOff"])
    def test_deleting_state_and_no_cancel(self, sim: SimulatedVirtualBox, before: str):
        """Running: DeletingSnapshotOnline, Paused: DeletingSnapshotPaused, else DeletingSnapshot; not cancelable."""
        snapshot = host_of(sim).take_snapshot("dev", "s")
        if before != "PoweredOff":
            sim.start("dev", workload=None)
        with Session(sim) as s:
            if before == "Paused":
                s.session.console.pause()
            sim.inject("dev", Fault.HANG)
            progress = s.machine.deleteSnapshot(snapshot.uuid)
            expected = {"Running": "DeletingSnapshotOnline", "Paused": "DeletingSnapshotPaused"}.get(
                before, "DeletingSnapshot")
            assert s.state() == expected
            assert not progress.cancelable
            with pytest.raises(SimulatedVBoxError):
                progress.cancel()

    def test_a_medium_with_two_children_fails_through_the_progress(self, sim: SimulatedVirtualBox):
        """A snapshot disk with a second child image (a linked clone's) fails with E_FAIL in the progress."""
        from vbremote.testing._vbox import _media

        host = host_of(sim)
        snapshot = host.take_snapshot("dev", "s")
        machine = sim.machine("dev")
        base = snapshot.attachments[0].chain[-1].uuid
        with sim.locks.disk_then_host(machine):
            _media.new_diff(machine, base)  # stands in for a linked clone's differencing image
        with Session(sim) as s:
            progress = s.machine.deleteSnapshot(snapshot.uuid)  # accepted: the check runs in the task
            wait(progress)
            assert progress.resultCode & 0xFFFFFFFF == 0x80004005
            assert "has more than one child hard disk (2)" in progress.errorInfo.text
        assert host.vm("dev").current_snapshot == snapshot.uuid
        assert host.state("dev") is vbremote.MachineState.POWERED_OFF

    def test_larger_parent_image_merges_backward(self, sim: SimulatedVirtualBox):
        """Between differencing images, a larger parent file takes the child's content; its uuid and file survive."""
        host = host_of(sim)
        host.take_snapshot("dev", "one")
        sim.start("dev", workload=GuestWorkload(rate=500))
        time.sleep(0.3)
        host.power_off("dev")
        second = host.take_snapshot("dev", "two")
        disk = host.vm("dev").disks[0]
        parent, child = disk.chain[-2], disk.chain[-1]
        assert parent.location.stat().st_size > child.location.stat().st_size
        host.delete_snapshot("dev", second.uuid)
        after = host.vm("dev").disks[0]
        assert [m.uuid for m in after.chain] == [m.uuid for m in disk.chain if m is not child]
        assert parent.location.is_file()
        assert not child.location.exists()
        assert sim.disk_matches_guest("dev")

    def test_larger_child_image_merges_forward_online(self, sim: SimulatedVirtualBox):
        """A larger child (the running state) takes the parent's content while the guest writes; the child survives."""
        host = host_of(sim)
        sim.start("dev", workload=GuestWorkload(rate=500, seed=5))
        host.pause("dev")  # nothing is written between the two snapshots
        host.take_snapshot("dev", "one")
        second = host.take_snapshot("dev", "two")
        host.resume("dev")
        time.sleep(0.4)
        disk = host.vm("dev").disks[0]
        parent, child = disk.chain[-2], disk.chain[-1]
        assert parent.location.stat().st_size < child.location.stat().st_size
        writes = sim.guest_writes("dev")
        host.delete_snapshot("dev", second.uuid)
        assert host.state("dev") is vbremote.MachineState.RUNNING
        after = host.vm("dev").disks[0]
        assert [m.uuid for m in after.chain] == [m.uuid for m in disk.chain if m is not parent]
        assert after.chain[-1].parent == disk.chain[-3].uuid
        assert not parent.location.exists()
        assert child.location.is_file()
        assert sim.guest_writes("dev") > writes
        assert sim.disk_matches_guest("dev")
        host.power_off("dev")
        assert sim.disk_matches_guest("dev")


SETTINGS_VERSIONS = {("6.1", "BIOS"): "1.16", ("6.1", "EFI"): "1.18"}


class TestSettingsFiles:
    @pytest.mark.parametrize("firmware", ["BIOS", "EFI"])
    def test_version_and_layout_per_profile(self, sim: SimulatedVirtualBox, firmware: str, tmp_path: Path):
        """Each profile writes the version and layout its VirtualBox writes, and parse_settings reads it back.

        Settings.cpp (6.1.38, 7.0.18, 7.1.12, 7.2), MachineConfigFile::bumpSettingsVersionIfNeeded: 6.1 writes a
        BIOS machine as 1.16 (StorageControllers beside Hardware, buildHardwareXML) and an EFI machine as 1.18 (a
        NVRAM path needs 1.18); 7.x writes an x86 machine as 1.19. NVRAM is Hardware/BIOS/NVRAM below 1.20, and a
        snapshot's hardware names its own NVRAM copy where the simulator recorded one.
        """
        host = host_of(sim)
        sim.create_vm("vm2", firmware=firmware, disks=2, external_disk_folder=tmp_path / "outside")
        sim.start("vm2")
        first = host.take_snapshot("vm2", "one")
        second = host.take_snapshot("vm2", "two")
        vm = host.vm("vm2")
        data = vm.settings_file.read_bytes()
        version = SETTINGS_VERSIONS.get((sim.profile, firmware), "1.19")
        n = "{http://www.virtualbox.org/}"
        root = ET.fromstring(data)
        assert root.get("version") == f"{version}-linux"
        machine = root.find(f"{n}Machine")
        assert machine is not None
        owners = [machine, *machine.iter(f"{n}Snapshot")]
        assert len(owners) == 3
        beside = version == "1.16"
        for owner in owners:
            assert len(owner.findall(f"{n}StorageControllers")) == (1 if beside else 0)
            assert len(owner.findall(f"{n}Hardware/{n}StorageControllers")) == (0 if beside else 1)
            assert owner.findall(f"{n}Platform") == []
            nvram = owner.findall(f"{n}Hardware/{n}BIOS/{n}NVRAM")
            assert len(nvram) == (1 if firmware == "EFI" else 0)
        parsed = parse_settings(data)
        assert parsed.version == version
        assert parsed.nvram == ("vm2.nvram" if firmware == "EFI" else None)
        assert [a.medium for a in parsed.attachments if a.type == "HardDisk"] == [d.chain[-1].uuid for d in vm.disks]
        for node, snapshot in zip(parsed.snapshots(), (first, second), strict=True):
            assert node.uuid == snapshot.uuid
            assert [a.medium for a in node.attachments if a.type == "HardDisk"] == [
                a.chain[-1].uuid for a in snapshot.attachments if a.type == "HardDisk"
            ]
        frozen = parse_settings(freeze_instant(data, second.uuid))
        assert [a.medium for a in frozen.attachments if a.type == "HardDisk"] == [
            a.chain[-1].uuid for a in second.attachments if a.type == "HardDisk"
        ]
        assert {d.chain[-1].uuid for d in vm.disks}.isdisjoint(m.uuid for m in frozen.all_media())


    def test_snapshot_nvram_copy_written_and_read_back(self, sim: SimulatedVirtualBox):
        """A snapshot's own NVRAM copy is written in its hardware and read back by a new host on the same home."""
        host = host_of(sim)
        uuid = sim.create_vm("vm2", firmware="EFI")
        snapshot = host.take_snapshot("vm2", "one")
        machine = sim.machines[uuid]
        machine.snapshots[snapshot.uuid].nvram = "Snapshots/2026-11-20T09-15-00-987654321Z.nvram"
        sim.write_settings(machine)
        parsed = parse_settings(host.vm("vm2").settings_file.read_bytes())
        assert parsed.nvram == "vm2.nvram"
        assert [n.nvram for n in parsed.snapshots()] == ["Snapshots/2026-11-20T09-15-00-987654321Z.nvram"]
        with SimulatedVirtualBox(sim.home, version=sim.profile) as again:
            assert again.machines[uuid].snapshots[snapshot.uuid].nvram == machine.snapshots[snapshot.uuid].nvram


class TestFaults:
    def test_no_space(self, sim71: SimulatedVirtualBox):
        """A snapshot that runs out of space fails with VirtualBox's text and leaves nothing behind."""
        host = host_of(sim71)
        sim71.start("dev")
        files = set(host.vm("dev").folder.rglob("*"))
        sim71.inject("dev", Fault.NO_SPACE)
        with pytest.raises(vbremote.VirtualBoxOperationFailed) as info:
            host.take_snapshot("dev", "s")
        assert info.value.result_code == 0x80BB0004
        assert "VERR_DISK_FULL" in info.value.text
        vm = host.vm("dev")
        assert vm.state is vbremote.MachineState.RUNNING
        assert vm.snapshot_tree is None
        assert set(vm.folder.rglob("*")) <= files | {vm.folder / "Logs" / "VBox.log"}

    def test_merge_failure_keeps_everything(self, sim71: SimulatedVirtualBox):
        """A failed merge raises; the snapshot and the guest's data stay, and a second delete works."""
        host = host_of(sim71)
        sim71.start("dev")
        snapshot = host.take_snapshot("dev", "s")
        sim71.inject("dev", Fault.MERGE_FAILURE)
        with pytest.raises(vbremote.VirtualBoxOperationFailed, match="merge"):
            host.delete_snapshot("dev", snapshot.uuid)
        assert host.vm("dev").current_snapshot == snapshot.uuid
        assert host.state("dev") is vbremote.MachineState.RUNNING
        assert sim71.disk_matches_guest("dev")
        host.delete_snapshot("dev", snapshot.uuid)
        assert sim71.disk_matches_guest("dev")

    def test_crash_after_take_leaves_a_stale_snapshot(self, sim71: SimulatedVirtualBox):
        """The VM dies right after the snapshot: Aborted, the snapshot stays, and can be deleted offline."""
        host = host_of(sim71)
        sim71.start("dev")
        sim71.inject("dev", Fault.VM_CRASH_AFTER_TAKE)
        snapshot = host.take_snapshot("dev", "vbremote-transient")
        vm = host.vm("dev")
        assert vm.state is vbremote.MachineState.ABORTED
        assert vm.snapshot(snapshot.uuid).name == "vbremote-transient"
        host.delete_snapshot("dev", snapshot.uuid)
        assert host.vm("dev").snapshot_tree is None
        assert sim71.disk_matches_guest("dev")

    def test_timeout_cancels_a_hung_snapshot(self, sim71: SimulatedVirtualBox):
        """A snapshot that never finishes times out, is canceled, and the VM runs on without it."""
        host = host_of(sim71)
        sim71.start("dev")
        sim71.inject("dev", Fault.HANG)
        with pytest.raises(vbremote.VirtualBoxTimeout, match="canceled"):
            host.take_snapshot("dev", "s", timeout=0.3)
        vm = host.vm("dev")
        assert vm.state is vbremote.MachineState.RUNNING
        assert vm.snapshot_tree is None
