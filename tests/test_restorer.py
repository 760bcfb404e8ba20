"""The Restorer on the simulated VirtualBox and real borg repositories, with archives the Snapshotter made.

Results are checked from the outside: the registered VM's state and media as
the simulated host reports them, the files against what the guest had
written at the snapshot's instant (the simulator records it), and the VDI
images with ``qemu-img check``.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path

import attrs
import hypothesis
import pytest
from helpers import PASSPHRASE, BorgCLI, tmpfs
from hypothesis import strategies as st

import vbremote
from vbremote._restorer import _plan as plan_module
from vbremote._restorer import _vm as vm_module
from vbremote._restorer._checks import HostReference, host_references, vmdk_extents
from vbremote._restorer._rewrite import eject_images, new_identity, set_vdi_uuids, settings_with, vdi_uuids
from vbremote._restorer._source import source_from_archive
from vbremote._restorer._stale import STALE_PREFIX, load_stale, remove_stale, save_stale, stale_name
from vbremote._restorer._vm import machine_folder_name
from vbremote._settings import parse_settings
from vbremote._snapshotter._lock import vm_lock
from vbremote.testing import MIB, GuestWorkload, SimulatedVirtualBox, Timing, qemu_tools_available
from vbremote.testing._vdi import VDI

PROFILES = ["6.1", "7.1"]


@pytest.fixture(autouse=True)
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restorers made without a state folder keep their locks under the test's folder, not the home folder."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


class Scene:
    """A simulated host with one VM "dev" (EFI, two 16 MiB disks, the second outside the VM folder)."""

    def __init__(self, tmp_path: Path, profile: str, repo: vbremote.Repository, borg: BorgCLI,
                 transport: vbremote.LocalTransport, *, home: str = "vbox") -> None:
        self.tmp_path = tmp_path
        self.profile = profile
        self.sim = SimulatedVirtualBox(tmp_path / home, version=profile,
                                       timing=Timing(unlock_delay=0.02, snapshot=0.02))
        self.sim.create_vm("dev", disk_size=16 * MIB, disks=2, firmware="EFI",
                           external_disk_folder=tmp_path / "elsewhere")
        self.host = vbremote.VirtualBoxHost.connect(manager=self.sim.manager(),
                                                    lock_retry=vbremote.LockRetry(total=0.3))
        self.repo = repo
        self.borg = borg
        self.transport = transport
        self.snapshotter = vbremote.Snapshotter(self.host, repo, state_dir=tmp_path / "state")

    def close(self) -> None:
        self.sim.close()

    def take(self, mode: vbremote.SnapshotMode | str = "auto") -> vbremote.ArchiveInfo:
        return self.snapshotter.take("dev", mode).archive


@pytest.fixture(params=PROFILES)
def scene(request: pytest.FixtureRequest, tmp_path: Path, repo: vbremote.Repository, borg_cli: BorgCLI,
          transport: vbremote.LocalTransport) -> Iterator[Scene]:
    made = Scene(tmp_path, request.param, repo, borg_cli, transport)
    yield made
    made.close()


@pytest.fixture
def scene71(tmp_path: Path, repo: vbremote.Repository, borg_cli: BorgCLI,
            transport: vbremote.LocalTransport) -> Iterator[Scene]:
    made = Scene(tmp_path, "7.1", repo, borg_cli, transport)
    yield made
    made.close()


def write_crafted(repo: vbremote.Repository, tmp_path: Path, settings: bytes, *, name: str = "crafted",
                  extra: dict[str, bytes] | None = None) -> vbremote.ArchiveInfo:
    """A vbremote archive of a hand-written settings file (and small data files), as a hostile server could hold."""
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    (folder / "dev.vbox").write_bytes(settings)
    specs = [vbremote.FileSpec(folder / "dev.vbox", "dev.vbox", vbremote.FileRole.SETTINGS)]
    for path, data in (extra or {}).items():
        (folder / path.replace("/", "_")).write_bytes(data)
        specs.append(vbremote.FileSpec(folder / path.replace("/", "_"), path, vbremote.FileRole.DISK))
    parsed = parse_settings(settings)
    metadata = vbremote.SnapshotMetadata(vm_name=parsed.name, vm_uuid=parsed.uuid)
    return repo.write_archive(name, specs, metadata).archive


def settings_text(*, disk: str = "dev.vdi", state: str | None = None, nvram: str | None = None,
                  snapshot_folder: str | None = None, disk_format: str = "VDI", hardware: str = "",
                  machine: str = "", version: str = "1.19", devices: str = "") -> bytes:
    machine_uuid = "{11111111-2222-3333-4444-555555555555}"
    state_attr = f' stateFile="{state}"' if state else ""
    folder_attr = f' snapshotFolder="{snapshot_folder}"' if snapshot_folder else ""
    nvram_xml = f'<BIOS><NVRAM path="{nvram}"/></BIOS>' if nvram else ""
    return (
        f'<?xml version="1.0"?>\n<VirtualBox xmlns="http://www.virtualbox.org/" version="{version}-linux">'
        f'<Machine uuid="{machine_uuid}" name="dev" OSType="Other"{state_attr}{folder_attr}>'
        '<MediaRegistry><HardDisks>'
        f'<HardDisk uuid="{{aaaaaaaa-2222-3333-4444-555555555555}}" location="{disk}" format="{disk_format}"'
        ' type="Normal"/>'
        f'</HardDisks></MediaRegistry>{machine}'
        f'<Hardware><CPU count="1"/>{nvram_xml}{hardware}</Hardware>'
        '<StorageControllers><StorageController name="SATA" type="AHCI" PortCount="2">'
        '<AttachedDevice type="HardDisk" port="0" device="0">'
        f'<Image uuid="{{aaaaaaaa-2222-3333-4444-555555555555}}"/></AttachedDevice>{devices}'
        '</StorageController></StorageControllers></Machine></VirtualBox>\n'
    ).encode()


def stale_scene(scene: Scene) -> tuple[vbremote.ArchiveInfo, Path, set[Path]]:
    """An archive of "dev", then a later snapshot and a saved state: the archive, the VM's folder, and the
    files of the VM's folder that its settings name and the archive lacks (stale after a restore in place)."""
    archive = scene.take()
    scene.sim.start("dev", workload=HOT)
    wait_writes(scene, 5)
    scene.host.take_snapshot("dev", "later")
    wait_writes(scene, 5)
    scene.host.save_state("dev")
    info = scene.host.vm("dev")
    assert [s.name for s in info.snapshots()].count("later") == 1
    folder = info.folder
    named: set[Path | None] = {m.location for a in info.attachments for m in a.chain}
    named |= {info.state_file, info.nvram_file}
    for snap in info.snapshots():
        named |= {m.location for a in snap.attachments for m in a.chain} | {snap.state_file, snap.nvram_file}
    restored = {folder / f.path for f in archive.files}
    expected = {p for p in named if p is not None and p.exists() and p.is_relative_to(folder) and p not in restored}
    return archive, folder, expected


def killed_at(script: str, marker: str) -> None:
    """Run ``script`` in a child process (a session of its own) until it prints ``marker``, then SIGKILL it."""
    env = {**os.environ, "PYTHONPATH": str(Path(vbremote.__file__).parent.parent)}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env, text=True, start_new_session=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == marker, child.stderr.read() if child.stderr else ""
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()


