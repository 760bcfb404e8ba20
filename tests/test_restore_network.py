"""Restores over SSH whose link is cut mid-transfer: a typed error, a consistent journal, no VM, a resume."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PASSPHRASE, BorgCLI
from netns_for_tests import NetnsLink, NetnsSSHD, link_with_sshd, restore

import vbremote
from vbremote.testing import MIB, SimulatedVirtualBox, qemu_tools_available

pytestmark = [pytest.mark.netns, pytest.mark.ssh, pytest.mark.slow, pytest.mark.borgcli]

RATE_MBIT = 40.0
DISK = 24 * MIB


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetnsLink, NetnsSSHD]]:
    yield from link_with_sshd(RATE_MBIT, tmp_path_factory.mktemp("netns-sshd"))


def _archive(tmp_path: Path, base: Path) -> Path:
    """A repository with one archive of a VM-like folder whose disk does not compress."""
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "vm.vbox").write_text('<?xml version="1.0"?>\n<VirtualBox version="1.19-linux"/>\n')
    (folder / "vm.vdi").write_bytes(os.urandom(DISK))
    (folder / "vm.nvram").write_bytes(os.urandom(128 * 1024))
    repo_path = tmp_path / "repo"
    specs = [
        vbremote.FileSpec(folder / "vm.vbox", "vm.vbox", vbremote.FileRole.SETTINGS),
        vbremote.FileSpec(folder / "vm.vdi", "vm.vdi", vbremote.FileRole.DISK),
        vbremote.FileSpec(folder / "vm.nvram", "vm.nvram", vbremote.FileRole.NVRAM),
    ]
    meta = vbremote.SnapshotMetadata("vm", str(uuid.uuid4()))
    with vbremote.Repository.init(vbremote.LocalTransport(repo_path), passphrase=PASSPHRASE, base_dir=base) as repo:
        repo.write_archive("a1", specs, meta)
    return repo_path


def _open(transport: vbremote.Transport, base: Path) -> vbremote.Repository:
    # The same repository is reached by path and through ssh: two locations, one on purpose.
    return vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base, accept_relocated=True)


class TestLinkCut:
    def test_cut_mid_fetch_fails_typed_and_resumes_identical(self, link, tmp_path):
        """Link down mid-fetch: ConnectionFailed; the journal records only right blocks; the re-run finishes."""
        net, sshd = link
        base = tmp_path / "base"
        base.mkdir()
        repo_path = _archive(tmp_path, base)
        target = tmp_path / "target"
        transport = sshd.transport(repo_path, alive_seconds=2)
        cut_at: list[int] = []

        def cut(event: vbremote.Progress) -> None:
            if not cut_at and event.total and event.done >= event.total * 0.6:
                cut_at.append(event.done)
                net.down()

        rx_before = net.host_rx_bytes()
        try:
            with (
                pytest.raises((vbremote.ConnectionFailed, vbremote.RestoreError)) as raised,
                _open(transport, base) as repo,
            ):
                restore(repo, "a1", target, progress=cut)
        finally:
            net.up()
        assert cut_at, f"the link was never cut: the restore ended before, with {raised.value!r}"
        error = raised.value
        if not isinstance(error, vbremote.ConnectionFailed):
            assert isinstance(error.__cause__, vbremote.ConnectionFailed), repr(error)
        first_rx = net.host_rx_bytes() - rx_before

        # The journal is there, records part of the disk, and each recorded block hashes to its archive id.
        state = vbremote.RestoreState.load(target)
        assert state is not None
        disk_state = state.file("vm.vdi")
        assert disk_state is not None
        assert 0 < state.done_bytes < DISK
        local_transport = vbremote.LocalTransport(repo_path)
        with _open(local_transport, base) as local:
            chunks = local.chunk_lists("a1").file("vm.vdi").chunks
            recorded = [
                c for c in chunks
                if any(start <= c.offset and c.offset + c.size <= end for start, end in disk_state.done)
            ]
            assert recorded
            assert local.local_ids(target / "vm.vdi", recorded) == [c.id for c in recorded]

        # Back up: the re-run continues and ends with what borg extract gives.
        rx_before = net.host_rx_bytes()
        with _open(transport, base) as repo:
            stats = restore(repo, "a1", target)
        assert stats.resumed
        assert stats.bytes_fetched <= DISK - sum(c.size for c in recorded) + 256 * 1024
        assert net.host_rx_bytes() - rx_before + first_rx < DISK * 1.5
        assert vbremote.RestoreState.load(target) is None
        extracted = tmp_path / "extracted"
        extracted.mkdir()
        BorgCLI(base)("extract", f"{repo_path}::a1", cwd=extracted)
        for name in ("vm.vdi", "vm.nvram"):
            assert (target / name).read_bytes() == (extracted / name).read_bytes(), name


class TestLinkCutRestorer:
    def test_restorer_cut_leaves_no_vm_and_rerun_registers(self, link, tmp_path):
        """Restorer over the cut link: ConnectionFailed, the VM not registered; after up a re-run registers it."""
        if not qemu_tools_available():
            pytest.skip("qemu-img/qemu-io are not installed (Debian package qemu-utils)")
        net, sshd = link
        base = tmp_path / "base"
        base.mkdir()
        local_transport = vbremote.LocalTransport(tmp_path / "repo")
        with (
            SimulatedVirtualBox(tmp_path / "vbox", version="7.1") as sim,
            vbremote.Repository.init(local_transport, passphrase=PASSPHRASE, base_dir=base) as local,
        ):
            sim.create_vm("dev", disk_size=DISK, content="random")
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            archive = vbremote.Snapshotter(host, local, state_dir=tmp_path / "state").take("dev").archive
            folder = host.vm("dev").folder
            disks = [f.path for f in archive.files if f.role is vbremote.FileRole.DISK]
        # The guest rewrote most of its disk after the snapshot (the image's data blocks, past its header and
        # block map): a restore has to fetch them back.
        image = folder / disks[0]
        with open(image, "r+b") as f:
            f.seek(MIB)
            f.write(os.urandom(image.stat().st_size - 2 * MIB))
        transport = sshd.transport(local_transport.path, alive_seconds=2)
        cut_at: list[int] = []

        def cut(event: vbremote.Progress) -> None:
            if event.operation == "restore" and not cut_at and event.total and event.done >= event.total * 0.6:
                cut_at.append(event.done)
                net.down()

        with SimulatedVirtualBox(tmp_path / "vbox", version="7.1") as sim:
            host = vbremote.VirtualBoxHost.connect(manager=sim.manager())
            try:
                with (
                    pytest.raises((vbremote.ConnectionFailed, vbremote.RestoreError)) as raised,
                    _open(transport, base) as repo,
                ):
                    vbremote.Restorer(host, repo, state_dir=tmp_path / "state").restore(archive.name, progress=cut)
            finally:
                net.up()
            assert cut_at, f"the link was never cut: the restore ended before, with {raised.value!r}"
            if not isinstance(raised.value, vbremote.ConnectionFailed):
                assert isinstance(raised.value.__cause__, vbremote.ConnectionFailed), repr(raised.value)
            assert not any(vm.uuid == archive.vm_uuid for vm in host.vms())
            assert vbremote.RestoreState.load(folder) is not None
            with _open(transport, base) as repo:
                result = vbremote.Restorer(host, repo, state_dir=tmp_path / "state").restore(archive.name, folder)
            assert result.resumed
            assert result.vm.uuid == archive.vm_uuid
            assert host.state(result.vm) is vbremote.MachineState.POWERED_OFF
        extracted = tmp_path / "extracted"
        extracted.mkdir()
        BorgCLI(base)("extract", f"{local_transport.path}::{archive.name}", cwd=extracted)
        for path in disks:
            assert (folder / path).read_bytes() == (extracted / path).read_bytes(), path
