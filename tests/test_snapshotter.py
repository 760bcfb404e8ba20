"""The Snapshotter on the simulated VirtualBox and real borg repositories.

Each run is checked from the outside: the VM's state and snapshot tree
afterwards, the archive as the borg CLI extracts it, and the extracted VM
registered on a fresh simulated host (as ``VBoxManage registervm`` would),
without vbremote's help.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid as uuid_module
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import BorgCLI

import vbremote
from vbremote._models import decode_comment
from vbremote._restorer._checks import settings_references
from vbremote._settings import parse_settings, relocate
from vbremote._snapshotter._collect import anchor_images, collect
from vbremote.testing import MIB, VIRTUALBOX_PROFILES, Fault, GuestWorkload, SimulatedVirtualBox, Timing

# The modes run on two profiles (the oldest and a current one); refusals,
# failures and the consistency under writes on every profile.
PROFILES = ["6.1", "7.1"]
HOT = GuestWorkload(rate=400, write_size=64 * 1024, pattern="hot", seed=3)


class Scene:
    """A simulated host with one VM ("dev": EFI, two 8 MiB disks, the second outside the VM folder)."""

    def __init__(self, tmp_path: Path, profile: str, repo: vbremote.Repository, borg: BorgCLI,
                 transport: vbremote.LocalTransport, *, unlock_delay: float = 0.05, disks: int = 2,
                 snapshot_seconds: float = 0.05) -> None:
        self.tmp_path = tmp_path
        self.profile = profile
        self.sim = SimulatedVirtualBox(tmp_path / "vbox", version=profile,
                                       timing=Timing(unlock_delay=unlock_delay, snapshot=snapshot_seconds))
        self.sim.create_vm("dev", disk_size=8 * MIB, disks=disks, firmware="EFI",
                           external_disk_folder=tmp_path / "elsewhere")
        self.host = vbremote.VirtualBoxHost.connect(manager=self.sim.manager(),
                                                    lock_retry=vbremote.LockRetry(total=0.3))
        self.repo = repo
        self.borg = borg
        self.transport = transport
        self.snapshotter = vbremote.Snapshotter(self.host, repo, state_dir=tmp_path / "state")

    def close(self) -> None:
        self.sim.close()

    def transient_snapshots(self) -> list[vbremote.SnapshotInfo]:
        return [s for s in self.host.vm("dev").snapshots() if s.name.startswith(vbremote.TRANSIENT_PREFIX)]

    def borg_archives(self) -> list[str]:
        return self.borg("list", "--bypass-lock", "--short", str(self.transport.path)).split()

    def extract(self, archive: vbremote.ArchiveInfo, into: Path) -> Path:
        """Extract with the borg CLI into an empty folder; returns the folder."""
        into.mkdir(parents=True)
        self.borg("extract", "--bypass-lock", f"{self.transport.path}::{archive.name}", cwd=into)
        return into

    def restore_elsewhere(self, archive: vbremote.ArchiveInfo, name: str = "restored"
                          ) -> tuple[SimulatedVirtualBox, vbremote.VirtualBoxHost, vbremote.VMInfo, Path]:
        """Extract the archive and register it on a fresh simulated host (another home folder)."""
        folder = self.extract(archive, self.tmp_path / name / "dev")
        other = SimulatedVirtualBox(self.tmp_path / name / "vbox", version=self.profile)
        host = vbremote.VirtualBoxHost.connect(manager=other.manager())
        info = host.register(folder / "dev.vbox")
        return other, host, info, folder


@pytest.fixture(params=PROFILES)
def scene(request: pytest.FixtureRequest, tmp_path: Path, repo: vbremote.Repository, borg_cli: BorgCLI,
          transport: vbremote.LocalTransport) -> Iterator[Scene]:
    made = Scene(tmp_path, request.param, repo, borg_cli, transport)
    yield made
    made.close()


@pytest.fixture(params=VIRTUALBOX_PROFILES)
def every_scene(request: pytest.FixtureRequest, tmp_path: Path, repo: vbremote.Repository, borg_cli: BorgCLI,
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


def instant_contents(scene: Scene) -> dict[int, bytes]:
    """What the guest had written to each disk at the transient snapshot's instant, as the simulator recorded it.

    Asked during the run (the simulator forgets an instant when its snapshot
    is deleted); the frozen images must read back as this.
    """
    (snapshot,) = scene.transient_snapshots()
    ports = [a.port for a in snapshot.attachments if a.type == "HardDisk"]
    return {port: scene.sim.guest_content_at("dev", snapshot.uuid, port) for port in ports}


def on_first(operation: str, action: Callable[[vbremote.Progress], None]) -> Callable[[vbremote.Progress], None]:
    """A progress callback that runs ``action`` once, at the first event of ``operation``."""
    fired = False

    def callback(event: vbremote.Progress) -> None:
        nonlocal fired
        if event.operation == operation and not fired:
            fired = True
            action(event)

    return callback


class TestModes:
    def test_running_vm_online(self, scene: Scene):
        """A running VM gets an online snapshot: it keeps running, and no transient snapshot stays."""
        scene.sim.start("dev", workload=HOT)
        result = scene.snapshotter.take("dev", labels={"before-upgrade"})
        assert result.mode is vbremote.SnapshotMode.ONLINE
        assert result.vm_state is vbremote.MachineState.RUNNING
        assert scene.host.state("dev") is vbremote.MachineState.RUNNING
        assert scene.host.vm("dev").snapshots() == ()
        assert result.archive.metadata.labels == {"before-upgrade"}
        assert result.archive.metadata.mode is vbremote.SnapshotMode.ONLINE
        assert scene.borg_archives() == [result.archive.name]
        assert result.archive.name.startswith("dev-")
        assert result.archive.name.endswith("-online")
        for port in (0, 1):
            assert scene.sim.disk_matches_guest("dev", port)

    @pytest.mark.parametrize("profile", PROFILES)
    def test_running_vm_snapshot_is_live(self, profile: str, tmp_path: Path, repo: vbremote.Repository,
                                         borg_cli: BorgCLI, transport: vbremote.LocalTransport):
        """A running VM's snapshot is live: VirtualBox is LiveSnapshotting, not pausing the VM, while it is taken."""
        scene = Scene(tmp_path, profile, repo, borg_cli, transport, snapshot_seconds=0.5)
        try:
            scene.sim.start("dev", workload=HOT)
            states = []

            def watch(event: vbremote.Progress) -> None:
                if event.operation == "snapshot":
                    states.append(scene.host.state("dev"))

            scene.snapshotter.take("dev", progress=watch)
            assert vbremote.MachineState.LIVE_SNAPSHOTTING in states
            assert vbremote.MachineState.ONLINE_SNAPSHOTTING not in states
        finally:
            scene.close()

    def test_archive_contents(self, scene: Scene):
        """An online archive holds the settings, both disks (the outside one under _external), the state, the NVRAM."""
        scene.sim.start("dev", workload=HOT)
        result = scene.snapshotter.take("dev")
        roles = {f.path: f.role for f in result.archive.files}
        assert roles.pop("dev.vbox") is vbremote.FileRole.SETTINGS
        assert roles.pop("dev.vdi") is vbremote.FileRole.DISK
        assert roles.pop("_external/dev-disk2.vdi") is vbremote.FileRole.DISK
        # The instant's own copies of the saved state and the NVRAM (VirtualBox copies the NVRAM per snapshot).
        by_role = {role: path for path, role in roles.items()}
        assert len(by_role) == len(roles) == 2
        assert by_role[vbremote.FileRole.STATE].startswith("Snapshots/")
        assert by_role[vbremote.FileRole.STATE].endswith(".sav")
        assert by_role[vbremote.FileRole.NVRAM].startswith("Snapshots/")
        assert by_role[vbremote.FileRole.NVRAM].endswith(".nvram")
        where = f"{scene.transport.path}::{result.archive.name}"
        listed = scene.borg("list", "--bypass-lock", "--format", "{path}{NL}", where)
        assert set(listed.split()) == {f.path for f in result.archive.files}
        metadata = result.archive.metadata
        assert metadata.external == {"_external/dev-disk2.vdi": str(scene.tmp_path / "elsewhere" / "dev-disk2.vdi")}
        assert metadata.taken == result.archive.time
        disks = {d.port: d.base for d in scene.host.vm("dev").disks}
        for port, path in ((0, "dev.vdi"), (1, "_external/dev-disk2.vdi")):
            stored = result.archive.file(path)
            assert (stored.medium, stored.parent) == (disks[port].uuid, None)
        assert result.archive.file("dev.vbox").medium is None
        # The comment as borg itself shows it reads back as the same metadata and files.
        info = json.loads(scene.borg("info", "--bypass-lock", "--json", where))
        decoded = decode_comment(info["archives"][0]["comment"])
        assert decoded == (metadata, result.archive.files)
        assert result.archive.metadata.vbox_version == scene.host.version
        assert result.stats.bytes_read == sum(f.size for f in result.archive.files)
        assert result.stats.seconds_transient >= result.stats.seconds_archive > 0

    def test_paused_vm_stays_paused(self, scene: Scene):
        """A paused VM gets an online snapshot taken with pause=true and stays paused."""
        scene.sim.start("dev", workload=HOT)
        mgr = scene.sim.manager()
        vbox = mgr.getVirtualBox()
        session = mgr.getSessionObject(vbox)
        vbox.findMachine("dev").lockMachine(session, mgr.constants.LockType_Shared)
        try:
            session.console.pause()
        finally:
            session.unlockMachine()
        result = scene.snapshotter.take("dev")
        assert result.mode is vbremote.SnapshotMode.ONLINE
        assert scene.host.state("dev") is vbremote.MachineState.PAUSED
        assert any(f.role is vbremote.FileRole.STATE for f in result.archive.files)
        assert scene.transient_snapshots() == []

    def test_powered_off_vm_offline(self, scene: Scene):
        """A powered-off VM gets an offline snapshot: no saved state, the VM stays off; it restores PoweredOff."""
        result = scene.snapshotter.take("dev")
        assert result.mode is vbremote.SnapshotMode.OFFLINE
        assert scene.host.state("dev") is vbremote.MachineState.POWERED_OFF
        assert not any(f.role is vbremote.FileRole.STATE for f in result.archive.files)
        other, _, info, _ = scene.restore_elsewhere(result.archive)
        with other:
            assert info.state is vbremote.MachineState.POWERED_OFF
            assert other.disk_content("dev", 0) == scene.sim.disk_content("dev", 0)

    def test_saved_vm_offline_keeps_the_state(self, scene71: Scene):
        """A saved VM gets an offline snapshot that holds its saved state; it restores Saved."""
        scene71.sim.start("dev", workload=HOT)
        scene71.host.save_state("dev")
        result = scene71.snapshotter.take("dev")
        assert result.mode is vbremote.SnapshotMode.OFFLINE
        assert scene71.host.state("dev") is vbremote.MachineState.SAVED
        assert any(f.role is vbremote.FileRole.STATE for f in result.archive.files)
        other, _, info, _ = scene71.restore_elsewhere(result.archive)
        with other:
            assert info.state is vbremote.MachineState.SAVED

    def test_migrate_leaves_the_vm_saved(self, scene: Scene):
        """migrate saves a running VM's state, archives it and leaves it Saved; the archive resumes elsewhere."""
        scene.sim.start("dev", workload=HOT)
        result = scene.snapshotter.take("dev", "migrate")
        assert result.mode is vbremote.SnapshotMode.MIGRATE
        assert result.vm_state is vbremote.MachineState.SAVED
        assert scene.host.state("dev") is vbremote.MachineState.SAVED
        assert scene.transient_snapshots() == []
        assert result.archive.name.endswith("-migrate")
        other, host, info, _ = scene.restore_elsewhere(result.archive)
        with other:
            assert info.state is vbremote.MachineState.SAVED
            for port in (0, 1):
                assert other.disk_content("dev", port) == scene.sim.disk_content("dev", port)
            host.start("dev")
            assert host.state("dev") is vbremote.MachineState.RUNNING

    def test_migrate_of_a_stopped_vm_is_offline(self, scene71: Scene):
        """migrate on a VM that is not running is an offline snapshot."""
        result = scene71.snapshotter.take("dev", vbremote.SnapshotMode.MIGRATE)
        assert result.mode is vbremote.SnapshotMode.OFFLINE
        assert scene71.host.state("dev") is vbremote.MachineState.POWERED_OFF

    def test_two_snapshots_in_one_second_get_two_names(self, scene71: Scene):
        """A second archive whose template name is taken gets a -2 suffix."""
        template = "{vm}-{mode}"
        snapshotter = vbremote.Snapshotter(scene71.host, scene71.repo, name_template=template,
                                           state_dir=scene71.tmp_path / "state")
        first = snapshotter.take("dev")
        second = snapshotter.take("dev")
        assert (first.archive.name, second.archive.name) == ("dev-offline", "dev-offline-2")
        assert second.stats.bytes_new < first.stats.bytes_new


