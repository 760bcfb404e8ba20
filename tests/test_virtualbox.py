"""VirtualBoxHost's behaviour: one suite, run on every simulator profile and, unchanged, on real VirtualBox.

The real run needs vboxapi and a disposable powered-off VM named by the
VBREMOTE_TEST_VM environment variable (its snapshots are taken and deleted,
it is started and powered off); elsewhere it is skipped with the reason.
Scenes are set with the adapter's own calls only, so the same code runs on both.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

import vbremote
from vbremote.testing import MIB, VIRTUALBOX_PROFILES, SimulatedVirtualBox, Timing

TARGETS = [*VIRTUALBOX_PROFILES, pytest.param("real", marks=pytest.mark.vbox)]


class Scene:
    """A host and one VM to work on, powered off at the start."""

    def __init__(self, host: vbremote.VirtualBoxHost, vm: str, sim: SimulatedVirtualBox | None) -> None:
        self.host = host
        self.vm = vm
        self.sim = sim

    def running(self) -> None:
        if not self.host.state(self.vm).is_running:
            self.host.start(self.vm)

    def api(self) -> tuple[int, int]:
        """The connected VirtualBox's (major, minor)."""
        found = re.match(r"(\d+)\.(\d+)", self.host.version)
        assert found is not None
        return int(found.group(1)), int(found.group(2))

    @contextlib.contextmanager
    def unregistered(self) -> Iterator[Path]:
        """The VM unregistered (its settings file given); registered again from that file afterwards."""
        settings = self.host.unregister(self.vm)
        try:
            yield settings
        finally:
            try:
                self.host.vm(self.vm)
            except vbremote.VMNotFound:
                self.host.register(settings)

    def reset(self) -> None:
        """Power off and delete every snapshot (for the real VM after a test)."""
        if self.host.state(self.vm).is_running:
            self.host.power_off(self.vm)
        for snapshot in reversed(self.host.vm(self.vm).snapshots()):
            self.host.delete_snapshot(self.vm, snapshot.uuid)


@pytest.fixture(params=TARGETS)
def scene(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scene]:
    if request.param == "real":
        try:
            import vboxapi  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            pytest.skip("vboxapi is not importable: real VirtualBox is not installed here")
        name = os.environ.get("VBREMOTE_TEST_VM")
        if not name:
            pytest.skip("set VBREMOTE_TEST_VM to a disposable powered-off VM to run against real VirtualBox")
        host = vbremote.VirtualBoxHost.connect()
        real = Scene(host, name, None)
        yield real
        real.reset()
        return
    with SimulatedVirtualBox(tmp_path / "vbox", version=request.param, timing=Timing(unlock_delay=0.2)) as sim:
        sim.create_vm("dev", disk_size=8 * MIB, disks=2, firmware="EFI",
                      external_disk_folder=tmp_path / "elsewhere")
        yield Scene(vbremote.VirtualBoxHost.connect(manager=sim.manager()), "dev", sim)


class TestReading:
    def test_find_by_name_and_uuid(self, scene: Scene):
        """A VM is found by name and by uuid, and appears in the list of VMs."""
        by_name = scene.host.vm(scene.vm)
        assert scene.host.vm(by_name.uuid) == by_name
        assert by_name.uuid in {vm.uuid for vm in scene.host.vms()}
        assert by_name.state is vbremote.MachineState.POWERED_OFF

    def test_unknown_vm(self, scene: Scene):
        """An unknown name raises VMNotFound naming it."""
        with pytest.raises(vbremote.VMNotFound) as info:
            scene.host.vm("no-such-vm-here")
        assert info.value.vm == "no-such-vm-here"

    def test_files_and_disks(self, scene: Scene):
        """The settings file, snapshot folder and each disk's base medium are real paths."""
        vm = scene.host.vm(scene.vm)
        assert vm.settings_file.is_file()
        assert vm.snapshot_folder.parent == vm.folder or vm.snapshot_folder.is_absolute()
        assert vm.disks
        for disk in vm.disks:
            assert disk.base is not None
            assert disk.base.parent is None
            assert disk.base.location.is_file()
            assert disk.base.logical_size > 0

    def test_firmware_and_nvram(self, scene: Scene):
        """The firmware type and the NVRAM file are read where the connected version keeps them.

        ``IMachine::firmwareType`` up to 7.0, ``IMachine::firmwareSettings`` (``IFirmwareSettings``)
        from 7.1; the NVRAM file on ``IBIOSSettings`` in 6.1 and ``IMachine::nonVolatileStore`` from
        7.0 (``src/VBox/Main/idl/VirtualBox.xidl`` of 6.1.38, 7.0.2, 7.1.12 and 7.2).
        """
        vm = scene.host.vm(scene.vm)
        assert vm.firmware in {"BIOS", "EFI", "EFI32", "EFI64", "EFIDUAL"}
        if scene.sim is not None:  # the scene's VM is an EFI machine with an NVRAM file
            assert vm.firmware == "EFI"
            assert vm.nvram_file == vm.folder / "dev.nvram"
        if vm.nvram_file is not None:
            assert vm.nvram_file.is_absolute()

    def test_media_are_accessible(self, scene: Scene):
        """Every medium of a VM whose files are all there is accessible, with its real logical size.

        A medium loaded from settings reads ``Inaccessible`` with size 0 until checked;
        ``IMedium::refreshState`` checks it (``Medium::initOne``, ``Medium::refreshState``,
        ``src/VBox/Main/src-server/MediumImpl.cpp``, 6.1.38 to 7.1.12).
        """
        with scene.unregistered() as settings:
            again = scene.host.register(settings)
        assert not again.inaccessible_media
        for disk in again.disks:
            for medium in disk.chain:
                assert medium.accessible
                assert medium.access_error == ""
                assert medium.logical_size > 0

    def test_version(self, scene: Scene):
        """The version is VirtualBox's dotted version."""
        assert scene.host.version.count(".") >= 2


