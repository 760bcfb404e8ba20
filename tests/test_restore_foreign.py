"""Archives made by another tool with the borg CLI, and hostile archives.

The other tool is the PowerShell project PythonNut/virtualbox-remote-snapshots
(virtualbox-remote-snapshots.ps1 at 7d3bdd1). Its archives are reproduced
here as it made them: a snapshot named ``vrs-temp`` (``--live`` for a running
VM, lines 115-123), then, from inside the VM folder (``cd``, line 137),
``borg create -vspx -C lz4 REPO::'<name with dashes>-<time>-<online|offline>' .``
(line 138), so that items are relative to the VM folder and the folder itself
is the item ``.``.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
from pathlib import Path

import pytest
from helpers import PASSPHRASE, BorgCLI
from hypothesis import given
from hypothesis import strategies as st

import vbremote
from vbremote._models import FileRole
from vbremote._restorer import _foreign, apply_plan, make_plan
from vbremote._restorer._checks import check_settings, settings_references
from vbremote._restorer._foreign import TRANSIENT_SNAPSHOT, foreign_source
from vbremote._settings import MachineSettings, Medium, parse_settings
from vbremote.testing import MIB, SimulatedVirtualBox

VM = "Win 10"


def _borg_create(borg_cli: BorgCLI, repo_path: Path, archive: str, folder: Path) -> None:
    """The tool's command line (virtualbox-remote-snapshots.ps1, line 138), run inside the VM folder.

    borg exits 1 (a warning) when the running guest writes the in-flight
    differencing image while it is read ("file changed while we backed it
    up"); the archive is made all the same, and the tool did not check.
    """
    result = borg_cli.run("create", "-sx", "-C", "lz4", f"{repo_path}::{archive}", ".", cwd=folder)
    assert result.returncode in (0, 1), result.stderr


@pytest.fixture
def borg_repo(tmp_path: Path, borg_cli: BorgCLI) -> Path:
    path = tmp_path / "repo"
    borg_cli("init", "-e", "repokey-blake2", str(path))
    return path


def _open(repo_path: Path, base_dir: Path) -> vbremote.Repository:
    return vbremote.Repository.open(vbremote.LocalTransport(repo_path), passphrase=PASSPHRASE, base_dir=base_dir)


def _source(repo_path: Path, base_dir: Path, archive: str) -> vbremote.RestoreSource:
    with _open(repo_path, base_dir) as repository:
        return foreign_source(repository, archive, repository.chunk_lists(archive))


def _tool_archive(tmp_path: Path, borg_cli: BorgCLI, repo_path: Path, *, running: bool, transient: bool = True,
                  firmware: str = "EFI", from_parent: bool = False) -> tuple[str, Path]:
    """A VM on a simulated host, archived as the PowerShell tool archives it; returns (archive, VM folder)."""
    with SimulatedVirtualBox(tmp_path / "host", version="6.1") as sim:
        sim.create_vm(VM, disk_size=4 * MIB, firmware=firmware)
        host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
        if running:
            sim.start(VM)
        if transient:
            host.take_snapshot(VM, TRANSIENT_SNAPSHOT)
        folder = Path(host.vm(VM).settings_file).parent
        suffix = "online" if running else "offline"
        archive = f"{VM.replace(' ', '-')}-2026.11.26-18.00.00-{suffix}"
        _borg_create(borg_cli, repo_path, archive, folder.parent if from_parent else folder)
        if running:
            sim.power_off(VM)
    return archive, folder


class TestPowerShellToolArchives:
    def test_online_archive_frozen_at_vrs_temp(self, tmp_path, borg_cli, borg_repo, base_dir):
        """A live vrs-temp archive restores the instant: Saved, its .sav and NVRAM copy, no in-flight disk."""
        archive, _ = _tool_archive(tmp_path, borg_cli, borg_repo, running=True)
        source = _source(borg_repo, base_dir, archive)
        settings = parse_settings(source.settings)
        assert source.foreign
        assert source.mode is vbremote.SnapshotMode.ONLINE
        assert source.settings_path == f"{VM}.vbox"
        assert source.vm_name == VM
        assert list(settings.snapshots()) == []
        assert settings.state_file is not None
        targets = {f.target_path: f.role for f in source.files}
        assert targets == {
            f"{VM}.vdi": FileRole.DISK,
            settings.state_file: FileRole.STATE,
            settings.nvram: FileRole.NVRAM,
        }
        assert settings.nvram is not None
        assert settings.nvram.startswith("Snapshots/")
        assert "frozen at the transient snapshot" in source.notes[0]

    def test_in_flight_and_logs_left_out(self, tmp_path, borg_cli, borg_repo, base_dir):
        """The differencing image attached after vrs-temp, the logs and the machine's live NVRAM are not restored."""
        archive, _folder = _tool_archive(tmp_path, borg_cli, borg_repo, running=True)
        source = _source(borg_repo, base_dir, archive)
        listed = {line.split(None, 7)[-1] for line in borg_cli("list", f"{borg_repo}::{archive}").splitlines()}
        in_flight = [p for p in listed if p.startswith("Snapshots/{") and p.endswith(".vdi")]
        assert len(in_flight) == 1
        assert "Logs/VBox.log" in listed
        assert f"{VM}.nvram" in listed
        restored = {f.archive_path for f in source.files}
        assert not restored & {*in_flight, "Logs/VBox.log", f"{VM}.nvram", f"{VM}.vbox"}

    def test_offline_archive(self, tmp_path, borg_cli, borg_repo, base_dir):
        """A powered-off VM's vrs-temp archive restores PoweredOff: offline, no saved state."""
        archive, _ = _tool_archive(tmp_path, borg_cli, borg_repo, running=False, firmware="BIOS")
        source = _source(borg_repo, base_dir, archive)
        assert source.mode is vbremote.SnapshotMode.OFFLINE
        assert {f.target_path for f in source.files} == {f"{VM}.vdi"}
        assert parse_settings(source.settings).state_file is None

    def test_without_transient_snapshot(self, tmp_path, borg_cli, borg_repo, base_dir):
        """Without a current vrs-temp (the tool's migrate action) the settings are used as they are, and it says so."""
        archive, folder = _tool_archive(tmp_path, borg_cli, borg_repo, running=False, transient=False)
        source = _source(borg_repo, base_dir, archive)
        assert source.settings == (folder / f"{VM}.vbox").read_bytes()
        assert "restored as they are" in source.notes[0]

    def test_vbox_in_a_subfolder(self, tmp_path, borg_cli, borg_repo, base_dir):
        """An archive of the folder above (.vbox one level down, which the tool's restore walk finds) restores alike."""
        archive, _ = _tool_archive(tmp_path, borg_cli, borg_repo, running=True, from_parent=True)
        source = _source(borg_repo, base_dir, archive)
        assert source.settings_path == f"{VM}.vbox"
        assert all(f.archive_path == f"{VM}/{f.target_path}" for f in source.files)
        assert f"{VM}.vdi" in {f.target_path for f in source.files}

    def test_chunks_are_the_archives_own(self, tmp_path, borg_cli, borg_repo, base_dir):
        """Each file's chunks, fetched in order, are byte-identical to borg extract of that file."""
        archive, _ = _tool_archive(tmp_path, borg_cli, borg_repo, running=True)
        source = _source(borg_repo, base_dir, archive)
        out = tmp_path / "extract"
        out.mkdir()
        borg_cli("extract", f"{borg_repo}::{archive}", *[f.archive_path for f in source.files], cwd=out)
        with _open(borg_repo, base_dir) as repository:
            for item in source.files:
                with repository.fetch(c.id for c in item.chunks) as stream:
                    data = {chunk.id: chunk.data for chunk in stream}
                assert b"".join(data[c.id] for c in item.chunks) == (out / item.archive_path).read_bytes()
                assert item.size == (out / item.archive_path).stat().st_size

    def test_frozen_settings_register(self, tmp_path, borg_cli, borg_repo, base_dir):
        """The frozen settings with borg extract's files register on a fresh host, Saved as the instant was."""
        archive, _ = _tool_archive(tmp_path, borg_cli, borg_repo, running=True)
        source = _source(borg_repo, base_dir, archive)
        out = tmp_path / "extract"
        out.mkdir()
        borg_cli("extract", f"{borg_repo}::{archive}", *[f.archive_path for f in source.files], cwd=out)
        with SimulatedVirtualBox(tmp_path / "other", version="6.1") as sim:
            target = sim.vms_folder / VM
            target.mkdir(parents=True)
            for item in source.files:
                (target / item.target_path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / item.archive_path, target / item.target_path)
            (target / source.settings_path).write_bytes(source.settings)
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            vm = host.register(target / source.settings_path)
            assert host.state(vm) is vbremote.MachineState.SAVED
        # Every file the registered settings name is there (the simulator does not insist).
        _, references = check_settings(source.settings, archive=archive)
        assert all((target / reference.path).is_file() for reference in references)


def _crafted(tmp_path: Path) -> Path:
    """A powered-off VM's folder from a simulated host, to be made hostile."""
    with SimulatedVirtualBox(tmp_path / "craft-host", version="6.1") as sim:
        sim.create_vm(VM, disk_size=MIB)
        folder = sim.vms_folder / VM
    copy = tmp_path / "crafted"
    shutil.copytree(folder, copy)
    return copy


def _refused(
    tmp_path: Path, borg_cli: BorgCLI, repo_path: Path, base_dir: Path, folder: Path
) -> vbremote.ArchiveInvalid:
    _borg_create(borg_cli, repo_path, "hostile", folder)
    with pytest.raises(vbremote.ArchiveInvalid) as caught:
        _source(repo_path, base_dir, "hostile")
    assert caught.value.archive == "hostile"
    assert "'hostile'" in str(caught.value)
    return caught.value


def _edit_vbox(folder: Path, old: str, new: str) -> None:
    path = folder / f"{VM}.vbox"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


class TestHostileArchives:
    def test_plain_folder_accepted(self, tmp_path, borg_cli, borg_repo, base_dir):
        """The untouched crafted folder is accepted (so each refusal below is the hostile part's)."""
        _borg_create(borg_cli, borg_repo, "plain", _crafted(tmp_path))
        assert {f.target_path for f in _source(borg_repo, base_dir, "plain").files} == {f"{VM}.vdi"}

    @pytest.mark.parametrize(
        ("kind", "words"),
        [("symlink", "symlink"), ("fifo", "fifo"), ("hardlink", "hard link")],
    )
    def test_special_items_refused(self, tmp_path, borg_cli, borg_repo, base_dir, kind, words):
        """A symlink, a FIFO or a hard link anywhere in the VM folder refuses the archive."""
        folder = _crafted(tmp_path)
        if kind == "symlink":
            (folder / "Logs").mkdir(exist_ok=True)
            (folder / "Logs" / "VBox.log").symlink_to("/etc/passwd")
        elif kind == "fifo":
            os.mkfifo(folder / "Snapshots" / "pipe")
        else:
            os.link(folder / f"{VM}.vdi", folder / "Snapshots" / "copy.vdi")
        error = _refused(tmp_path, borg_cli, borg_repo, base_dir, folder)
        assert words in str(error)

    def test_no_vbox(self, tmp_path, borg_cli, borg_repo, base_dir):
        """An archive without a .vbox (a .vbox-prev does not count) is refused."""
        folder = _crafted(tmp_path)
        (folder / f"{VM}.vbox").rename(folder / f"{VM}.vbox-prev")
        assert "no VirtualBox settings file" in str(_refused(tmp_path, borg_cli, borg_repo, base_dir, folder))

    def test_two_vbox_listed(self, tmp_path, borg_cli, borg_repo, base_dir):
        """Two .vbox files are refused, and the error lists both."""
        folder = _crafted(tmp_path)
        (folder / "old").mkdir()
        shutil.copy(folder / f"{VM}.vbox", folder / "old" / "other.vbox")
        message = str(_refused(tmp_path, borg_cli, borg_repo, base_dir, folder))
        assert f"'{VM}.vbox'" in message
        assert "'old/other.vbox'" in message

    @pytest.mark.parametrize(
        ("old", "new"),
        [
            (f'location="{VM}.vdi"', 'location="../../../home/user/.ssh/authorized_keys"'),
            (f'location="{VM}.vdi"', 'location="/etc/shadow"'),
            (f'location="{VM}.vdi"', 'location="C:/Windows/disk.vdi"'),
            (f'location="{VM}.vdi"', 'location="Snapshots\\..\\..\\x.vdi"'),
            ('<Machine ', '<Machine stateFile="../outside.sav" '),
            ('snapshotFolder="Snapshots"', 'snapshotFolder="/var/tmp"'),
        ],
    )
    def test_references_outside_refused(self, tmp_path, borg_cli, borg_repo, base_dir, old, new):
        """Settings that name a file outside the VM folder are refused, naming the path."""
        folder = _crafted(tmp_path)
        _edit_vbox(folder, old, new)
        assert "outside the VM folder" in str(_refused(tmp_path, borg_cli, borg_repo, base_dir, folder))

    def test_host_reference_is_a_problem(self, tmp_path, borg_cli, borg_repo, base_dir):
        """Another tool's archive whose settings share the host's / is planned with a host-reference problem and
        refused before any write; trusted, it restores with the shared folder kept."""
        folder = _crafted(tmp_path)
        _edit_vbox(folder, "<Hardware>", '<Hardware><SharedFolders><SharedFolder name="root" hostPath="/"'
                                         ' writable="true" autoMount="true"/></SharedFolders>')
        _borg_create(borg_cli, borg_repo, "shares", folder)
        target = tmp_path / "t" / VM
        with SimulatedVirtualBox(tmp_path / "other", version="6.1") as sim, _open(borg_repo, base_dir) as repository:
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            restorer = vbremote.Restorer(host, repository)
            (problem,) = restorer.plan("shares", target).problems
            assert problem.code == "host-reference"
            assert "shared folder 'root': '/'" in problem.message
            with pytest.raises(vbremote.RestorePreflightFailed):
                restorer.restore("shares", target)
            assert not (tmp_path / "t").exists()
            assert host.vms() == ()
            result = restorer.restore("shares", target, allow_host_references=True)
            assert result.vm is not None
            assert b'hostPath="/"' in result.settings_file.read_bytes()

    def test_dtd_refused(self, tmp_path, borg_cli, borg_repo, base_dir):
        """A settings file with a DTD (entity expansion) is refused as the archive's fault."""
        folder = _crafted(tmp_path)
        _edit_vbox(folder, "<VirtualBox ", '<!DOCTYPE v [<!ENTITY a "aaaa">]>\n<VirtualBox ')
        assert "DOCTYPE" in str(_refused(tmp_path, borg_cli, borg_repo, base_dir, folder))

    def test_missing_disk_refused(self, tmp_path, borg_cli, borg_repo, base_dir):
        """A disk the settings name but the archive lacks is refused, not restored half."""
        folder = _crafted(tmp_path)
        (folder / f"{VM}.vdi").unlink()
        assert "does not hold" in str(_refused(tmp_path, borg_cli, borg_repo, base_dir, folder))

    @pytest.mark.parametrize(("bound", "value", "words"), [("MAX_ITEMS", 2, "items"), ("MAX_FILE_SIZE", 4096, "bytes")])
    def test_absurd_counts_and_sizes_refused(self, tmp_path, borg_cli, borg_repo, base_dir, monkeypatch, bound, value,
                                             words):
        """More items or a larger file than the bounds allow is refused (bounds lowered to fit a test)."""
        monkeypatch.setattr(_foreign, bound, value)
        assert words in str(_refused(tmp_path, borg_cli, borg_repo, base_dir, _crafted(tmp_path)))

    def test_vbox_as_fifo_refused(self, tmp_path, borg_cli, borg_repo, base_dir):
        """A .vbox that is not a regular file is refused before anything is read."""
        folder = tmp_path / "f"
        folder.mkdir()
        os.mkfifo(folder / f"{VM}.vbox")
        assert stat.S_ISFIFO((folder / f"{VM}.vbox").lstat().st_mode)
        assert "fifo" in str(_refused(tmp_path, borg_cli, borg_repo, base_dir, folder))


def _extract(borg_cli: BorgCLI, repo_path: Path, archive: str, source: vbremote.RestoreSource, out: Path) -> None:
    out.mkdir()
    borg_cli("extract", f"{repo_path}::{archive}", *[f.archive_path for f in source.files], cwd=out)


class TestSettingsReferences:
    @given(st.text(alphabet="ab./\\:C ", min_size=1, max_size=12))
    def test_accepted_paths_stay_inside(self, location):
        """Any medium location the check accepts is relative, normalised, POSIX-style and without a drive letter."""
        settings = MachineSettings(uuid="1", name="n", state_file=None, current_snapshot=None, snapshot_folder=None,
                                   media=(Medium("2", location, "VDI", None, ()),), attachments=(), snapshot=None,
                                   nvram=None)
        try:
            (reference,) = settings_references(settings, archive="a")
        except vbremote.ArchiveInvalid:
            return
        path = reference.path
        assert not path.startswith("/")
        assert "\\" not in path
        assert ".." not in path.split("/")
        assert posixpath.normpath(path) == path
        assert not (path[:1].isalpha() and path[1:2] == ":")


class TestEndToEnd:
    def test_restore_into_empty_folder(self, tmp_path, borg_cli, borg_repo, base_dir):
        """A restore of the tool's archive into an empty folder: files as borg extract's, and the VM registers Saved."""
        archive, _ = _tool_archive(tmp_path, borg_cli, borg_repo, running=True)
        with SimulatedVirtualBox(tmp_path / "fresh", version="6.1") as sim:
            target = sim.vms_folder / VM
            with _open(borg_repo, base_dir) as repository:
                source = foreign_source(repository, archive, repository.chunk_lists(archive))
                plan = make_plan(repository, source, target)
                assert plan.bytes_reused == 0
                apply_plan(repository, plan, verify="full")
            _extract(borg_cli, borg_repo, archive, source, tmp_path / "extract")
            for item in source.files:
                extracted = (tmp_path / "extract" / item.archive_path).read_bytes()
                assert (target / item.target_path).read_bytes() == extracted
            (target / source.settings_path).write_bytes(source.settings)
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            vm = host.register(target / source.settings_path)
            assert host.state(vm) is vbremote.MachineState.SAVED
            assert sorted(p.name for p in target.iterdir()) == sorted(
                {source.settings_path, *(f.target_path.split("/")[0] for f in source.files)})

    def test_incremental_in_place(self, tmp_path, borg_cli, borg_repo, base_dir):
        """Over files that differ in three places, only the chunks holding them travel; files as borg extract's."""
        archive, _ = _tool_archive(tmp_path, borg_cli, borg_repo, running=True)
        target = tmp_path / "restored"
        with _open(borg_repo, base_dir) as repository:
            source = foreign_source(repository, archive, repository.chunk_lists(archive))
            apply_plan(repository, make_plan(repository, source, target))
            disk = next(f for f in source.files if f.role is FileRole.DISK)
            changed = [disk.size // 7, disk.size // 2, disk.size - 5000]
            with open(target / disk.target_path, "r+b") as local:
                for offset in changed:
                    local.seek(offset)
                    local.write(os.urandom(4096))
            hit = {c.id: c.size for c in disk.chunks if any(c.offset <= o + 4095 and o < c.offset + c.size
                                                             for o in changed)}
            plan = make_plan(repository, source, target)
            # (A chunk whose data sits elsewhere in the folder too is copied, not fetched.)
            assert plan.bytes_to_fetch <= sum(hit.values())
            assert plan.bytes_reused == sum(f.size for f in source.files) - sum(hit.values())
            apply_plan(repository, plan)
        _extract(borg_cli, borg_repo, archive, source, tmp_path / "extract")
        for item in source.files:
            assert (target / item.target_path).read_bytes() == (tmp_path / "extract" / item.archive_path).read_bytes()