class TestRefusals:
    def test_wrong_state_for_the_mode(self, every_scene: Scene):
        """online of a powered-off VM, offline of a running one: InvalidVMState naming the state; nothing written."""
        with pytest.raises(vbremote.InvalidVMState) as info:
            every_scene.snapshotter.take("dev", "online")
        assert info.value.state is vbremote.MachineState.POWERED_OFF
        every_scene.sim.start("dev", workload=HOT)
        with pytest.raises(vbremote.InvalidVMState) as info:
            every_scene.snapshotter.take("dev", "offline")
        assert info.value.state is vbremote.MachineState.RUNNING
        assert every_scene.repo.archives() == []
        assert every_scene.host.vm("dev").snapshots() == ()

    def test_bad_arguments(self, scene71: Scene):
        """A bad mode, label or name template is a ConfigurationError before anything happens."""
        with pytest.raises(vbremote.ConfigurationError):
            scene71.snapshotter.take("dev", "sideways")  # type: ignore[arg-type]
        with pytest.raises(vbremote.ConfigurationError):
            scene71.snapshotter.take("dev", labels={""})
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.Snapshotter(scene71.host, scene71.repo, name_template="{vm}/{nope}")
        assert scene71.host.vm("dev").snapshots() == ()

    def test_transient_state_refused(self, every_scene: Scene):
        """A VM in a transient state (another snapshot under way) is refused with InvalidVMState; nothing written."""
        every_scene.sim.start("dev", workload=HOT)
        mgr = every_scene.sim.manager()
        vbox = mgr.getVirtualBox()
        session = mgr.getSessionObject(vbox)
        vbox.findMachine("dev").lockMachine(session, mgr.constants.LockType_Shared)
        try:
            every_scene.sim.inject("dev", Fault.HANG)
            progress, _ = session.machine.takeSnapshot("someone else's", "", False)
            with pytest.raises(vbremote.InvalidVMState) as info:
                every_scene.snapshotter.take("dev")
            assert info.value.state is vbremote.MachineState.LIVE_SNAPSHOTTING
            progress.cancel()
            progress.waitForCompletion(5000)
        finally:
            session.unlockMachine()
        assert every_scene.repo.archives() == []
        assert every_scene.host.vm("dev").snapshots() == ()

    def test_snapshot_fails_for_lack_of_space(self, every_scene: Scene):
        """VirtualBox failing the take (no space for the differencing image): its typed error, nothing written."""
        every_scene.sim.start("dev", workload=HOT)
        every_scene.sim.inject("dev", Fault.NO_SPACE)
        with pytest.raises(vbremote.VirtualBoxOperationFailed, match="VERR_DISK_FULL") as info:
            every_scene.snapshotter.take("dev")
        assert info.value.snapshot_id is not None
        assert every_scene.host.vm("dev").snapshots() == ()
        assert every_scene.host.state("dev") is vbremote.MachineState.RUNNING
        assert every_scene.borg_archives() == []

    def test_missing_file_named_by_the_settings(self, scene71: Scene):
        """A saved state the settings name is gone: SnapshotError naming it, snapshot deleted, nothing written."""
        scene71.sim.start("dev", workload=HOT)
        user = scene71.host.take_snapshot("dev", "user")
        assert user.state_file is not None
        user.state_file.unlink()
        with pytest.raises(vbremote.SnapshotError, match=user.state_file.name):
            scene71.snapshotter.take("dev")
        assert [s.name for s in scene71.host.vm("dev").snapshots()] == ["user"]
        assert scene71.borg_archives() == []

    @pytest.mark.parametrize("profile", VIRTUALBOX_PROFILES)
    def test_locked_vm(self, profile: str, tmp_path: Path, repo: vbremote.Repository, borg_cli: BorgCLI,
                       transport: vbremote.LocalTransport):
        """A VM VirtualBox keeps locked (being unlocked after a power-off) raises VMLocked; nothing is written."""
        scene = Scene(tmp_path, profile, repo, borg_cli, transport, unlock_delay=3.0)
        try:
            scene.sim.start("dev", workload=HOT)
            scene.sim.power_off("dev")
            with pytest.raises(vbremote.VMLocked):
                scene.snapshotter.take("dev")
            assert scene.repo.archives() == []
            assert scene.host.vm("dev").snapshots() == ()
        finally:
            scene.close()