class TestSource:
    def test_snapshotter_archive(self, scene: Scene):
        """A Snapshotter archive gives every data file at its archive path, and the settings it was frozen with."""
        archive = scene.take()
        source = source_from_archive(scene.repo, archive.name)
        assert source.vm_uuid == archive.vm_uuid
        assert source.vm_name == "dev"
        assert source.settings_path == "dev.vbox"
        paths = {f.target_path: f for f in source.files}
        recorded = {f.path for f in archive.files if f.role is not vbremote.FileRole.SETTINGS}
        assert set(paths) == recorded
        assert any(p.startswith("_external/") for p in paths)
        for f in source.files:
            assert f.target_path == f.archive_path
            assert f.size == archive.file(f.archive_path).size
        parsed = parse_settings(source.settings)
        assert parsed.uuid == archive.vm_uuid
        assert source.vbox_version == scene.host.version
        assert source.mode is archive.mode

    def test_external_mapped(self, scene71: Scene):
        """An ``_external/`` disk goes where the caller maps it, and the settings name it there."""
        archive = scene71.take()
        (external,) = [f.path for f in archive.files if f.path.startswith("_external/")]
        source = source_from_archive(scene71.repo, archive, external={external: "disks/second.vdi"})
        assert "disks/second.vdi" in {f.target_path for f in source.files}
        locations = {m.location for m in parse_settings(source.settings).all_media()}
        assert "disks/second.vdi" in locations
        assert external not in locations

    def test_external_map_outside_refused(self, scene71: Scene):
        """A mapping that leaves the target folder is refused."""
        archive = scene71.take()
        (external,) = [f.path for f in archive.files if f.path.startswith("_external/")]
        with pytest.raises(vbremote.ConfigurationError):
            source_from_archive(scene71.repo, archive, external={external: "../second.vdi"})

    @pytest.mark.parametrize(("settings", "what"), [
        (settings_text(disk="../../etc/x"), "medium"),
        (settings_text(disk="/etc/x"), "medium"),
        (settings_text(state="/var/tmp/dev.sav"), "saved state"),
        (settings_text(nvram="../dev.nvram"), "NVRAM"),
        (settings_text(snapshot_folder="/srv/elsewhere"), "snapshot folder"),
    ])
    def test_hostile_settings_refused(self, repo: vbremote.Repository, tmp_path: Path, settings: bytes, what: str):
        """Settings that name a file outside the VM folder are refused with an error naming the archive."""
        archive = write_crafted(repo, tmp_path, settings, extra={"dev.vdi": b"\0" * 4096})
        with pytest.raises(vbremote.ArchiveInvalid, match="outside the VM folder") as caught:
            source_from_archive(repo, archive)
        assert caught.value.archive == "crafted"
        assert what in str(caught.value)

    def test_missing_disk_refused(self, repo: vbremote.Repository, tmp_path: Path):
        """Settings that need a disk the archive does not hold are refused."""
        archive = write_crafted(repo, tmp_path, settings_text(disk="dev.vdi"))
        with pytest.raises(vbremote.ArchiveInvalid, match="not in the archive") as caught:
            source_from_archive(repo, archive)
        assert caught.value.path == "dev.vdi"

    def test_bad_xml_refused(self, repo: vbremote.Repository, tmp_path: Path):
        """A settings file with a DOCTYPE (entity expansion) is refused as the archive's fault."""
        bomb = (b'<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaa">]>'
                b'<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19"><Machine uuid="{11111111-2222-3333-'
                b'4444-555555555555}" name="dev">&a;</Machine></VirtualBox>')
        folder = tmp_path / "bomb"
        folder.mkdir()
        (folder / "dev.vbox").write_bytes(bomb)
        metadata = vbremote.SnapshotMetadata(vm_name="dev", vm_uuid="11111111-2222-3333-4444-555555555555")
        archive = repo.write_archive(
            "bomb", [vbremote.FileSpec(folder / "dev.vbox", "dev.vbox", vbremote.FileRole.SETTINGS)], metadata
        ).archive
        with pytest.raises(vbremote.ArchiveInvalid, match="DOCTYPE"):
            source_from_archive(repo, archive)

    def test_settings_of_another_vm_refused(self, repo: vbremote.Repository, tmp_path: Path):
        """A settings file whose machine uuid is not the metadata's is refused."""
        folder = tmp_path / "other"
        folder.mkdir()
        (folder / "dev.vbox").write_bytes(settings_text())
        (folder / "dev.vdi").write_bytes(b"\0" * 4096)
        metadata = vbremote.SnapshotMetadata(vm_name="dev", vm_uuid=str(uuid_module.uuid4()))
        archive = repo.write_archive("other", [
            vbremote.FileSpec(folder / "dev.vbox", "dev.vbox", vbremote.FileRole.SETTINGS),
            vbremote.FileSpec(folder / "dev.vdi", "dev.vdi", vbremote.FileRole.DISK),
        ], metadata).archive
        with pytest.raises(vbremote.ArchiveInvalid, match="metadata says"):
            source_from_archive(repo, archive)


class TestRewrite:
    def test_drop_state_and_level(self):
        """Dropping the state file and setting a portability level change only those."""
        data = settings_text(state="Snapshots/x.sav")
        out = settings_with(data, drop_state=True, cpu_portability_level=2)
        parsed = parse_settings(out)
        assert parsed.state_file is None
        assert b'CpuIdPortabilityLevel="2"' in out
        assert parse_settings(settings_with(data)).state_file == "Snapshots/x.sav"

    def test_new_identity(self):
        """A new identity changes the machine uuid, its name and every hard disk's uuid, in registry and attachments."""
        out, machine, media = new_identity(settings_text(), name="dev-old")
        parsed = parse_settings(out)
        assert parsed.uuid == machine != "11111111-2222-3333-4444-555555555555"
        assert parsed.name == "dev-old"
        (old,) = media
        assert old == "aaaaaaaa-2222-3333-4444-555555555555"
        assert [m.uuid for m in parsed.all_media()] == [media[old]]
        assert [a.medium for a in parsed.attachments] == [media[old]]

    def test_eject_images(self):
        """Ejecting empties each DVD or floppy drive of those images (machine and snapshots, both storage layouts)
        and drops them from the registry; other images and drives stay."""
        dvd, floppy, kept = "dddddddd-0000-4000-8000-000000000000", "ffffffff-0000-4000-8000-000000000000", \
            "eeeeeeee-0000-4000-8000-000000000000"

        def devices(*uuids: str) -> str:
            return "".join(
                f'<AttachedDevice type="{kind}" port="{port}" device="0"><Image uuid="{{{uuid}}}"/></AttachedDevice>'
                for port, (kind, uuid) in enumerate(zip(("DVD", "Floppy", "DVD"), uuids, strict=False), start=1))

        registry = (f'<DVDImages><Image uuid="{{{dvd}}}" location="/isos/a.iso"/>'
                    f'<Image uuid="{{{kept}}}" location="/isos/b.iso"/></DVDImages>'
                    f'<FloppyImages><Image uuid="{{{floppy}}}" location="/img/boot.img"/></FloppyImages>')
        # The machine in the layout before 1.17 (controllers beside Hardware), the snapshot in the later one.
        snapshot = (f'<Snapshot uuid="{{99999999-0000-4000-8000-000000000000}}" name="s" '
                    f'timeStamp="2026-01-01T00:00:00Z"><Hardware><StorageControllers>'
                    f'<StorageController name="IDE" type="PIIX4">{devices(dvd, floppy)}</StorageController>'
                    '</StorageControllers></Hardware></Snapshot>')
        text = settings_text().decode()
        text = text.replace("</HardDisks>", "</HardDisks>" + registry)
        text = text.replace("<Hardware>", snapshot + "<Hardware>", 1)
        text = text.replace("</StorageController></StorageControllers></Machine>",
                            f'</StorageController><StorageController name="IDE" type="PIIX4">'
                            f'{devices(dvd, floppy, kept)}</StorageController></StorageControllers></Machine>')
        data = text.encode()
        before = parse_settings(data)
        assert {a.medium for a in before.attachments} >= {dvd, floppy, kept}
        out = eject_images(data, {dvd, "{" + floppy.upper() + "}"})
        parsed = parse_settings(out)
        assert [(i.uuid, i.kind) for i in parsed.images] == [(kept, "DVD")]
        assert [(a.type, a.medium) for a in parsed.attachments if a.type != "HardDisk"] == [
            ("DVD", None), ("Floppy", None), ("DVD", kept)]
        assert parsed.snapshot is not None
        assert [(a.type, a.medium) for a in parsed.snapshot.attachments] == [("DVD", None), ("Floppy", None)]
        assert b"<FloppyImages" not in out
        assert b'<AttachedDevice type="DVD" port="1" device="0" />' in out
        assert [m.uuid for m in parsed.all_media()] == [m.uuid for m in before.all_media()]
        assert eject_images(data, ()) is data

    def test_vdi_uuids_rewritten(self, tmp_path: Path):
        """A differencing VDI gets its new uuid and its parent's new uuid; qemu-img still reads both."""
        if not qemu_tools_available():
            pytest.skip("qemu-img is not installed (Debian package qemu-utils)")
        from vbremote.testing._vdi import VDI

        base = VDI.create(tmp_path / "base.vdi", 4 * MIB)
        base.write(0, b"x" * 4096)
        child = VDI.create_diff(tmp_path / "child.vdi", base)
        child.write(MIB, b"y" * 4096)
        media = {base.uuid: str(uuid_module.uuid4()), child.uuid: str(uuid_module.uuid4())}
        assert set_vdi_uuids(tmp_path / "base.vdi", media)
        assert set_vdi_uuids(tmp_path / "child.vdi", media)
        assert vdi_uuids(tmp_path / "base.vdi") == (media[base.uuid], str(uuid_module.UUID(int=0)))
        assert vdi_uuids(tmp_path / "child.vdi") == (media[child.uuid], media[base.uuid])
        reopened = VDI.open(tmp_path / "child.vdi", parent=VDI.open(tmp_path / "base.vdi"))
        assert reopened.read(0, 4096) == b"x" * 4096
        assert reopened.read(MIB, 4096) == b"y" * 4096
        subprocess.run(["qemu-img", "check", "-f", "vdi", str(tmp_path / "base.vdi")], check=True,
                       capture_output=True)
        (tmp_path / "plain").write_bytes(b"not an image" * 100)
        assert not set_vdi_uuids(tmp_path / "plain", media)


HOT = GuestWorkload(rate=60, write_size=64 * 1024, pattern="hot", seed=5)


def take_recording(scene: Scene, mode: vbremote.SnapshotMode | str = "auto") -> tuple[vbremote.ArchiveInfo,
                                                                                        dict[int, bytes]]:
    """An archive, and what the guest had written to each disk at its instant (recorded during the run)."""
    contents: dict[int, bytes] = {}

    def record(event: vbremote.Progress) -> None:
        if event.operation == "archive" and not contents:
            transient = [s for s in scene.host.vm("dev").snapshots()
                         if s.name.startswith(vbremote.TRANSIENT_PREFIX)]
            (snapshot,) = transient
            for port in (0, 1):
                contents[port] = scene.sim.guest_content_at("dev", snapshot.uuid, port)

    result = scene.snapshotter.take("dev", mode, progress=record)
    assert contents, "the run reported no archive progress"
    return result.archive, contents


def wait_writes(scene: Scene, count: int) -> None:
    deadline = time.monotonic() + 10
    start = scene.sim.guest_writes("dev")
    while scene.sim.guest_writes("dev") < start + count:
        assert time.monotonic() < deadline, "the guest did not write"
        time.sleep(0.01)


