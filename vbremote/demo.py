"""The vbremote demo: ``python -m vbremote.demo``.

It needs no VirtualBox and no server: the repository lives in a temporary
folder, and the VM is a VM-like folder with a real VDI disk made by qemu-img.
It shows the repository layer end to end: create a repository, store the VM
folder, let the "guest" change 2 % of its disk, store it again, show what
the second archive really cost, and prune by borg's retention rules. Then the
Snapshotter on a simulated VirtualBox host: a VM whose guest keeps writing
gets two online snapshots, with what each cost; and the Restorer brings the
newest back in place after the guest changed its disk: the plan, a restore
interrupted half-way on purpose, and the re-run that resumes from its journal.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from . import (
    DEFAULT_NAME_TEMPLATE,
    FileRole,
    FileSpec,
    KeepRules,
    LocalTransport,
    Progress,
    Pruner,
    Repository,
    Restorer,
    SnapshotMetadata,
    SnapshotMode,
    SnapshotResult,
    Snapshotter,
    VirtualBoxHost,
    WriteResult,
)
from .testing import MIB, GuestWorkload, SimulatedVirtualBox, Timing, guest_write, make_vdi

_SETTINGS = """<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{{{uuid}}}" name="{name}" OSType="Debian_64" snapshotFolder="Snapshots">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{{{disk}}}" location="{name}.vdi" format="VDI" type="Normal"/>
      </HardDisks>
    </MediaRegistry>
    <Hardware>
      <Memory RAMSize="2048"/>
      <StorageControllers>
        <StorageController name="SATA" type="AHCI" PortCount="1">
          <AttachedDevice type="HardDisk" port="0" device="0">
            <Image uuid="{{{disk}}}"/>
          </AttachedDevice>
        </StorageController>
      </StorageControllers>
    </Hardware>
  </Machine>
