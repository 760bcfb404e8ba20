"""Repository: real borg repositories in temporary folders."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import PASSPHRASE, disk_content, metadata, vm_specs

import vbremote
from vbremote._borg import _protocol
from vbremote._models import ArchiveFile, encode_comment
from vbremote.testing import MIB, guest_write


def write_disk(tmp_path: Path, content: bytes, name: str = "disk.img") -> vbremote.FileSpec:
    path = tmp_path / name
    path.write_bytes(content)
    return vbremote.FileSpec(path, name, vbremote.FileRole.DISK)


class TestOpen:
    def test_init_then_open(self, transport, base_dir):
        """A repository made by init opens again with the same passphrase and id."""
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as first:
            repo_id = first.id
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as again:
            assert again.id == repo_id
            assert again.encryption == "repokey"
            assert again.block_size == vbremote.DEFAULT_BLOCK_SIZE

    def test_passphrase_callable(self, transport, base_dir):
        """A callable passphrase is asked once at open."""
        calls = []

        def secret() -> str:
            calls.append(1)
            return PASSPHRASE

        vbremote.Repository.init(transport, passphrase=secret, base_dir=base_dir).close()
        vbremote.Repository.open(transport, passphrase=secret, base_dir=base_dir).close()
        assert len(calls) == 2

    def test_missing_repository(self, tmp_path, base_dir):
        """Opening where no repository is raises RepositoryNotFound."""
        with pytest.raises(vbremote.RepositoryNotFound):
            vbremote.Repository.open(vbremote.LocalTransport(tmp_path / "nothing"), base_dir=base_dir)

    def test_init_twice(self, repo, transport, base_dir):
        """init where a repository exists raises RepositoryExists and changes nothing."""
        with pytest.raises(vbremote.RepositoryExists):
            vbremote.Repository.init(transport, passphrase="other", base_dir=base_dir)
        assert repo.archives() == []

    def test_wrong_passphrase(self, repo, transport, base_dir):
        """A wrong passphrase raises PassphraseWrong, saying which repository's key it did not unlock."""
        repo.close()
        with pytest.raises(vbremote.PassphraseWrong, match="does not unlock the key of the repository at"):
            vbremote.Repository.open(transport, passphrase="wrong", base_dir=base_dir)

    def test_missing_passphrase(self, repo, transport, base_dir, monkeypatch):
        """No passphrase anywhere raises PassphraseMissing instead of prompting."""
        repo.close()
        for name in ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD", "BORG_NEW_PASSPHRASE"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(vbremote.PassphraseMissing):
            vbremote.Repository.open(transport, base_dir=base_dir)

    def test_passphrase_from_borg_environment(self, repo, transport, base_dir, monkeypatch):
        """Without passphrase=, borg's own BORG_PASSPHRASE is used."""
        repo.close()
        monkeypatch.setenv("BORG_PASSPHRASE", PASSPHRASE)
        vbremote.Repository.open(transport, base_dir=base_dir).close()

    def test_init_encrypted_without_passphrase(self, transport, base_dir, monkeypatch):
        """init of an encrypted repository without any passphrase is refused before anything is made."""
        for name in ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD", "BORG_NEW_PASSPHRASE"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(vbremote.PassphraseMissing):
            vbremote.Repository.init(transport, base_dir=base_dir)
        assert not Path(transport.path).exists()

    def test_failed_init_leaves_nothing(self, transport, base_dir, monkeypatch):
        """An init whose key cannot be made (a failing BORG_PASSCOMMAND) leaves no half-made repository."""
        for name in ("BORG_PASSPHRASE", "BORG_PASSPHRASE_FD", "BORG_NEW_PASSPHRASE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("BORG_PASSCOMMAND", "false")
        with pytest.raises(vbremote.RepositoryError):
            vbremote.Repository.init(transport, base_dir=base_dir)
        assert not Path(transport.path).exists()

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"encryption": "rot13"}, "encryption"),
            ({"block_size": 3 * MIB}, "block size"),
            ({"lock_wait": -1}, "lock_wait"),
        ],
    )
    def test_bad_init_arguments(self, transport, base_dir, kwargs, match):
        """Invalid init arguments raise ConfigurationError (a ValueError) and create nothing."""
        with pytest.raises(vbremote.ConfigurationError, match=match):
            vbremote.Repository.init(transport, passphrase="x", base_dir=base_dir, **kwargs)
        assert not Path(transport.path).exists()

    def test_bad_compression(self, repo, transport, base_dir):
        """An invalid compression spec raises ConfigurationError."""
        repo.close()
        with pytest.raises(vbremote.ConfigurationError, match="compression"):
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, compression="gzip9")

    def test_locked(self, repo, transport, base_dir):
        """A second open waits lock_wait seconds for borg's lock, then raises RepositoryLocked."""
        with pytest.raises(vbremote.RepositoryLocked):
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=0.3)

    def test_lock_released_on_close(self, repo, transport, base_dir):
        """Closing releases the lock for the next open."""
        repo.close()
        vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=0).close()

    def test_shared_locks(self, repo, transport, base_dir):
        """Two read-only opens share borg's lock."""
        repo.close()
        with (
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, read_only=True),
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, read_only=True, lock_wait=0),
        ):
            pass

    @pytest.mark.parametrize("encryption", vbremote.ENCRYPTION_MODES)
    def test_every_encryption_mode(self, tmp_path, base_dir, encryption):
        """Every borg 1.4 encryption mode round-trips, and local ids equal stored ids."""
        transport = vbremote.LocalTransport(tmp_path / encryption)
        content = disk_content(3) + b"tail"
        spec = write_disk(tmp_path, content)
        with vbremote.Repository.init(
            transport, encryption=encryption, passphrase=PASSPHRASE, base_dir=base_dir
        ) as repo:
            repo.write_archive("a", [spec], metadata())
            chunks = repo.chunk_list("a", spec.path)
            assert repo.local_chunk_ids(spec.source) == [c.id for c in chunks.chunks]
            assert b"".join(d for _, d in repo.fetch_chunks(c.id for c in chunks.chunks)) == content
        with vbremote.Repository.open(
            transport, passphrase=PASSPHRASE, base_dir=base_dir, accept_unencrypted=True
        ) as repo:
            assert [a.name for a in repo.archives()] == ["a"]

    def test_unknown_unencrypted_refused(self, tmp_path, base_dir):
        """An unencrypted repository this user never saw is refused unless accepted (borg would ask)."""
        transport = vbremote.LocalTransport(tmp_path / "plain")
        vbremote.Repository.init(transport, encryption="none", base_dir=base_dir).close()
        other_base = tmp_path / "other-base"
        other_base.mkdir()
        with pytest.raises(vbremote.AccessDenied):
            vbremote.Repository.open(transport, base_dir=other_base)
        vbremote.Repository.open(transport, base_dir=other_base, accept_unencrypted=True).close()

    def test_not_a_transport(self, tmp_path):
        """A transport that is not a Transport raises ConfigurationError."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.Repository.open(str(tmp_path))  # type: ignore[arg-type]


class TestWrite:
    def test_write_and_list(self, repo, vm_folder):
        """An archive lists with its metadata, roles, sizes and chunking."""
        meta = metadata("dev", mode=vbremote.SnapshotMode.ONLINE, labels={"before-upgrade"})
        result = repo.write_archive("dev-1", vm_specs(vm_folder), meta)
        [info] = repo.archives()
        assert info == result.archive
        assert (info.name, info.vm_name, info.vm_uuid, info.mode) == ("dev-1", "dev", meta.vm_uuid, meta.mode)
        assert info.metadata.labels == {"before-upgrade"}
        disk = info.file("vm.vdi")
        assert disk.role is vbremote.FileRole.DISK
        assert disk.size == (vm_folder / "vm.vdi").stat().st_size
        assert disk.chunking.kind == "fixed"
        assert info.file("vm.vbox").chunking.kind == "buzhash"
        assert result.bytes_read == sum(p.stat().st_size for p in vm_folder.iterdir())

    def test_vdi_blocks_stay_aligned(self, repo, vm_folder):
        """A qemu-made VDI gets a header chunk so that a 1 MiB guest write changes one chunk."""
        disk = vm_folder / "vm.vdi"
        first = repo.write_archive("one", vm_specs(vm_folder), metadata())
        assert first.archive.file("vm.vdi").chunking.header_size > 0
        guest_write(disk, 7 * MIB, os.urandom(MIB))
        second = repo.write_archive("two", vm_specs(vm_folder), first.archive.metadata)
        # One changed data block of the disk (the settings and NVRAM files are unchanged).
        assert second.chunks_new == 1
        assert second.bytes_new == MIB

    def test_zero_blocks(self, repo, tmp_path):
        """All-zero blocks are recognised and stored once."""
        spec = write_disk(tmp_path, bytes(5 * MIB) + b"x")
        result = repo.write_archive("zeros", [spec], metadata())
        assert result.chunks_zero == 5
        assert result.chunks_new == 2  # one zero chunk and the tail

    def test_repeated_blocks_stored_once(self, repo, transport, borg_cli, tmp_path):
        """Blocks repeated within one file, next to each other or not, are stored once and read back whole."""
        rng = random.Random(11)
        distinct = [rng.randbytes(MIB) for _ in range(3)]
        content = b"".join(distinct[0] if i % 4 else distinct[(i // 4) % 3] for i in range(48))
        spec = write_disk(tmp_path, content)
        result = repo.write_archive("repeats", [spec], metadata())
        assert (result.chunks, result.chunks_new, result.bytes_new) == (48, 3, 3 * MIB)
        repo.close()
        out = borg_cli.check_and_extract(transport.path, "repeats", tmp_path / "out")
        assert (out / "disk.img").read_bytes() == content

    def test_repeat_read_before_its_first_block(self, repo, tmp_path):
        """A block whose repeat was read first (threads race) is still stored with its own data."""
        for attempt in range(8):
            block = os.urandom(MIB)
            spec = write_disk(tmp_path, block * 2)
            # The first copy leaves the page cache, so the second one is likely read and hashed first.
            fd = os.open(spec.source, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, MIB, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            result = repo.write_archive(f"a{attempt}", [spec], metadata())
            assert (result.chunks, result.chunks_new) == (2, 1)
            ids = [chunk.id for chunk in repo.chunk_list(f"a{attempt}", "disk.img").chunks]
            assert [data for _, data in repo.fetch_chunks(ids)] == [block, block]
        assert repo.check(verify_data=True).ok

    def test_incremental_sends_only_changes(self, repo, tmp_path):
        """A second archive after a small change sends only the changed blocks."""
        content = bytearray(disk_content(10))
        spec = write_disk(tmp_path, bytes(content))
        meta = metadata()
        repo.write_archive("one", [spec], meta)
        content[4 * MIB + 10 : 4 * MIB + 20] = b"0123456789"
        spec.source.write_bytes(bytes(content))
        second = repo.write_archive("two", [spec], meta)
        assert (second.chunks_new, second.bytes_new) == (1, MIB)

    def test_block_size_per_archive(self, repo, tmp_path):
        """The block size can be chosen per archive and is recorded."""
        spec = write_disk(tmp_path, disk_content(8))
        result = repo.write_archive("big", [spec], metadata(), block_size=4 * MIB)
        assert result.archive.files[0].chunking == vbremote.Chunking.fixed(4 * MIB)
        assert result.chunks == 2

    def test_repository_default_block_size(self, tmp_path, base_dir):
        """init records the default block size in the repository."""
        transport = vbremote.LocalTransport(tmp_path / "r")
        vbremote.Repository.init(transport, passphrase="p", base_dir=base_dir, block_size=2 * MIB).close()
        with vbremote.Repository.open(transport, passphrase="p", base_dir=base_dir) as repo:
            assert repo.block_size == 2 * MIB

    def test_timestamp(self, repo, tmp_path):
        """An archive can be given its time, like borg create --timestamp."""
        when = datetime(2024, 3, 31, 1, 30, tzinfo=UTC)
        repo.write_archive("old", [write_disk(tmp_path, b"x")], metadata(), timestamp=when)
        assert repo.archive("old").time == when

    def test_progress(self, repo, tmp_path):
        """Progress events report bytes done up to the total."""
        events: list[vbremote.Progress] = []
        repo.write_archive("p", [write_disk(tmp_path, disk_content(4))], metadata(), progress=events.append)
        assert events
        assert events[-1].done == events[-1].total == 4 * MIB
        assert all(e.operation == "write" for e in events)

    def test_progress_a_few_times_a_second(self, repo, tmp_path):
        """A file gets an event at its first block, at its end, and in between at most one every 0.1 s."""
        events: list[vbremote.Progress] = []
        started = time.monotonic()
        repo.write_archive("p", [write_disk(tmp_path, disk_content(64, seed=8))], metadata(), progress=events.append)
        elapsed = time.monotonic() - started
        assert events[0].done == MIB
        assert events[-1].done == events[-1].total == 64 * MIB
        assert len(events) <= 2 + elapsed / 0.1 + 1

    def test_progress_once_for_a_file_of_one_chunk(self, repo, tmp_path):
        """A file of one chunk, disk or not, gets one progress event."""
        settings = tmp_path / "vm.vbox"
        settings.write_text("<VirtualBox/>")
        events: list[vbremote.Progress] = []
        files = [vbremote.FileSpec(settings, "vm.vbox", vbremote.FileRole.SETTINGS), write_disk(tmp_path, b"x" * 1000)]
        repo.write_archive("s", files, metadata(), progress=events.append)
        assert [(e.path, e.done) for e in events] == [("vm.vbox", 13), ("disk.img", 1013)]

    def test_name_taken(self, repo, tmp_path):
        """Writing an existing name raises ArchiveExists and keeps the first archive."""
        spec = write_disk(tmp_path, b"one")
        repo.write_archive("a", [spec], metadata())
        with pytest.raises(vbremote.ArchiveExists):
            repo.write_archive("a", [spec], metadata())
        assert len(repo.archives()) == 1

    @pytest.mark.parametrize("name", ["", " a", "a/b"])
    def test_bad_names(self, repo, tmp_path, name):
        """Invalid archive names raise ConfigurationError."""
        with pytest.raises(vbremote.ConfigurationError):
            repo.write_archive(name, [write_disk(tmp_path, b"x")], metadata())

    def test_bad_files(self, repo, tmp_path):
        """No files, missing files and duplicate paths raise ConfigurationError; nothing is written."""
        spec = write_disk(tmp_path, b"x")
        with pytest.raises(vbremote.ConfigurationError):
            repo.write_archive("a", [], metadata())
        with pytest.raises(vbremote.ConfigurationError):
            repo.write_archive("a", [vbremote.FileSpec(tmp_path / "none", "none")], metadata())
        with pytest.raises(vbremote.ConfigurationError):
            repo.write_archive("a", [spec, spec], metadata())
        assert repo.archives() == []

    def test_bad_file_compression(self, repo, tmp_path):
        """A file compression borg does not know is refused before anything is written; an empty one at once."""
        good = write_disk(tmp_path, disk_content(3), "good.img")
        other = tmp_path / "vm.sav"
        other.write_bytes(b"state" * 1000)
        with pytest.raises(vbremote.ConfigurationError, match="compression"):
            repo.write_archive("a", [good, vbremote.FileSpec(other, "vm.sav", compression="zstd,99")], metadata())
        assert repo.archives() == []
        with pytest.raises(vbremote.ConfigurationError, match="compression"):
            vbremote.FileSpec(other, "vm.sav", compression="")
        repo.write_archive("a", [good, vbremote.FileSpec(other, "vm.sav", compression="zstd,3")], metadata())
        assert [a.name for a in repo.archives()] == ["a"]

    def test_not_a_regular_file(self, repo, tmp_path):
        """A FIFO (or any non-regular file) is refused before anything is written."""
        good = write_disk(tmp_path, disk_content(3), "good.img")
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(vbremote.ConfigurationError):
            repo.write_archive("a", [good, vbremote.FileSpec(fifo, "fifo")], metadata())
        assert repo.archives() == []

    def test_file_changed_before_read(self, repo, tmp_path):
        """A file whose size changes after write_archive looked at it raises SourceChanged; nothing is committed."""
        first = write_disk(tmp_path, disk_content(48, seed=6), "first.img")
        second = write_disk(tmp_path, b"short", "second.img")

        def grow(event: vbremote.Progress) -> None:
            # While the worker is still busy with the first file, the second one grows.
            if event.path == "first.img" and second.source.stat().st_size == 5:
                with open(second.source, "ab") as f:
                    f.write(b"longer now")

        with pytest.raises(vbremote.SourceChanged, match=r"second\.img"):
            repo.write_archive("a", [first, second], metadata(), progress=grow)
        assert repo.archives() == []
        assert repo.check().ok

    def test_cancelled_write_commits_nothing(self, transport, base_dir, tmp_path):
        """Raising from the progress callback cancels the write: nothing is committed, and the repository is clean."""
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir).close()
        spec = write_disk(tmp_path, disk_content(64, seed=2))

        def cancel(event: vbremote.Progress) -> None:
            if event.done > 0:  # the first event: after the first block, mid-write
                raise KeyboardInterrupt

        repo = vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir)
        with pytest.raises(KeyboardInterrupt):
            repo.write_archive("a", [spec], metadata(), progress=cancel)
        repo.close()
        # borg removes the killed worker's stale lock itself (same host, dead process).
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=5) as again:
            assert again.archives() == []
            assert again.check(verify_data=True).ok
            again.write_archive("a", [spec], metadata())
            assert [a.name for a in again.archives()] == ["a"]

    def test_worker_killed_mid_write(self, transport, base_dir, tmp_path):
        """A crash of the borg side mid-write loses nothing committed and leaves no stale lock."""
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir).close()
        spec = write_disk(tmp_path, disk_content(64, seed=3))
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            repo.write_archive("kept", [spec], metadata())
        repo = vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir)
        spec.source.write_bytes(disk_content(64, seed=4))

        def crash(event: vbremote.Progress) -> None:
            if event.done > 0:  # the first event: after the first block, mid-write
                os.kill(repo._worker._process.pid, 9)

        with pytest.raises(vbremote.RepositoryError, match="ended unexpectedly"):
            repo.write_archive("lost", [spec], metadata(), progress=crash)
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=5) as again:
            assert [a.name for a in again.archives()] == ["kept"]
            assert again.check(verify_data=True).ok

    def test_foreign_archives_are_skipped(self, repo, transport, borg_cli, tmp_path):
        """Archives made by other tools (no vbremote metadata) are not listed."""
        (tmp_path / "f").write_text("x")
        repo.write_archive("ours", [write_disk(tmp_path, b"y")], metadata())
        repo.close()
        borg_cli("create", f"{transport.path}::theirs", "f", cwd=tmp_path)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir) as again:
            assert [a.name for a in again.archives()] == ["ours"]


class TestReadOnly:
    def test_writes_refused_up_front(self, repo, transport, base_dir, tmp_path):
        """A read-only repository refuses every write with RepositoryReadOnly before borg sees it, and stays usable."""
        spec = write_disk(tmp_path, disk_content(3, seed=1))
        repo.write_archive("a", [spec], metadata())
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, read_only=True) as ro:
            assert ro.read_only
            attempts = [
                lambda: ro.write_archive("b", [spec], metadata()),
                lambda: ro.delete_archives(["a"]),
                lambda: ro.set_labels("a", {"protected"}),
                ro.compact,
            ]
            for attempt in attempts:
                with pytest.raises(vbremote.RepositoryReadOnly, match="read_only=True") as caught:
                    attempt()
                assert caught.value.location == transport.location
                # Still in step: reads work after each refusal.
                assert [a.name for a in ro.archives()] == ["a"]
            chunks = ro.chunk_list("a", spec.path)
            assert b"".join(d for _, d in ro.fetch_chunks(c.id for c in chunks.chunks)) == spec.source.read_bytes()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as again:
            [archive] = again.archives()
            assert archive.metadata.labels == frozenset()
            assert again.check().ok

    def test_pruner_refused_on_a_read_only_repository(self, repo, transport, base_dir, tmp_path):
        """Pruning through a read-only repository raises RepositoryReadOnly and deletes nothing; a dry run works."""
        spec = write_disk(tmp_path, b"x")
        meta = metadata()
        now = datetime.now(UTC)
        for n in range(3):
            repo.write_archive(f"a{n}", [spec], meta, timestamp=now.replace(microsecond=0) - timedelta(hours=3 - n))
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, read_only=True) as ro:
            pruner = vbremote.Pruner(ro, vbremote.KeepRules(last=1))
            assert len(pruner.prune(meta.vm_uuid, dry_run=True).plan.prune) == 2
            with pytest.raises(vbremote.RepositoryReadOnly):
                pruner.prune(meta.vm_uuid)
            assert [a.name for a in ro.archives()] == ["a0", "a1", "a2"]


class TestRecovery:
    def test_failed_write_then_delete_and_list(self, repo, tmp_path):
        """After a write that fails (SourceChanged), the worker has rolled back: delete, list and write work."""
        keep = write_disk(tmp_path, disk_content(3, seed=1), "keep.img")
        repo.write_archive("keep", [keep], metadata())
        repo.write_archive("gone", [keep], metadata())
        first = write_disk(tmp_path, disk_content(48, seed=6), "first.img")
        second = write_disk(tmp_path, b"short", "second.img")

        def grow(event: vbremote.Progress) -> None:
            if event.path == "first.img" and second.source.stat().st_size == 5:
                with open(second.source, "ab") as f:
                    f.write(b"longer now")

        with pytest.raises(vbremote.SourceChanged):
            repo.write_archive("failed", [first, second], metadata(), progress=grow)
        assert repo.delete_archives(["gone"]).deleted == ("gone",)
        assert [a.name for a in repo.archives()] == ["keep"]
        repo.write_archive("after", [keep], metadata())
        assert [a.name for a in repo.archives()] == ["keep", "after"]
        assert repo.check().ok

    def test_failed_delete_then_write(self, repo, tmp_path):
        """A refused delete (unknown archive) leaves the repository usable for writes and deletes."""
        spec = write_disk(tmp_path, b"x")
        repo.write_archive("a", [spec], metadata())
        with pytest.raises(vbremote.ArchiveNotFound):
            repo.delete_archives(["a", "missing"])
        repo.write_archive("b", [spec], metadata())
        assert repo.delete_archives(["a"]).deleted == ("a",)
        assert [a.name for a in repo.archives()] == ["b"]


class TestErrorAttributes:
    def test_archive_not_found_names_the_archive(self, repo, tmp_path):
        """ArchiveNotFound carries the archive name, from the worker and from the repository layer."""
        repo.write_archive("a", [write_disk(tmp_path, b"x")], metadata())
        for call in (
            lambda: repo.delete_archives(["a", "nope"]),
            lambda: repo.chunk_list("nope", "disk.img"),
            lambda: repo.archive("nope"),
            lambda: repo.set_labels("nope", {"x"}),
        ):
            with pytest.raises(vbremote.ArchiveNotFound) as caught:
                call()
            assert caught.value.archive == "nope"
            assert caught.value.location == repo.transport.location

    def test_archive_exists_names_the_archive(self, repo, tmp_path):
        """ArchiveExists carries the name that is taken."""
        spec = write_disk(tmp_path, b"x")
        repo.write_archive("taken", [spec], metadata())
        with pytest.raises(vbremote.ArchiveExists) as caught:
            repo.write_archive("taken", [spec], metadata())
        assert caught.value.archive == "taken"

    def test_file_not_in_archive_names_archive_and_path(self, repo, tmp_path):
        """FileNotInArchive carries the archive and the path asked for."""
        repo.write_archive("a", [write_disk(tmp_path, b"x")], metadata())
        with pytest.raises(vbremote.FileNotInArchive) as caught:
            repo.chunk_list("a", "no/such.vdi")
        assert (caught.value.archive, caught.value.path) == ("a", "no/such.vdi")


class TestUntrustedArchives:
    def _hostile(self, borg_cli, transport, tmp_path, name, comment):
        (tmp_path / "f").write_text("x")
        # borg expands {placeholders} in comments: braces are doubled to stay literal.
        literal = comment.replace("{", "{{").replace("}", "}}")
        borg_cli("create", "--comment", literal, f"{transport.path}::{name}", "f", cwd=tmp_path)

    def test_hostile_archive_skipped_and_refused_by_name(self, repo, transport, borg_cli, tmp_path, caplog):
        """A record with a path escaping the VM folder is left out of listings (with a warning) and refused by name."""
        meta = metadata()
        repo.write_archive("good", [write_disk(tmp_path, b"y")], meta)
        repo.close()
        record = _hostile_record(meta.vm_uuid)
        self._hostile(borg_cli, transport, tmp_path, "evil", json.dumps(record))
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir) as again:
            with caplog.at_level("WARNING", logger="vbremote.repository"):
                assert [a.name for a in again.archives()] == ["good"]
                assert [a.name for a in again.archives(vm=meta.vm_uuid)] == ["good"]
            assert any("evil" in r.getMessage() and "stay inside" in r.getMessage() for r in caplog.records)
            with pytest.raises(vbremote.ArchiveMetadataError, match="stay inside") as caught:
                again.archive("evil")
            assert caught.value.archive == "evil"
            assert caught.value.location == transport.location
            with pytest.raises(vbremote.ArchiveMetadataError):
                again.set_labels("evil", {"x"})
            assert again.archive("good").name == "good"

    def test_implausible_time_is_refused(self, repo, transport, borg_cli, tmp_path):
        """A valid record on an archive dated before 1970 is refused; the same record dated now is listed."""
        meta = metadata()
        record = json.loads(encode_comment(meta, [
            ArchiveFile("vm.vbox", vbremote.FileRole.SETTINGS, 1, vbremote.Chunking.buzhash())
        ]))
        repo.close()
        self._hostile(borg_cli, transport, tmp_path, "now", json.dumps(record))
        (tmp_path / "f").write_text("x")
        literal = json.dumps(record).replace("{", "{{").replace("}", "}}")
        borg_cli("create", "--timestamp", "1969-07-20T20:17:40", "--comment", literal,
                 f"{transport.path}::ancient", "f", cwd=tmp_path)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir) as again:
            assert [a.name for a in again.archives()] == ["now"]
            with pytest.raises(vbremote.ArchiveMetadataError, match="implausible time") as caught:
                again.archive("ancient")
            assert caught.value.archive == "ancient"

    def test_pruner_never_deletes_what_it_cannot_read(self, repo, transport, borg_cli, tmp_path):
        """The Pruner plans only readable archives: a hostile one of the same VM is never deleted or counted."""
        meta = metadata()
        spec = write_disk(tmp_path, b"y")
        now = datetime.now(UTC).replace(microsecond=0)
        for n in range(3):
            repo.write_archive(f"good{n}", [spec], meta, timestamp=now - timedelta(hours=10 - n))
        repo.close()
        self._hostile(borg_cli, transport, tmp_path, "evil", json.dumps(_hostile_record(meta.vm_uuid)))
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir) as again:
            result = vbremote.Pruner(again, vbremote.KeepRules(last=1)).prune(meta.vm_uuid)
            assert sorted(result.deleted) == ["good0", "good1"]
        listed = borg_cli("list", "--short", transport.path).split()
        assert sorted(listed) == ["evil", "good2"]


def _hostile_record(vm_uuid: str) -> dict[str, object]:
    """A vbremote record whose one file would be restored outside the VM folder."""
    return {
        "vbremote": 1, "vm": {"name": "dev", "uuid": vm_uuid}, "mode": "offline", "labels": [], "extra": {},
        "vbox_version": None, "host": None, "cpu_vendor": None, "cpu_portability": None,
        "files": [
            {"path": "../../../etc/cron.d/x", "role": "other", "size": 1, "chunking": ["buzhash", 19, 23, 21, 4095]}
        ],
    }


class TestSelection:
    def test_by_uuid_and_name(self, repo, tmp_path):
        """vm= selects by uuid or by name; 'dev' never selects 'dev2'."""
        spec = write_disk(tmp_path, b"x")
        dev, dev2 = metadata("dev"), metadata("dev2")
        repo.write_archive("dev-1", [spec], dev)
        repo.write_archive("dev2-1", [spec], dev2)
        repo.write_archive("dev-2", [spec], dev)
        assert [a.name for a in repo.archives(vm="dev")] == ["dev-1", "dev-2"]
        assert [a.name for a in repo.archives(vm=dev2.vm_uuid)] == ["dev2-1"]
        assert repo.archives(vm="nope") == []

    def test_renamed_vm_keeps_history(self, repo, tmp_path):
        """Selecting by the new name finds the archives taken under the old name."""
        spec = write_disk(tmp_path, b"x")
        old = metadata("old-name")
        repo.write_archive("a1", [spec], old)
        repo.write_archive("a2", [spec], metadata("new-name", old.vm_uuid))
        assert [a.name for a in repo.archives(vm="new-name")] == ["a1", "a2"]

    def test_ambiguous_name(self, repo, tmp_path):
        """A name used by two VMs must be given as a uuid."""
        spec = write_disk(tmp_path, b"x")
        repo.write_archive("a1", [spec], metadata("same"))
        repo.write_archive("a2", [spec], metadata("same"))
        with pytest.raises(vbremote.ConfigurationError, match="uuid"):
            repo.archives(vm="same")

    def test_missing_archive(self, repo):
        """archive() of an unknown name raises ArchiveNotFound."""
        with pytest.raises(vbremote.ArchiveNotFound):
            repo.archive("nope")


class TestRead:
    def test_chunk_list_offsets(self, repo, tmp_path):
        """A chunk list covers the file with contiguous offsets."""
        content = disk_content(3) + b"tail"
        spec = write_disk(tmp_path, content)
        repo.write_archive("a", [spec], metadata())
        chunks = repo.chunk_list("a", spec.path)
        assert chunks.size == len(content)
        assert [c.offset for c in chunks.chunks] == [0, MIB, 2 * MIB, 3 * MIB]
        assert [c.size for c in chunks.chunks] == [MIB, MIB, MIB, 4]

    def test_chunk_list_errors(self, repo, tmp_path):
        """Unknown archives and paths raise their own errors."""
        repo.write_archive("a", [write_disk(tmp_path, b"x")], metadata())
        with pytest.raises(vbremote.ArchiveNotFound):
            repo.chunk_list("b", "disk.img")
        with pytest.raises(vbremote.FileNotInArchive):
            repo.chunk_list("a", "other.img")

    def test_fetch_in_order_and_early_exit(self, repo, tmp_path):
        """fetch_chunks yields in the order asked, and a loop left early leaves the repository usable."""
        content = disk_content(200, seed=3)
        spec = write_disk(tmp_path, content)
        repo.write_archive("a", [spec], metadata())
        ids = [c.id for c in repo.chunk_list("a", spec.path).chunks]
        wanted = list(reversed(ids))
        got = [chunk_id for chunk_id, _ in repo.fetch_chunks(wanted)]
        assert got == wanted
        for _ in repo.fetch_chunks(ids):
            break
        assert len(repo.archives()) == 1

    def test_fetch_missing_chunk(self, repo):
        """Fetching an id the repository lacks raises IntegrityError."""
        with pytest.raises(vbremote.IntegrityError):
            list(repo.fetch_chunks([bytes(32)]))

    def test_corruption_is_detected(self, repo, transport, tmp_path):
        """A flipped byte in a stored chunk raises IntegrityError naming the chunk."""
        content = os.urandom(MIB)
        spec = write_disk(tmp_path, content)
        repo.write_archive("a", [spec], metadata())
        chunk_id = repo.chunk_list("a", spec.path).chunks[0].id
        repo.close()
        segment = max(Path(transport.path, "data").rglob("[0-9]*"), key=lambda p: p.stat().st_size)
        data = bytearray(segment.read_bytes())
        data[len(data) // 2] ^= 0xFF
        segment.write_bytes(bytes(data))
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=repo_base(repo)) as again:
            with pytest.raises(vbremote.IntegrityError) as caught:
                list(again.fetch_chunks([chunk_id]))
            assert caught.value.chunk_id == chunk_id.hex()
            assert not again.check(verify_data=True).ok

    def test_local_ids_need_fixed_chunking(self, repo, tmp_path):
        """local_chunk_ids refuses a content-defined chunking and a missing file."""
        spec = write_disk(tmp_path, b"x")
        with pytest.raises(vbremote.ConfigurationError):
            repo.local_chunk_ids(spec.source, chunking=vbremote.Chunking.buzhash())
        with pytest.raises(vbremote.ConfigurationError):
            repo.local_chunk_ids(tmp_path / "none")

    def test_threads_share_a_repository(self, repo, tmp_path):
        """Calls from several threads run one at a time and all succeed."""
        spec = write_disk(tmp_path, disk_content(4))
        repo.write_archive("a", [spec], metadata())
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(5):
                    ids = [c.id for c in repo.chunk_list("a", spec.path).chunks]
                    assert len(list(repo.fetch_chunks(ids))) == 4
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def repo_base(repo: vbremote.Repository) -> Path:
    # The fixture's base folder sits beside the repository folder.
    return Path(repo.transport.path).parent / "borg-base"


def corrupt_one_chunk(transport: vbremote.LocalTransport) -> None:
    """Flip one byte in the middle of the largest segment file (inside one stored chunk)."""
    segment = max(Path(transport.path, "data").rglob("[0-9]*"), key=lambda p: p.stat().st_size)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))


def swap_two_chunks(transport: vbremote.LocalTransport, ids: list[bytes]) -> tuple[bytes, bytes]:
    """Swap the stored (encrypted) data of the first two of ``ids`` that have equal stored sizes in one segment.

    Both entries keep valid segment checksums, still authenticate (a MAC covers only
    the ciphertext) and decrypt: only the id check of the plaintext can tell that
    each now holds the other's data. Returns the two ids.
    """
    entries: dict[bytes, tuple[Path, int, int]] = {}
    for segment in Path(transport.path, "data").rglob("[0-9]*"):
        if not segment.is_file():
            continue
        data = segment.read_bytes()
        offset = 8  # the segment magic
        while offset < len(data):
            size, tag = int.from_bytes(data[offset + 4:offset + 8], "little"), data[offset + 8]
            if tag == 0:  # a PUT: crc, size, tag, key, data
                entries[data[offset + 9:offset + 41]] = (segment, offset, size)
            offset += size
    a, b = next(
        (a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
        if a != b and entries[a][0] == entries[b][0] and entries[a][2] == entries[b][2]
    )
    (path, at_a, size), (_, at_b, _) = entries[a], entries[b]
    data = bytearray(path.read_bytes())
    body_a, body_b = bytes(data[at_a + 41:at_a + size]), bytes(data[at_b + 41:at_b + size])
    for at, body in ((at_a, body_b), (at_b, body_a)):
        data[at + 41:at + size] = body
        data[at:at + 4] = zlib.crc32(body, zlib.crc32(bytes(data[at + 4:at + 41]))).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return a, b


def count_requests(repo: vbremote.Repository, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the op of every request the repository sends its worker from now on."""
    ops: list[str] = []
    worker = repo._worker
    post = worker._post

    def counting(message: object) -> None:
        if isinstance(message, _protocol.Request):
            ops.append(message.op)
        post(message)

    monkeypatch.setattr(worker, "_post", counting)
    return ops