class TestInPlace:
    def test_online_archive_resumes_saved(self, scene: Scene):
        """After the guest changed, an online archive restores in place: only changed blocks travel, the VM is
        Saved with the instant's disks."""
        scene.sim.start("dev", workload=HOT)
        archive, instant = take_recording(scene)
        assert archive.mode is vbremote.SnapshotMode.ONLINE
        wait_writes(scene, 20)
        restorer = vbremote.Restorer(scene.host, scene.repo)
        plan = restorer.plan(archive, power_off=True)
        assert plan.problems == ()
        assert plan.target == scene.host.vm("dev").folder
        total = sum(f.source.size for f in plan.files)
        assert 0 < plan.bytes_to_fetch < total / 2, plan.table()
        running_at_hash: list[bool] = []

        def while_hashing(event: vbremote.Progress) -> None:
            # A guest still running while the plan compares its files would make the plan stale: the
            # plan made while it runs (only to find problems before the power-off) must not be the one used.
            if event.operation == "hash":
                running = scene.host.state("dev").is_running
                if running and not running_at_hash:
                    wait_writes(scene, 10)
                running_at_hash.append(running)

        result = restorer.restore(archive, power_off=True, progress=while_hashing)
        assert running_at_hash[0] is True
        assert running_at_hash[-1] is False
        assert running_at_hash == sorted(running_at_hash, reverse=True)  # all hashing after the power-off last
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.SAVED
        assert result.vm.uuid == archive.vm_uuid
        # The guest wrote on until the restore powered it off: the restore's own plan, made then, differs.
        assert 0 < result.stats.bytes_fetched < total / 2
        for port, content in instant.items():
            assert scene.sim.disk_content("dev", port) == content
        scene.host.start("dev")
        assert scene.host.state("dev") is vbremote.MachineState.RUNNING

    def test_offline_archive_powered_off(self, scene: Scene):
        """An offline archive restores a powered-off VM; the disks hold what they held when it was taken."""
        before = {port: scene.sim.disk_content("dev", port) for port in (0, 1)}
        archive = scene.take()
        assert archive.mode is vbremote.SnapshotMode.OFFLINE
        scene.sim.start("dev", workload=HOT)
        wait_writes(scene, 20)
        scene.sim.power_off("dev")
        assert scene.sim.disk_content("dev", 0) != before[0]
        result = vbremote.Restorer(scene.host, scene.repo).restore(archive)
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.POWERED_OFF
        for port, content in before.items():
            assert scene.sim.disk_content("dev", port) == content

    def test_stale_files_removed(self, scene71: Scene, tmp_path: Path):
        """Files the old VM named and the archive lacks (a later snapshot's images and state) are removed and
        listed; other files in the folder stay."""
        scene = scene71
        archive, folder, expected = stale_scene(scene)
        keep = folder / "Logs" / "VBox.log"
        keep.parent.mkdir(exist_ok=True)
        keep.write_text("log")
        mine = folder / "notes.txt"
        mine.write_text("mine")
        result = vbremote.Restorer(scene.host, scene.repo).restore(archive)
        assert {p.suffix for p in expected} >= {".vdi", ".sav"}
        assert set(result.removed) == expected
        assert not any(p.exists() for p in result.removed)
        assert keep.read_text() == "log"
        assert mine.read_text() == "mine"
        assert all((folder / f.path).exists() for f in archive.files)
        assert result.vm is not None
        assert [s.name for s in result.vm.snapshots()] == []


class TestElsewhere:
    def test_another_host(self, scene: Scene, tmp_path: Path):
        """Into a folder on another host (migration): the external disk lands inside the folder, the VM registers
        there Saved and resumes."""
        scene.sim.start("dev", workload=HOT)
        archive, instant = take_recording(scene)
        other = SimulatedVirtualBox(tmp_path / "other", version=scene.profile)
        try:
            host = vbremote.VirtualBoxHost.connect(manager=other.manager())
            restorer = vbremote.Restorer(host, scene.repo)
            plan = restorer.plan(archive)
            assert plan.target == other.vms_folder / "dev"
            result = restorer.restore(archive)
            assert result.vm is not None
            assert result.vm.state is vbremote.MachineState.SAVED
            assert result.vm.folder == other.vms_folder / "dev"
            for m in (m for a in result.vm.attachments for m in a.chain):
                assert m.location.is_relative_to(result.vm.folder)
            for port, content in instant.items():
                assert other.disk_content("dev", port) == content
            host.start("dev")
            assert host.state("dev") is vbremote.MachineState.RUNNING
        finally:
            other.close()

    def test_migrate_archive(self, scene71: Scene, tmp_path: Path):
        """A migrate archive (the VM saved, then archived) registers Saved on the other host."""
        scene71.sim.start("dev", workload=HOT)
        archive = scene71.snapshotter.take("dev", vbremote.SnapshotMode.MIGRATE).archive
        other = SimulatedVirtualBox(tmp_path / "other", version="7.1")
        try:
            result = vbremote.Restorer(vbremote.VirtualBoxHost.connect(manager=other.manager()),
                                       scene71.repo).restore(archive)
            assert result.vm is not None
            assert result.vm.state is vbremote.MachineState.SAVED
            for port in (0, 1):
                assert other.disk_content("dev", port) == scene71.sim.disk_content("dev", port)
        finally:
            other.close()

    def test_same_uuid_elsewhere_refused(self, scene71: Scene, tmp_path: Path):
        """Into another folder while the VM is registered from its own: refused, and nothing is written."""
        archive = scene71.take()
        restorer = vbremote.Restorer(scene71.host, scene71.repo)
        plan = restorer.plan(archive, tmp_path / "copy")
        assert [p.code for p in plan.problems] == ["uuid-elsewhere"]
        with pytest.raises(vbremote.RestorePreflightFailed, match="uuid-elsewhere") as caught:
            restorer.restore(archive, tmp_path / "copy")
        assert [p.code for p in caught.value.problems] == ["uuid-elsewhere"]
        assert not (tmp_path / "copy").exists()

    def test_as_new_beside(self, scene: Scene):
        """As a new VM: registered beside the current one with new machine and disk uuids; the images check."""
        if not qemu_tools_available():
            pytest.skip("qemu-img is not installed (Debian package qemu-utils)")
        scene.sim.start("dev", workload=HOT)
        archive, instant = take_recording(scene)
        restorer = vbremote.Restorer(scene.host, scene.repo)
        result = restorer.restore(archive, as_new="dev-old")
        new = result.vm
        assert new is not None
        current = scene.host.vm("dev")
        assert new.name == "dev-old"
        assert new.uuid != current.uuid
        assert new.folder == scene.sim.vms_folder / "dev-old"
        assert new.state is vbremote.MachineState.SAVED
        old_media = {m.uuid for a in current.attachments for m in a.chain}
        new_media = {m.uuid for a in new.attachments for m in a.chain}
        assert new_media
        assert not old_media & new_media
        assert current.state is vbremote.MachineState.RUNNING
        for port, content in instant.items():
            assert scene.sim.disk_content("dev-old", port) == content
        for medium in (m for a in new.attachments for m in a.chain):
            assert vdi_uuids(medium.location) is not None
            assert vdi_uuids(medium.location)[0] == medium.uuid
            subprocess.run(["qemu-img", "check", "-f", "vdi", str(medium.location)], check=True,
                           capture_output=True)

    def test_as_new_with_other_disk_formats_refused(self, scene71: Scene, tmp_path: Path):
        """As a new VM, disks whose headers vbremote cannot give new uuids (not VDI) are refused before any
        write, instead of a VM that fails to register after every byte was written."""
        settings = settings_text(disk="dev.vmdk").replace(b'format="VDI"', b'format="VMDK"')
        archive = write_crafted(scene71.repo, tmp_path, settings, extra={"dev.vmdk": b"\1" * 4096})
        restorer = vbremote.Restorer(scene71.host, scene71.repo)
        target = tmp_path / "new"
        assert [p.code for p in restorer.plan(archive, target, as_new="copy").problems] == ["as-new-format"]
        with pytest.raises(vbremote.RestorePreflightFailed, match="VMDK"):
            restorer.restore(archive, target, as_new="copy")
        assert not target.exists()
        assert restorer.plan(archive, target).problems == ()

    def test_as_new_reads_the_current_vm(self, scene71: Scene):
        """As a new VM beside a powered-off current VM: its disks are read as seeds, so little is fetched."""
        archive = scene71.take()
        scene71.sim.start("dev", workload=HOT)
        wait_writes(scene71, 10)
        scene71.sim.power_off("dev")
        restorer = vbremote.Restorer(scene71.host, scene71.repo)
        plan = restorer.plan(archive, as_new="dev-old")
        result = restorer.restore(archive, as_new="dev-old")
        # The plan reads the same seeds as the restore, so it says what will travel.
        assert plan.bytes_to_fetch == result.stats.bytes_fetched
        total = sum(f.size for f in archive.files)
        assert result.stats.bytes_copied > total / 2
        assert result.stats.bytes_fetched < total / 2
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.POWERED_OFF