class TestSnapshots:
    def test_offline_snapshot_and_delete(self, scene: Scene):
        """An offline snapshot adds a differencing image on each disk; deleting it merges back to the base."""
        before = scene.host.vm(scene.vm)
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-test", description="offline")
        assert not snapshot.online
        assert snapshot.state_file is None
        after = scene.host.vm(scene.vm)
        assert after.current_snapshot == snapshot.uuid
        assert after.state is vbremote.MachineState.POWERED_OFF
        for old, new in zip(before.disks, after.disks, strict=True):
            assert new.chain[:-1] == old.chain
            assert new.medium is not None
            assert new.medium.location.is_file()
        frozen = {a.medium.uuid for a in snapshot.attachments if a.medium is not None and a.type == "HardDisk"}
        assert frozen == {d.medium.uuid for d in before.disks if d.medium is not None}
        scene.host.delete_snapshot(scene.vm, snapshot.uuid)
        final = scene.host.vm(scene.vm)
        assert final.snapshot_tree is None
        assert final.current_snapshot is None
        assert [d.chain for d in final.disks] == [d.chain for d in before.disks]

    def test_live_snapshot_keeps_the_vm_running(self, scene: Scene):
        """A live snapshot of a running VM saves its state; the VM runs on, and on after the online delete."""
        scene.running()
        events: list[vbremote.Progress] = []
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-live", on_progress=events.append)
        assert snapshot.online
        assert snapshot.state_file is not None
        assert snapshot.state_file.is_file()
        assert scene.host.state(scene.vm) is vbremote.MachineState.RUNNING
        deleted: list[vbremote.Progress] = []
        scene.host.delete_snapshot(scene.vm, snapshot.uuid, on_progress=deleted.append)
        assert scene.host.state(scene.vm) is vbremote.MachineState.RUNNING
        assert not snapshot.state_file.exists()
        for what, got in (("take snapshot", events), ("delete snapshot", deleted)):
            assert got, f"no progress event arrived for {what}"
            assert {(e.operation, e.path, e.total) for e in got} == {(what, scene.vm, 100)}
            done = [e.done for e in got]
            assert done == sorted(done)
            assert done[0] >= 0
            assert done[-1] == 100

    def test_nested_snapshots_delete_the_middle(self, scene: Scene):
        """Deleting a middle snapshot re-parents its child and keeps the current state."""
        first = scene.host.take_snapshot(scene.vm, "one")
        second = scene.host.take_snapshot(scene.vm, "two")
        third = scene.host.take_snapshot(scene.vm, "three")
        scene.host.delete_snapshot(scene.vm, second.uuid)
        vm = scene.host.vm(scene.vm)
        assert [s.name for s in vm.snapshots()] == ["one", "three"]
        assert vm.snapshot(third.uuid).parent == first.uuid
        assert vm.current_snapshot == third.uuid
        for snapshot in (third, first):
            scene.host.delete_snapshot(scene.vm, snapshot.uuid)
        assert scene.host.vm(scene.vm).snapshot_tree is None

    def test_unknown_snapshot(self, scene: Scene):
        """Deleting a snapshot that does not exist raises SnapshotNotFound and changes nothing."""
        with pytest.raises(vbremote.SnapshotNotFound):
            scene.host.delete_snapshot(scene.vm, "no-such-snapshot")
        assert scene.host.vm(scene.vm).snapshot_tree is None

    def test_restore(self, scene: Scene):
        """Restoring an offline snapshot makes it current again, PoweredOff, with a fresh differencing image."""
        snapshot = scene.host.take_snapshot(scene.vm, "base")
        scene.host.take_snapshot(scene.vm, "later")
        scene.host.restore_snapshot(scene.vm, snapshot.uuid)
        vm = scene.host.vm(scene.vm)
        assert vm.current_snapshot == snapshot.uuid
        assert vm.state is vbremote.MachineState.POWERED_OFF
        frozen = {a.medium.uuid for a in snapshot.attachments if a.type == "HardDisk" and a.medium}
        assert {d.chain[-2].uuid for d in vm.disks} == frozen

    def test_restore_refused_while_running(self, scene: Scene):
        """Restoring while the VM runs raises InvalidVMState and leaves the VM running."""
        snapshot = scene.host.take_snapshot(scene.vm, "base")
        scene.running()
        with pytest.raises(vbremote.InvalidVMState):
            scene.host.restore_snapshot(scene.vm, snapshot.uuid)
        assert scene.host.state(scene.vm) is vbremote.MachineState.RUNNING