class TestFetch:
    def test_each_distinct_id_once_in_order(self, repo, tmp_path):
        """fetch yields each distinct id once, in the order of first appearance, with its data."""
        content = disk_content(12, seed=5)
        spec = write_disk(tmp_path, content)
        repo.write_archive("a", [spec], metadata())
        refs = repo.chunk_list("a", spec.path).chunks
        data = {r.id: content[r.offset : r.offset + r.size] for r in refs}
        asked = [r.id for r in reversed(refs)] * 3
        with repo.fetch(asked) as chunks:
            got = list(chunks)
        assert [c.id for c in got] == list(dict.fromkeys(asked))
        assert all(c.data == data[c.id] and c.error is None for c in got)
        assert chunks.ids == tuple(dict.fromkeys(asked))

    def test_one_request_for_the_whole_list(self, repo, tmp_path, monkeypatch):
        """A fetch of many chunks is one request to the worker (one pipelined get_many), not one per batch."""
        spec = write_disk(tmp_path, disk_content(150, seed=6))
        repo.write_archive("a", [spec], metadata())
        ids = [c.id for c in repo.chunk_list("a", spec.path).chunks]
        ops = count_requests(repo, monkeypatch)
        with repo.fetch(ids) as chunks:
            assert sum(1 for _ in chunks) == len(set(ids))
        assert ops == ["fetch"]

    def test_leaving_early_cancels_and_stays_in_step(self, repo, tmp_path):
        """Leaving the with block after two chunks cancels the rest; the next calls work."""
        content = os.urandom(32 * MIB)
        spec = write_disk(tmp_path, content)
        repo.write_archive("a", [spec], metadata())
        ids = [c.id for c in repo.chunk_list("a", spec.path).chunks]
        with repo.fetch(ids) as chunks:
            for count, _ in enumerate(chunks, 1):
                if count == 2:
                    break
        assert [a.name for a in repo.archives()] == ["a"]
        with repo.fetch(ids) as chunks:
            assert b"".join(c.data for c in chunks) == content

    def test_exception_in_the_block_cancels(self, repo, tmp_path):
        """An exception raised inside the with block cancels the stream and goes on; the repository is usable."""
        spec = write_disk(tmp_path, os.urandom(16 * MIB))
        repo.write_archive("a", [spec], metadata())
        ids = [c.id for c in repo.chunk_list("a", spec.path).chunks]

        def fail_inside() -> None:
            with repo.fetch(ids) as chunks:
                next(iter(chunks))
                raise LookupError("caller failed")

        with pytest.raises(LookupError):
            fail_inside()
        assert len(repo.archives()) == 1
        assert len(list(repo.fetch_chunks(ids))) == len(ids)

    def test_missing_chunk_is_reported_and_the_rest_follow(self, repo, tmp_path):
        """With errors="report" a missing id comes back with an IntegrityError naming it; the others follow."""
        content = os.urandom(6 * MIB)
        spec = write_disk(tmp_path, content)
        repo.write_archive("a", [spec], metadata())
        ids = [c.id for c in repo.chunk_list("a", spec.path).chunks]
        missing = bytes(range(32))
        asked = [*ids[:2], missing, *ids[2:]]
        with repo.fetch(asked, errors="report") as chunks:
            got = list(chunks)
        assert [c.id for c in got] == list(dict.fromkeys(asked))
        bad = [c for c in got if c.error is not None]
        assert [c.id for c in bad] == [missing]
        assert bad[0].error.chunk_id == missing.hex()
        assert bad[0].data == b""
        assert b"".join(c.data for c in got) == content

    def test_missing_chunk_raises_by_default(self, repo, tmp_path):
        """By default a missing id raises IntegrityError naming it, and the repository stays usable."""
        spec = write_disk(tmp_path, disk_content(3, seed=8))
        repo.write_archive("a", [spec], metadata())
        ids = [c.id for c in repo.chunk_list("a", spec.path).chunks]
        missing = bytes(range(32))
        with pytest.raises(vbremote.IntegrityError) as caught, repo.fetch([ids[0], missing, *ids[1:]]) as chunks:
            list(chunks)
        assert caught.value.chunk_id == missing.hex()
        assert len(list(repo.fetch_chunks(ids))) == len(ids)

    def test_corrupt_chunk_reported_by_id(self, repo, transport, tmp_path):
        """One damaged chunk in a real segment: reported by its id, every other chunk arrives intact."""
        content = os.urandom(8 * MIB)
        spec = write_disk(tmp_path, content)
        repo.write_archive("a", [spec], metadata())
        refs = repo.chunk_list("a", spec.path).chunks
        repo.close()
        corrupt_one_chunk(transport)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=repo_base(repo)) as again:
            with again.fetch([r.id for r in refs], errors="report") as chunks:
                got = list(chunks)
            bad = [c for c in got if c.error is not None]
            assert len(bad) == 1
            assert bad[0].error.chunk_id == bad[0].id.hex()
            assert len(got) == len(refs)
            for ref, chunk in zip(refs, got, strict=True):
                assert chunk.id == ref.id
                if chunk.error is None:
                    assert chunk.data == content[ref.offset : ref.offset + ref.size]
            with pytest.raises(vbremote.IntegrityError) as caught, again.fetch([r.id for r in refs]) as chunks:
                list(chunks)
            assert caught.value.chunk_id == bad[0].id.hex()

    def test_swapped_chunks_fail_the_id_check(self, repo, transport, tmp_path):
        """Two stored chunks with their data swapped authenticate and decrypt, and still fail: their ids differ."""
        content = os.urandom(4 * MIB)
        spec = write_disk(tmp_path, content)
        repo.write_archive("a", [spec], metadata())
        refs = repo.chunk_list("a", spec.path).chunks
        repo.close()
        assert swap_two_chunks(transport, [r.id for r in refs[1:]]) == (refs[1].id, refs[2].id)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=repo_base(repo)) as again:
            with again.fetch([r.id for r in refs], errors="report") as chunks:
                got = {c.id: c for c in chunks}
            assert [got[r.id].error is not None for r in refs] == [False, True, True, False]
            assert "id verification failed" in str(got[refs[1].id].error)
            assert got[refs[3].id].data == content[3 * MIB:]
            with pytest.raises(vbremote.IntegrityError) as caught, again.fetch([r.id for r in refs]) as chunks:
                list(chunks)
            assert caught.value.chunk_id == refs[1].id.hex()

    def test_memory_stays_bounded(self, repo, tmp_path):
        """A slow reader of a long fetch keeps the worker's memory flat: it waits on the pipe, not reading ahead."""
        spec = write_disk(tmp_path, os.urandom(128 * MIB))
        repo.write_archive("a", [spec], metadata())
        ids = [c.id for c in repo.chunk_list("a", spec.path).chunks]
        status = Path(f"/proc/{repo._worker._process.pid}/status")
        if not status.exists():
            pytest.skip("needs /proc to read the worker's memory")

        def rss() -> int:
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
            return int(line.split()[1]) * 1024

        before = rss()
        with repo.fetch(ids) as chunks:
            stream = iter(chunks)
            next(stream)
            time.sleep(1.0)  # time enough to read every chunk ahead, if it would
            grown = rss() - before
            assert sum(1 for _ in stream) == len(ids) - 1
        assert grown < 32 * MIB

    def test_bad_arguments(self, repo):
        """An id that is not 32 bytes, or an unknown errors mode, raises ConfigurationError before anything is sent."""
        with pytest.raises(vbremote.ConfigurationError, match="32 bytes"):
            repo.fetch([b"short"])
        with pytest.raises(vbremote.ConfigurationError, match="errors"):
            repo.fetch([bytes(32)], errors="ignore")  # type: ignore[arg-type]
        with repo.fetch([]) as chunks:
            assert list(chunks) == []