class TestPreflight:
    def test_running_refused(self, scene71: Scene):
        """A running VM is a problem unless power_off=True; the refused restore changes nothing."""
        archive = scene71.take()
        scene71.sim.start("dev", workload=None)
        restorer = vbremote.Restorer(scene71.host, scene71.repo)
        assert [p.code for p in restorer.plan(archive).problems] == ["vm-running"]
        assert restorer.plan(archive, power_off=True).problems == ()
        folder = scene71.host.vm("dev").folder
        before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
        with pytest.raises(vbremote.RestorePreflightFailed) as caught:
            restorer.restore(archive)
        assert caught.value.problems[0].remedy
        assert scene71.host.state("dev") is vbremote.MachineState.RUNNING
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before
        result = restorer.restore(archive, power_off=True)
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.POWERED_OFF

    def test_power_off_only_once_the_plan_is_clear(self, scene71: Scene, monkeypatch: pytest.MonkeyPatch):
        """With power_off=True, a restore its plan refuses (no room, a symlink in the folder) leaves the
        VM running: every check of the plan runs before the power-off."""
        archive = scene71.take()
        scene71.sim.start("dev", workload=None)
        restorer = vbremote.Restorer(scene71.host, scene71.repo)
        folder = scene71.host.vm("dev").folder
        real_usage = shutil.disk_usage
        with monkeypatch.context() as patched:
            patched.setattr(plan_module.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
            with pytest.raises(vbremote.RestorePreflightFailed) as caught:
                restorer.restore(archive, power_off=True)
            assert [p.code for p in caught.value.problems] == ["no-space"]
        assert scene71.host.state("dev") is vbremote.MachineState.RUNNING
        disk = next(folder / f.path for f in archive.files
                    if f.role is vbremote.FileRole.DISK and (folder / f.path).exists())
        moved = disk.with_name("elsewhere.vdi")
        disk.rename(moved)
        disk.symlink_to(moved)
        with pytest.raises(vbremote.RestoreError, match="symlink"):
            restorer.restore(archive, power_off=True)
        assert scene71.host.state("dev") is vbremote.MachineState.RUNNING
        disk.unlink()
        moved.rename(disk)
        result = restorer.restore(archive, power_off=True)
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.POWERED_OFF

    def test_version_mismatch(self, scene71: Scene, tmp_path: Path):
        """A saved state of VirtualBox 7.1 is refused on 7.0; with discard_state it restores powered off."""
        scene71.sim.start("dev", workload=HOT)
        archive, instant = take_recording(scene71)
        other = SimulatedVirtualBox(tmp_path / "other", version="7.0")
        try:
            host = vbremote.VirtualBoxHost.connect(manager=other.manager())
            restorer = vbremote.Restorer(host, scene71.repo)
            (problem,) = restorer.plan(archive).problems
            assert problem.code == "vbox-version"
            assert "discard_state=True" in problem.remedy
            with pytest.raises(vbremote.RestorePreflightFailed):
                restorer.restore(archive)
            assert not (other.vms_folder / "dev").exists()
            # The state that is discarded is neither fetched nor written.
            plan = restorer.plan(archive, discard_state=True)
            assert plan.problems == ()
            assert [f.source.role for f in plan.files].count(vbremote.FileRole.STATE) == 0
            result = restorer.restore(archive, discard_state=True)
            assert result.vm is not None
            assert result.vm.state is vbremote.MachineState.POWERED_OFF
            assert result.vm.state_file is None
            assert list(result.vm.folder.rglob("*.sav")) == []
            for port, content in instant.items():
                assert other.disk_content("dev", port) == content
        finally:
            other.close()

    def test_offline_archive_of_a_saved_vm(self, scene71: Scene, tmp_path: Path):
        """A VM that was Saved is archived offline with its state: it restores Saved in place, and on another
        release its saved state is refused before any write, as an online archive's is."""
        scene71.sim.start("dev", workload=HOT)
        wait_writes(scene71, 5)
        scene71.host.save_state("dev")
        archive = scene71.take()
        assert archive.mode is vbremote.SnapshotMode.OFFLINE
        assert vbremote.FileRole.STATE in {f.role for f in archive.files}
        other = SimulatedVirtualBox(tmp_path / "other", version="7.0")
        try:
            restorer = vbremote.Restorer(vbremote.VirtualBoxHost.connect(manager=other.manager()), scene71.repo)
            assert [p.code for p in restorer.plan(archive).problems] == ["vbox-version"]
            with pytest.raises(vbremote.RestorePreflightFailed):
                restorer.restore(archive)
            assert not (other.vms_folder / "dev").exists()
        finally:
            other.close()
        result = vbremote.Restorer(scene71.host, scene71.repo).restore(archive)
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.SAVED
        scene71.host.start("dev")
        assert scene71.host.state("dev") is vbremote.MachineState.RUNNING

    def test_cpu_vendor(self, scene71: Scene):
        """A saved state taken on another CPU vendor is refused, with the way out; offline archives are not."""
        scene71.sim.start("dev", workload=None)
        archive = scene71.take()
        restorer = vbremote.Restorer(scene71.host, scene71.repo, cpu_vendor="SomeOtherVendor")
        problems = restorer.plan(archive, power_off=True).problems
        assert [p.code for p in problems] == ["cpu-vendor"]
        assert "discard_state=True" in problems[0].remedy
        assert restorer.plan(archive, power_off=True, discard_state=True).problems == ()
        result = restorer.restore(archive, power_off=True, discard_state=True, cpu_portability_level=2)
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.POWERED_OFF
        assert result.vm.cpu_portability_level == 2

    def test_hostile_refused_before_any_write(self, scene71: Scene, tmp_path: Path):
        """A vbremote archive whose settings name ../../etc/x is refused by plan and restore; nothing is written."""
        archive = write_crafted(scene71.repo, tmp_path, settings_text(disk="../../etc/x"),
                                extra={"dev.vdi": b"\1" * 4096})
        restorer = vbremote.Restorer(scene71.host, scene71.repo)
        target = tmp_path / "t" / "dev"
        for call in (restorer.plan, restorer.restore):
            with pytest.raises(vbremote.ArchiveInvalid, match="crafted"):
                call(archive, target)
        assert not (tmp_path / "t").exists()
        assert scene71.host.vm("dev").state is vbremote.MachineState.POWERED_OFF


VMDK_HEAD = '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="{create}"\n\n'

#: One crafted settings file (and its disk) per kind of host reference, the value it must be reported with.
HOST_REFERENCES = {
    "shared-folder": (dict(hardware='<SharedFolders><SharedFolder name="x" hostPath="/" writable="true"'
                                    ' autoMount="true"/></SharedFolders>'), "shared folder 'x'", "/"),
    "serial-rawfile": (dict(hardware='<UART><Port slot="0" enabled="true" IOBase="0x3f8" IRQ="4" hostMode="RawFile"'
                                     ' path="/home/user/.bashrc"/></UART>'), "serial port 0 (RawFile)",
                       "/home/user/.bashrc"),
    "serial-pipe": (dict(hardware='<UART><Port slot="1" enabled="false" IOBase="0x2f8" IRQ="3" hostMode="HostPipe"'
                                  ' server="true" path="/run/x.sock"/></UART>'), "serial port 1 (HostPipe)",
                    "/run/x.sock"),
    "parallel-port": (dict(hardware='<LPT><Port slot="0" enabled="true" IOBase="0x378" IRQ="7"'
                                    ' path="/dev/parport0"/></LPT>'), "parallel port 0", "/dev/parport0"),
    "recording-1.18": (dict(version="1.18", machine='<VideoCapture enabled="true" screens="1"'
                                                    ' file="/home/user/.ssh/authorized_keys"/>'),
                       "recording file of screen 0", "/home/user/.ssh/authorized_keys"),
    "recording-1.19": (dict(machine='<Recording enabled="true" screens="1"><Screen id="0" enabled="true" dest="1"'
                                    ' file="/etc/cron.d/x.webm"/></Recording>'),
                       "recording file of screen 0", "/etc/cron.d/x.webm"),
    "extradata": (dict(machine='<ExtraData><ExtraDataItem name="GUI/LastCloseAction" value="PowerOff"/>'
                               '<ExtraDataItem name="VBoxInternal/PDM/Devices/evil/Path" value="/var/lib/evil.so"/>'
                               '</ExtraData>'), "ExtraData VBoxInternal/PDM/Devices/evil/Path", "/var/lib/evil.so"),
    "nat-tftp": (dict(hardware='<Network><Adapter slot="0" enabled="true" type="82540EM"><NAT>'
                               '<TFTP prefix="/etc" boot-file="shadow"/></NAT></Adapter></Network>'),
                 "the TFTP folder of network adapter 0", "/etc"),
    "generic-vde": (dict(hardware='<Network><Adapter slot="1" enabled="true" type="82540EM"><DisabledModes>'
                                  '<GenericInterface driver="VDE"><Property name="network" value="/run/vde.ctl"/>'
                                  '</GenericInterface></DisabledModes><NAT/></Adapter></Network>'),
                    "a setting of network adapter 1 (VDE)", "network=/run/vde.ctl"),
    "host-drive": (dict(devices='<AttachedDevice passthrough="false" type="DVD" port="1" device="0">'
                                '<HostDrive src="/dev/sr0"/></AttachedDevice>'),
                   "host DVD drive passed through at SATA port 1 device 0", "/dev/sr0"),
    "vmdk-absolute": (dict(disk="dev.vmdk", disk_format="VMDK",
                           vmdk=VMDK_HEAD.format(create="fullDevice") + 'RW 2048 FLAT "/dev/sda" 0\n'),
                      "extent 1 of the VMDK descriptor dev.vmdk", "/dev/sda"),
    "vmdk-climbs": (dict(disk="dev.vmdk", disk_format="VMDK",
                         vmdk=VMDK_HEAD.format(create="monolithicFlat") + 'RW 8 FLAT "../../../etc/shadow" 0\n'),
                    "extent 1 of the VMDK descriptor dev.vmdk", "../../../etc/shadow"),
}


def small_vdi(tmp_path: Path) -> bytes:
    """A real, empty 1 MiB VDI with the uuid of the disk of :func:`settings_text`."""
    path = tmp_path / "small.vdi"
    VDI.create(path, MIB, image_uuid="aaaaaaaa-2222-3333-4444-555555555555")
    return path.read_bytes()


def crafted_with(repo: vbremote.Repository, tmp_path: Path, kind: str) -> vbremote.ArchiveInfo:
    spec = dict(HOST_REFERENCES[kind][0])
    vmdk = spec.pop("vmdk", None)
    disk = spec.get("disk", "dev.vdi")
    data = vmdk.encode() if vmdk is not None else small_vdi(tmp_path)
    return write_crafted(repo, tmp_path, settings_text(**spec), extra={disk: data})


@pytest.fixture
def empty_host(tmp_path: Path) -> Iterator[vbremote.VirtualBoxHost]:
    """A simulated VirtualBox 7.1 host with no VM."""
    sim = SimulatedVirtualBox(tmp_path / "vbox", version="7.1")
    yield vbremote.VirtualBoxHost.connect(manager=sim.manager())
    sim.close()


class TestHostReferences:
    @pytest.mark.parametrize("kind", sorted(HOST_REFERENCES))
    def test_reported_and_refused(self, empty_host: vbremote.VirtualBoxHost, repo: vbremote.Repository,
                                  tmp_path: Path, kind: str):
        """Each kind of host reference is a host-reference problem; restore refuses it and writes nothing."""
        archive = crafted_with(repo, tmp_path, kind)
        _, what, value = HOST_REFERENCES[kind]
        restorer = vbremote.Restorer(empty_host, repo)
        target = tmp_path / "t" / "dev"
        problems = restorer.plan(archive, target).problems
        assert [p.code for p in problems] == ["host-reference"]
        assert what in problems[0].message
        assert repr(value) in problems[0].message
        assert "allow_host_references=True" in problems[0].remedy
        with pytest.raises(vbremote.RestorePreflightFailed) as caught:
            restorer.restore(archive, target)
        assert [p.code for p in caught.value.problems] == ["host-reference"]
        assert not (tmp_path / "t").exists()
        assert empty_host.vms() == ()

    def test_allowed_shared_folder_restores(self, empty_host: vbremote.VirtualBoxHost, repo: vbremote.Repository,
                                            tmp_path: Path, caplog: pytest.LogCaptureFixture):
        """With allow_host_references=True the VM registers with its shared folder intact, and a warning says so."""
        archive = crafted_with(repo, tmp_path, "shared-folder")
        restorer = vbremote.Restorer(empty_host, repo)
        target = tmp_path / "t" / "dev"
        assert restorer.plan(archive, target, allow_host_references=True).problems == ()
        with caplog.at_level("WARNING", logger="vbremote.restore"):
            result = restorer.restore(archive, target, allow_host_references=True)
        assert result.vm is not None
        assert result.vm.uuid == "11111111-2222-3333-4444-555555555555"
        assert b'<SharedFolder name="x" hostPath="/" writable="true" autoMount="true"' in \
            result.settings_file.read_bytes()
        assert any("shared folder 'x'" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)

    def test_plain_settings_restore(self, empty_host: vbremote.VirtualBoxHost, repo: vbremote.Repository,
                                    tmp_path: Path):
        """Settings without host references (a USB filter, a disconnected port with an old path, a GUI ExtraData
        item, the default recording file) plan no problem and restore as before."""
        hardware = ('<USB><DeviceFilters><DeviceFilter name="any" active="true"/></DeviceFilters></USB>'
                    '<UART><Port slot="0" enabled="false" IOBase="0x3f8" IRQ="4" hostMode="Disconnected"'
                    ' path="/var/log/old-serial.log"/></UART>')
        machine = ('<ExtraData><ExtraDataItem name="GUI/LastCloseAction" value="PowerOff"/></ExtraData>'
                   '<Recording enabled="false" screens="1"><Screen id="0" enabled="true" dest="1" file="."/>'
                   '</Recording>')
        disk = small_vdi(tmp_path)
        archive = write_crafted(repo, tmp_path, settings_text(hardware=hardware, machine=machine),
                                extra={"dev.vdi": disk})
        restorer = vbremote.Restorer(empty_host, repo)
        target = tmp_path / "t" / "dev"
        assert restorer.plan(archive, target).problems == ()
        result = restorer.restore(archive, target)
        assert result.vm is not None
        assert (target / "dev.vdi").read_bytes() == disk

    def test_snapshot_hardware_and_own_folder(self):
        """A snapshot's own hardware is searched too; raw and recording files inside the VM folder are the VM's."""
        snapshot = ('<Snapshot uuid="{bbbbbbbb-2222-3333-4444-555555555555}" name="base"'
                    ' timeStamp="2026-01-01T00:00:00Z">'
                    '<Hardware><SharedFolders><SharedFolder name="old" hostPath="/srv/old"/></SharedFolders></Hardware>'
                    '</Snapshot>')
        hardware = ('<UART><Port slot="0" enabled="true" IOBase="0x3f8" IRQ="4" hostMode="RawFile"'
                    ' path="/vms/dev/serial.log"/></UART>')
        machine = ('<Recording enabled="true" screens="1"><Screen id="0" enabled="true" dest="1"'
                   ' file="/vms/dev/dev.webm"/></Recording>' + snapshot)
        data = settings_text(hardware=hardware, machine=machine)
        found = host_references(data, folder="/vms/dev")
        assert found == (HostReference("shared folder 'old' of snapshot 'base'", "/srv/old"),)
        elsewhere = {r.what for r in host_references(data, folder="/vms/other")}
        assert elsewhere == {"serial port 0 (RawFile)", "recording file of screen 0",
                             "shared folder 'old' of snapshot 'base'"}

    @hypothesis.given(before=st.lists(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n\0"),
                                              max_size=40)),
                      name=st.text(st.characters(exclude_categories=("Cs",), exclude_characters='"\n\r\0'),
                                   min_size=1, max_size=60))
    def test_vmdk_extents_found(self, before: list[str], name: str):
        """Whatever lines surround it, a quoted extent name is found exactly; no input makes the parser fail."""
        text = VMDK_HEAD.format(create="monolithicFlat") + "".join(line + "\n" for line in before)
        text += f'RDONLY 16 SPARSE "{name}"\r\nRW 8 ZERO\n'
        found = vmdk_extents(text.encode())
        assert found[-1] == name
        assert vmdk_extents(b"KDMV" + text.encode()) == ()


