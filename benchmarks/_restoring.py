"""Restore helpers shared by the restore benchmark and the network tests.

:func:`source_of` builds the :class:`RestoreSource` of a vbremote archive from
its metadata and chunk lists (what the Restorer does for a vbremote archive),
and :func:`restore` plans and applies it into a folder (as the Restorer
does: the chunks the plan will fetch start coming while it still hashes). Run as a program, this
module restores in a child process that reports how many bytes it fetched, so
a parent can kill it at a chosen point:

    python _restoring.py TRANSPORT_JSON PASSPHRASE BASE_DIR ARCHIVE TARGET
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import vbremote
from vbremote._restorer import Prefetch, apply_plan, make_plan
from vbremote._restorer._source import RestoreSource, SourceFile


def source_of(repository: vbremote.Repository, archive: str, settings_path: str = "vm.vbox") -> RestoreSource:
    """What the vbremote archive ``archive`` restores: every stored file but the settings, at its own path."""
    info = repository.archive(archive)
    listed = repository.chunk_lists(info).files()
    roles = {f.path: f.role for f in info.files}
    settings_chunks = listed[settings_path].chunks
    with repository.fetch([c.id for c in settings_chunks]) as stream:
        data = {chunk.id: chunk.data for chunk in stream}
    settings = b"".join(data[c.id] for c in settings_chunks)
    files = tuple(
        SourceFile(path, path, roles[path], chunks.size, chunks.chunks)
        for path, chunks in listed.items()
        if path != settings_path
    )
    return RestoreSource(
        archive=info.name, archive_id=info.id, vm_uuid=info.vm_uuid, vm_name=info.vm_name, mode=info.mode,
        settings_path=settings_path, settings=settings, files=files,
    )


def restore(
    repository: vbremote.Repository, archive: str, target: Path, *, progress: object = None
) -> vbremote.ApplyStats:
    """Plan and apply ``archive`` into ``target`` (resuming an interrupted restore of it)."""
    source = source_of(repository, archive)
    with Prefetch(repository) as prefetch:
        plan = make_plan(repository, source, target, fetch_known=prefetch)
        return apply_plan(repository, plan, progress=progress, prefetch=prefetch)  # type: ignore[arg-type]


def transport_to_json(transport: vbremote.Transport) -> str:
    if isinstance(transport, vbremote.LocalTransport):
        return json.dumps({"local": str(transport.path)})
    assert isinstance(transport, vbremote.SSHTransport)
    return json.dumps({
        "host": transport.host, "path": transport.path, "user": transport.user, "port": transport.port,
        "identity_file": str(transport.identity_file), "ssh_options": list(transport.ssh_options),
        "remote_borg": transport.remote_borg,
    })


def transport_from_json(text: str) -> vbremote.Transport:
    data = json.loads(text)
    if "local" in data:
        return vbremote.LocalTransport(data["local"])
    return vbremote.SSHTransport(
        data["host"], data["path"], user=data["user"], port=data["port"], identity_file=Path(data["identity_file"]),
        ssh_options=tuple(data["ssh_options"]), remote_borg=data["remote_borg"],
    )


def main() -> None:
    """Child: restore, printing ``fetched N`` lines as chunks arrive and a final JSON line of stats."""
    transport_json, passphrase, base_dir, archive, target = sys.argv[1:6]
    transport = transport_from_json(transport_json)

    def progress(event: vbremote.Progress) -> None:
        if event.operation in ("fetch", "restore"):
            print(f"progress {event.done} {event.total}", flush=True)

    # The server may still be releasing the lock of a killed run: wait for it rather than fail.
    with vbremote.Repository.open(
        transport, passphrase=passphrase, base_dir=Path(base_dir), lock_wait=60
    ) as repository:
        stats = restore(repository, archive, Path(target), progress=progress)
        # The worker (and ssh) are alive until the repository closes: their peaks now.
        children = [peak_rss_kib(pid) for pid in child_pids()]
    print("stats " + json.dumps({
        "bytes_fetched": stats.bytes_fetched, "bytes_written": stats.bytes_written, "resumed": stats.resumed,
        "seconds": stats.seconds, "rss_kib": peak_rss_kib(os.getpid()), "worker_rss_kib": max(children, default=0),
    }), flush=True)


def peak_rss_kib(pid: int) -> int:
    """The peak resident set of a process since its exec (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child_pids() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


if __name__ == "__main__":
    main()