class TestDeleteCompactCheck:
    def test_delete_and_compact_free_space(self, repo, tmp_path):
        """Deleting an archive and compacting frees its unique data."""
        spec = write_disk(tmp_path, os.urandom(4 * MIB))
        repo.write_archive("a", [spec], metadata())
        result = repo.delete_archives(["a"])
        assert result.deleted == ("a",)
        assert result.append_only is False
        compacted = repo.compact()
        assert compacted.freed_bytes is not None
        assert compacted.freed_bytes >= 4 * MIB
        assert repo.archives() == []

    def test_delete_unknown_changes_nothing(self, repo, tmp_path):
        """Deleting a list with an unknown name deletes nothing."""
        repo.write_archive("a", [write_disk(tmp_path, b"x")], metadata())
        with pytest.raises(vbremote.ArchiveNotFound):
            repo.delete_archives(["a", "b"])
        assert [a.name for a in repo.archives()] == ["a"]

    def test_shared_chunks_survive_delete(self, repo, tmp_path):
        """Chunks shared with a remaining archive stay readable after delete and compact."""
        content = disk_content(3)
        spec = write_disk(tmp_path, content)
        meta = metadata()
        repo.write_archive("a", [spec], meta)
        repo.write_archive("b", [spec], meta)
        repo.delete_archives(["a"])
        repo.compact()
        ids = [c.id for c in repo.chunk_list("b", spec.path).chunks]
        assert b"".join(d for _, d in repo.fetch_chunks(ids)) == content
        assert repo.check(verify_data=True).ok

    def test_append_only_repository(self, tmp_path, base_dir, borg_cli):
        """In an append-only repository a delete frees nothing, and the result says so."""
        transport = vbremote.LocalTransport(tmp_path / "ao")
        borg_cli("init", "--encryption=repokey", "--append-only", transport.path)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            assert repo.append_only is True
            repo.write_archive("a", [write_disk(tmp_path, os.urandom(2 * MIB))], metadata())
            assert repo.delete_archives(["a"]).append_only is True
            compacted = repo.compact()
            assert compacted.append_only is True
            assert compacted.freed_bytes == 0