SAV_NAME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{9}Z\.sav")
NVRAM_NAME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{9}Z\.nvram")


class TestSnapshotKinds:
    """What kind of snapshot each VM state gets (src/VBox/Main/src-server/SnapshotImpl.cpp, takeSnapshot)."""

    def test_paused_vm_gets_an_online_snapshot_and_stays_paused(self, scene: Scene):
        """A Paused VM's snapshot saves its state (fPause=true: 7.0.10+ refuses a live one) and leaves it Paused."""
        scene.running()
        scene.host.pause(scene.vm)
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-paused")
        assert snapshot.online
        assert snapshot.state_file is not None
        assert snapshot.state_file.is_file()
        assert scene.host.state(scene.vm) is vbremote.MachineState.PAUSED
        scene.host.resume(scene.vm)
        assert scene.host.state(scene.vm) is vbremote.MachineState.RUNNING

    def test_saved_vm_snapshot_shares_the_state_file(self, scene: Scene):
        """An offline snapshot of a Saved VM uses the VM's state file (i_takeSnapshotHandler); deleting keeps it."""
        scene.running()
        scene.host.save_state(scene.vm)
        saved = scene.host.vm(scene.vm).state_file
        assert saved is not None
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-saved")
        assert snapshot.state_file == saved
        assert snapshot.online  # ISnapshot.online is "has a state file" (Snapshot::getOnline)
        assert scene.host.state(scene.vm) is vbremote.MachineState.SAVED
        scene.host.delete_snapshot(scene.vm, snapshot.uuid)
        vm = scene.host.vm(scene.vm)
        assert vm.state_file == saved
        assert saved.is_file()

    def test_live_needs_a_running_vm(self, scene: Scene):
        """live=True for a VM that is not Running raises InvalidVMState before VirtualBox is asked; nothing is made."""
        with pytest.raises(vbremote.InvalidVMState) as info:
            scene.host.take_snapshot(scene.vm, "vbremote-live", live=True)
        assert info.value.snapshot_id is None
        assert scene.host.vm(scene.vm).snapshot_tree is None

    def test_not_live_pauses_a_running_vm_for_the_snapshot(self, scene: Scene):
        """live=False on a Running VM saves its state while paused, then the VM runs on."""
        scene.running()
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-paused-live", live=False)
        assert snapshot.online
        assert snapshot.state_file is not None
        assert scene.host.state(scene.vm) is vbremote.MachineState.RUNNING

    def test_state_file_named_by_time_in_the_snapshot_folder(self, scene: Scene):
        """A live snapshot's state file is <snapshot folder>/<UTC time>Z.sav (i_composeSavedStateFilename)."""
        scene.running()
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-live")
        assert snapshot.state_file is not None
        assert snapshot.state_file.parent == scene.host.vm(scene.vm).snapshot_folder
        assert SAV_NAME.fullmatch(snapshot.state_file.name)