class TestReservedNames:
    @pytest.mark.parametrize("name", [".vbremote-restore.json", ".vbremote-restore.json.tmp",
                                      ".vbremote-stale-11111111-2222-3333-4444-555555555555.json"])
    def test_archive_holding_a_restore_record_refused(self, repo: vbremote.Repository, tmp_path: Path,
                                                      empty_host: vbremote.VirtualBoxHost, name: str):
        """An archive that would write the journal or a stale-file list (which a later restore would trust, and
        remove files by) is refused before any write."""
        record = b'{"version":1,"vm_uuid":"11111111-2222-3333-4444-555555555555","files":["notes.txt"]}'
        archive = write_crafted(repo, tmp_path, settings_text(), extra={"dev.vdi": small_vdi(tmp_path), name: record})
        target = tmp_path / "target"
        restorer = vbremote.Restorer(empty_host, repo)
        for call in (restorer.plan, restorer.restore):
            with pytest.raises(vbremote.ArchiveInvalid, match="keeps for its own records") as caught:
                call(archive, target)
            assert caught.value.path == name
        assert not target.exists()

    def test_refused_restore_puts_the_records_back(self, scene71: Scene, tmp_path: Path):
        """A restore refused after it recorded the stale files (here: the state folder cannot hold the
        unfinished-restore record) leaves no record behind, and the running VM runs on."""
        archive, folder, stale = stale_scene(scene71)
        scene71.host.start("dev")  # resumes the saved state
        state = tmp_path / "another-state"
        state.mkdir()
        (state / "restoring").write_text("a file where the record's folder would go")
        restorer = vbremote.Restorer(scene71.host, scene71.repo, state_dir=state)
        recorded: list[bool] = []

        def hashing(event: vbremote.Progress) -> None:  # the stale files are recorded after the first plan
            recorded.append(any(p.name.startswith(STALE_PREFIX) for p in folder.iterdir()))

        with pytest.raises(vbremote.ConfigurationError, match="state folder"):
            restorer.restore(archive, power_off=True, progress=hashing)
        assert recorded
        assert not any(recorded)
        assert scene71.host.state("dev") is vbremote.MachineState.RUNNING
        assert not any(p.name.startswith(STALE_PREFIX) for p in folder.iterdir())
        assert all(p.exists() for p in stale if p.suffix != ".sav")  # (the resume removed the saved state)


