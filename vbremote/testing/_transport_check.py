"""A conformance check for transports, including third-party ones."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from .._errors import PassphraseWrong, RepositoryLocked
from .._models import FileRole, FileSpec, SnapshotMetadata
from .._repository import Repository
from .._transports import Transport

__all__ = ["TransportCheckFailed", "check_transport"]


class TransportCheckFailed(AssertionError):
    """A transport did not behave as vbremote needs; the message says which step failed."""


def _expect(condition: bool, step: str) -> None:
    if not condition:
        raise TransportCheckFailed(step)


def check_transport(transport: Transport, *, base_dir: Path | None = None) -> None:
    """Prove that a transport works with vbremote, end to end.

    It creates a repository at the transport's path (which must not exist
    yet), then checks: writing an archive, listing it, reading a file's chunk
    list, fetching chunks (verified, and equal to what was written), that the
    local chunk-id computation matches, that a second open waits for and
    reports borg's lock, that a wrong passphrase is refused, and deleting
    and compacting.

    Args:
        transport: The transport under test, pointing at a path where no
            repository exists yet.
        base_dir: borg's base folder to use (``BORG_BASE_DIR``); default: a
            temporary one, removed afterwards.

    Raises:
        TransportCheckFailed: A step misbehaved (the message names it).
        VBRemoteError: A step failed outright, with vbremote's own error.
    """
    passphrase = "check-transport " + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="vbremote-check-") as scratch:
        work = Path(scratch)
        base = base_dir if base_dir is not None else work / "borg"
        disk = work / "disk.img"
        # Two distinct blocks, a zero block and a short tail.
        content = os.urandom(1 << 20) + bytes(1 << 20) + b"vbremote" * (1 << 17) + os.urandom(1234)
        disk.write_bytes(content)
        settings = work / "vm.vbox"
        settings.write_text("<VirtualBox/>\n")
        files = [FileSpec(settings, "vm.vbox", FileRole.SETTINGS), FileSpec(disk, "vm.vdi", FileRole.DISK)]
        metadata = SnapshotMetadata(vm_name="check", vm_uuid=str(uuid.uuid4()))

        with Repository.init(transport, passphrase=passphrase, base_dir=base) as repo:
            written = repo.write_archive("check-1", files, metadata)
            _expect(written.bytes_read == len(content) + settings.stat().st_size, "write: bytes read")
            _expect(written.chunks_zero >= 1, "write: the zero block was not recognised")
            listed = repo.archives()
            _expect([a.name for a in listed] == ["check-1"], "list: the archive is not listed")
            _expect(listed[0].vm_uuid == metadata.vm_uuid, "list: metadata did not survive")
            chunks = repo.chunk_list("check-1", "vm.vdi")
            _expect(chunks.size == len(content), "chunk list: wrong size")
            fetched = b"".join(data for _, data in repo.fetch_chunks(c.id for c in chunks.chunks))
            _expect(fetched == content, "fetch: the data read back differs from the data written")
            local = repo.local_chunk_ids(disk)
            _expect(local == [c.id for c in chunks.chunks], "local ids differ from the stored chunk ids")

            try:
                Repository.open(transport, passphrase=passphrase, lock_wait=0.5, base_dir=base).close()
            except RepositoryLocked:
                pass
            else:
                raise TransportCheckFailed("lock: a second open did not wait for the exclusive lock")

            deleted = repo.delete_archives(["check-1"])
            _expect(deleted.deleted == ("check-1",), "delete: the archive was not deleted")
            repo.compact()
            _expect(repo.archives() == [], "delete: the archive is still listed")

        try:
            Repository.open(transport, passphrase=passphrase + "x", base_dir=base).close()
        except PassphraseWrong:
            pass
        else:
            raise TransportCheckFailed("passphrase: a wrong passphrase was accepted")

        with Repository.open(transport, passphrase=passphrase, lock_wait=5, base_dir=base) as repo:
            _expect(repo.archives() == [], "reopen: the repository is not as it was left")
            _expect(repo.check().ok, "check: borg found problems in the repository")