class TestNVRAM:
    """The NVRAM store per snapshot (SnapshotImpl.cpp: i_takeSnapshotHandler, i_deleteSnapshotHandler, restore)."""

    @staticmethod
    def nvram(scene: Scene) -> Path:
        vm = scene.host.vm(scene.vm)
        if vm.nvram_file is None or not vm.nvram_file.is_file():
            pytest.skip(f"{scene.vm} has no NVRAM file (a BIOS VM, or one that never ran)")
        return vm.nvram_file

    def test_snapshot_copies_the_nvram_and_delete_removes_it(self, scene: Scene):
        """Each snapshot gets Snapshots/<time>.nvram, a copy of the VM's NVRAM; deleting the snapshot deletes it."""
        nvram = self.nvram(scene)
        content = nvram.read_bytes()
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-nvram")
        assert snapshot.nvram_file is not None
        assert snapshot.nvram_file.parent == scene.host.vm(scene.vm).snapshot_folder
        assert NVRAM_NAME.fullmatch(snapshot.nvram_file.name)
        assert snapshot.nvram_file.read_bytes() == content
        assert scene.host.vm(scene.vm).snapshot(snapshot.uuid).nvram_file == snapshot.nvram_file
        scene.host.delete_snapshot(scene.vm, snapshot.uuid)
        assert not snapshot.nvram_file.exists()
        assert nvram.read_bytes() == content

    def test_restore_copies_the_nvram_back(self, scene: Scene):
        """Restoring a snapshot replaces the VM's NVRAM file with the snapshot's copy."""
        nvram = self.nvram(scene)
        content = nvram.read_bytes()
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-nvram")
        nvram.write_bytes(content[::-1])  # the variables change after the snapshot
        scene.host.restore_snapshot(scene.vm, snapshot.uuid)
        restored = scene.host.vm(scene.vm).nvram_file
        assert restored is not None
        assert restored.read_bytes() == content
        assert snapshot.nvram_file is not None
        assert snapshot.nvram_file.read_bytes() == content


class TestRestoreAndDelete:
    def test_restore_sets_the_last_state_change_to_the_snapshot_time(self, scene: Scene):
        """After a restore the VM's last state change is the snapshot's time (i_restoreSnapshotHandler)."""
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-base")
        time.sleep(2.1)  # the settings file keeps whole seconds
        scene.running()
        scene.host.power_off(scene.vm)
        assert scene.host.vm(scene.vm).last_state_change > snapshot.taken
        scene.host.restore_snapshot(scene.vm, snapshot.uuid)
        assert abs((scene.host.vm(scene.vm).last_state_change - snapshot.taken).total_seconds()) < 1

    def test_restore_of_an_online_snapshot_shares_its_state_file(self, scene: Scene):
        """Restoring an online snapshot leaves the VM Saved on the snapshot's own state file, not a copy."""
        scene.running()
        snapshot = scene.host.take_snapshot(scene.vm, "vbremote-live")
        scene.host.power_off(scene.vm)
        scene.host.restore_snapshot(scene.vm, snapshot.uuid)
        vm = scene.host.vm(scene.vm)
        assert vm.state is vbremote.MachineState.SAVED
        assert vm.state_file == snapshot.state_file

    def test_delete_refused_with_two_child_snapshots(self, scene: Scene):
        """A snapshot with two child snapshots is refused up front (VBOX_E_INVALID_OBJECT_STATE); nothing changes."""
        first = scene.host.take_snapshot(scene.vm, "vbremote-one")
        scene.host.take_snapshot(scene.vm, "vbremote-two")
        scene.host.restore_snapshot(scene.vm, first.uuid)
        scene.host.take_snapshot(scene.vm, "vbremote-three")
        before = scene.host.vm(scene.vm)
        with pytest.raises(vbremote.VirtualBoxOperationFailed) as info:
            scene.host.delete_snapshot(scene.vm, first.uuid)
        assert info.value.result_code == 0x80BB0007
        assert scene.host.vm(scene.vm).snapshots() == before.snapshots()

    def test_delete_refused_for_the_current_snapshot_with_a_child(self, scene: Scene):
        """The current snapshot with a child snapshot is refused up front (SessionMachine::i_deleteSnapshot)."""
        first = scene.host.take_snapshot(scene.vm, "vbremote-one")
        scene.host.take_snapshot(scene.vm, "vbremote-two")
        scene.host.restore_snapshot(scene.vm, first.uuid)
        with pytest.raises(vbremote.VirtualBoxOperationFailed) as info:
            scene.host.delete_snapshot(scene.vm, first.uuid)
        assert info.value.result_code == 0x80BB0007
        assert [s.name for s in scene.host.vm(scene.vm).snapshots()] == ["vbremote-one", "vbremote-two"]

    def test_delete_a_snapshot_whose_images_have_no_child(self, scene: Scene):
        """A snapshot image left without a child (its state was restored away) is deleted, not merged."""
        first = scene.host.take_snapshot(scene.vm, "vbremote-one")
        second = scene.host.take_snapshot(scene.vm, "vbremote-two")
        scene.host.restore_snapshot(scene.vm, first.uuid)
        before = scene.host.vm(scene.vm)
        scene.host.delete_snapshot(scene.vm, second.uuid)
        vm = scene.host.vm(scene.vm)
        assert [s.uuid for s in vm.snapshots()] == [first.uuid]
        assert [d.chain for d in vm.disks] == [d.chain for d in before.disks]
        for attachment in second.attachments:
            if attachment.type == "HardDisk" and attachment.medium is not None:
                assert not attachment.medium.location.exists()

    def test_delete_between_equal_differencing_images_merges_forward(self, scene: Scene):
        """Two differencing images of equal file size merge forward: the child's uuid and file survive."""
        scene.host.take_snapshot(scene.vm, "vbremote-one")
        second = scene.host.take_snapshot(scene.vm, "vbremote-two")
        before = scene.host.vm(scene.vm)
        for disk in before.disks:
            assert disk.chain[-2].location.stat().st_size == disk.chain[-1].location.stat().st_size
        scene.host.delete_snapshot(scene.vm, second.uuid)
        after = scene.host.vm(scene.vm)
        for old, new in zip(before.disks, after.disks, strict=True):
            parent, child = old.chain[-2], old.chain[-1]
            assert [m.uuid for m in new.chain] == [m.uuid for m in old.chain if m is not parent]
            assert not parent.location.exists()
            assert child.location.is_file()