class TestFolderFromName:
    @pytest.mark.parametrize(("name", "folder"), [
        # The examples VirtualBox's own check of sanitiseMachineFilename lists (VirtualBoxImpl.cpp, 7.1.12).
        ("OS/2 2.1", "OS_2 2.1"),
        ("-!My VM!-", "__My VM_-"),
        ("\U00010330", "____"),
        ("  My VM  ", "__My VM__"),
        (".My VM.", "_My VM_"),
        ("My VM", "My VM"),
        # And what an archive's author might try.
        ("..", "__"),
        ("../../etc", "_._.._etc"),
        ("/root/.ssh", "_root_.ssh"),
        ("a\\b", "a_b"),
    ])
    def test_as_virtualbox_names_a_new_machines_folder(self, name: str, folder: str):
        """A VM's name gives the folder name VirtualBox gives a new machine: one name, never a path."""
        assert machine_folder_name(name) == folder

    @pytest.mark.parametrize("name", ["../../escaped", "/abs/escaped", ".."])
    def test_a_hostile_name_stays_in_the_default_folder(self, repo: vbremote.Repository, tmp_path: Path, name: str):
        """target=None on a host without the VM: the folder is made from the archive's VM name inside the
        default machine folder, whatever the name says."""
        VDI.create(tmp_path / "real.vdi", MIB)
        data = settings_text().replace(b'name="dev"', f'name="{name}"'.encode())
        archive = write_crafted(repo, tmp_path, data, extra={"dev.vdi": (tmp_path / "real.vdi").read_bytes()})
        with SimulatedVirtualBox(tmp_path / "other", version="7.1") as other:
            host = vbremote.VirtualBoxHost.connect(manager=other.manager())
            default = host.default_machine_folder
            escaped = Path(os.path.normpath(default / name))
            restorer = vbremote.Restorer(host, repo)
            plan = restorer.plan(archive)
            assert plan.target.parent == default
            assert plan.target.name == machine_folder_name(name)
            result = restorer.restore(archive)
            assert result.vm is not None
            assert result.vm.folder == plan.target
            # Where the name points, taken as a path, nothing was made.
            assert not escaped.is_relative_to(default)
            assert not (escaped / "dev.vdi").exists()
            assert (plan.target / "dev.vdi").exists()


class TestUnregisterFirst:
    def test_failed_apply_leaves_no_vm(self, scene71: Scene):
        """The old VM is unregistered before the first write: a restore that fails half-way leaves no VM
        registered, and a re-run into the same folder completes."""
        scene = scene71
        scene.sim.start("dev", workload=HOT)
        archive, instant = take_recording(scene)
        wait_writes(scene, 20)
        folder = scene.host.vm("dev").folder
        restorer = vbremote.Restorer(scene.host, scene.repo)
        registered_at_write: list[bool] = []

        class Stop(Exception):
            pass

        def fail(event: vbremote.Progress) -> None:
            if event.operation == "restore":
                registered_at_write.append(any(vm.uuid == archive.vm_uuid for vm in scene.host.vms()))
                if event.done > 0:
                    raise Stop

        with pytest.raises(Stop):
            restorer.restore(archive, power_off=True, progress=fail)
        assert registered_at_write
        assert not any(registered_at_write)
        assert not any(vm.uuid == archive.vm_uuid for vm in scene.host.vms())
        result = restorer.restore(archive, folder)
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.SAVED
        for port, content in instant.items():
            assert scene.sim.disk_content("dev", port) == content

    @pytest.mark.parametrize(("code", "error"), [(errno.ENOSPC, vbremote.TargetSpaceError),
                                                  (errno.EIO, vbremote.RestoreError)])
    def test_settings_write_failure_is_typed(self, scene71: Scene, monkeypatch: pytest.MonkeyPatch, code: int,
                                             error: type[vbremote.RestoreError]):
        """A failure writing the settings file is a RestoreError (TargetSpaceError when full), not an OSError."""
        archive = scene71.take()
        settings_file = scene71.host.vm("dev").settings_file

        real = vm_module._write_atomically

        def fail(path: Path, data: bytes) -> None:
            if path.suffix != ".vbox":
                return real(path, data)
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr(vm_module, "_write_atomically", fail)
        with pytest.raises(error) as caught:
            vbremote.Restorer(scene71.host, scene71.repo).restore(archive)
        assert type(caught.value) is error
        assert caught.value.path == str(settings_file)
        assert isinstance(caught.value.__cause__, OSError)

    def test_interrupted_restore_goes_on_in_the_vms_own_folder(self, scene71: Scene, tmp_path: Path):
        """target=None after an interrupted in-place restore (the VM unregistered) is the VM's own folder,
        also when it is not the default machine folder; once finished, the next default is as before."""
        scene = scene71
        archive = scene.take()
        restorer = vbremote.Restorer(scene.host, scene.repo)
        scene.host.unregister(scene.host.vm("dev"))
        elsewhere = tmp_path / "elsewhere"
        assert restorer.restore(archive, elsewhere).vm is not None  # the VM now lives outside the default folder

        class Stop(Exception):
            pass

        def fail(event: vbremote.Progress) -> None:
            if event.operation == "restore" and event.done > 0:
                raise Stop

        scene.sim.start("dev", workload=HOT)
        wait_writes(scene, 5)
        with pytest.raises(Stop):
            restorer.restore(archive, power_off=True, progress=fail)
        assert not any(vm.uuid == archive.vm_uuid for vm in scene.host.vms())
        assert restorer.plan(archive).target == elsewhere
        result = restorer.restore(archive)
        assert result.vm is not None
        assert result.vm.folder == elsewhere
        assert result.resumed
        scene.host.unregister(scene.host.vm("dev"))
        assert restorer.plan(archive).target == scene.host.default_machine_folder / "dev"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    with tmpfs(tmp_path / "small", "4m") as folder:
        yield folder


def rewritten(scene: Scene, archive: vbremote.ArchiveInfo, tmp_path: Path, **changes: object) -> vbremote.ArchiveInfo:
    """The same files in a new archive whose metadata differs (e.g. taken on another host)."""
    folder = tmp_path / f"extract-{archive.name}"
    folder.mkdir()
    scene.borg("extract", "--bypass-lock", f"{scene.transport.path}::{archive.name}", cwd=folder)
    specs = [vbremote.FileSpec(folder / f.path, f.path, f.role, medium=f.medium, parent=f.parent)
             for f in archive.files]
    metadata = attrs.evolve(archive.metadata, **changes)
    return scene.repo.write_archive(f"{archive.name}-moved", specs, metadata).archive


class TestPreflightMore:
    def test_no_space(self, scene71: Scene, small_fs: Path):
        """A target too small for what the restore writes is refused before any write."""
        archive = scene71.take()
        other = SimulatedVirtualBox(scene71.tmp_path / "other", version="7.1")
        try:
            restorer = vbremote.Restorer(vbremote.VirtualBoxHost.connect(manager=other.manager()), scene71.repo)
            codes = [p.code for p in restorer.plan(archive, small_fs / "dev").problems]
            assert codes == ["no-space"]
            with pytest.raises(vbremote.RestorePreflightFailed, match="no-space"):
                restorer.restore(archive, small_fs / "dev")
            assert list(small_fs.iterdir()) == []
        finally:
            other.close()

    def test_cpu_portability_from_another_host(self, scene71: Scene, tmp_path: Path):
        """A saved state from another host at portability level 0 needs cpu_portability_level= or discard_state."""
        scene71.sim.start("dev", workload=None)
        archive = rewritten(scene71, scene71.take(), tmp_path, host="another-host")
        restorer = vbremote.Restorer(scene71.host, scene71.repo)
        problems = restorer.plan(archive, power_off=True).problems
        assert [p.code for p in problems] == ["cpu-portability"]
        assert "cpu_portability_level=" in problems[0].remedy
        assert restorer.plan(archive, power_off=True, cpu_portability_level=1).problems == ()
        result = restorer.restore(archive, power_off=True, cpu_portability_level=1)
        assert result.vm is not None
        assert result.vm.state is vbremote.MachineState.SAVED
        assert result.vm.cpu_portability_level == 1


class TestOtherTools:
    def test_borg_cli_archive_of_vm_folder(self, tmp_path: Path, borg_cli: BorgCLI, base_dir: Path):
        """An archive the borg CLI made of a powered-off VM's folder (the PowerShell tool's way) restores onto
        another host and registers PoweredOff with the folder's disk."""
        sim = SimulatedVirtualBox(tmp_path / "vbox", version="7.1")
        other = SimulatedVirtualBox(tmp_path / "other", version="7.1")
        try:
            sim.create_vm("plain", disk_size=8 * MIB)
            content = sim.disk_content("plain")
            folder = sim.vms_folder / "plain"
            repo_path = tmp_path / "cli-repo"
            borg_cli("init", "-e", "repokey-blake2", str(repo_path))
            borg_cli("create", "-C", "lz4", f"{repo_path}::plain-2026.11.26-18.00.00-offline", ".", cwd=folder)
            host = vbremote.VirtualBoxHost.connect(manager=other.manager())
            with vbremote.Repository.open(vbremote.LocalTransport(repo_path), passphrase=PASSPHRASE,
                                          base_dir=base_dir) as repository:
                restorer = vbremote.Restorer(host, repository)
                plan = restorer.plan("plain-2026.11.26-18.00.00-offline")
                assert plan.source.foreign
                assert plan.problems == ()
                result = restorer.restore("plain-2026.11.26-18.00.00-offline")
            assert result.vm is not None
            assert result.vm.state is vbremote.MachineState.POWERED_OFF
            assert result.vm.folder == other.vms_folder / "plain"
            assert other.disk_content("plain") == content
        finally:
            sim.close()
            other.close()


class TestCheck:
    def test_inaccessible_medium_not_left_registered(self, scene71: Scene):
        """A restored VM that registers with a medium VirtualBox cannot open is unregistered again, with an error."""
        archive = scene71.take()
        folder = scene71.host.vm("dev").folder
        victim = folder / "_external" / "dev-disk2.vdi"

        def lose_disk(event: vbremote.Progress) -> None:
            if event.operation == "restore" and event.done == event.total and victim.exists():
                victim.unlink()

        with pytest.raises(vbremote.RestoreError, match="inaccessible") as caught:
            vbremote.Restorer(scene71.host, scene71.repo).restore(archive, verify="none", progress=lose_disk)
        assert caught.value.archive == archive.name
        assert not any(vm.uuid == archive.vm_uuid for vm in scene71.host.vms())


