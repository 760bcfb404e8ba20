"""Example user code, type-checked with mypy --strict (not run)."""

from __future__ import annotations

from pathlib import Path

import vbremote


def backup(folder: Path, vm_name: str, vm_uuid: str) -> vbremote.WriteResult:
    transport: vbremote.Transport = vbremote.SSHTransport(
        "backup.example.org", "/srv/borg/vms", user="borg", identity_file=Path("~/.ssh/id_ed25519")
    )

    def secret() -> str:
        return "from a keyring"

    with vbremote.Repository.open(transport, passphrase=secret, lock_wait=30) as repo:
        files = [
            vbremote.FileSpec(folder / f"{vm_name}.vbox", f"{vm_name}.vbox", vbremote.FileRole.SETTINGS),
            vbremote.FileSpec(folder / f"{vm_name}.vdi", f"{vm_name}.vdi", vbremote.FileRole.DISK),
        ]
        metadata = vbremote.SnapshotMetadata(vm_name, vm_uuid, mode=vbremote.SnapshotMode.OFFLINE)

        def show(event: vbremote.Progress) -> None:
            print(event.path, event.done, event.total)

        result = repo.write_archive(f"{vm_name}-1", files, metadata, progress=show)
        newest: list[vbremote.ArchiveInfo] = repo.archives(vm=vm_uuid)[-1:]
        for info in newest:
            chunks: vbremote.FileChunks = repo.chunk_list(info, f"{vm_name}.vdi")
            chunking = info.file(f"{vm_name}.vdi").chunking
            local: list[bytes] = repo.local_chunk_ids(folder / f"{vm_name}.vdi", chunking=chunking)
            changed = [c for c, mine in zip(chunks.chunks, local, strict=False) if c.id != mine]
            for chunk_id, data in repo.fetch_chunks(c.id for c in changed):
                print(chunk_id.hex(), len(data))
            stream: vbremote.ChunkStream
            with repo.fetch([c.id for c in changed], errors="report") as stream:
                for chunk in stream:
                    fetched: vbremote.FetchedChunk = chunk
                    if fetched.error is not None:
                        print("damaged:", fetched.error.chunk_id)
                    else:
                        print(fetched.id.hex(), len(fetched.data))
        return result


def handle() -> None:
    try:
        backup(Path("/vms/dev"), "dev", "0b8e1c6a-0000-4000-8000-000000000001")
    except vbremote.RepositoryLocked as exc:
        print("busy:", exc.location)
    except vbremote.IntegrityError as exc:
        print("bad chunk:", exc.chunk_id)
    except vbremote.ArchiveMetadataError as exc:
        print("refused archive:", exc.archive, exc.location)
    except vbremote.FileNotInArchive as exc:
        print("missing:", exc.archive, exc.path)
    except vbremote.RepositoryReadOnly:
        print("opened read-only")
    except vbremote.VBRemoteError as exc:
        print("failed:", exc)


def snapshot_running_vms(manager: object | None = None) -> list[vbremote.SnapshotInfo]:
    host = vbremote.VirtualBoxHost.connect(manager=manager, lock_retry=vbremote.LockRetry(total=30.0))
    taken: list[vbremote.SnapshotInfo] = []
    for vm in host.vms():
        if not vm.state.is_running:
            continue
        disks: list[Path] = [d.base.location for d in vm.disks if d.base is not None]
        print(vm.name, disks, vm.nvram_file)
        firmware: str = vm.firmware
        missing: list[tuple[Path, str]] = [(m.location, m.access_error) for m in vm.inaccessible_media]
        print(firmware, missing, all(m.accessible for d in vm.disks for m in d.chain))
        try:
            taken.append(host.take_snapshot(vm, "nightly", live=True, timeout=60.0))
        except vbremote.InvalidVMState as exc:
            print("changed state:", exc.state)
        except vbremote.VirtualBoxError as exc:
            print(exc.vm, hex(exc.result_code or 0), exc.text)
            if exc.snapshot_id is not None:
                host.delete_snapshot(vm, exc.snapshot_id)
    return taken