</VirtualBox>
"""


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    raise AssertionError("unreachable")


def _progress_printer(label: str) -> tuple[Callable[[Progress], None], Callable[[], None]]:
    last = [0.0]
    interactive = sys.stdout.isatty()

    def show(event: Progress) -> None:
        if not interactive:
            return
        now = time.monotonic()
        if now - last[0] > 0.2 or event.done == event.total:
            last[0] = now
            percent = 100 * event.done / event.total if event.total else 100
            print(f"\r  {label}: {percent:5.1f} %  {_size(event.done)} of {_size(event.total)}", end="", flush=True)

    def finish() -> None:
        if interactive:
            print()

    return show, finish


def _write_with_progress(
    repo: Repository, archive: str, files: list[FileSpec], metadata: SnapshotMetadata
) -> WriteResult:
    show, finish = _progress_printer(archive)
    result = repo.write_archive(archive, files, metadata, progress=show)
    finish()
    return result


def make_vm_folder(folder: Path, name: str, disk_size: int) -> tuple[Path, str]:
    """A VM-like folder: settings file, a real VDI disk with guest-like content, NVRAM."""
    folder.mkdir(parents=True)
    vm_uuid = str(uuid.uuid4())
    (folder / f"{name}.vbox").write_text(_SETTINGS.format(uuid=vm_uuid, disk=uuid.uuid4(), name=name))
    make_vdi(folder / f"{name}.vdi", disk_size, seed=1)
    (folder / f"{name}.nvram").write_bytes(random.Random(2).randbytes(128 * 1024))
    return folder, vm_uuid


def vm_files(folder: Path, name: str) -> list[FileSpec]:
    return [
        FileSpec(folder / f"{name}.vbox", f"{name}.vbox", FileRole.SETTINGS),
        FileSpec(folder / f"{name}.vdi", f"{name}.vdi", FileRole.DISK),
        FileSpec(folder / f"{name}.nvram", f"{name}.nvram", FileRole.NVRAM),
    ]


def run(workdir: Path, disk_mib: int, *, kept: bool = False) -> None:
    name = "demo-vm"
    print(f"vbremote demo in {workdir}\n")
    folder, vm_uuid = make_vm_folder(workdir / name, name, disk_mib * MIB)
    disk = folder / f"{name}.vdi"
    print(f"1. A VM folder with a {disk_mib} MiB VDI disk ({_size(disk.stat().st_size)} allocated), made by qemu-img.")

    transport = LocalTransport(workdir / "repository")
    base = workdir / "borg"
    passphrase = "demo passphrase"
    metadata = SnapshotMetadata(vm_name=name, vm_uuid=vm_uuid, mode=SnapshotMode.OFFLINE, host="demo-host")
    with Repository.init(transport, passphrase=passphrase, base_dir=base) as repo:
        print(f"2. A borg repository at {transport.location} ({repo.encryption}, {repo.block_size // MIB} MiB blocks).")
        first = _write_with_progress(repo, f"{name}-1", vm_files(folder, name), metadata)
        print(
            f"   stored {_size(first.bytes_read)} as {_size(first.bytes_stored)} in {first.seconds:.2f} s"
            f" ({first.chunks} chunks, {first.chunks_zero} all-zero)"
        )

        rng = random.Random(3)
        blocks = disk_mib
        changed = max(1, blocks * 2 // 100)
        for index in rng.sample(range(blocks), changed):
            guest_write(disk, index * MIB, rng.randbytes(MIB))
        print(f"3. The guest rewrote {changed} of {blocks} 1 MiB blocks (2 %), through qemu-io.")

        second = _write_with_progress(repo, f"{name}-2", vm_files(folder, name), metadata)
        print(
            f"   read {_size(second.bytes_read)}, sent {second.chunks_new} new chunks:"
            f" {_size(second.bytes_new)} of data, {_size(second.bytes_stored)} stored"
        )

        print("4. The repository's archives:")
        print(f"   {'name':<14} {'time (UTC)':<20} {'mode':<8} {'vm uuid':<36} files")
        for info in repo.archives(vm=name):
            files = ", ".join(f"{f.path} ({f.role.value})" for f in info.files)
            print(f"   {info.name:<14} {info.time:%Y-%m-%d %H:%M:%S}  {info.mode.value:<8} {info.vm_uuid} {files}")

        result = repo.check(verify_data=True)
        print(f"5. borg check --verify-data: {'no problems' if result.ok else result.problems}")
        chunks = repo.chunk_list(second.archive, f"{name}.vdi")
        local = repo.local_chunk_ids(disk)
        same = sum(a == b.id for a, b in zip(local, chunks.chunks, strict=True))
        print(f"   local block ids equal to archive 2's chunk ids: {same} of {len(local)}")

        pruner = Pruner(repo, KeepRules(last=1))
        print("6. Retention with borg's rule keep-last 1; the plan:")
        for line in pruner.plan(name).table().splitlines():
            print("   " + line)
        pruned = pruner.prune(name)
        print(
            f"   pruned {', '.join(pruned.deleted) or 'nothing'}; compaction freed {_size(pruned.freed_bytes or 0)}"
            " (borg rewrites a segment once 10 % of it is unused)"
        )
        snapshots(workdir, repo, max(8, disk_mib // 4))
    if kept:
        print("\nThese are ordinary borg archives; the borg CLI (installed with vbremote) lists them:")
        print(f"  BORG_BASE_DIR={base} BORG_PASSPHRASE='{passphrase}' borg list {transport.location}")
    else:
        print("\nThese are ordinary borg archives, which the borg CLI reads too; the folder is removed now.")
        print("To keep it and list them with borg: python -m vbremote.demo --keep DIR (or vbremote demo --keep DIR,")
        print("or bash scripts/dev.sh demo --keep DIR).")


def _show_snapshot(result: SnapshotResult, writes_before: int, writes_after: int) -> None:
    stats = result.stats
    print(f"   archive {result.archive.name} ({result.mode.value}; the VM is {result.vm_state.value})")
    print(
        f"   read {_size(stats.bytes_read)}, sent {stats.chunks_new} new chunks: {_size(stats.bytes_new)} of data,"
        f" {_size(stats.bytes_stored)} stored; {stats.chunks} chunks, {stats.chunks_zero} all-zero"
    )
    print(
        f"   snapshot {stats.seconds_snapshot:.2f} s, archive {stats.seconds_archive:.2f} s, merge"
        f" {stats.seconds_merge:.2f} s; the transient snapshot existed {stats.seconds_transient:.2f} s"
    )
    print(f"   the guest kept writing: {writes_after - writes_before} writes during the run")


def snapshots(workdir: Path, repo: Repository, disk_mib: int) -> None:
    """Two online snapshots of a simulated VM whose guest keeps writing."""
    name = "guest-vm"
    with SimulatedVirtualBox(workdir / "virtualbox", version="7.1", timing=Timing(unlock_delay=0.05)) as sim:
        sim.create_vm(name, disk_size=disk_mib * MIB, firmware="EFI", seed=5)
        workload = GuestWorkload(rate=200, write_size=64 * 1024, pattern="hot", seed=6)
        sim.start(name, workload=workload)
        host = VirtualBoxHost.connect(manager=sim.manager())
        print(
            f"\n7. A simulated VirtualBox {host.version} host; VM {name!r} (EFI, a {disk_mib} MiB disk) is running,"
            f" its guest writing {workload.write_size // 1024} KiB {workload.rate:.0f} times a second."
        )
        snapshotter = Snapshotter(host, repo, state_dir=workdir / "state")
        print(f"   Snapshotter.take({name!r}) names archives {DEFAULT_NAME_TEMPLATE!r}.")
        taken = []
        for number in (1, 2):
            if number == 2:
                before = sim.guest_writes(name)
                time.sleep(1.0)
                print(f"   ... the guest wrote {sim.guest_writes(name) - before} more times ...")
            print(f"{7 + number}. Online snapshot {number}:")
            before = sim.guest_writes(name)
            result = snapshotter.take(name, labels={"demo"})
            _show_snapshot(result, before, sim.guest_writes(name))
            taken.append(result)
        print(f"10. The archives of {name!r} (a snapshot's transient VirtualBox snapshot is gone):")
        for info in repo.archives(vm=name):
            print(f"   {info.name:<44} {info.time:%Y-%m-%d %H:%M:%S}  {info.mode.value:<7} {len(info.files)} files")
        print(f"    VirtualBox snapshots of the VM now: {len(host.vm(name).snapshots())}")
        restore(host, repo, name, taken[-1], workdir / "state")


class _StopHalfway(Exception):
    """Raised from the demo's progress callback to interrupt a restore on purpose."""