class TestKilled:
    def test_killed_restore_leaves_no_vm(self, tmp_path: Path, repo: vbremote.Repository, borg_cli: BorgCLI,
                                         transport: vbremote.LocalTransport, base_dir: Path):
        """SIGKILL of the restoring process while it writes: the VM is not registered; a re-run into the same
        folder completes."""
        scene = Scene(tmp_path, "7.1", repo, borg_cli, transport)
        scene.sim.start("dev", workload=HOT)
        archive, instant = take_recording(scene)
        wait_writes(scene, 20)
        scene.sim.power_off("dev")
        folder = scene.host.vm("dev").folder
        scene.close()
        repo.close()
        script = textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            import vbremote
            from vbremote.testing import SimulatedVirtualBox

            def stall(event):
                if event.operation == "restore" and event.done > 0:
                    print("WRITING", flush=True)
                    time.sleep(600)

            sim = SimulatedVirtualBox({str(tmp_path / "vbox")!r}, version="7.1")
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            with vbremote.Repository.open(vbremote.LocalTransport({str(transport.path)!r}),
                                          passphrase={PASSPHRASE!r}, base_dir={str(base_dir)!r}) as repo:
                vbremote.Restorer(host, repo).restore({archive.name!r}, progress=stall)
        """)
        killed_at(script, "WRITING")
        with SimulatedVirtualBox(tmp_path / "vbox", version="7.1") as sim:
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            assert not any(vm.uuid == archive.vm_uuid for vm in host.vms())
            # The killed run's borg worker (a session of its own) lets go of the lock once it sees its parent gone.
            with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir,
                                          lock_wait=60) as again:
                result = vbremote.Restorer(host, again).restore(archive.name, folder)
            assert result.resumed
            assert result.vm is not None
            assert result.vm.state is vbremote.MachineState.SAVED
            for port, content in instant.items():
                assert sim.disk_content("dev", port) == content


def files_and_times(folder: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (nanoseconds)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


class TestLocks:
    def test_held_vm_lock_refuses(self, scene71: Scene, tmp_path: Path):
        """While a snapshot run holds the VM's lock, a restore raises RestoreLocked at once: nothing written, the
        VM still registered."""
        scene = scene71
        archive = scene.take()
        folder = scene.host.vm("dev").folder
        before = files_and_times(folder)
        restorer = vbremote.Restorer(scene.host, scene.repo, state_dir=tmp_path / "state")
        with vm_lock(tmp_path / "state", archive.vm_uuid):
            started = time.monotonic()
            with pytest.raises(vbremote.RestoreLocked) as caught:
                restorer.restore(archive)
            assert time.monotonic() - started < 1
        assert caught.value.lock_file.endswith(f"{archive.vm_uuid}.lock")
        assert caught.value.archive == archive.name
        assert files_and_times(folder) == before
        assert scene.host.vm("dev").folder == folder

    def test_lock_wait(self, scene71: Scene, tmp_path: Path):
        """With lock_wait, a restore waits that long for a held lock before it gives up; a negative wait is refused."""
        scene = scene71
        archive = scene.take()
        restorer = vbremote.Restorer(scene.host, scene.repo, state_dir=tmp_path / "state", lock_wait=0.3)
        with vm_lock(tmp_path / "state", archive.vm_uuid):
            started = time.monotonic()
            with pytest.raises(vbremote.RestoreLocked):
                restorer.restore(archive)
            assert time.monotonic() - started >= 0.3
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.Restorer(scene.host, scene.repo, lock_wait=-1)

    def test_snapshot_refused_during_restore(self, scene71: Scene, tmp_path: Path):
        """A snapshot run of the VM while a restore plans (the VM still registered) is refused with
        SnapshotInProgress."""
        scene = scene71
        archive = scene.take()
        refused: list[str] = []

        def snapshot_meanwhile(event: vbremote.Progress) -> None:
            if event.operation == "hash" and not refused:
                with pytest.raises(vbremote.SnapshotInProgress) as caught:
                    scene.snapshotter.take(archive.vm_uuid)
                refused.append(str(caught.value))

        result = vbremote.Restorer(scene.host, scene.repo, state_dir=tmp_path / "state").restore(
            archive, progress=snapshot_meanwhile)
        assert refused
        assert "restore" in refused[0]
        assert result.vm is not None
        with vm_lock(tmp_path / "state", archive.vm_uuid):  # let go once the restore is done
            pass

    def test_second_restore_into_same_folder(self, scene71: Scene, tmp_path: Path):
        """A restore of another VM into a folder a restore is writing is refused with RestoreLocked."""
        scene = scene71
        scene.sim.create_vm("two", disk_size=4 * MIB)
        archive = scene.take()
        other = scene.snapshotter.take("two").archive
        scene.host.unregister("two")  # nothing else would stop a restore of it into dev's folder meanwhile
        folder = scene.host.vm("dev").folder
        restorer = vbremote.Restorer(scene.host, scene.repo, state_dir=tmp_path / "state")
        seen: list[dict[Path, tuple[int, int]]] = []

        def second(event: vbremote.Progress) -> None:
            if event.operation == "restore" and not seen:
                before = files_and_times(folder)
                with pytest.raises(vbremote.RestoreLocked) as caught:
                    restorer.restore(other, folder)
                assert "target folder" in str(caught.value)
                seen.append(files_and_times(folder))
                assert seen[0] == before

        restorer.restore(archive, progress=second)
        assert seen
        assert not (folder / "two.vbox").exists()


class TestStaleList:
    def test_not_followed_through_symlinks(self, tmp_path: Path):
        """A listed file that became a symlink, or lies under a folder that became one, is left with its target."""
        folder = tmp_path / "vm"
        outside = tmp_path / "outside"
        (folder / "Snapshots").mkdir(parents=True)
        outside.mkdir()
        (outside / "diff.vdi").write_bytes(b"outside")
        (outside / "dev.sav").write_bytes(b"outside")
        (folder / "gone.vdi").write_bytes(b"stale")
        (folder / "kept.vdi").write_bytes(b"kept")
        save_stale(folder, "u1", [folder / "Snapshots" / "diff.vdi", folder / "dev.sav", folder / "gone.vdi",
                                  folder / "kept.vdi"])
        (folder / "Snapshots").rmdir()
        (folder / "Snapshots").symlink_to(outside)
        (folder / "dev.sav").symlink_to(outside / "dev.sav")
        listed = load_stale(folder, "u1")
        assert listed == {folder / "Snapshots" / "diff.vdi", folder / "dev.sav", folder / "gone.vdi",
                          folder / "kept.vdi"}
        removed = remove_stale(folder, listed, keep={folder / "kept.vdi"})
        assert removed == (folder / "gone.vdi",)
        assert (outside / "diff.vdi").read_bytes() == b"outside"
        assert (outside / "dev.sav").read_bytes() == b"outside"
        assert (folder / "dev.sav").is_symlink()
        assert (folder / "kept.vdi").read_bytes() == b"kept"

    def test_hostile_entries_ignored(self, tmp_path: Path):
        """Entries that leave the folder, and lists of another VM or of an unknown version, name nothing."""
        folder = tmp_path / "vm"
        folder.mkdir()
        (tmp_path / "victim").write_bytes(b"x")
        name = f"{STALE_PREFIX}u1.json"
        (folder / name).write_text('{"version":1,"vm_uuid":"u1","files":["../victim","/etc/passwd","a/../b",""]}')
        assert load_stale(folder, "u1") == set()
        (folder / name).write_text('{"version":1,"vm_uuid":"u2","files":["x"]}')
        assert load_stale(folder, "u1") == set()
        (folder / name).write_text('{"version":9,"vm_uuid":"u1","files":["x"]}')
        assert load_stale(folder, "u1") == set()
        assert remove_stale(folder, {tmp_path / "victim", folder}, keep=set()) == ()
        assert (tmp_path / "victim").exists()

    def test_uuid_chooses_no_path(self, tmp_path: Path):
        """A VM uuid that is not one (an archive of another tool says what it likes) names a file in the folder."""
        folder = tmp_path / "a" / "vm"
        folder.mkdir(parents=True)
        save_stale(folder, "../../x", [folder / "f.vdi"])
        assert [p.parent for p in tmp_path.rglob("*.json")] == [folder]
        assert load_stale(folder, "../../x") == {folder / "f.vdi"}
        canonical = "0a1b2c3d-0000-4000-8000-000000000001"
        assert stale_name("{" + canonical.upper() + "}") == f"{STALE_PREFIX}{canonical}.json"


class TestStaleAfterKill:
    @pytest.mark.parametrize("point", ["settings-written", "registered"])
    def test_killed_then_rerun_removes_stale(self, point: str, tmp_path: Path, repo: vbremote.Repository,
                                             borg_cli: BorgCLI, transport: vbremote.LocalTransport, base_dir: Path):
        """SIGKILL right after the new settings are written, or right after they are registered: a re-run
        removes the old VM's stale files and lists them, but not one that became a symlink."""
        scene = Scene(tmp_path, "7.1", repo, borg_cli, transport)
        archive, folder, expected = stale_scene(scene)
        assert {p.suffix for p in expected} >= {".vdi", ".sav"}
        scene.close()
        repo.close()
        hook = ("vm_module._write_atomically = stall_after(vm_module._write_atomically)" if point == "settings-written"
                else "vbremote.VirtualBoxHost.register = stall_after(vbremote.VirtualBoxHost.register)")
        script = textwrap.dedent(f"""
            import time
            import vbremote
            import vbremote._restorer._vm as vm_module
            from vbremote.testing import SimulatedVirtualBox

            def stall_after(step):
                def stalled(*args, **kwargs):
                    done = step(*args, **kwargs)
                    if {point!r} == "registered" or str(args[0]).endswith(".vbox"):  # the settings, no other file
                        print("KILLPOINT", flush=True)
                        time.sleep(600)
                    return done
                return stalled

            {hook}
            sim = SimulatedVirtualBox({str(tmp_path / "vbox")!r}, version="7.1")
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            with vbremote.Repository.open(vbremote.LocalTransport({str(transport.path)!r}),
                                          passphrase={PASSPHRASE!r}, base_dir={str(base_dir)!r}) as repo:
                vbremote.Restorer(host, repo).restore({archive.name!r}, {str(folder)!r})
        """)
        killed_at(script, "KILLPOINT")
        assert all(p.exists() for p in expected)  # killed before it removed anything
        assert any(p.name.startswith(STALE_PREFIX) for p in folder.iterdir())
        # A listed file replaced by a symlink meanwhile: neither it nor what it points to is removed.
        saved = min(p for p in expected if p.suffix == ".sav")
        outside = tmp_path / "outside.sav"
        outside.write_bytes(b"not the VM's")
        saved.unlink()
        saved.symlink_to(outside)
        expected.remove(saved)
        with SimulatedVirtualBox(tmp_path / "vbox", version="7.1") as sim:
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            assert any(vm.uuid == archive.vm_uuid for vm in host.vms()) == (point == "registered")
            with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir,
                                          lock_wait=60) as again:
                result = vbremote.Restorer(host, again).restore(archive.name, folder)
            assert set(result.removed) == expected
            assert not any(p.exists() for p in expected)
            assert saved.is_symlink()
            assert outside.read_bytes() == b"not the VM's"
            assert all((folder / f.path).exists() for f in archive.files)
            assert not any(p.name.startswith(STALE_PREFIX) for p in folder.iterdir())
            assert result.vm is not None
            assert [s.name for s in result.vm.snapshots()] == []