def compare_blocks(transport: vbremote.Transport, archive: str, folder: Path) -> int:
    """How many bytes a restore of ``archive`` into ``folder`` would fetch."""
    to_fetch = 0
    with vbremote.Repository.open(transport, read_ahead=64 << 20) as repo:
        try:
            contents: vbremote.ArchiveContents = repo.chunk_lists(archive)
        except vbremote.ArchiveInvalid as exc:
            print("refused:", exc.archive, exc.path)
            return 0
        refused: tuple[vbremote.StoredItem, ...] = contents.others()
        print([(item.path, item.kind.value) for item in refused if item.kind is not vbremote.ItemKind.DIRECTORY])
        for path, chunks in contents.files().items():
            local: list[bytes | None] = repo.local_ids(folder / path, chunks.chunks)
            for ref, mine in zip(chunks.chunks, local, strict=True):
                if ref.id != mine and ref.id != repo.zero_chunk_id(ref.size):
                    to_fetch += ref.size
        print(repo.local_ids(folder / "x", [(0, 4096)]), repo.chunk_id(b"data"))
    return to_fetch


def nightly(repo: vbremote.Repository, names: list[str]) -> list[vbremote.SnapshotResult]:
    host = vbremote.VirtualBoxHost.connect()
    snapshotter = vbremote.Snapshotter(host, repo, state_dir=Path("/var/lib/vbremote"), lock_wait=60.0,
                                       checkpoint_interval=vbremote.DEFAULT_CHECKPOINT_INTERVAL / 2)
    interval: float | None = snapshotter.checkpoint_interval
    print(interval)
    done: list[vbremote.SnapshotResult] = []
    for name in names:
        try:
            result = snapshotter.take(name, "auto", labels={"nightly"}, progress=lambda e: print(e.operation))
        except vbremote.TransientSnapshotLeft as exc:
            archive: vbremote.ArchiveInfo | None = exc.archive
            print("left", exc.snapshot, archive.name if archive else "-")
            continue
        except vbremote.SnapshotInProgress as exc:
            print("busy:", exc.lock_file)
            continue
        stats: vbremote.SnapshotStats = result.stats
        mode: vbremote.SnapshotMode = result.mode
        print(result.archive.name, mode.value, stats.bytes_new, stats.seconds_transient, len(result.leftovers))
        done.append(result)
    migrated = snapshotter.take(names[0], vbremote.SnapshotMode.MIGRATE)
    print(migrated.vm_state.value, vbremote.TRANSIENT_PREFIX, vbremote.DEFAULT_NAME_TEMPLATE)
    return done


def restore_latest(repo: vbremote.Repository, name: str) -> vbremote.VMInfo | None:
    host = vbremote.VirtualBoxHost.connect()
    restorer = vbremote.Restorer(host, repo, state_dir=Path("/var/lib/vbremote"), lock_wait=5)
    plan: vbremote.RestorePlan = restorer.plan(name, seeds=[Path("/srv/old.vdi")])
    print(plan.table(), plan.bytes_to_fetch, host.default_machine_folder)
    problems: tuple[vbremote.PlanProblem, ...] = plan.problems
    for problem in problems:
        print(problem.code, problem.remedy)
    try:
        result: vbremote.RestoreResult = restorer.restore(name, power_off=True, verify="full", discard_state=False,
                                                          cpu_portability_level=1, progress=lambda e: print(e.done))
    except vbremote.RestorePreflightFailed as exc:
        print(exc.archive, [p.code for p in exc.problems])
        return None
    except vbremote.RestoreLocked as exc:
        print(exc.vm, exc.lock_file)
        return None
    copy = restorer.restore(name, as_new=f"{name}-copy", register=False, eject_missing_images=True)
    ejected: tuple[vbremote.ImageDrive, ...] = copy.ejected
    print([(d.image, d.kind, d.snapshot, d.describe()) for d in ejected])
    print(result.stats.bytes_fetched, result.removed, result.resumed, copy.settings_file)
    return result.vm