class TestInterruptedSnapshot:
    """An interrupted take_snapshot cancels an online snapshot and names what it asked for."""

    @pytest.mark.parametrize("error", [RuntimeError("callback failed"), KeyboardInterrupt()])
    def test_callback_error_cancels_and_names_the_snapshot(self, scene: Scene, error: BaseException):
        """The callback's exception (or Ctrl-C) comes out with snapshot_id; the online snapshot is canceled."""
        scene.running()
        scene.host.poll_interval = 0.01

        def interrupt(event: vbremote.Progress) -> None:
            raise error

        with pytest.raises(type(error)) as info:
            scene.host.take_snapshot(scene.vm, "vbremote-interrupted", on_progress=interrupt)
        snapshot_id = getattr(info.value, "snapshot_id", None)
        assert snapshot_id is not None
        assert any(snapshot_id in note for note in getattr(info.value, "__notes__", []))
        vm = scene.host.vm(scene.vm)
        assert snapshot_id not in {s.uuid for s in vm.snapshots()}
        assert vm.state is vbremote.MachineState.RUNNING


class TestStates:
    def test_save_state_and_resume(self, scene: Scene):
        """Save state leaves the VM Saved with a state file; starting resumes it."""
        scene.running()
        scene.host.save_state(scene.vm)
        vm = scene.host.vm(scene.vm)
        assert vm.state is vbremote.MachineState.SAVED
        assert vm.state_file is not None
        assert vm.state_file.is_file()
        scene.host.start(scene.vm)
        assert scene.host.state(scene.vm) is vbremote.MachineState.RUNNING

    def test_power_off_refused_when_off(self, scene: Scene):
        """Powering off a VM that is off raises InvalidVMState."""
        with pytest.raises(vbremote.InvalidVMState):
            scene.host.power_off(scene.vm)

    def test_lock_retried_after_power_off(self, scene: Scene):
        """A write lock right after power-off waits out the 'being unlocked' window instead of failing."""
        scene.running()
        scene.host.power_off(scene.vm)
        scene.host.set_cpu_portability_level(scene.vm, 1)
        assert scene.host.vm(scene.vm).cpu_portability_level == 1

    def test_cpu_portability_level(self, scene: Scene):
        """The level is saved; a bad level is refused before VirtualBox is asked; a running VM refuses."""
        scene.host.set_cpu_portability_level(scene.vm, 3)
        assert scene.host.vm(scene.vm).cpu_portability_level == 3
        with pytest.raises(vbremote.ConfigurationError):
            scene.host.set_cpu_portability_level(scene.vm, 4)
        scene.running()
        with pytest.raises(vbremote.InvalidVMState):
            scene.host.set_cpu_portability_level(scene.vm, 0)
        assert scene.host.vm(scene.vm).cpu_portability_level == 3

    def test_unregister_and_register(self, scene: Scene):
        """Unregistering keeps the files; registering the settings file brings the same VM back."""
        before = scene.host.vm(scene.vm)
        settings = scene.host.unregister(scene.vm)
        assert settings.is_file()
        with pytest.raises(vbremote.VMNotFound):
            scene.host.vm(before.uuid)
        again = scene.host.register(settings)
        assert (again.uuid, again.name, again.disks) == (before.uuid, before.name, before.disks)
        with pytest.raises(vbremote.VirtualBoxOperationFailed):
            scene.host.register(settings)

    def test_unregister_refused_while_running(self, scene: Scene):
        """A running VM is not unregistered."""
        scene.running()
        with pytest.raises(vbremote.InvalidVMState):
            scene.host.unregister(scene.vm)
        assert scene.host.state(scene.vm) is vbremote.MachineState.RUNNING