def insert_iso(scene: Scene, name: str = "install.iso") -> Path:
    """A DVD image outside the VM folder (as an installer ISO is), inserted into the VM's DVD drive."""
    iso = scene.tmp_path / "isos" / name
    iso.parent.mkdir(exist_ok=True)
    iso.write_bytes(name.encode() * 512)
    scene.sim.insert_image("dev", iso)
    return iso


def mtimes(*folders: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*") if p.is_file()}


def dvd(attachments: tuple[vbremote.DiskAttachment, ...]) -> vbremote.DiskAttachment:
    (drive,) = [a for a in attachments if a.type == "DVD"]
    return drive


class TestImages:
    def test_missing_image_refused_in_place_before_any_write(self, scene71: Scene, caplog: pytest.LogCaptureFixture):
        """A DVD image gone since the snapshot: plan names it and its drive; restore refuses, writes nothing and
        leaves the VM registered as it was."""
        iso = insert_iso(scene71)
        archive = scene71.take()
        scene71.sim.start("dev", workload=HOT)
        wait_writes(scene71, 5)
        scene71.sim.power_off("dev")
        iso.unlink()
        restorer = vbremote.Restorer(scene71.host, scene71.repo)
        (problem,) = restorer.plan(archive).problems
        assert problem.code == "image-missing"
        assert str(iso) in problem.message
        assert "DVD drive SATA port 2 device 0 of the current state" in problem.message
        assert "eject_missing_images=True" in problem.remedy
        assert str(iso) in problem.remedy
        folder = scene71.host.vm("dev").folder
        before = mtimes(folder, scene71.tmp_path / "elsewhere")
        with pytest.raises(vbremote.RestorePreflightFailed, match="image-missing") as caught:
            restorer.restore(archive)
        assert [p.code for p in caught.value.problems] == ["image-missing"]
        assert mtimes(folder, scene71.tmp_path / "elsewhere") == before
        assert scene71.host.vm("dev").state is vbremote.MachineState.POWERED_OFF

    def test_missing_image_on_another_host_nothing_written(self, scene71: Scene, tmp_path: Path):
        """Onto another host without the image: refused, the target folder is never made, no VM registered."""
        iso = insert_iso(scene71)
        archive = scene71.take()
        iso.unlink()
        other = SimulatedVirtualBox(tmp_path / "other", version="7.1")
        try:
            host = vbremote.VirtualBoxHost.connect(manager=other.manager())
            with pytest.raises(vbremote.RestorePreflightFailed, match="image-missing"):
                vbremote.Restorer(host, scene71.repo).restore(archive)
            assert not (other.vms_folder / "dev").exists()
            assert host.vms() == ()
        finally:
            other.close()

    def test_image_present_restores_attached(self, scene71: Scene, tmp_path: Path):
        """With the image where the settings say, outside the VM folder: a host reference (the guest reads a host
        file); allowed, the VM registers with the image in its drive. An image inside the folder is none."""
        iso = insert_iso(scene71)
        archive = scene71.take()
        other = SimulatedVirtualBox(tmp_path / "other", version="7.1")
        try:
            restorer = vbremote.Restorer(vbremote.VirtualBoxHost.connect(manager=other.manager()), scene71.repo)
            (problem,) = restorer.plan(archive).problems
            assert problem.code == "host-reference"
            assert str(iso) in problem.message
            assert "DVD image" in problem.message
            with pytest.raises(vbremote.RestorePreflightFailed):
                restorer.restore(archive)
            assert restorer.plan(archive, target=iso.parent).problems == ()  # the image inside the target folder
            assert restorer.plan(archive, allow_host_references=True).problems == ()
            result = restorer.restore(archive, allow_host_references=True)
            assert result.vm is not None
            assert result.ejected == ()
            (image,) = dvd(result.vm.attachments).chain
            assert image.location == iso
            assert image.accessible
        finally:
            other.close()

    def test_eject_restores_empty_drives(self, scene: Scene, tmp_path: Path, caplog: pytest.LogCaptureFixture):
        """eject_missing_images: the VM registers Saved as archived with an empty drive, in its user snapshot too;
        each ejection is listed and logged, the image leaves the settings."""
        iso = insert_iso(scene)
        scene.host.take_snapshot("dev", "first")
        scene.sim.start("dev", workload=HOT)
        archive = scene.take()
        assert archive.mode is vbremote.SnapshotMode.ONLINE
        iso.unlink()
        other = SimulatedVirtualBox(tmp_path / "other", version=scene.profile)
        try:
            host = vbremote.VirtualBoxHost.connect(manager=other.manager())
            restorer = vbremote.Restorer(host, scene.repo)
            plan = restorer.plan(archive, eject_missing_images=True)
            assert plan.problems == ()
            caplog.set_level("WARNING", logger="vbremote.restore")
            result = restorer.restore(archive, eject_missing_images=True)
            assert result.ejected == plan.ejected
            assert [(d.image, d.kind, d.port, d.snapshot) for d in result.ejected] == [
                (iso, "DVD", 2, None), (iso, "DVD", 2, "first")]
            logged = [r.getMessage() for r in caplog.records if r.name == "vbremote.restore"]
            assert sum(str(iso) in m and "restored empty" in m for m in logged) == 2
            vm = result.vm
            assert vm is not None
            assert vm.state is vbremote.MachineState.SAVED
            assert dvd(vm.attachments).chain == ()
            assert vm.snapshot_tree is not None
            assert vm.snapshot_tree.name == "first"
            assert dvd(vm.snapshot_tree.attachments).chain == ()
            assert parse_settings(result.settings_file.read_bytes()).images == ()
            host.start("dev")
            assert host.state("dev") is vbremote.MachineState.RUNNING
        finally:
            other.close()

    def test_missing_in_user_snapshot_only(self, scene71: Scene, tmp_path: Path):
        """An image only a user snapshot attaches (the current drive holds another, present): the problem names the
        snapshot's drive; ejecting empties that drive only and keeps the present image attached."""
        old = insert_iso(scene71, "old.iso")
        scene71.host.take_snapshot("dev", "with-old")
        new = insert_iso(scene71, "new.iso")
        archive = scene71.take()
        old.unlink()
        other = SimulatedVirtualBox(tmp_path / "other", version="7.1")
        try:
            restorer = vbremote.Restorer(vbremote.VirtualBoxHost.connect(manager=other.manager()), scene71.repo)
            # The present image outside the folder is a host reference, allowed here.
            (problem,) = restorer.plan(archive, allow_host_references=True).problems
            assert problem.code == "image-missing"
            assert str(old) in problem.message
            assert str(new) not in problem.message
            assert "of snapshot 'with-old'" in problem.message
            assert "current state" not in problem.message
            with pytest.raises(vbremote.RestorePreflightFailed):
                restorer.restore(archive, allow_host_references=True)
            assert not (other.vms_folder / "dev").exists()
            result = restorer.restore(archive, eject_missing_images=True, allow_host_references=True)
            assert [(d.image, d.snapshot) for d in result.ejected] == [(old, "with-old")]
            assert result.vm is not None
            assert result.vm.state is vbremote.MachineState.POWERED_OFF
            (image,) = dvd(result.vm.attachments).chain
            assert image.location == new
            assert image.accessible
            assert result.vm.snapshot_tree is not None
            assert dvd(result.vm.snapshot_tree.attachments).chain == ()
            assert [i.location for i in parse_settings(result.settings_file.read_bytes()).images] == [str(new)]
        finally:
            other.close()