class TestTransientSnapshot:
    def test_description_says_what_made_it(self, scene71: Scene):
        """The transient snapshot carries the reserved prefix and a description naming vbremote and the run."""
        seen: list[vbremote.SnapshotInfo] = []
        scene71.snapshotter.take("dev", progress=on_first("archive", lambda _: seen.extend(
            scene71.transient_snapshots())))
        (snapshot,) = seen
        assert snapshot.name.startswith(vbremote.TRANSIENT_PREFIX)
        run = snapshot.name.removeprefix(vbremote.TRANSIENT_PREFIX)
        assert "vbremote" in snapshot.description
        assert run in snapshot.description
        assert str(os.getpid()) in snapshot.description

    def test_leftovers_removed_and_reported(self, scene: Scene):
        """Transient snapshots of crashed runs are deleted first and reported; user snapshots stay."""
        scene.host.take_snapshot("dev", "user")
        scene.sim.start("dev", workload=HOT)
        crashed = scene.host.take_snapshot("dev", vbremote.TRANSIENT_PREFIX + "crashed")
        result = scene.snapshotter.take("dev")
        assert [s.uuid for s in result.leftovers] == [crashed.uuid]
        assert [s.name for s in scene.host.vm("dev").snapshots()] == ["user"]
        assert scene.host.state("dev") is vbremote.MachineState.RUNNING
        for port in (0, 1):
            assert scene.sim.disk_matches_guest("dev", port)

    def test_repository_dies_mid_archive(self, every_scene: Scene):
        """The repository's worker killed mid-archive: a RepositoryError, the snapshot deleted, nothing committed."""
        every_scene.sim.start("dev", workload=HOT)
        pid = every_scene.repo._worker._process.pid

        def kill(_: vbremote.Progress) -> None:
            os.kill(pid, signal.SIGKILL)

        with pytest.raises(vbremote.RepositoryError):
            every_scene.snapshotter.take("dev", progress=on_first("archive", kill))
        assert every_scene.host.vm("dev").snapshots() == ()
        assert every_scene.host.state("dev") is vbremote.MachineState.RUNNING
        assert every_scene.borg_archives() == []
        every_scene.borg("check", str(every_scene.transport.path))

    def test_callback_cancels_mid_archive(self, scene71: Scene):
        """A progress callback raising mid-archive cancels: its error, the snapshot deleted, nothing committed."""
        class Stop(Exception):
            pass

        def stop(_: vbremote.Progress) -> None:
            raise Stop

        with pytest.raises(Stop):
            scene71.snapshotter.take("dev", progress=on_first("archive", stop))
        assert scene71.host.vm("dev").snapshots() == ()
        assert scene71.borg_archives() == []
        # The repository stays usable: the next run commits.
        result = scene71.snapshotter.take("dev")
        assert scene71.borg_archives() == [result.archive.name]

    def test_interrupt_during_the_archive(self, scene71: Scene):
        """Ctrl-C while the files are read: the snapshot is deleted, nothing committed, the guest runs on."""
        scene71.sim.start("dev", workload=HOT)

        def interrupt(_: vbremote.Progress) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            scene71.snapshotter.take("dev", progress=on_first("archive", interrupt))
        assert scene71.host.vm("dev").snapshots() == ()
        assert scene71.host.state("dev") is vbremote.MachineState.RUNNING
        assert scene71.borg_archives() == []
        for port in (0, 1):
            assert scene71.sim.disk_matches_guest("dev", port)

    def test_interrupt_during_the_take(self, scene71: Scene):
        """A KeyboardInterrupt while the snapshot is being taken still deletes the snapshot it made."""
        scene71.sim.start("dev", workload=HOT)
        events = 0

        def interrupt(event: vbremote.Progress) -> None:
            nonlocal events
            if event.operation == "snapshot":
                events += 1
                if events == 2:  # VirtualBox's first progress report: the take is under way or done
                    raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            scene71.snapshotter.take("dev", progress=interrupt)
        assert events == 2
        assert scene71.host.vm("dev").snapshots() == ()
        assert scene71.host.state("dev") is vbremote.MachineState.RUNNING
        assert scene71.borg_archives() == []

    def test_merge_failure_leaves_archive_and_names_the_snapshot(self, every_scene: Scene):
        """A failed delete raises TransientSnapshotLeft after the commit; the next run removes the snapshot."""
        every_scene.sim.start("dev", workload=HOT)
        every_scene.sim.inject("dev", Fault.MERGE_FAILURE)
        with pytest.raises(vbremote.TransientSnapshotLeft) as info:
            every_scene.snapshotter.take("dev")
        error = info.value
        assert error.archive is not None
        assert every_scene.borg_archives() == [error.archive.name]
        (left,) = every_scene.transient_snapshots()
        assert error.snapshot == left.uuid
        assert error.snapshot_name == left.name
        assert left.uuid in str(error)
        assert "next snapshot run deletes it" in str(error)
        result = every_scene.snapshotter.take("dev")
        assert [s.uuid for s in result.leftovers] == [left.uuid]
        assert every_scene.host.vm("dev").snapshots() == ()
        for port in (0, 1):
            assert every_scene.sim.disk_matches_guest("dev", port)

    def test_vm_crash_after_take(self, every_scene: Scene):
        """The VM crashing right after the take: the instant is archived, the result says the VM is Aborted."""
        every_scene.sim.start("dev", workload=HOT)
        every_scene.sim.inject("dev", Fault.VM_CRASH_AFTER_TAKE)
        result = every_scene.snapshotter.take("dev")
        assert result.mode is vbremote.SnapshotMode.ONLINE
        assert result.vm_state is vbremote.MachineState.ABORTED
        assert every_scene.host.vm("dev").snapshots() == ()
        other, _, info, _ = every_scene.restore_elsewhere(result.archive)
        with other:
            assert info.state is vbremote.MachineState.SAVED