class TestRelocated:
    def test_moved_repository(self, tmp_path, base_dir):
        """A repository moved since last use is refused (borg would ask) unless accept_relocated."""
        first = vbremote.LocalTransport(tmp_path / "a")
        vbremote.Repository.init(first, passphrase=PASSPHRASE, base_dir=base_dir).close()
        moved = tmp_path / "b"
        Path(first.path).rename(moved)
        with pytest.raises(vbremote.AccessDenied, match="accept_relocated"):
            vbremote.Repository.open(vbremote.LocalTransport(moved), passphrase=PASSPHRASE, base_dir=base_dir)
        vbremote.Repository.open(
            vbremote.LocalTransport(moved), passphrase=PASSPHRASE, base_dir=base_dir, accept_relocated=True
        ).close()


class TestMetadataCache:
    def test_second_listing_reads_no_archive_metadata(self, repo, tmp_path):
        """Archive metadata is read once per archive id; later listings only read the manifest."""
        spec = write_disk(tmp_path, b"x")
        for n in range(5):
            repo.write_archive(f"a{n}", [spec], metadata())
        replies: list[list[dict[str, object]]] = []
        call = repo._worker.call

        def spy(op: str, progress=None, **kwargs):
            result = call(op, progress, **kwargs)
            if op == "archives":
                replies.append(result)
            return result

        repo._worker.call = spy
        # write_archive already knows what it wrote: no comment is read back.
        assert len(repo.archives()) == 5
        assert all(comment is None for _, _, _, comment in replies[-1])

    def _cached_then_gone(self, repo, transport, borg_cli, tmp_path, names):
        """Write archives and list them (filling the cache); then remove their metadata from the repository."""
        spec = write_disk(tmp_path, b"x")
        for name in names:
            repo.write_archive(name, [spec], metadata(name))
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir) as again:
            archives = again.archives()
        assert [a.name for a in archives] == names
        [cache_file] = borg_cli.base_dir.rglob("vbremote/*.json")
        # Without their metadata objects the repository cannot describe these
        # archives any more: only the cache can.
        borg_cli("debug", "delete-obj", transport.path, *(a.id for a in archives))
        return cache_file, archives

    def test_metadata_read_from_the_cache(self, repo, transport, borg_cli, tmp_path):
        """A new connection lists archives from the cache file, without reading their metadata from the repository."""
        names = [f"a{n}" for n in range(4)]
        self._cached_then_gone(repo, transport, borg_cli, tmp_path, names)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir) as again:
            assert [(a.name, a.vm_name) for a in again.archives()] == [(n, n) for n in names]

    def test_tampered_entry_is_ignored(self, repo, transport, borg_cli, tmp_path):
        """A cache entry whose comment was changed fails its MAC and is fetched from the repository again."""
        cache_file, _ = self._cached_then_gone(repo, transport, borg_cli, tmp_path, ["a"])
        data = json.loads(cache_file.read_text())
        [(archive_id, (comment, mac))] = data["entries"].items()
        data["entries"][archive_id] = [comment.replace('"name":"a"', '"name":"forged"'), mac]
        cache_file.write_text(json.dumps(data))
        with (
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir) as again,
            # The repository no longer has the object, so the refetch fails: the forged entry was not used.
            pytest.raises(vbremote.IntegrityError),
        ):
            again.archives()

    def test_entry_bound_to_its_archive(self, repo, transport, borg_cli, tmp_path):
        """An entry moved to another archive's id fails its MAC: archive a cannot claim b's metadata."""
        cache_file, archives = self._cached_then_gone(repo, transport, borg_cli, tmp_path, ["a", "b"])
        data = json.loads(cache_file.read_text())
        a_id, b_id = archives[0].id, archives[1].id
        data["entries"][a_id] = data["entries"][b_id]
        cache_file.write_text(json.dumps(data))
        with (
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir) as again,
            pytest.raises(vbremote.IntegrityError),
        ):
            again.archives()

    def test_tampered_entry_is_refetched(self, repo, transport, base_dir, tmp_path):
        """With the repository intact, a tampered entry is refetched: the listing says what the repository says."""
        spec = write_disk(tmp_path, b"x")
        repo.write_archive("a", [spec], metadata("real"))
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as again:
            again.archives()
        [cache_file] = base_dir.rglob("vbremote/*.json")
        data = json.loads(cache_file.read_text())
        [(archive_id, (comment, mac))] = data["entries"].items()
        data["entries"][archive_id] = [comment.replace('"name":"real"', '"name":"forged"'), mac]
        cache_file.write_text(json.dumps(data))
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as again:
            assert [a.vm_name for a in again.archives()] == ["real"]
        cache_file.write_text("{not json")
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as again:
            assert [a.vm_name for a in again.archives()] == ["real"]

    def test_no_cache_without_a_key(self, tmp_path, base_dir):
        """An unencrypted repository has no secret to authenticate a cache with, so none is written."""
        transport = vbremote.LocalTransport(tmp_path / "plain")
        with vbremote.Repository.init(transport, encryption="none", base_dir=base_dir) as plain:
            plain.write_archive("a", [write_disk(tmp_path, b"x")], metadata())
        with vbremote.Repository.open(transport, base_dir=base_dir, accept_unencrypted=True) as again:
            assert [a.name for a in again.archives()] == ["a"]
        assert list(base_dir.rglob("vbremote/*.json")) == []

    def test_set_labels_unknown_archive(self, repo):
        """set_labels on an unknown archive raises ArchiveNotFound."""
        with pytest.raises(vbremote.ArchiveNotFound):
            repo.set_labels("nope", {"x"})