def _settings_copy(source: Path, folder: Path, *, name: str) -> tuple[Path, str]:
    """A copy of a VM's settings file under a new uuid and name, its disks' locations relative to ``folder``."""
    ns = "http://www.virtualbox.org/"
    ET.register_namespace("", ns)
    tree = ET.parse(source)
    machine = tree.getroot().find(f"{{{ns}}}Machine")
    assert machine is not None
    new_uuid = str(uuid_module.uuid4())
    machine.set("uuid", f"{{{new_uuid}}}")
    machine.set("name", name)
    for disk in machine.iter(f"{{{ns}}}HardDisk"):
        disk.set("location", Path(disk.get("location", "disk.vdi")).name)
    folder.mkdir(parents=True)
    copy = folder / f"{name}.vbox"
    tree.write(copy, xml_declaration=True, encoding="utf-8")
    return copy, new_uuid


class TestRegistering:
    def test_password_by_version(self, scene: Scene):
        """6.1's openMachine takes no password: the adapter refuses one before VirtualBox opens anything.

        ``IVirtualBox::openMachine`` is ``(settingsFile)`` in 6.1.38 and ``(settingsFile, password)``
        from 7.0.2 (``src/VBox/Main/idl/VirtualBox.xidl``, ``VirtualBox::openMachine`` in
        ``src/VBox/Main/src-server/VirtualBoxImpl.cpp``); the connected version decides, not a TypeError.
        """
        if scene.api() >= (7, 0):
            pytest.skip("7.0 and later take the password (for encrypted VMs)")
        before = scene.host.vm(scene.vm)
        with scene.unregistered() as settings:
            with pytest.raises(vbremote.ConfigurationError, match="encrypted"):
                scene.host.register(settings, password="secret")
            with pytest.raises(vbremote.VMNotFound):
                scene.host.vm(before.uuid)
            assert scene.host.register(settings).uuid == before.uuid

    def test_missing_medium_loads_inaccessible(self, scene: Scene):
        """Registering does not check that media files exist: a missing one loads as Inaccessible.

        ``Medium::initOne`` (``src/VBox/Main/src-server/MediumImpl.cpp``) marks every medium read from
        settings inaccessible without opening it; ``Medium::refreshState`` finds the file missing
        (6.1.38, 7.0.x, 7.1.12, 7.2).
        """
        before = scene.host.vm(scene.vm)
        disk = before.disks[-1]
        assert disk.medium is not None
        missing = disk.medium.location
        aside = missing.with_name(missing.name + ".aside")
        with scene.unregistered() as settings:
            missing.rename(aside)
            try:
                again = scene.host.register(settings)
                assert again.uuid == before.uuid
                slots = {(a.controller, a.port, a.device): a for a in again.disks}
                medium = slots[(disk.controller, disk.port, disk.device)].medium
                assert medium is not None
                assert medium.uuid == disk.medium.uuid
                assert not medium.accessible
                assert medium.access_error
                assert [m.uuid for m in again.inaccessible_media] == [medium.uuid]
                scene.host.unregister(again.uuid)
            finally:
                aside.rename(missing)

    def test_start_with_a_missing_medium_fails(self, scene: Scene):
        """Starting a VM whose disk is missing fails with the medium's access error; the VM stays PoweredOff.

        ``Console::i_powerUpThreadTask`` locks the media; ``Medium::i_createMediumLockList`` fails
        an inaccessible hard disk with ``E_FAIL`` and its last access error; ``Console::i_powerDown``
        sets Starting back to PoweredOff (``ConsoleImpl.cpp``, ``MediumImpl.cpp``, 6.1.38 and 7.1.12).
        """
        before = scene.host.vm(scene.vm)
        disk = before.disks[-1]
        assert disk.medium is not None
        missing = disk.medium.location
        aside = missing.with_name(missing.name + ".aside")
        with scene.unregistered() as settings:
            missing.rename(aside)
            try:
                scene.host.register(settings)
                with pytest.raises(vbremote.VirtualBoxOperationFailed) as info:
                    scene.host.start(scene.vm)
                assert info.value.result_code == 0x80004005
                assert "Could not open the medium" in info.value.text
                assert scene.host.state(scene.vm) is vbremote.MachineState.POWERED_OFF
                scene.host.unregister(before.uuid)
            finally:
                aside.rename(missing)

    def test_settings_file_name_need_not_match(self, scene: Scene):
        """A settings file named otherwise than its VM registers; the VM keeps its name and that file.

        ``Machine::initFromSettings`` and ``Machine::i_prepareRegister``
        (``src/VBox/Main/src-server/MachineImpl.cpp``) never compare the file name with the VM name.
        """
        before = scene.host.vm(scene.vm)
        with scene.unregistered() as settings:
            renamed = settings.with_name("renamed-" + settings.name)
            settings.rename(renamed)
            try:
                again = scene.host.register(renamed)
                assert (again.uuid, again.name, again.settings_file) == (before.uuid, before.name, renamed)
                assert again.disks == before.disks
                scene.host.unregister(again.uuid)
            finally:
                renamed.rename(settings)

    def test_relative_locations_follow_the_folder(self, scene: Scene):
        """A VM folder moved elsewhere registers with its relative media locations under the new folder.

        ``Medium::initOne`` joins a relative location to the folder of the opened settings file
        (``src/VBox/Main/src-server/MediumImpl.cpp``); absolute locations stay.
        """
        before = scene.host.vm(scene.vm)
        folder = before.folder
        moved = folder.with_name(folder.name + "-moved")
        with scene.unregistered():
            folder.rename(moved)
            try:
                again = scene.host.register(moved / before.settings_file.name)
                assert again.settings_file == moved / before.settings_file.name
                for old, new in zip(before.disks, again.disks, strict=True):
                    for was, now in zip(old.chain, new.chain, strict=True):
                        assert now.uuid == was.uuid
                        if was.location.is_relative_to(folder):
                            assert now.location == moved / was.location.relative_to(folder)
                        else:
                            assert now.location == was.location
                        assert now.accessible
                scene.host.unregister(again.uuid)
            finally:
                moved.rename(folder)

    def test_duplicate_medium_uuid_refused(self, scene: Scene, tmp_path: Path):
        """A settings file naming a known medium uuid at another location is refused with E_INVALIDARG.

        ``VirtualBox::i_registerMedium`` / ``i_checkMediaForConflicts``
        (``src/VBox/Main/src-server/VirtualBoxImpl.cpp``, 6.1.38 to 7.2): a uuid already known at a
        different location is a conflict ("Cannot register the hard disk ... because a hard disk ...
        already exists"); nothing is registered.
        """
        source = scene.host.vm(scene.vm).settings_file
        copy, new_uuid = _settings_copy(source, tmp_path / "copy", name="vbremote-duplicate-media")
        known = {vm.uuid for vm in scene.host.vms()}
        with pytest.raises(vbremote.VirtualBoxOperationFailed) as info:
            scene.host.register(copy)
        assert info.value.result_code == 0x80070057
        assert {vm.uuid for vm in scene.host.vms()} == known
        assert new_uuid not in known

    def test_aborted_with_state_file(self, scene: Scene, tmp_path: Path):
        """``aborted`` with a ``stateFile`` loads as AbortedSaved on 7.x and as Aborted without it on 6.1.

        ``Machine::i_loadMachineDataFromSettings`` (``src/VBox/Main/src-server/MachineImpl.cpp``):
        7.0.2 to 7.2 keep the state file and set ``MachineState_AbortedSaved``; 6.1.38 drops the
        state file and sets ``MachineState_Aborted``. The state file need not exist.
        """
        folder = tmp_path / "orphan"
        folder.mkdir()
        vm_uuid = str(uuid_module.uuid4())
        settings = folder / "orphan.vbox"
        settings.write_text(
            '<?xml version="1.0"?>\n<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">\n'
            f'  <Machine uuid="{{{vm_uuid}}}" name="vbremote-orphan" OSType="Other" snapshotFolder="Snapshots"'
            ' stateFile="Snapshots/2024-01-02T03-04-05-000000000Z.sav" aborted="true">\n'
            "    <Hardware/>\n  </Machine>\n</VirtualBox>\n",
            encoding="utf-8",
        )
        vm = scene.host.register(settings)
        try:
            assert vm.uuid == vm_uuid
            if scene.api() >= (7, 0):
                assert vm.state is vbremote.MachineState.ABORTED_SAVED
                assert vm.state_file == folder / "Snapshots" / "2024-01-02T03-04-05-000000000Z.sav"
            else:
                assert vm.state is vbremote.MachineState.ABORTED
                assert vm.state_file is None
        finally:
            scene.host.unregister(vm_uuid)