class TestLock:
    def test_second_run_refused_while_the_first_runs(self, scene71: Scene):
        """A second run on a VM whose first run is under way raises SnapshotInProgress at once."""
        inside = threading.Event()
        release = threading.Event()
        outcome: list[object] = []

        def hold(_: vbremote.Progress) -> None:
            inside.set()
            release.wait(30)

        def first() -> None:
            try:
                outcome.append(scene71.snapshotter.take("dev", progress=on_first("archive", hold)))
            except BaseException as exc:  # reported to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=first)
        thread.start()
        try:
            assert inside.wait(30)
            other = vbremote.Snapshotter(scene71.host, scene71.repo, state_dir=scene71.tmp_path / "state")
            started = time.monotonic()
            with pytest.raises(vbremote.SnapshotInProgress) as info:
                other.take("dev")
            assert time.monotonic() - started < 2.0  # at once: no lock_wait was given
            assert info.value.lock_file.endswith(".lock")
            assert len(scene71.transient_snapshots()) == 1  # the first run's, untouched
        finally:
            release.set()
            thread.join(60)
        (result,) = outcome
        assert isinstance(result, vbremote.SnapshotResult)

    def test_waiting_run_goes_after_the_first(self, tmp_path: Path, scene71: Scene):
        """With lock_wait, a second run waits for the first, then runs and finds no leftover of it."""
        inside = threading.Event()
        release = threading.Event()
        outcome: list[object] = []

        def hold(_: vbremote.Progress) -> None:
            inside.set()
            release.wait(30)

        def first() -> None:
            try:
                outcome.append(scene71.snapshotter.take("dev", progress=on_first("archive", hold)))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=first)
        thread.start()
        assert inside.wait(30)
        second = vbremote.Snapshotter(scene71.host, scene71.repo, state_dir=tmp_path / "state", lock_wait=30)
        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        result = second.take("dev")
        assert time.monotonic() - started >= 0.4
        thread.join(60)
        assert result.leftovers == ()
        assert isinstance(outcome[0], vbremote.SnapshotResult)
        assert scene71.host.vm("dev").snapshots() == ()