def restore(host: VirtualBoxHost, repo: Repository, name: str, snapshot: SnapshotResult, state_dir: Path) -> None:
    """Back to the newest snapshot in place: the plan, a restore interrupted half-way, and its resumption."""
    host.power_off(name)
    restorer = Restorer(host, repo, state_dir=state_dir)
    plan = restorer.plan(snapshot.archive)
    print("11. The VM is powered off; the guest wrote on after snapshot 2. Back to snapshot 2 in place; the plan"
          " (nothing is written yet):")
    for line in plan.table().splitlines():
        print(f"    {line}")
    folder = host.vm(name).folder

    def stop_halfway(event: Progress) -> None:
        if event.operation == "restore" and event.total and event.done >= event.total // 2:
            raise _StopHalfway

    try:
        restorer.restore(snapshot.archive, progress=stop_halfway)
    except _StopHalfway:
        registered = name in [vm.name for vm in host.vms()]
        print(
            "12. That restore was interrupted half-way on purpose."
            + (" The VM was unregistered before the first write, so it cannot start half-restored."
               if not registered else "")
        )
    result = restorer.restore(snapshot.archive, target=folder)
    stats = result.stats
    assert result.vm is not None
    print(
        f"13. Run again: it resumed ({result.resumed}) from the journal; fetched {_size(stats.bytes_fetched)},"
        f" copied {_size(stats.bytes_copied)} from local data, wrote {_size(stats.bytes_written)},"
        f" verified {_size(stats.bytes_verified)}. The VM is {result.vm.state.value}: it resumes where snapshot 2"
        " left it."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbremote.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--disk-mib", type=int, default=256, help="size of the demo VM's disk (MiB)")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        run(args.keep, args.disk_mib, kept=True)
    else:
        with tempfile.TemporaryDirectory(prefix="vbremote-demo-") as workdir:
            run(Path(workdir), args.disk_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