def test_connect_without_vboxapi():
    """Without vboxapi, connect() says what to install."""
    try:
        import vboxapi  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(vbremote.VirtualBoxUnavailable, match="vboxapi"):
            vbremote.VirtualBoxHost.connect()
    else:
        pytest.skip("vboxapi is installed here")


def test_lock_retry_gives_up(tmp_path: Path):
    """When the lock stays taken longer than the retry budget, VMLocked is raised and nothing changes."""
    with SimulatedVirtualBox(tmp_path / "vbox", timing=Timing(unlock_delay=5.0)) as sim:
        sim.create_vm("dev", disk_size=4 * MIB)
        host = vbremote.VirtualBoxHost.connect(manager=sim.manager(),
                                               lock_retry=vbremote.LockRetry(total=0.3, first=0.05))
        host.start("dev")
        host.power_off("dev")
        started = time.monotonic()
        with pytest.raises(vbremote.VMLocked) as info:
            host.set_cpu_portability_level("dev", 2)
        assert time.monotonic() - started < 2.0
        assert info.value.result_code == 0x80BB0007
        assert host.vm("dev").cpu_portability_level == 0


def test_last_progress_event_says_done(tmp_path: Path):
    """An operation that finishes while the progress callback runs still ends with a done=100 event."""
    with SimulatedVirtualBox(tmp_path / "vbox", timing=Timing(snapshot=0.3)) as sim:
        sim.create_vm("dev", disk_size=4 * MIB)
        host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
        events: list[vbremote.Progress] = []

        def slow(event: vbremote.Progress) -> None:
            events.append(event)
            time.sleep(0.5)  # the snapshot completes meanwhile

        host.take_snapshot("dev", "s", on_progress=slow)
        assert [e.done for e in events] == [0, 100]