# Run in a child process: snapshot the VM and die by SIGKILL in the middle of the archive.
_CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import vbremote
    from vbremote.testing import SimulatedVirtualBox

    home, repo_path, base_dir, state_dir = (Path(a) for a in sys.argv[1:5])
    sim = SimulatedVirtualBox(home, version="7.1")
    host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
    repo = vbremote.Repository.open(vbremote.LocalTransport(repo_path), passphrase=os.environ["PASSPHRASE"],
                                    base_dir=base_dir)

    def die(event):
        # The whole run dies at once, its borg worker too (as when a service's process group is killed).
        if event.operation == "archive" and event.done > 0:
            worker = repo._worker._process
            worker.kill()
            worker.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    vbremote.Snapshotter(host, repo, state_dir=state_dir).take("dev", progress=die)
""")


class TestCrash:
    def test_killed_run_leaves_a_leftover_the_next_run_removes(self, tmp_path: Path, base_dir: Path,
                                                                borg_cli: BorgCLI):
        """A run killed mid-archive leaves its lock free, nothing committed, and a leftover the next run removes."""
        home = tmp_path / "vbox"
        with SimulatedVirtualBox(home, version="7.1") as sim:
            sim.create_vm("dev", disk_size=8 * MIB, firmware="EFI")
        transport = vbremote.LocalTransport(tmp_path / "repo")
        vbremote.Repository.init(transport, passphrase=borg_cli.passphrase, base_dir=base_dir).close()
        env = {**os.environ, "PASSPHRASE": borg_cli.passphrase,
               "PYTHONPATH": os.pathsep.join([str(Path(vbremote.__file__).parent.parent),
                                              os.environ.get("PYTHONPATH", "")])}
        child = subprocess.run(
            [sys.executable, "-c", _CRASHING_RUN, str(home), str(transport.path), str(base_dir),
             str(tmp_path / "state")], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert child.returncode == -signal.SIGKILL, child.stderr
        # The killed run's work folder holds the settings it was archiving; the next run removes it.
        (work,) = (tmp_path / "state" / "work").iterdir()
        assert [p.suffix for p in work.iterdir()] == [".vbox"]
        borg_cli("check", str(transport.path))
        assert borg_cli("list", "--short", str(transport.path)).split() == []
        with SimulatedVirtualBox(home, version="7.1") as sim, vbremote.Repository.open(
                transport, passphrase=borg_cli.passphrase, base_dir=base_dir) as repo:
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            (left,) = host.vm("dev").snapshots()
            assert left.name.startswith(vbremote.TRANSIENT_PREFIX)
            result = vbremote.Snapshotter(host, repo, state_dir=tmp_path / "state").take("dev")
            assert [s.uuid for s in result.leftovers] == [left.uuid]
            assert host.vm("dev").snapshots() == ()
            assert [a.name for a in repo.archives()] == [result.archive.name]
        assert list((tmp_path / "state" / "work").iterdir()) == []


class TestStateFolder:
    def test_default_follows_xdg(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scene71: Scene):
        """Lock files live in $XDG_STATE_HOME/vbremote, else ~/.local/state/vbremote (relative values ignored)."""
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
        snapshotter = vbremote.Snapshotter(scene71.host, scene71.repo)
        assert snapshotter.state_dir == tmp_path / "xdg" / "vbremote"
        snapshotter.take("dev")
        uuid = scene71.host.vm("dev").uuid
        assert (tmp_path / "xdg" / "vbremote" / "locks" / f"{uuid}.lock").is_file()
        monkeypatch.setenv("XDG_STATE_HOME", "relative/path")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert vbremote.Snapshotter(scene71.host, scene71.repo).state_dir == tmp_path / "home/.local/state/vbremote"


class TestConsistency:
    @pytest.mark.parametrize("profile", VIRTUALBOX_PROFILES)
    def test_archived_disks_are_the_instant_while_the_guest_writes(self, profile: str, tmp_path: Path,
                                                                  repo: vbremote.Repository,
                                                                  borg_cli: BorgCLI,
                                                                  transport: vbremote.LocalTransport):
        """With a fast guest on three disks, the archived disks are, bit for bit, what the guest had at the instant."""
        scene = Scene(tmp_path, profile, repo, borg_cli, transport, disks=3)
        try:
            scene.sim.start("dev", workload=GuestWorkload(rate=500, write_size=64 * 1024, pattern="hot", seed=5))
            time.sleep(0.2)
            instant: dict[int, bytes] = {}
            writes: list[int] = []

            def record(event: vbremote.Progress) -> None:
                if event.operation == "archive":
                    if not instant:
                        instant.update(instant_contents(scene))
                    writes.append(scene.sim.guest_writes("dev"))

            result = scene.snapshotter.take("dev", progress=record)
            assert writes[-1] > writes[0], "the guest kept writing during the archive"
            for port in range(3):
                assert scene.sim.disk_matches_guest("dev", port)
            other, _, _, _ = scene.restore_elsewhere(result.archive)
            with other:
                for port in range(3):
                    archived = other.disk_content("dev", port)
                    assert archived == instant[port], f"disk {port}"
                assert any(other.disk_content("dev", p) != scene.sim.guest_content("dev", p) for p in range(3))
        finally:
            scene.close()


class TestDisasterRecovery:
    @pytest.fixture(params=VIRTUALBOX_PROFILES)
    def any_profile(self, request: pytest.FixtureRequest, tmp_path: Path, repo: vbremote.Repository,
                    borg_cli: BorgCLI, transport: vbremote.LocalTransport) -> Iterator[Scene]:
        made = Scene(tmp_path, request.param, repo, borg_cli, transport)
        yield made
        made.close()

    def test_extract_and_register_without_vbremote(self, any_profile: Scene):
        """borg extract + register gives the VM back Saved, with its disks, nested user snapshots and NVRAM."""
        scene = any_profile
        scene.host.take_snapshot("dev", "first")
        scene.sim.start("dev", workload=HOT)
        scene.host.take_snapshot("dev", "second")
        instant: dict[int, bytes] = {}
        nvram: list[bytes] = []

        def record(_: vbremote.Progress) -> None:
            instant.update(instant_contents(scene))
            nvram.append((scene.sim.machine("dev").folder / "dev.nvram").read_bytes())

        result = scene.snapshotter.take("dev", progress=on_first("archive", record))
        other, host, info, folder = scene.restore_elsewhere(result.archive)
        with other:
            assert info.state is vbremote.MachineState.SAVED
            assert [s.name for s in info.snapshots()] == ["first", "second"]
            first, second = info.snapshots()
            assert second.parent == first.uuid
            assert first.state_file is None
            assert second.state_file is not None
            assert second.state_file.is_file()
            assert info.state_file is not None
            assert info.state_file.is_file()
            assert info.nvram_file is not None
            assert info.nvram_file.read_bytes() == nvram[0]
            assert (folder / "_external" / "dev-disk2.vdi").is_file()
            assert not (folder / "Logs").exists()
            for port in (0, 1):
                assert other.disk_content("dev", port) == instant[port]
            host.start("dev")
            assert host.state("dev") is vbremote.MachineState.RUNNING
            # The user snapshots work: back to "first", whose disks the archive also holds.
            host.power_off("dev")
            host.restore_snapshot("dev", first.uuid)
            assert host.state("dev") is vbremote.MachineState.POWERED_OFF


class TestRemovableImages:
    def test_images_are_referred_to_by_absolute_path_not_archived(self, scene71: Scene):
        """DVD and floppy images are not collected; the archived settings name them by absolute path."""
        folder = scene71.sim.machine("dev").folder
        text = scene71.sim.machine("dev").settings_path.read_text()
        dvd, tools, floppy = (str(uuid_module.uuid4()) for _ in range(3))
        images = (f'<DVDImages><Image uuid="{{{dvd}}}" location="install.iso"/>'
                  f'<Image uuid="{{{tools}}}" location="/srv/iso/tools.iso"/></DVDImages>'
                  f'<FloppyImages><Image uuid="{{{floppy}}}" location="boot.img"/></FloppyImages>')
        text = text.replace("</HardDisks>", "</HardDisks>" + images, 1)
        attached = rf'\1><Image uuid="{{{dvd}}}"/></AttachedDevice>'
        text, count = re.subn(r'(<AttachedDevice type="DVD"[^>]*?)\s*/>', attached, text, count=1)
        assert count == 1
        (folder / "install.iso").write_bytes(b"iso" * 1000)
        settings = parse_settings(text.encode())
        collected = collect(settings, folder, vm="dev")
        assert {spec.role for spec in collected.files} == {vbremote.FileRole.DISK, vbremote.FileRole.NVRAM}
        assert not any(spec.path.endswith((".iso", ".img")) for spec in collected.files)
        relocated = relocate(text.encode(), old_folder=str(folder), external=collected.external)
        anchored, named = anchor_images(relocated, folder)
        assert named == (str(folder / "install.iso"), "/srv/iso/tools.iso", str(folder / "boot.img"))
        for location in named:
            assert f'location="{location}"'.encode() in anchored
        # Hard disks stay relative to the folder; the restore's checks accept the file and skip the images.
        after = parse_settings(anchored)
        assert [m.location for m in after.media] == [m.location for m in parse_settings(relocated).media]
        references = settings_references(after, archive="a")
        assert not any(r.path.endswith((".iso", ".img")) for r in references)

    def test_settings_without_images_unchanged(self, scene71: Scene):
        """A settings file without DVD or floppy images comes back byte for byte."""
        data = scene71.sim.machine("dev").settings_path.read_bytes()
        assert anchor_images(data, scene71.sim.machine("dev").folder) == (data, ())


class TestCheckpoints:
    def test_checkpoints_during_a_take_leave_only_the_archive(self, scene71: Scene):
        """A short checkpoint interval (2 ms: due at every block) commits checkpoints during the take; afterwards
        borg lists only the archive."""
        scene71.sim.start("dev", workload=HOT)
        snapshotter = vbremote.Snapshotter(scene71.host, scene71.repo, state_dir=scene71.tmp_path / "state",
                                           checkpoint_interval=0.002)
        events: list[vbremote.Progress] = []
        result = snapshotter.take("dev", progress=events.append)
        checkpoints = [e for e in events if e.operation == "checkpoint"]
        assert checkpoints, "no checkpoint was written"
        sizes = {f.path: f.size for f in result.archive.files}
        for event in checkpoints:
            assert event.total == sizes[event.path]
            assert 0 < event.done <= event.total
        listed = json.loads(scene71.borg("list", "--bypass-lock", "--json", "--consider-checkpoints",
                                         str(scene71.transport.path)))
        assert [a["name"] for a in listed["archives"]] == [result.archive.name]
        assert [a.name for a in scene71.repo.archives()] == [result.archive.name]

    def test_bad_interval_refused(self, scene71: Scene):
        """A checkpoint interval that is not a positive number of seconds (or None) is a ConfigurationError."""
        for bad in (0, -1.0, float("inf"), True, "60"):
            with pytest.raises(vbremote.ConfigurationError, match="checkpoint_interval"):
                vbremote.Snapshotter(scene71.host, scene71.repo, checkpoint_interval=bad)  # type: ignore[arg-type]
        assert vbremote.Snapshotter(scene71.host, scene71.repo, checkpoint_interval=None).checkpoint_interval is None
        assert (vbremote.Snapshotter(scene71.host, scene71.repo).checkpoint_interval
                == vbremote.DEFAULT_CHECKPOINT_INTERVAL)


class TestStorage:
    def test_saved_state_in_zstd_and_small_chunks_disks_in_lz4(self, tmp_path: Path, base_dir: Path,
                                                              borg_cli: BorgCLI):
        """A snapshot stores the VM's saved state with zstd in chunks of at most 1 MiB, its disks with lz4."""
        transport = vbremote.LocalTransport(tmp_path / "plain")
        # Unencrypted, so that each stored object shows borg's compressor id.
        with vbremote.Repository.init(transport, encryption="none", base_dir=base_dir) as repo:
            scene = Scene(tmp_path, "7.1", repo, borg_cli, transport)
            try:
                scene.sim.start("dev", workload=HOT)
                scene.host.save_state("dev")
                state_file = scene.host.vm("dev").state_file
                assert state_file is not None
                # The simulator's RAM is random (stored uncompressed by any compressor): give it pages of text.
                size = state_file.stat().st_size
                state_file.write_bytes((b"".join(b"guest page %08d\n" % i for i in range(size // 20 + 1)))[:size])
                result = scene.snapshotter.take("dev")
                listed = repo.chunk_lists(result.archive).files()
            finally:
                scene.close()
        assert result.mode is vbremote.SnapshotMode.OFFLINE
        roles = {f.path: f.role for f in result.archive.files}
        states = [path for path, role in roles.items() if role is vbremote.FileRole.STATE]
        disks = [path for path, role in roles.items() if role is vbremote.FileRole.DISK]
        assert states
        assert disks
        headers: dict[vbremote.FileRole, set[bytes]] = {}
        for n, path in enumerate(states + disks):
            if path in states:
                assert result.archive.file(path).chunking == vbremote.Chunking.saved_state()
                assert max(chunk.size for chunk in listed[path].chunks) <= MIB
            for m, chunk in enumerate(listed[path].chunks):
                out = tmp_path / f"obj-{n}-{m}"
                borg_cli("debug", "get-obj", str(transport.path), chunk.id.hex(), str(out))
                # The plaintext key's type byte, then borg's compressor id: 03 00 zstd, 01 00 lz4, 00 00 none.
                headers.setdefault(roles[path], set()).add(out.read_bytes()[:3])
        assert headers[vbremote.FileRole.STATE] == {b"\x02\x03\x00"}
        assert b"\x02\x01\x00" in headers[vbremote.FileRole.DISK]
        assert headers[vbremote.FileRole.DISK] <= {b"\x02\x01\x00", b"\x02\x00\x00"}


class TestProgressAndLogs:
    def test_phases_in_order(self, scene71: Scene, caplog: pytest.LogCaptureFixture):
        """Progress events come in phase order, archive events per file in bytes; the run logs to vbremote.snapshot."""
        scene71.sim.start("dev", workload=HOT)
        events: list[vbremote.Progress] = []
        with caplog.at_level("INFO", logger="vbremote.snapshot"):
            result = scene71.snapshotter.take("dev", progress=events.append)
        phases = []
        for event in events:
            if not phases or phases[-1] != event.operation:
                phases.append(event.operation)
        assert phases == ["locking", "leftovers", "snapshot", "archive", "merge"]
        sizes = {f.path: f.size for f in result.archive.files}
        done: dict[str, list[int]] = {}
        for event in events:
            if event.operation == "archive":
                assert event.total == sizes[event.path]
                assert 0 <= event.done <= event.total
                done.setdefault(event.path, []).append(event.done)
        for disk in ("dev.vdi", "_external/dev-disk2.vdi"):
            assert done[disk] == sorted(done[disk])
            assert done[disk][0] < sizes[disk], "counted from the file's own start"
            assert done[disk][-1] == sizes[disk]
        assert any(r.name == "vbremote.snapshot" and result.archive.name in r.getMessage() for r in caplog.records)