class TestPyvbox:
    def test_from_pyvbox_reads_7x_states_right(self, tmp_path: Path):
        """A pyvbox VirtualBox object is unwrapped; vbremote reads a 7.x Running VM as Running where pyvbox cannot."""
        virtualbox = pytest.importorskip("virtualbox")
        with SimulatedVirtualBox(tmp_path / "vbox", version="7.1") as sim:
            sim.create_vm("dev", disk_size=4 * MIB)
            sim.start("dev", workload=None)
            manager = sim.manager()
            wrapped = virtualbox.VirtualBox(interface=manager.getVirtualBox())
            assert str(wrapped.find_machine("dev").state) == "Paused"  # pyvbox's 6.1 numbering
            host = vbremote.VirtualBoxHost.from_pyvbox(wrapped, manager=manager)
            assert host.vm("dev").state is vbremote.MachineState.RUNNING

    def test_from_pyvbox_refuses_other_objects(self):
        """Something that is not a pyvbox VirtualBox object is refused with ConfigurationError."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.VirtualBoxHost.from_pyvbox(object())

    def test_from_pyvbox_without_vboxapi(self, tmp_path: Path):
        """Without a manager and without vboxapi, pyvbox's own manager is unavailable: a clear error."""
        virtualbox = pytest.importorskip("virtualbox")
        try:
            import vboxapi  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("vboxapi is installed here")
        with SimulatedVirtualBox(tmp_path / "vbox") as sim:
            wrapped = virtualbox.VirtualBox(interface=sim.manager().getVirtualBox())
            with pytest.raises(vbremote.VirtualBoxUnavailable):
                vbremote.VirtualBoxHost.from_pyvbox(wrapped)
